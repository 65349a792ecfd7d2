"""``openelm-mlx bench``: prompt and decode speed of openelm-mlx against mlx_lm on the same weights.

Both engines load the same converted directory in one process; runs alternate after a warm-up
of each, and medians (with min/max) are reported, since shared machines are noisy.
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

from . import cpu
from .blas import describe
from .generate import generate_tokens, peak_memory_gb
from .loading import load_model
from .step import uses_compiled_step


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


def timed_run(engine: str, step_fn: Callable, model, prompt: list[int], gen: int) -> tuple[Run, list[int]]:
    mx.clear_cache()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    tokens, t_first = [], 0.0
    for tok in step_fn(model, prompt, gen):
        if not tokens:
            t_first = time.perf_counter()
        tokens.append(tok)
    t_end = time.perf_counter()
    decode_tps = (len(tokens) - 1) / (t_end - t_first) if len(tokens) > 1 else 0.0
    run = Run(engine, len(prompt), len(tokens), len(prompt) / (t_first - t0), decode_tps, peak_memory_gb())
    return run, tokens


def bench(
    model_dir: str | Path,
    prompt_tokens: int = 128,
    gen_tokens: int = 128,
    runs: int = 5,
    compare: str | None = "mlx-lm",
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict:
    model_dir = Path(model_dir)
    engines: dict[str, tuple[Callable, object]] = {"openelm-mlx": (_ours, load_model(model_dir))}
    if compare == "mlx-lm":
        from mlx_lm.utils import load_model as mlx_lm_load_model

        engines["mlx-lm"] = (_mlx_lm, mlx_lm_load_model(model_dir)[0])
    ours = engines["openelm-mlx"][1]
    vocab = ours.config.vocab_size
    prompt = [ours.config.bos_token_id] + np.random.default_rng(seed).integers(3, vocab, prompt_tokens - 1).tolist()
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
        s["bandwidth_fraction"] = bytes_per_token * s["generation_tps"]["median"] / (bandwidth["gbps"] * 1e9)
    report = {
        "model": str(model_dir),
        "backend": str(mx.default_device()),
        "blas": describe(),
        "matmul_routes": cpu.describe(),
        "decode_step": "compiled (mx.compile)" if uses_compiled_step(ours) else "eager",
        "runs": [asdict(r) for r in results],
        "median": summary,
        "ratio": None,
        "same_tokens": None,
        "bandwidth_gbps": bandwidth["gbps"],
        "bandwidth_measured_gbps": bandwidth,
        "bandwidth_fraction": summary["openelm-mlx"]["bandwidth_fraction"],
        "weight_bytes_per_token": bytes_per_token,
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
    lines = [
        f"model {r['model']} | backend {r['backend']} | BLAS {r['blas']}",
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
    lines.append(
        f"memory bandwidth {r['bandwidth_gbps']:.1f} GB/s "
        f"({', '.join(f'{k} {v:.1f}' for k, v in r['bandwidth_measured_gbps'].items() if k != 'gbps')}); "
        f"decode reads {r['weight_bytes_per_token'] / 1e6:.1f} MB/token "
        f"= {100 * r['bandwidth_fraction']:.1f}% of bandwidth"
    )
    return "\n".join(lines)


def write_json(report: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
