"""Writing a model directory so that nothing the user had is ever half-replaced or lost.

All files go to a hidden sibling ``.NAME.partial-PID``; only a complete, verified
directory is renamed to its final name.  ``--force`` swaps an existing directory
out with two renames, and leftovers of killed runs are removed (and reported) by
the next run.  A destination that is or holds the source is always refused; so is one
that is not empty and not a model directory openelm-mlx wrote (destinations.py).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx

from ..destinations import MODEL_FILES, check_replaceable, write_marker
from ..errors import OpenELMError

SHARD_BYTES = 5 * 2**30
_PARTIAL = ".partial-"
_OLD = ".old-"
# What a conversion writes (and the conversion cache's marker): --force replaces only this.
WRITTEN = MODEL_FILES


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def is_converted_model(folder: Path) -> bool:
    """A directory openelm-mlx wrote before it left markers: its config.json has our block and it
    holds only our files (with a marker, ``destinations.refusal`` decides)."""
    if not folder.is_dir() or folder.is_symlink():
        return False
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(raw, dict) or not isinstance(raw.get("openelm_mlx"), dict):
        return False
    return all(WRITTEN.fullmatch(p.name) for p in folder.iterdir())


def check_destination(dst: Path, force: int, sources: list[Path], flag: str = "--mlx-path") -> None:
    """Refuse a destination whose replacement would lose something the user had.

    With ``force``, an earlier output of openelm-mlx (or an empty folder) is replaced; nothing
    else ever is."""
    target = dst.expanduser().resolve()
    for s in sources:
        src = s.expanduser().resolve()
        if src == target or target in src.parents:
            what = "is" if src == target else "contains"
            raise OpenELMError(
                f"{flag} {dst} {what} the source {s}: writing there would delete it; choose another directory"
            )
    if not (dst.exists() or dst.is_symlink()):
        return
    if not force:
        raise OpenELMError(f"{dst} already exists; pass --force to replace it")
    check_replaceable(dst, flag, MODEL_FILES, legacy=is_converted_model(dst))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(dst: Path) -> list[str]:
    """Tidy up after runs that died; returns a message per thing done.

    A killed ``--force`` run may have moved the previous ``dst`` aside and not yet put the
    new one in place: the previous one is restored.  Partial outputs are removed.
    """
    done = []
    for p in sorted(dst.parent.glob(f".{dst.name}.*")):
        for marker in (_PARTIAL, _OLD):
            tail = p.name[len(f".{dst.name}") :]
            if not (tail.startswith(marker) and tail[len(marker) :].isdigit()):
                continue
            if _pid_alive(int(tail[len(marker) :])):
                continue
            if marker == _OLD and not (dst.exists() or dst.is_symlink()):
                os.rename(p, dst)
                done.append(f"restored {dst} from {p.name}, left aside by an interrupted --force conversion")
            else:
                _remove(p)
                done.append(f"removed {p}, left behind by an interrupted conversion")
    return done


@contextmanager
def staging_dir(dst: Path, force: bool) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``dst``; on success it becomes ``dst``, else it vanishes."""
    dst = dst.expanduser().absolute()
    if (dst.exists() or dst.is_symlink()) and not force:
        raise OpenELMError(f"{dst} already exists; pass --force to replace it")
    check_replaceable(dst, "--mlx-path", MODEL_FILES, legacy=is_converted_model(dst))
    tmp = dst.parent / f".{dst.name}{_PARTIAL}{os.getpid()}"
    _remove(tmp)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise OpenELMError(f"{dst.parent}: cannot create the output ({e.strerror})") from None
    try:
        yield tmp
        write_marker(tmp, "output")  # what lets a later --force replace this folder, and only this
        _fsync_tree(tmp)
        if dst.exists() or dst.is_symlink():
            # Again at the swap: the folder may have changed while the new output was written.
            check_replaceable(dst, "--mlx-path", MODEL_FILES, legacy=is_converted_model(dst))
            old = dst.parent / f".{dst.name}{_OLD}{os.getpid()}"
            os.rename(dst, old)
            try:
                os.rename(tmp, dst)
            except BaseException:
                os.rename(old, dst)  # put back what the user had
                raise
            _remove(old)  # a directory, a file or a link: no backup is left behind
        else:
            os.rename(tmp, dst)
    except BaseException:
        _remove(tmp)
        raise


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def save_weights(folder: Path, weights: dict[str, mx.array]) -> list[str]:
    """``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` shards with an index above 5 GB."""
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for name, w in weights.items():
        if shards[-1] and size + w.nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = w
        size += w.nbytes
    meta = {"format": "mlx"}
    try:
        if len(shards) == 1:
            mx.save_safetensors(str(folder / "model.safetensors"), shards[0], metadata=meta)
            return ["model.safetensors"]
        names, weight_map = [], {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            mx.save_safetensors(str(folder / fname), shard, metadata=meta)
            names.append(fname)
            weight_map.update(dict.fromkeys(shard, fname))
        index = {
            "metadata": {"total_size": sum(w.nbytes for w in weights.values())},
            "weight_map": weight_map,
        }
        write_json(folder / "model.safetensors.index.json", index)
        return names
    except (OSError, RuntimeError, ValueError) as e:
        raise OpenELMError(f"cannot write weights to {folder} ({e}); is the disk full?") from None


def write_text(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as e:
        raise OpenELMError(f"cannot write {path} ({e.strerror}); is the disk full?") from None


def write_json(path: Path, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")
