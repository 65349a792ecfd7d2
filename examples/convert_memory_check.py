"""Conversion memory check on a real preset shape (not part of CI).

Writes a random-weight, sharded float32 HF checkpoint of a preset (1_1B by default: 4.3 GB;
3B: 12 GB) and converts it to 4-bit in a child process, then prints the child's peak resident
memory next to the source and output sizes.  The converter reads one tensor at a time, so the
peak should be about the output plus one tensor, far below the source size.

    python examples/convert_memory_check.py --preset 1_1B --workdir /tmp/memcheck
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def write_checkpoint(folder: Path, config, shards: int = 3) -> int:
    """A random float32 HF checkpoint of ``config``'s shapes, sharded, one shard in memory at a time."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    shapes = list(config.weight_shapes().items())
    per = -(-len(shapes) // shards)
    rng = np.random.default_rng(0)
    weight_map = {}
    for i in range(shards):
        part = shapes[i * per : (i + 1) * per]
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {n: (rng.standard_normal(s, dtype=np.float32) / np.sqrt(s[-1])).astype(np.float32) for n, s in part}
        save_file(tensors, str(folder / name))
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="1_1B")
    ap.add_argument("--workdir", default="/tmp/openelm-memcheck")
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--q-bits", default="4")
    args = ap.parse_args()
    work = Path(args.workdir)
    src, dst = work / f"src-{args.preset}", work / f"out-{args.preset}-q{args.q_bits}"
    if not src.exists():
        print(f"writing a random {args.preset} checkpoint to {src} ...", flush=True)
        from openelm_mlx import OpenELMConfig

        write_checkpoint(src, OpenELMConfig.from_preset(args.preset), args.shards)
    shutil.rmtree(dst, ignore_errors=True)
    src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    t0 = time.time()
    cmd = [
        sys.executable,
        "-m",
        "openelm_mlx.cli",
        "convert",
        "--hf-path",
        str(src),
        "--mlx-path",
        str(dst),
        "-q",
        "--q-bits",
        args.q_bits,
    ]
    subprocess.run(cmd, check=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
    out_bytes = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    print(
        f"preset {args.preset}: source {src_bytes / 2**30:.2f} GiB (float32), output {out_bytes / 2**30:.2f} GiB "
        f"({args.q_bits}-bit), peak RSS of convert {peak / 2**30:.2f} GiB "
        f"({peak / src_bytes:.2f}x source), {time.time() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
