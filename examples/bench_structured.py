"""Reproduce BENCHMARKS.md's structured-output table: constrained against free decoding.

    python examples/bench_structured.py --workdir /tmp/openelm-bench-structured -n 3 -g 64

The 270M shape with random weights, float32 and 4-bit (``nn.quantize``, group 64), and a
32000-piece byte-fallback SentencePiece tokenizer trained on the bundled KJV text (the real
OpenELM vocabulary's size); and the bundled model with its own 4096-piece tokenizer.  For batch
1 and 8, the same prompts decode once free and once under a JSON Schema (an array of eight
strings, long enough that no row ends before ``-g`` tokens), alternating; decode tok/s is the
aggregate after every row has its first token (medians of ``-n`` runs).  Time to first token at
batch 1: free, with a schema compiled for the first time (cold: a new schema text each run) and
with one compiled before (cached).
"""

from __future__ import annotations

import argparse
import json
import lzma
import statistics
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from openelm_mlx import OpenELM, OpenELMConfig, load
from openelm_mlx.engine import Engine, GenParams
from openelm_mlx.grammar import Matcher, compile_spec, fill_masks, parse_response_format
from openelm_mlx.grammar.bridge import llg_tokenizer, token_bytes
from openelm_mlx.tokenizer import Tokenizer, train_sentencepiece

ROOT = Path(__file__).resolve().parent.parent
KJV = ROOT / "examples" / "data" / "kjv.txt.xz"
SCHEMA = {"type": "array", "items": {"type": "string", "maxLength": 300}, "minItems": 8, "maxItems": 8}


def tokenizer(work: Path) -> Tokenizer:
    path = work / "kjv-32000.model"
    if not path.exists():
        lines = [line for line in lzma.open(KJV, "rt").read().splitlines() if line.strip()]
        train_sentencepiece(lines, 32000, path, hard_vocab_limit=False)
    return Tokenizer(path)


def model_270m(bits: int | None) -> OpenELM:
    config = OpenELMConfig.from_preset("270M")
    rng = np.random.default_rng(0)
    model = OpenELM(config)
    weights = []
    for name, shape in config.weight_shapes().items():
        if len(shape) == 1:
            w = 1.0 + 0.2 * rng.standard_normal(shape, dtype=np.float32)
        else:
            scale = 1.0 if "token_embeddings" in name or name == "lm_head.weight" else 1 / np.sqrt(shape[1])
            w = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
        weights.append((name, mx.array(w)))
    model.load_weights(weights)
    if bits is not None:
        nn.quantize(model, group_size=64, bits=bits)
    mx.eval(model.parameters())
    return model


def decode_run(model, tok, prompts, spec, g: int) -> tuple[float, int]:
    """Aggregate decode tok/s after every row has its first token; tokens counted in that span."""
    engine = Engine(model, tok, max_batch=len(prompts))
    for p in prompts:
        engine.submit(p, GenParams(max_tokens=g, constraint=spec))
    first: set[int] = set()
    start, counted = None, 0
    while engine.has_work():
        outs = engine.step()
        for o in outs:
            if start is not None:
                counted += len(o.tokens)
            first.add(o.seq_id)
        if start is None and len(first) == len(prompts):
            start = time.perf_counter()
    return counted / (time.perf_counter() - start), counted


def walk(m: Matcher, tok: Tokenizer, text: bytes) -> None:
    """Advance ``m`` along ``text``, taking the longest allowed token that spells its next bytes."""
    spelled = token_bytes(tok, 32000)
    while text:
        allowed = np.flatnonzero(m.mask())
        best = max((i for i in allowed if spelled[i] and text.startswith(spelled[i])), key=lambda i: len(spelled[i]))
        m.advance(int(best))
        text = text[len(spelled[best]) :]


def mask_cost(tok: Tokenizer, spec_text: dict) -> None:
    """What the grammar adds to a decode step on the CPU: the masks of 1 and 8 rows inside a JSON
    string, and the transfer of the [rows, vocab] boolean array to MLX (medians of 200)."""
    spec = parse_response_format(spec_text, bare_schema=True)
    compiled = compile_spec(spec, tok, 32000, tok.eos_id)
    for rows in (1, 8):
        matchers = [Matcher(spec, compiled, 32000) for _ in range(rows)]
        for m in matchers:  # into a string, where most tokens are allowed: the costliest masks
            walk(m, tok, b'["And God said')
        times = []
        for _ in range(200):
            t0 = time.perf_counter()
            mx.eval(mx.array(fill_masks(matchers, 32000)))
            times.append(time.perf_counter() - t0)
        print(f"masks of {rows} row(s) at 32000 pieces, to MLX: {statistics.median(times) * 1e3:.3f} ms", flush=True)


def ttft(model, tok, prompt, spec) -> float:
    engine = Engine(model, tok, max_batch=1)
    t0 = time.perf_counter()
    engine.submit(prompt, GenParams(max_tokens=1, constraint=spec))
    while engine.has_work():
        if any(o.tokens for o in engine.step()):
            break
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/openelm-bench-structured")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("-n", type=int, default=3)
    ap.add_argument("-g", type=int, default=64, help="tokens generated per sequence")
    ap.add_argument("-p", type=int, default=32, help="prompt tokens per sequence")
    ap.add_argument("--only", nargs="*", help="setups to run (default: all)")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    tok = tokenizer(work)
    t0 = time.perf_counter()
    llg_tokenizer(tok, 32000, tok.eos_id)
    print(f"tokenizer bridge: {tok.vocab_size} pieces, built once in {time.perf_counter() - t0:.2f} s", flush=True)
    lines = [line for line in lzma.open(KJV, "rt").read().splitlines() if line.strip()]
    mask_cost(tok, spec_text=SCHEMA)
    spec = parse_response_format(SCHEMA, bare_schema=True)
    rows = [
        "| model | B | free decode tok/s | constrained decode tok/s | ratio | TTFT free | TTFT cold schema "
        "| TTFT cached |",
        "|---|---|---|---|---|---|---|---|",
    ]
    results = {}
    bundled = (lambda: load()[0], load()[1])
    setups = {"270M float32": (lambda: model_270m(None), tok), "270M 4-bit": (lambda: model_270m(4), tok)}
    setups["bundled 4.7M float32"] = bundled  # the smallest step: where the mask's cost shows most
    for tag, (make, tok) in setups.items():
        if args.only and tag not in args.only:
            continue
        model = make()
        text_ids = tok.encode(" ".join(lines[:400]))
        for b in args.batches:
            prompts = [text_ids[i * args.p : (i + 1) * args.p] for i in range(b)]
            decode_run(model, tok, prompts, None, 8)  # warm-up: traces, BLAS, grammar cache
            decode_run(model, tok, prompts, spec, 8)
            free, cons = [], []
            for _ in range(args.n):
                free.append(decode_run(model, tok, prompts, None, args.g)[0])
                cons.append(decode_run(model, tok, prompts, spec, args.g)[0])
            f, c = statistics.median(free), statistics.median(cons)
            t_free = t_cold = t_hot = float("nan")
            if b == 1:
                p = prompts[0]
                t_free = statistics.median(ttft(model, tok, p, None) for _ in range(args.n))
                colds = []
                for k in range(args.n):  # a new schema text each time: compiled from scratch
                    fresh = parse_response_format({**SCHEMA, "description": f"run {time.time()} {k}"}, bare_schema=True)
                    colds.append(ttft(model, tok, p, fresh))
                t_cold = statistics.median(colds)
                t_hot = statistics.median(ttft(model, tok, p, spec) for _ in range(args.n))
            results[f"{tag} B={b}"] = dict(free=free, constrained=cons, ttft=[t_free, t_cold, t_hot])
            ms = lambda t: "" if t != t else f"{t * 1e3:.0f} ms"  # noqa: E731
            rows.append(
                f"| {tag} | {b} | {f:.1f} | {c:.1f} | **{c / f:.2f}** | {ms(t_free)} | {ms(t_cold)} | {ms(t_hot)} |"
            )
            print(rows[-1], flush=True)
        del model
    print("\n".join(rows))
    (work / "structured-summary.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
