"""Conversions that ``load()`` makes on the fly, kept under ``~/.cache/openelm-mlx``.

``load("apple/OpenELM-270M")`` or ``load("folder/with/pytorch_model.bin")`` converts once and
reuses the result.  An entry is keyed on the source, the dtype (``auto`` resolves by backend:
float32 on the CPU, bfloat16 on a GPU) and the backend, so a conversion made on one device or in
one dtype is never served for another.  Each entry records the source's content identity (the resolved Hub snapshot
or local path, and for every file the conversion reads: its size, modification time and a hash of
its first and last 64 KiB, which hold safetensors headers and zip directories): when the source
changes, the next ``load()`` converts it again instead of silently serving the old weights.

``openelm-mlx cache --list`` shows the entries; ``--clear`` removes them (only directories this
module wrote: it never deletes anything else, even if OPENELM_MLX_CACHE points somewhere odd).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import OpenELMError

MARKER = "openelm-mlx-source.json"  # written into each entry after a complete conversion
_EDGE = 64 * 1024
_READ_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model")


def cache_root() -> Path:
    return Path(os.environ.get("OPENELM_MLX_CACHE", Path.home() / ".cache" / "openelm-mlx")).expanduser()


def _files_read(path: Path) -> list[Path]:
    """The files a conversion of ``path`` can read (weights, configs, index, tokenizer)."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(_READ_SUFFIXES))
    beside = [path.parent / n for n in ("config.json", "generation_config.json", "tokenizer.model")]
    return [path] + [p for p in beside if p.is_file()]


def fingerprint(path: Path) -> str:
    """Content identity of a local source: names, sizes, mtimes, and hashes of each file's ends."""
    h = hashlib.sha256()
    for f in _files_read(path):
        st = f.stat()  # follows the Hub cache's symlinks to the blobs
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(_EDGE))
            if st.st_size > 2 * _EDGE:
                fh.seek(-_EDGE, os.SEEK_END)
                h.update(fh.read(_EDGE))
    return h.hexdigest()


def _resolve(src: str) -> tuple[Path, str]:
    """(local folder or file, identity) of ``src``; a Hub repo id is fetched (or found in the HF cache)."""
    from .convert import hub

    path = Path(src).expanduser()
    if path.exists():
        return path.resolve(), str(path.resolve())
    if hub.looks_like_repo_id(src) and not hub.looks_local_path(src):
        return hub.download_checkpoint(src), src
    raise OpenELMError(f"{src}: no such file or directory (and not a Hub repo id like apple/OpenELM-270M)")


def backend() -> str:
    """The device kind conversions are made for ("cpu" or "gpu")."""
    import mlx.core as mx

    return "cpu" if mx.default_device() == mx.cpu else "gpu"


def entry_dir(identity: str, dtype: str, device: str) -> Path:
    name = Path(identity).name or "model"
    key = f"{identity}\0{dtype}\0{device}"
    return cache_root() / f"{name}-{dtype}-{device}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def _read_marker(entry: Path) -> dict:
    try:
        data = json.loads((entry / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def convert_into_cache(
    src: str, dtype: str = "auto", log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)
) -> Path:
    """The cached conversion of ``src`` in ``dtype`` for this backend, converting (again) when it
    is missing or the source changed."""
    from .convert.pipeline import convert, pick_dtype

    dtype, _ = pick_dtype(dtype)
    device = backend()
    local, identity = _resolve(src)
    dst = entry_dir(identity, dtype, device)
    current = fingerprint(local)
    recorded = _read_marker(dst)
    same = recorded.get("dtype") == dtype and recorded.get("backend") == device
    if recorded.get("fingerprint") == current and same and (dst / "config.json").is_file():
        return dst
    if recorded:
        log(f"{src} changed since it was converted into {dst}: converting it again ...")
    else:
        log(f"converting {src} into {dst} (once) ...")
    cache_root().mkdir(parents=True, exist_ok=True)
    # Convert what was fingerprinted: the resolved local copy, not the repo id a second time.
    convert(str(local), dst, dtype=dtype, force=dst.exists(), log=log)
    marker = {"source": src, "path": str(local), "fingerprint": current, "dtype": dtype, "backend": device}
    tmp = dst / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=2) + "\n")
    os.replace(tmp, dst / MARKER)  # atomic: a killed run leaves no marker, so it converts again
    return dst


@dataclass
class Entry:
    path: Path
    source: str
    state: str  # current, stale, source gone
    nbytes: int


def entries() -> list[Entry]:
    root = cache_root()
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        marker = _read_marker(d) if d.is_dir() else {}
        if not marker:
            continue
        local = Path(marker.get("path", ""))
        if not local.exists():
            state = "source gone"
        else:
            state = "current" if fingerprint(local) == marker.get("fingerprint") else "stale (source changed)"
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        out.append(Entry(d, str(marker.get("source", "?")), state, size))
    return out


def clear(log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> tuple[int, int]:
    """Remove every entry this module wrote, and leftovers of interrupted conversions into it.
    An entry that holds anything else (files put there since) is kept, and said so."""
    from .convert.writer import clean_stale
    from .destinations import MODEL_FILES, refusal

    removed = freed = 0
    for e in entries():
        why = refusal(e.path, MODEL_FILES, legacy=True)  # its openelm-mlx-source.json vouches for it
        if why is not None:
            log(f"kept {e.path}: {why}")
            continue
        clean_stale(e.path)
        shutil.rmtree(e.path)
        removed, freed = removed + 1, freed + e.nbytes
    return removed, freed


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("cache", help="list or clear the conversions load() keeps (~/.cache/openelm-mlx)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--list", action="store_true", help="list the cached conversions (the default)")
    g.add_argument("--clear", action="store_true", help="remove every cached conversion")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    root = cache_root()
    if args.clear:
        removed, freed = clear()
        print(f"removed {removed} cached conversion(s), {_mb(freed)}, from {root}")
        return 0
    found = entries()
    if not found:
        print(f"no cached conversions in {root}")
        return 0
    for e in found:
        print(f"{e.path.name}  {_mb(e.nbytes):>9}  {e.state:<22}  {e.source}")
    print(f"{len(found)} cached conversion(s), {_mb(sum(e.nbytes for e in found))}, in {root}")
    return 0
