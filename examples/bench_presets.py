"""Reproduce BENCHMARKS.md: openelm-mlx against mlx_lm on real preset shapes (random weights).

    python examples/bench_presets.py --presets 270M 1_1B --workdir /tmp/openelm-bench

For each preset: write a random float32 HF checkpoint, convert it to float32 and to 4-bit,
and run ``openelm-mlx bench`` on both (which runs both engines in one process).  Then the
end-to-end check: ``openelm-mlx generate`` with its defaults against ``mlx_lm.generate`` with
its defaults on the same float32 directory and a 128-token prompt.  mlx_lm.generate needs a
tokenizer matching the vocabulary, so that check uses the 270M layer shapes with the bundled
4096-piece KJV tokenizer.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from convert_memory_check import write_checkpoint

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "openelm_mlx.cli"]


def run(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr}")
    return out.stdout + out.stderr


def end_to_end(work: Path, runs: int) -> dict:
    from openelm_mlx import OpenELMConfig

    src, dst = work / "e2e-src", work / "e2e-f32"
    if not src.exists():
        config = OpenELMConfig.from_preset("270M", vocab_size=4096)
        write_checkpoint(src, config)
        shutil.copy(ROOT / "openelm_mlx" / "bundled" / "openelm-tiny-kjv" / "tokenizer.model", src)
    if not dst.exists():
        run([*CLI, "convert", "--hf-path", str(src), "--mlx-path", str(dst), "--dtype", "float32"])
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    words = (ROOT / "openelm_mlx" / "bundled" / "kjv-valid.txt").read_text().split()
    prompt = " ".join(words[:200])
    while len(sp.encode(prompt)) + 1 > 128:  # 128 tokens with BOS
        prompt = prompt.rsplit(" ", 1)[0]
    ours, theirs = [], []
    for _ in range(runs):
        out = run([*CLI, "generate", "--model", str(dst), "--prompt", prompt, "--max-tokens", "8"])
        ours.append(float(re.search(r"prompt: \d+ tokens, ([0-9.]+) tokens/s", out).group(1)))
        out = run(
            [
                sys.executable,
                "-m",
                "mlx_lm",
                "generate",
                "--model",
                str(dst),
                "--prompt",
                prompt,
                "--max-tokens",
                "8",
                "--ignore-chat-template",
            ]
        )
        theirs.append(float(re.search(r"Prompt: \d+ tokens, ([0-9.]+) tokens-per-sec", out).group(1)))
    ours.sort(), theirs.sort()
    return {
        "openelm-mlx generate prompt tok/s": ours[len(ours) // 2],
        "mlx_lm.generate prompt tok/s": theirs[len(theirs) // 2],
        "ratio": ours[len(ours) // 2] / theirs[len(theirs) // 2],
    }


def markdown_rows(shape: str, tag: str, r: dict) -> list[str]:
    """BENCHMARKS.md's table rows for one ``bench`` report."""
    blas = "OpenBLAS" if "openblas" in r["blas"].lower() else "reference"
    rows = []
    for engine, s in r["median"].items():
        decode, fraction = s["generation_tps"]["median"], s["bandwidth_fraction"]
        ratio = (
            f"**{r['ratio']['prompt_tps']:.3g}** | **{r['ratio']['generation_tps']:.3g}**"
            if engine == "openelm-mlx" and r["ratio"]
            else " | "
        )
        rows.append(
            f"| {shape} | {tag} | {blas} | {engine} | {s['prompt_tps']['median']:.1f} | {decode:.2f} | "
            f"{s['peak_memory_gb']['median']:.2f} GB | {100 * fraction:.0f}% | {ratio} |"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["270M", "1_1B"])
    ap.add_argument("--workdir", default="/tmp/openelm-bench")
    ap.add_argument("-n", type=int, default=5)
    ap.add_argument("-g", type=int, default=128, help="tokens generated per run")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    from openelm_mlx import OpenELMConfig

    results, table = {}, []
    for preset in args.presets:
        src = work / f"src-{preset}"
        if not src.exists():
            write_checkpoint(src, OpenELMConfig.from_preset(preset))
        for tag, flags in {"float32": ["--dtype", "float32"], "4-bit": ["-q", "--q-bits", "4"]}.items():
            dst = work / f"{preset}-{tag}"
            if not dst.exists():
                run([*CLI, "convert", "--hf-path", str(src), "--mlx-path", str(dst), *flags])
            report_file = work / f"{preset}-{tag}.json"
            cmd = [*CLI, "bench", "--model", str(dst), "-n", str(args.n), "-g", str(args.g), "--json", str(report_file)]
            print(run(cmd), flush=True)
            results[f"{preset} {tag}"] = json.loads(report_file.read_text())
            table += markdown_rows(preset, tag, results[f"{preset} {tag}"])
    results["end-to-end"] = end_to_end(work, args.n)
    print(json.dumps(results["end-to-end"], indent=2))
    print("\n".join(table))
    (work / "summary.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
