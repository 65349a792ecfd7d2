"""Reproduce BENCHMARKS.md's batched table: the engine against mlx_lm's BatchGenerator.

    python examples/bench_batch.py --workdir /tmp/openelm-bench --batches 1 4 8 16
    python examples/bench_batch.py --only "270M float32" --batches 1 4 8 16 32 --runtimes cpu gpu-path
    python examples/bench_batch.py --ops       # ops per decode step, traces under a staggered load

``--runtimes``: run each bench under ``OPENELM_MLX_RUNTIME`` = each of them (runtime.py: ``cpu``
is the CPU runtime, ``gpu-path`` the GPU runtime's code on the CPU); mlx_lm runs in every one.

For the 270M shape (random float32 weights, converted to float32 and to 4-bit) and the bundled
model, run ``openelm-mlx bench --batch B`` for each B: both engines in one process, the same
random prompts, alternating order, medians of ``-n`` runs.  Decode tok/s is the aggregate over
the B sequences after every sequence has its first token.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from convert_memory_check import write_checkpoint

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "openelm_mlx.cli"]
BUNDLED = ROOT / "openelm_mlx" / "bundled" / "openelm-tiny-kjv"


def run(cmd: list[str], env: dict | None = None) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
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
    ap.add_argument("--runtimes", nargs="+", default=["cpu"], help="OPENELM_MLX_RUNTIME values to run under")
    ap.add_argument("--ops", action="store_true", help="ops per decode step and traces under a staggered load")
    args = ap.parse_args()
    if args.ops:
        return ops_and_traces()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = [
        "| model | runtime | B | openelm-mlx decode tok/s | mlx_lm decode tok/s | ratio | prompt ratio | same tokens |"
    ]
    rows.append("|---|---|---|---|---|---|---|---|")
    results = {}
    for tag, path in models(work).items():
        if args.only and tag not in args.only:
            continue
        for b in args.batches:
            for rt in args.runtimes:
                out = work / f"batch-{tag.replace(' ', '-')}-{rt}-{b}.json"
                cmd = [*CLI, "bench", "--model", str(path), "-p", str(args.p), "-g", str(args.g), "-n", str(args.n)]
                print(run([*cmd, "--batch", str(b), "--json", str(out)], {"OPENELM_MLX_RUNTIME": rt}), flush=True)
                r = results[f"{tag} {rt} B={b}"] = json.loads(out.read_text())
                ours, theirs = (r["median"][e]["generation_tps"]["median"] for e in ("openelm-mlx", "mlx-lm"))
                rows.append(
                    f"| {tag} | {rt} | {b} | {ours:.2f} | {theirs:.2f} | **{r['ratio']['generation_tps']:.2f}** | "
                    f"{r['ratio']['prompt_tps']:.2f} | {r['same_tokens']} |"
                )
                print(rows[-1], flush=True)
    print("\n".join(rows))
    (work / "batch-summary.json").write_text(json.dumps(results, indent=2))


def count_ops(*outputs) -> int:
    import mlx.core as mx

    with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
        mx.export_to_dot(f.name, *outputs)
        return f.read().count("shape=rectangle")


def ops_and_traces() -> None:
    """The 270M shape (random weights), the GPU runtime's code on this CPU: MLX ops in one decode
    step at B = 1, 8, 32; then 40 requests, prompts of 1 to 600 tokens, arriving a few per round:
    traces of the compiled step, distinct buckets met, and the time tracing took."""
    os.environ["OPENELM_MLX_RUNTIME"] = "gpu-path"
    import mlx.core as mx
    import numpy as np

    from openelm_mlx import OpenELM, OpenELMConfig, runtime, step
    from openelm_mlx.cache import BatchKVCache
    from openelm_mlx.engine import Engine, GenParams

    config = OpenELMConfig.from_preset("270M")
    model = OpenELM(config)
    mx.eval(model.parameters())
    runtime.prepare(model)
    rng = np.random.default_rng(0)
    for b in (1, 8, 32):
        batch = BatchKVCache(config.num_kv_heads, config.head_dim, b)
        for slot in range(b):
            batch.take()
            model(mx.array([rng.integers(3, 32000, 16 + slot).tolist()]), cache=batch.view(slot))
        mx.eval(batch.keys, batch.values)
        tokens = mx.array(rng.integers(3, 32000, (b, 1)), dtype=mx.uint32)
        mx.eval(tokens)
        decode = step.DecodeStep(model, compiled=True)
        logits = decode(tokens, batch, list(range(b)))
        print(f"ops per decode step, B={b} (compiled): {count_ops(logits)}", flush=True)
        mx.eval(logits)
    for b in (1, 8, 32):  # a whole engine round: the step, sampling, the next step's input
        engine = Engine(model, max_batch=b)
        for r in range(b):
            engine.submit(rng.integers(3, 32000, 16 + r).tolist(), GenParams(max_tokens=8, ignore_eos=True))
        while len(engine.running) < b:
            engine.step()
        engine.step()
        engine.step()
        real, mx.async_eval = mx.async_eval, lambda *a, **k: None  # keep the round's graph unevaluated
        try:
            engine.step()
        finally:
            mx.async_eval = real
        print(f"ops per engine round (greedy), B={b}: {count_ops(engine._sampled)}", flush=True)
        mx.eval(engine._sampled)
    lengths = [1, 600] + rng.integers(1, 601, 38).tolist()
    queue = [([1] + rng.integers(3, 32000, n - 1).tolist(), int(rng.integers(8, 64))) for n in lengths]
    engine = Engine(model, max_batch=16)
    before = step.TRACES.traces, step.TRACES.seconds
    known = set(engine.decode.buckets)  # met by the engine rounds above, traced there
    t0, rounds, tokens_out, round_times = time.perf_counter(), 0, 0, []
    while queue or engine.has_work():
        for _ in range(int(rng.integers(0, 3))):
            if queue:
                prompt, n = queue.pop(0)
                engine.submit(prompt, GenParams(max_tokens=n, ignore_eos=True))
        r0 = time.perf_counter()
        tokens_out += sum(len(o.tokens) for o in engine.step())
        round_times.append(time.perf_counter() - r0)
        rounds += 1
    total = time.perf_counter() - t0
    traces, seconds = step.TRACES.traces - before[0], step.TRACES.seconds - before[1]
    print(
        f"staggered load: 40 requests, {rounds} rounds, {tokens_out} tokens in {total:.1f} s; "
        f"{traces} traces for {len(engine.decode.buckets - known)} new buckets met "
        f"{sorted(engine.decode.buckets - known)}; "
        f"tracing {seconds:.2f} s = {100 * seconds / total:.1f}% of the run; "
        f"median round {1000 * statistics.median(round_times):.0f} ms",
        flush=True,
    )


if __name__ == "__main__":
    main()
