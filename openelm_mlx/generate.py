"""Text generation for one prompt: ``generate``, ``stream_generate`` and ``generate_tokens``.

All three run on the engine (engine.py), which owns the decode loop; this module adds the
tokenizer, the Instruct template and the running figures the CLI prints.  Speculative decoding
(a smaller OpenELM drafts, the model verifies) and prompt-lookup decoding (drafts copied from
earlier context) are the engine's too: a token is accepted only if it equals what the model
itself samples there, so at temperature 0 both give exactly the plain greedy output.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import mlx.core as mx

from .cache import KVCache
from .engine import Engine, GenParams, encode_prompt, params_from_options
from .errors import OpenELMError
from .grammar import OutputSpec
from .model import OpenELM
from .sampling import SamplingOptions
from .tokenizer import Tokenizer


@dataclass
class GenerationResponse:
    text: str  # the new piece of text (may be empty while a UTF-8 sequence is incomplete)
    tokens: list[int]  # the token ids behind it
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_gb: float
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length" (max tokens) or None
    draft_proposed: int = 0
    draft_accepted: int = 0
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class DecodeStats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated: int = 0
    decode_start: float = field(default_factory=time.perf_counter)
    draft_proposed: int = 0
    draft_accepted: int = 0


def peak_memory_gb() -> float:
    get = getattr(mx, "get_peak_memory", None) or mx.metal.get_peak_memory
    return get() / 1e9


def run_one(
    model: OpenELM,
    prompt_ids: list[int],
    params: GenParams,
    *,
    tokenizer: Tokenizer | None = None,
    cache: list[KVCache] | None = None,
    history: list[int] | None = None,
    draft_model: OpenELM | None = None,
    stats: DecodeStats | None = None,
):
    """Run one sequence on an engine of its own, yielding the engine's outputs; ``stats`` is kept current."""
    engine = Engine(model, tokenizer, max_batch=1, draft_model=draft_model)
    stats = stats if stats is not None else DecodeStats()
    t0 = time.perf_counter()
    seq = engine.submit(prompt_ids, params, cache=cache, history=history)
    try:
        while engine.has_work():
            for o in engine.step():
                if stats.generated == 0 and o.tokens:
                    stats.prompt_tokens = o.prompt_tokens - o.cached_tokens
                    stats.prompt_seconds = time.perf_counter() - t0
                    stats.decode_start = time.perf_counter()
                stats.generated = o.generation_tokens
                stats.draft_proposed, stats.draft_accepted = o.draft_proposed, o.draft_accepted
                yield o
    finally:
        if engine.has_work():  # the caller stopped early (Ctrl-C, break): keep the cache consistent
            engine.cancel(seq)
            engine.step()


def generate_tokens(
    model: OpenELM,
    prompt_ids: list[int],
    *,
    max_tokens: int = 256,
    sampling: SamplingOptions | None = None,
    seed: int | None = None,
    cache: list[KVCache] | None = None,
    history: list[int] | None = None,
    draft_model: OpenELM | None = None,
    num_draft_tokens: int = 3,
    prompt_lookup: int = 0,
    stats: DecodeStats | None = None,
    ignore_eos: bool = False,
    constraint: OutputSpec | None = None,
    tokenizer: Tokenizer | None = None,
) -> Iterator[int]:
    """Yield generated token ids until EOS (yielded) or ``max_tokens``.

    With ``cache``, ``history`` lists the tokens already in it (they count for the repetition
    penalty); ``prompt_ids`` are appended after them.  ``history`` is extended in place with
    the prompt and every yielded token, so a caller can continue the conversation.
    """
    if max_tokens < 1:
        raise OpenELMError(f"--max-tokens {max_tokens}: must be at least 1")
    params = GenParams(
        max_tokens=max_tokens,
        sampling=sampling or SamplingOptions(),
        seed=seed,
        ignore_eos=ignore_eos,
        prompt_lookup=prompt_lookup if draft_model is None else 0,
        num_draft_tokens=num_draft_tokens,
        constraint=constraint,
    )
    runs = run_one(
        model,
        prompt_ids,
        params,
        tokenizer=tokenizer,
        cache=cache,
        history=history,
        draft_model=draft_model,
        stats=stats,
    )
    for o in runs:
        yield from o.tokens


def stream_generate(
    model: OpenELM,
    tokenizer: Tokenizer,
    prompt: str | list[int],
    *,
    max_tokens: int = 256,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    system_prompt: str | None = None,
    chat_template: str = "auto",
    draft_model: OpenELM | None = None,
    num_draft_tokens: int = 3,
    prompt_lookup: int = 0,
    stop: list[str] | tuple[str, ...] = (),
    logprobs: int | None = None,
    response_format: dict | None = None,
) -> Iterator[GenerationResponse]:
    """Yield a ``GenerationResponse`` per generated token: new text, ids and running figures.

    ``response_format``: ``{"type": "json_object"}``, ``{"type": "json_schema", "json_schema":
    {"name", "schema"}}`` or a JSON Schema itself: only output that satisfies it is sampled (a
    ``max_tokens`` cut, finish reason "length", may leave it incomplete)."""
    ids = encode_prompt(model, tokenizer, prompt, system_prompt=system_prompt, chat_template=chat_template)
    if max_tokens < 1:
        raise OpenELMError(f"--max-tokens {max_tokens}: must be at least 1")
    params = params_from_options(
        max_tokens=max_tokens,
        temp=temp,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        response_format=response_format,
        seed=seed,
        stop=tuple(stop),
        logprobs=logprobs,
        prompt_lookup=prompt_lookup if draft_model is None else 0,
        num_draft_tokens=num_draft_tokens,
    )
    stats = DecodeStats()
    for o in run_one(model, ids, params, tokenizer=tokenizer, draft_model=draft_model, stats=stats):
        r = _response(o.text, o.tokens, stats, o.finish_reason)
        r.logprobs, r.top_logprobs = o.logprobs, o.top_logprobs
        yield r


def _response(text: str, tokens: list[int], stats: DecodeStats, finish: str | None) -> GenerationResponse:
    elapsed = time.perf_counter() - stats.decode_start
    return GenerationResponse(
        text=text,
        tokens=tokens,
        prompt_tokens=stats.prompt_tokens,
        prompt_tps=stats.prompt_tokens / stats.prompt_seconds if stats.prompt_seconds > 0 else 0.0,
        generation_tokens=stats.generated,
        generation_tps=(stats.generated - 1) / elapsed if elapsed > 0 and stats.generated > 1 else 0.0,
        peak_memory_gb=peak_memory_gb(),
        finish_reason=finish,
        draft_proposed=stats.draft_proposed,
        draft_accepted=stats.draft_accepted,
    )


def generate(model: OpenELM, tokenizer: Tokenizer, prompt: str | list[int], **options) -> str:
    """The generated text (without the prompt); options as for ``stream_generate``."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **options))
