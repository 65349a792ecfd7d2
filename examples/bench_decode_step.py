"""The engine's decode step, eager against compiled, in one process on the same weights.

    python examples/bench_decode_step.py MODEL_DIR --batch 1 4 8 [--steps 24] [--reps 3]
    OPENELM_MLX_RUNTIME=gpu-path python examples/bench_decode_step.py MODEL_DIR --batch 1

For each batch size, B sequences of 32 random prompt tokens decode together in the engine, once
with every step eager (``step.DecodeStep(compiled=False)``: on the CPU runtime, float32 matmuls
through NumPy's gemv/gemm) and once through the compiled step, alternating, ``--reps`` times;
aggregate decode tok/s over ``--steps`` rounds, medians.  The figures behind step.py's choice of
which steps to compile.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from openelm_mlx import runtime
from openelm_mlx.engine import Engine, GenParams
from openelm_mlx.loading import load_model
from openelm_mlx.step import DecodeStep


def rate(model, decode: DecodeStep, prompts: list[list[int]], steps: int) -> float:
    engine = Engine(model, max_batch=len(prompts))
    engine.decode = decode
    for p in prompts:
        engine.submit(p, GenParams(max_tokens=steps + 4, ignore_eos=True))
    while engine.prefilling or engine.waiting:
        engine.step()
    engine.step()  # the first decode step (and the trace of its bucket) is not timed
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    seconds = time.perf_counter() - t0
    while engine.has_work():
        engine.step()
    return len(prompts) * steps / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    model = load_model(args.model)
    print(runtime.prepare(model).describe())
    rng = random.Random(0)
    for b in args.batch:
        prompts = [[rng.randrange(100, 4000) for _ in range(32)] for _ in range(b)]
        steps = {"eager": DecodeStep(model, compiled=False), "compiled": DecodeStep(model)}
        rates: dict[str, list[float]] = {k: [] for k in steps}
        rate(model, steps["compiled"], prompts, 2)  # warm: the traces of the buckets this batch meets
        for rep in range(args.reps):
            for name in list(steps) if rep % 2 == 0 else list(steps)[::-1]:
                rates[name].append(rate(model, steps[name], prompts, args.steps))
        med = {k: statistics.median(v) for k, v in rates.items()}
        line = ", ".join(f"{k} {med[k]:.2f} tok/s ({' '.join(f'{x:.1f}' for x in v)})" for k, v in rates.items())
        print(f"B={b}: {line}; compiled/eager {med['compiled'] / med['eager']:.2f}x")


if __name__ == "__main__":
    main()
