"""``openelm-mlx bench``: prompt and decode speed of openelm-mlx against mlx_lm on the same weights.

Both engines load the same converted directory in one process; runs alternate after a warm-up
of each, and medians (with min/max) are reported, since shared machines are noisy.  With
``batch`` > 1, B sequences decode together (openelm-mlx's engine against ``mlx_lm``'s
``BatchGenerator``, the machinery under ``mlx_lm.batch_generate``) and decode speed is the
aggregate: tokens of all sequences per second, from the moment every sequence has its first token.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import runtime
from .blas import describe
from .engine import Engine, GenParams
from .generate import generate_tokens, peak_memory_gb
from .loading import load_model
from .step import TRACES, lone_decodes_eagerly


@dataclass
class Run:
    engine: str
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    peak_memory_gb: float


def measure_bandwidth_gbps(mib: int = 1024, repeats: int = 5) -> dict[str, float]:
    """Memory bandwidth, measured two ways; ``gbps`` is the larger.

    ``copy``: copying a large MLX array reads and writes every byte once (on the CPU split over
    two streams, each on its own thread, as decoding does).  ``read``: a matrix-vector product
    over a large float32 matrix with NumPy's BLAS on all cores, which reads every byte once.  On
    CPUs whose MLX copy kernel is slower than the memory (about 5 GB/s per thread on the x86_64
    of BENCHMARKS.md) the copy alone understates what decoding can read.
    """
    n = mib * 2**20 // 4
    a = mx.random.uniform(shape=(n,))
    mx.eval(a)
    streams = [mx.default_stream(mx.default_device())]
    if mx.default_device() == mx.cpu:
        streams.append(mx.new_stream(mx.cpu))
    parts = [a[i * n // len(streams) : (i + 1) * n // len(streams)] for i in range(len(streams))]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        copies = []
        for part, stream in zip(parts, streams, strict=True):
            with mx.stream(stream):
                copies.append(mx.concatenate([part, part[:1]]))  # a real copy, never a view
        mx.eval(copies)
        times.append(time.perf_counter() - t0)
        del copies
    out = {"copy": 2 * a.nbytes / statistics.median(times) / 1e9}
    if mx.default_device() == mx.cpu:
        m = np.asarray(a).reshape(4096, -1)
        v = np.ones(m.shape[1], dtype=np.float32)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            m @ v
            times.append(time.perf_counter() - t0)
        out["read"] = m.nbytes / statistics.median(times) / 1e9
    out["gbps"] = max(out.values())
    return out


def _ours(model, prompt: list[int], gen: int) -> Iterator[int]:
    return generate_tokens(model, prompt, max_tokens=gen, ignore_eos=True)


def _mlx_lm(model, prompt: list[int], gen: int) -> Iterator[int]:
    from mlx_lm.generate import generate_step

    for tok, _ in generate_step(mx.array(prompt), model, max_tokens=gen, sampler=lambda x: mx.argmax(x, axis=-1)):
        yield int(tok)


def _ours_batch(model, prompts: list[list[int]], gen: int) -> Iterator[tuple[int, int]]:
    engine = Engine(model, max_batch=len(prompts))
    for p in prompts:
        engine.submit(p, GenParams(max_tokens=gen, ignore_eos=True))
    while engine.has_work():
        for o in engine.step():
            for tok in o.tokens:
                yield o.seq_id, tok


def _mlx_lm_batch(model, prompts: list[list[int]], gen: int) -> Iterator[tuple[int, int]]:
    from mlx_lm.generate import BatchGenerator

    B = len(prompts)
    greedy = lambda x: mx.argmax(x, axis=-1)  # noqa: E731
    gen_ = BatchGenerator(model, stop_tokens=[], sampler=greedy, completion_batch_size=B, prefill_batch_size=B)
    uids = gen_.insert(prompts, [gen] * B)
    index = {u: i for i, u in enumerate(uids)}
    try:
        while responses := gen_.next_generated():
            for r in responses:
                yield index[r.uid], int(r.token)
    finally:
        gen_.close()


def timed_run(engine: str, step_fn: Callable, model, prompt: list, gen: int) -> tuple[Run, list]:
    """One run; ``prompt`` is one prompt, or a list of B prompts for a batched ``step_fn`` that
    yields (sequence, token).  Decode speed counts the tokens after the last first token."""
    mx.clear_cache()
    mx.reset_peak_memory()
    batched = isinstance(prompt[0], list)
    prompts = prompt if batched else [prompt]
    stream = step_fn(model, prompt, gen) if batched else ((0, t) for t in step_fn(model, prompt, gen))
    t0 = time.perf_counter()
    tokens: dict[int, list[int]] = {}
    t_all, after = 0.0, 0
    for seq, tok in stream:
        tokens.setdefault(seq, []).append(tok)
        if t_all:
            after += 1
        elif len(tokens) == len(prompts):  # every sequence has its first token
            t_all = time.perf_counter()
    t_end = time.perf_counter()
    decode_tps = after / (t_end - t_all) if after else 0.0
    prompt_count = sum(len(p) for p in prompts)
    generated = sum(map(len, tokens.values()))
    run = Run(engine, prompt_count, generated, prompt_count / (t_all - t0), decode_tps, peak_memory_gb())
    ordered = [tokens[k] for k in sorted(tokens)]
    return run, ordered if batched else ordered[0]


def bench(
    model_dir: str | Path,
    prompt_tokens: int = 128,
    gen_tokens: int = 128,
    runs: int = 5,
    compare: str | None = "mlx-lm",
    seed: int = 0,
    log: Callable[[str], None] = print,
    batch: int = 1,
) -> dict:
    model_dir = Path(model_dir)
    ours_fn, theirs_fn = (_ours, _mlx_lm) if batch == 1 else (_ours_batch, _mlx_lm_batch)
    engines: dict[str, tuple[Callable, object]] = {"openelm-mlx": (ours_fn, load_model(model_dir))}
    if compare == "mlx-lm":
        from mlx_lm.utils import load_model as mlx_lm_load_model

        engines["mlx-lm"] = (theirs_fn, mlx_lm_load_model(model_dir)[0])
    ours = engines["openelm-mlx"][1]
    vocab, rng = ours.config.vocab_size, np.random.default_rng(seed)
    prompts = [[ours.config.bos_token_id] + rng.integers(3, vocab, prompt_tokens - 1).tolist() for _ in range(batch)]
    prompt = prompts[0] if batch == 1 else prompts
    greedy: dict[str, list[int]] = {}
    for name, (fn, model) in engines.items():  # warm-up (and the greedy tokens to compare)
        _, greedy[name] = timed_run(name, fn, model, prompt, gen_tokens)
    results: list[Run] = []
    order = list(engines)
    for i in range(runs):
        for name in order if i % 2 == 0 else reversed(order):
            fn, model = engines[name]
            run, _ = timed_run(name, fn, model, prompt, gen_tokens)
            results.append(run)
            log(
                f"  run {i + 1}/{runs} {name:12s} prompt {run.prompt_tps:8.1f} tok/s  "
                f"decode {run.generation_tps:7.2f} tok/s"
            )
    bandwidth = measure_bandwidth_gbps()
    summary = {name: _summary([r for r in results if r.engine == name]) for name in engines}
    bytes_per_token = ours.weight_bytes
    for s in summary.values():  # weights read per second over what the memory delivers
        # A batched step reads the weights once for all its rows.
        steps_per_s = s["generation_tps"]["median"] / batch
        s["bandwidth_fraction"] = bytes_per_token * steps_per_s / (bandwidth["gbps"] * 1e9)
    report = {
        "model": str(model_dir),
        "batch": batch,
        "backend": str(mx.default_device()),
        "blas": describe(),
        "matmul_routes": runtime.of(ours).describe(),
        "decode_step": "compiled (mx.compile); a lone sequence eagerly (NumPy gemv)"
        if lone_decodes_eagerly(ours)
        else "compiled (mx.compile)",
        "runs": [asdict(r) for r in results],
        "median": summary,
        "ratio": None,
        "same_tokens": None,
        "bandwidth_gbps": bandwidth["gbps"],
        "bandwidth_measured_gbps": bandwidth,
        "bandwidth_fraction": summary["openelm-mlx"]["bandwidth_fraction"],
        "weight_bytes_per_token": bytes_per_token,
        # Traces of the compiled decode step in this run (one per slots x capacity bucket met).
        "compiled_traces": TRACES.traces,
        "compiled_trace_seconds": TRACES.seconds,
    }
    if "mlx-lm" in engines:
        report["ratio"] = {
            k: summary["openelm-mlx"][k]["median"] / summary["mlx-lm"][k]["median"]
            for k in ("prompt_tps", "generation_tps")
        }
        report["same_tokens"] = greedy["openelm-mlx"] == greedy["mlx-lm"]
    return report


def _summary(runs: list[Run]) -> dict:
    out = {}
    for key in ("prompt_tps", "generation_tps", "peak_memory_gb"):
        values = [getattr(r, key) for r in runs]
        out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return out


def format_report(r: dict) -> str:
    batch = r.get("batch", 1)
    lines = [
        f"model {r['model']} | batch {batch} | backend {r['backend']} | BLAS {r['blas']}",
        f"routes: {r['matmul_routes']}; decode step: {r['decode_step']}",
    ]
    lines.append(f"{'engine':12s} {'prompt tok/s (min-max)':>28s} {'decode tok/s (min-max)':>26s} {'peak GB':>8s}")
    for name, s in r["median"].items():
        p, g = s["prompt_tps"], s["generation_tps"]
        lines.append(
            f"{name:12s} {p['median']:10.1f} ({p['min']:.1f}-{p['max']:.1f}){'':>4s} "
            f"{g['median']:8.2f} ({g['min']:.2f}-{g['max']:.2f}){'':>4s} {s['peak_memory_gb']['median']:8.2f}"
        )
    if r["ratio"]:
        lines.append(
            f"ratio openelm-mlx / mlx-lm: prompt {r['ratio']['prompt_tps']:.3f}, "
            f"decode {r['ratio']['generation_tps']:.3f}; "
            f"same greedy tokens: {r['same_tokens']}"
        )
    if batch > 1:
        lines.append(f"decode tok/s is the aggregate over {batch} sequences; prompt tok/s covers all {batch} prompts")
        lines.append(f"compiled step traces: {r['compiled_traces']} ({r['compiled_trace_seconds']:.2f} s tracing)")
    lines.append(
        f"memory bandwidth {r['bandwidth_gbps']:.1f} GB/s "
        f"({', '.join(f'{k} {v:.1f}' for k, v in r['bandwidth_measured_gbps'].items() if k != 'gbps')}); "
        f"decode reads {r['weight_bytes_per_token'] / 1e6:.1f} MB/step "
        f"= {100 * r['bandwidth_fraction']:.1f}% of bandwidth"
    )
    return "\n".join(lines)


def write_json(report: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
