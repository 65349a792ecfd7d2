"""Compile time and per-token mask time of three grammar engines on OpenELM's tokenizer.

    pip install xgrammar outlines-core   # llguidance is a dependency already
    python examples/compare_grammar_engines.py [TOKENIZER.model]

Each engine compiles the same JSON Schema, then walks 60 tokens (or to the end) picking a seeded
random allowed token at every step; the medians are of the per-step mask computation.  The
figures and the choice are in BENCHMARKS.md ("Structured output").
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np

from openelm_mlx.grammar.bridge import _Vocabulary
from openelm_mlx.tokenizer import Tokenizer

BUNDLED = "openelm_mlx/bundled/openelm-tiny-kjv/tokenizer.model"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["alpha", "beta", "gamma"]}, "minItems": 1, "maxItems": 3},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "tags", "score"],
    "additionalProperties": False,
}
STEPS = 60


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def us(times: list[float]) -> str:
    return f"median {statistics.median(times) * 1e6:.0f} us, max {max(times) * 1e6:.0f} us"


def allowed_from_bits(words: np.ndarray, n: int) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little")[:n])


def run_llguidance(tok: Tokenizer, n: int, eos: int) -> str:
    import llguidance
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

    t0 = time.perf_counter()
    lt = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocabulary(tok, n, eos)), n_vocab=n)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    m = llguidance.LLMatcher(lt, grammar, log_level=0)
    t_compile = time.perf_counter() - t0
    bits, rng, times = allocate_token_bitmask(1, n), np.random.default_rng(0), []
    for _ in range(STEPS):
        t0 = time.perf_counter()
        fill_next_token_bitmask(m, bits)
        times.append(time.perf_counter() - t0)
        t = int(rng.choice(allowed_from_bits(bits[0], n)))
        assert m.consume_token(t), m.get_error()
        if m.is_stopped():
            break
    return f"llguidance {llguidance.__version__}: tokenizer {ms(t_tok)}, compile {ms(t_compile)}, mask {us(times)}"


def run_xgrammar(tok: Tokenizer, n: int, eos: int) -> str:
    import xgrammar as xgr

    t0 = time.perf_counter()
    pieces = [tok.sp.id_to_piece(i) for i in range(n)]
    info = xgr.TokenizerInfo(pieces, xgr.VocabType.BYTE_FALLBACK, stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    t_compile = time.perf_counter() - t0
    m, bits = xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, n)
    rng, times = np.random.default_rng(0), []
    for _ in range(STEPS):
        t0 = time.perf_counter()
        m.fill_next_token_bitmask(bits)
        times.append(time.perf_counter() - t0)
        t = int(rng.choice(allowed_from_bits(bits[0].numpy(), n)))
        assert m.accept_token(t)
        if m.is_terminated():
            break
    return f"xgrammar: tokenizer {ms(t_tok)}, compile {ms(t_compile)}, mask {us(times)}"


def run_outlines(tok: Tokenizer, n: int, eos: int) -> str:
    import outlines_core
    from outlines_core.json_schema import build_regex_from_schema

    tokens = _Vocabulary(tok, n, eos).tokens
    t0 = time.perf_counter()
    vocab: dict[bytes, list[int]] = {}
    for i, t in enumerate(tokens):
        if i != eos and not t.startswith(b"\xff"):
            vocab.setdefault(t, []).append(i)
    v = outlines_core.Vocabulary(eos, vocab)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = outlines_core.Index(build_regex_from_schema(json.dumps(SCHEMA)), v)
    t_compile = time.perf_counter() - t0
    guide, rng, times = outlines_core.Guide(index), np.random.default_rng(0), []
    for _ in range(STEPS):
        t0 = time.perf_counter()
        allowed = guide.get_tokens()
        times.append(time.perf_counter() - t0)
        guide.advance(int(rng.choice(allowed)))
        if guide.is_finished():
            break
    return (
        f"outlines-core: vocabulary {ms(t_tok)}, compile (whole regex index) {ms(t_compile)}, allowed list {us(times)}"
    )


def main() -> None:
    tok = Tokenizer(sys.argv[1] if len(sys.argv) > 1 else BUNDLED)
    n, eos = tok.vocab_size, tok.eos_id
    print(f"tokenizer: {n} pieces")
    for run in (run_llguidance, run_xgrammar, run_outlines):
        try:
            print(run(tok, n, eos))
        except ImportError as e:
            print(f"{run.__name__}: not installed ({e})")


if __name__ == "__main__":
    main()
