"""Reproduce BENCHMARKS.md "Fine-tuning": LoRA training speed and peak memory, openelm-mlx against mlx_lm.

    python examples/bench_lora.py --workdir /tmp/openelm-lora-bench -n 3

Both trainers get the same converted float32 directory, the same data folder (train/valid.jsonl
of ``{"text"}`` lines: the entries of examples/data/devil.txt.xz) and the same settings: LoRA
rank 32, alpha 32 (mlx_lm's scale 1.0), dropout 0.1 on qkv_proj, out_proj, proj_1 and proj_2 of
every block (mlx_lm adapts only modules inside the blocks, so no embedding adapter here),
batch 8, sequences cut at --max-seq-length, AdamW at a constant learning rate.  Each run is a
fresh process doing 2 x --steps updates; the figure is the second report window's trained
tokens/s (compilation and warm-up fall in the first) and the process's peak MLX memory.  The
runs alternate between the trainers; the table has the medians.

Models: the bundled OpenELM-tiny-KJV (float32, and 4-bit for QLoRA), and the 270M layer shapes
with random weights and the bundled 4096-piece tokenizer (mlx_lm needs a tokenizer matching the
vocabulary).
"""

from __future__ import annotations

import argparse
import json
import lzma
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "openelm_mlx" / "bundled" / "openelm-tiny-kjv"
KEYS = ["attn.qkv_proj", "attn.out_proj", "ffn.proj_1", "ffn.proj_2"]


def run(cmd: list[str], env: dict | None = None) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stdout}\n{out.stderr}")
    return out.stdout + out.stderr


def make_data(folder: Path) -> None:
    """Entries of the dictionary joined into pieces longer than any --max-seq-length used here, so
    that every batch is cut to the full width: the same work per update for both trainers, and a
    peak memory that does not depend on which batches a run happened to draw."""
    text = lzma.decompress((ROOT / "examples" / "data" / "devil.txt.xz").read_bytes()).decode()
    entries = [e.strip() for e in re.split(r"\n\s*\n(?=[A-Z][A-Z' -]+, )", text) if e.strip()]
    pieces, current = [], ""
    for e in entries:
        current = f"{current}\n\n{e}" if current else e
        if len(current) >= 2000:  # about 500 tokens of the 4096-piece tokenizer
            pieces.append(current)
            current = ""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": p}) for p in pieces]
    (folder / "train.jsonl").write_text("\n".join(lines[: -len(lines) // 10]) + "\n")
    (folder / "valid.jsonl").write_text("\n".join(lines[-len(lines) // 10 :]) + "\n")


def make_models(work: Path) -> dict[str, Path]:
    sys.path.insert(0, str(ROOT / "examples"))
    import shutil

    from convert_memory_check import write_checkpoint

    from openelm_mlx import OpenELMConfig

    cli = [sys.executable, "-m", "openelm_mlx.cli", "convert", "--dtype", "float32", "--no-verify"]
    models = {
        "bundled (4.7M)": work / "tiny-f32",
        "bundled 4-bit (QLoRA)": work / "tiny-q4",
        "270M shape, vocab 4096": work / "270m-f32",
    }
    if not models["bundled (4.7M)"].exists():
        run([*cli, "--hf-path", str(BUNDLED), "--mlx-path", str(models["bundled (4.7M)"])])
    if not models["bundled 4-bit (QLoRA)"].exists():
        run([*cli, "--hf-path", str(BUNDLED), "--mlx-path", str(models["bundled 4-bit (QLoRA)"]), "-q"])
    src = work / "270m-src"
    if not models["270M shape, vocab 4096"].exists():
        if not src.exists():
            write_checkpoint(src, OpenELMConfig.from_preset("270M", vocab_size=4096))
            shutil.copy(BUNDLED / "tokenizer.model", src)
        run([*cli, "--hf-path", str(src), "--mlx-path", str(models["270M shape, vocab 4096"])])
    return models


def ours(model: Path, data: Path, out: Path, a: argparse.Namespace) -> tuple[float, float]:
    log = run(
        [sys.executable, "-m", "openelm_mlx.cli", "lora", "--model", str(model), "--data", str(data)]
        + ["--iters", str(2 * a.steps), "--steps-per-report", str(a.steps), "--steps-per-eval", "100000"]
        + ["--val-batches", "1", "--batch-size", str(a.batch_size), "--max-seq-length", str(a.max_seq_length)]
        + ["--rank", "32", "--alpha", "32", "--dropout", "0.1", "--targets", "qkv_proj", "out_proj", "proj_1"]
        + ["proj_2", "--learning-rate", "1e-5", "--lr-schedule", "constant", "--save-every", "0"]
        + ["--adapter-path", str(out), "--force"]
    )
    last = re.findall(r"train loss [\d.]+, lr [^,]+, ([\d,]+) tokens/s, .*peak memory ([\d.]+) GB", log)[-1]
    return float(last[0].replace(",", "")), float(last[1])


def theirs(model: Path, data: Path, out: Path, a: argparse.Namespace) -> tuple[float, float]:
    cmd = [sys.executable, __file__, "--mlx-lm-worker", str(model), str(data), str(out)]
    cmd += ["--steps", str(a.steps), "--batch-size", str(a.batch_size), "--max-seq-length", str(a.max_seq_length)]
    # The openelm-mlx CLI restarts itself on OpenBLAS when it is installed (blas.py): give mlx_lm the same BLAS.
    from openelm_mlx.blas import fast_blas_env

    env = fast_blas_env()
    info = json.loads(re.findall(r'\{"tokens_per_second".*\}', run(cmd, env))[-1])
    return info["tokens_per_second"], info["peak_memory"]


def mlx_lm_worker(model: str, data: str, out: str, a: argparse.Namespace) -> None:
    """mlx_lm.lora's own run(), with a callback that records its report (its CLI prints no peak memory)."""
    import types

    import numpy as np
    from mlx_lm import lora as mlx_lora
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import load_dataset
    from mlx_lm.utils import load

    np.random.seed(0)  # as mlx_lm.lora's run() does: its batch order
    reports = []

    class Record(TrainingCallback):
        def on_train_loss_report(self, info):
            reports.append(info)

    opts = dict(mlx_lora.CONFIG_DEFAULTS)
    opts.update(
        model=model,
        data=data,
        train=True,
        fine_tune_type="lora",
        optimizer="adamw",
        num_layers=-1,
        batch_size=a.batch_size,
        iters=2 * a.steps,
        steps_per_report=a.steps,
        steps_per_eval=100000,
        val_batches=1,
        learning_rate=1e-5,
        max_seq_length=a.max_seq_length,
        adapter_path=out,
        save_every=100000,
        lora_parameters={"rank": 32, "scale": 1.0, "dropout": 0.1, "keys": KEYS},
    )
    args = types.SimpleNamespace(**opts)
    m, tokenizer = load(model)
    train_set, valid_set, _ = load_dataset(args, tokenizer)
    mlx_lora.train_model(args, m, train_set, valid_set, Record())
    print(json.dumps({k: reports[-1][k] for k in ("tokens_per_second", "peak_memory")}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/openelm-lora-bench"))
    ap.add_argument("-n", "--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="updates per report window (two windows per run)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-seq-length", type=int, default=256)
    ap.add_argument("--models", nargs="+", default=None, help="which of the two models (default both)")
    ap.add_argument("--mlx-lm-worker", nargs=3, metavar=("MODEL", "DATA", "OUT"))
    a = ap.parse_args()
    if a.mlx_lm_worker:
        return mlx_lm_worker(*a.mlx_lm_worker, a)
    a.workdir.mkdir(parents=True, exist_ok=True)
    data = a.workdir / "devil-jsonl"
    make_data(data)
    models = make_models(a.workdir)
    rows = []
    for name, path in models.items():
        if a.models and not any(m in name for m in a.models):
            continue
        figures: dict[str, list[tuple[float, float]]] = {"openelm-mlx": [], "mlx-lm": []}
        for i in range(a.runs):
            figures["openelm-mlx"].append(ours(path, data, a.workdir / "ad-ours", a))
            figures["mlx-lm"].append(theirs(path, data, a.workdir / "ad-theirs", a))
            print(f"{name} run {i + 1}: {figures}", file=sys.stderr, flush=True)
        med = {k: (statistics.median(t for t, _ in v), statistics.median(m for _, m in v)) for k, v in figures.items()}
        best = {k: max(t for t, _ in v) for k, v in figures.items()}
        speed = med["openelm-mlx"][0] / med["mlx-lm"][0]
        best_speed = best["openelm-mlx"] / best["mlx-lm"]
        memory = med["openelm-mlx"][1] / med["mlx-lm"][1]
        for who, (tps, mem) in med.items():
            runs = ", ".join(f"{t:,.0f}" for t, _ in figures[who])
            mine = who == "openelm-mlx"
            rows.append(
                f"| {name} | {who} | {tps:,.0f} | {best[who]:,.0f} | {runs} | {mem:.3f} GB | "
                + (f"**{speed:.2f}x** | {best_speed:.2f}x | **{memory:.3f}x** |" if mine else " |  |  |")
            )
    print(
        "| model | trainer | tokens/s, median | best | runs | peak memory, median | speed, median "
        "| speed, best | memory |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
