"""Writing a model directory so that nothing the user had is ever half-replaced.

All files go to a hidden sibling ``.NAME.partial-PID``; only a complete, verified
directory is renamed to its final name.  ``--force`` swaps an existing directory
out with two renames, and leftovers of killed runs are removed (and reported) by
the next run.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx

from ..errors import OpenELMError

SHARD_BYTES = 5 * 2**30
_PARTIAL = ".partial-"
_OLD = ".old-"


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
            if marker == _OLD and not dst.exists():
                os.rename(p, dst)
                done.append(f"restored {dst} from {p.name}, left aside by an interrupted --force conversion")
            else:
                shutil.rmtree(p, ignore_errors=True)
                done.append(f"removed {p}, left behind by an interrupted conversion")
    return done


@contextmanager
def staging_dir(dst: Path, force: bool) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``dst``; on success it becomes ``dst``, else it vanishes."""
    dst = dst.expanduser().absolute()
    if dst.exists() and not force:
        raise OpenELMError(f"{dst} already exists; pass --force to replace it")
    tmp = dst.parent / f".{dst.name}{_PARTIAL}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise OpenELMError(f"{dst.parent}: cannot create the output ({e.strerror})") from None
    try:
        yield tmp
        _fsync_tree(tmp)
        if dst.exists():
            old = dst.parent / f".{dst.name}{_OLD}{os.getpid()}"
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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
