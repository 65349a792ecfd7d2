"""The engine's decode step, eager against compiled, in one process on the same weights.

    python examples/bench_decode_step.py MODEL_DIR --batch 1 4 8 [--steps 24] [--reps 3]
    OPENELM_MLX_RUNTIME=gpu-path python examples/bench_decode_step.py MODEL_DIR --batch 1

For each batch size, B sequences of 32 random prompt tokens decode together in the engine, once
with every step eager (``step.DecodeStep(compiled=False)``: on the CPU runtime, float32 matmuls
through NumPy's gemv/gemm) and once through the compiled step, alternating, ``--reps`` times;
aggregate decode tok/s over ``--steps`` rounds, medians.  The figures behind step.py's choice of
which steps to compile.

``--matmul-share``: instead, the compiled step's time at each batch size against the same
matmuls alone (every linear layer and the head, B rows each), alternating, medians of 15: the
share of a step no change outside the matmuls can win back on this machine.
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


def matmul_share(model, b: int) -> None:
    import mlx.core as mx

    from openelm_mlx.cache import BatchKVCache

    config, rng = model.config, random.Random(1)
    batch = BatchKVCache(config.num_kv_heads, config.head_dim, b)
    for slot in range(b):
        batch.take()
        model(mx.array([[rng.randrange(3, 4000) for _ in range(32 + slot)]]), cache=batch.view(slot))
    mx.eval(batch.keys, batch.values)
    decode = DecodeStep(model)
    tokens = mx.array([[rng.randrange(3, 4000)] for _ in range(b)], dtype=mx.uint32)
    weights = [m.weight for _, m in model.named_modules() if type(m).__name__ == "Linear" and "bias" not in m]
    if config.share_input_output_layers:  # the tied head (every OpenELM)
        weights.append(model.transformer.token_embeddings.weight)
    inputs = {w.shape[1]: mx.random.normal((b, 1, w.shape[1])) for w in weights}
    mx.eval(list(inputs.values()))
    step_s, mm_s = [], []
    for i in range(18):
        t0 = time.perf_counter()
        mx.eval(decode(tokens, batch, []))
        t1 = time.perf_counter()
        mx.eval([inputs[w.shape[1]] @ w.T for w in weights])
        if i >= 3:
            step_s.append(t1 - t0)
            mm_s.append(time.perf_counter() - t1)
    s, m = statistics.median(step_s), statistics.median(mm_s)
    n = len(weights)
    print(f"B={b}: compiled step {s * 1e3:.1f} ms, its {n} matmuls alone {m * 1e3:.1f} ms ({100 * m / s:.0f}%)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--matmul-share", action="store_true", help="the compiled step against its matmuls alone")
    args = ap.parse_args()
    model = load_model(args.model)
    print(runtime.prepare(model).describe())
    if args.matmul_share:
        for b in args.batch:
            matmul_share(model, b)
        return
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
