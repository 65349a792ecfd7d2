"""Reproduce BENCHMARKS.md's batched table: the engine against mlx_lm's BatchGenerator.

    python examples/bench_batch.py --workdir /tmp/openelm-bench --batches 1 4 8 16

For the 270M shape (random float32 weights, converted to float32 and to 4-bit) and the bundled
model, run ``openelm-mlx bench --batch B`` for each B: both engines in one process, the same
random prompts, alternating order, medians of ``-n`` runs.  Decode tok/s is the aggregate over
the B sequences after every sequence has its first token.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from convert_memory_check import write_checkpoint

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "openelm_mlx.cli"]
BUNDLED = ROOT / "openelm_mlx" / "bundled" / "openelm-tiny-kjv"


def run(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr}")
    return out.stdout


def models(work: Path) -> dict[str, Path]:
    from openelm_mlx import OpenELMConfig

    src = work / "src-270M"
    if not src.exists():
        write_checkpoint(src, OpenELMConfig.from_preset("270M"))
    out = {}
    for tag, flags in {"float32": ["--dtype", "float32"], "4-bit": ["-q", "--q-bits", "4"]}.items():
        dst = out[f"270M {tag}"] = work / f"270M-{tag}"
        if not dst.exists():
            # Speed only: verification of conversions is the converter's tests' job (and slow here).
            run([*CLI, "convert", "--hf-path", str(src), "--mlx-path", str(dst), *flags, "--no-verify"])
    bundled = out["bundled float32"] = work / "bundled-f32"
    if not bundled.exists():
        run([*CLI, "convert", "--hf-path", str(BUNDLED), "--mlx-path", str(bundled), "--dtype", "float32"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/openelm-bench")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4, 8, 16])
    ap.add_argument("--only", nargs="*", help="model tags to run (default: all)")
    ap.add_argument("-n", type=int, default=3)
    ap.add_argument("-p", type=int, default=64, help="prompt tokens per sequence")
    ap.add_argument("-g", type=int, default=32, help="tokens generated per sequence")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = ["| model | B | openelm-mlx decode tok/s | mlx_lm decode tok/s | ratio | prompt ratio | same tokens |"]
    rows.append("|---|---|---|---|---|---|---|")
    results = {}
    for tag, path in models(work).items():
        if args.only and tag not in args.only:
            continue
        for b in args.batches:
            out = work / f"batch-{tag.replace(' ', '-')}-{b}.json"
            cmd = [*CLI, "bench", "--model", str(path), "-p", str(args.p), "-g", str(args.g), "-n", str(args.n)]
            print(run([*cmd, "--batch", str(b), "--json", str(out)]), flush=True)
            r = results[f"{tag} B={b}"] = json.loads(out.read_text())
            ours, theirs = (r["median"][e]["generation_tps"]["median"] for e in ("openelm-mlx", "mlx-lm"))
            rows.append(
                f"| {tag} | {b} | {ours:.2f} | {theirs:.2f} | **{r['ratio']['generation_tps']:.2f}** | "
                f"{r['ratio']['prompt_tps']:.2f} | {r['same_tokens']} |"
            )
            print(rows[-1], flush=True)
    print("\n".join(rows))
    (work / "batch-summary.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
