"""Text generation: load a model, prefill, decode, stream.

``generate_tokens`` is the engine (token ids in, token ids out, KV cache reused);
``stream_generate`` and ``generate`` add the tokenizer, the Instruct template and timing.
Speculative decoding (a smaller OpenELM drafts, the model verifies) and prompt-lookup
decoding (drafts copied from earlier context) share one verification loop; a token is
accepted only if it equals what the model itself samples there, so at temperature 0
both give exactly the plain greedy output.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import mlx.core as mx

from .cache import KVCache
from .errors import OpenELMError
from .model import OpenELM
from .sampling import SamplingOptions, make_sampler
from .step import decoder
from .template import format_prompt
from .tokenizer import Tokenizer

PREFILL_CHUNK = 512


@dataclass
class GenerationResponse:
    text: str  # the new piece of text (may be empty while a UTF-8 sequence is incomplete)
    tokens: list[int]  # the token ids behind it
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_gb: float
    finish_reason: str | None = None  # "stop" (EOS), "length" (max tokens) or None
    draft_proposed: int = 0
    draft_accepted: int = 0


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


def _prefill(model: OpenELM, ids: list[int], cache: list[KVCache]) -> mx.array | None:
    """Run ``ids`` through the model into the cache; returns the last position's logits."""
    logits = None
    for start in range(0, len(ids), PREFILL_CHUNK):
        logits = model.infer(mx.array([ids[start : start + PREFILL_CHUNK]]), cache=cache, last_only=True)[0, -1]
        mx.eval(logits)
    return logits


def check_context(model: OpenELM, used: int, new: int, max_tokens: int) -> None:
    limit = model.config.max_context_length
    if used + new + max_tokens > limit:
        raise OpenELMError(
            f"the prompt ({used + new} tokens) plus --max-tokens {max_tokens} exceeds the model's context of "
            f"{limit} tokens; shorten the prompt or lower --max-tokens"
        )


Proposer = Callable[[list[int], int], list[int]]


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
) -> Iterator[int]:
    """Yield generated token ids until EOS (yielded) or ``max_tokens``.

    With ``cache``, ``history`` lists the tokens already in it (they count for the repetition
    penalty); ``prompt_ids`` are appended after them.  ``history`` is extended in place with
    the prompt and every yielded token, so a caller can continue the conversation.
    """
    if not prompt_ids:
        raise OpenELMError("the prompt is empty")
    if max_tokens < 1:
        raise OpenELMError(f"--max-tokens {max_tokens}: must be at least 1")
    cache = cache if cache is not None else model.make_cache()
    history = history if history is not None else []
    if cache[0].offset > len(history):
        raise OpenELMError("the KV cache holds more tokens than the given history")
    check_context(model, len(history), len(prompt_ids), max_tokens)
    stats = stats if stats is not None else DecodeStats()
    sampling = sampling or SamplingOptions()
    sampler = make_sampler(sampling, seed)
    eos = -1 if ignore_eos else model.config.eos_token_id
    pending = history[cache[0].offset :] + list(prompt_ids)  # not yet in the cache
    history.extend(prompt_ids)
    stats.prompt_tokens = len(pending)
    t0 = time.perf_counter()
    if draft_model is None and prompt_lookup <= 0:
        track = sampling.repetition_penalty != 1.0
        steps = _plain_steps(model, pending, cache, history, sampler, max_tokens, track)
    else:
        if draft_model is not None and draft_model.config.vocab_size != model.config.vocab_size:
            raise OpenELMError("--draft-model has a different vocabulary from --model")
        propose: Proposer = _DraftProposer(draft_model) if draft_model is not None else _lookup_proposer
        k = num_draft_tokens if draft_model is not None else prompt_lookup
        steps = _speculative_steps(model, pending, cache, history, sampler, max_tokens, stats, propose, k, eos)
    first = True
    for tok in steps:
        if first:
            stats.prompt_seconds = time.perf_counter() - t0
            stats.decode_start = time.perf_counter()
            first = False
        stats.generated += 1
        history.append(tok)
        yield tok
        if tok == eos:
            return


def _plain_steps(model, pending, cache, history, sampler, max_tokens, track_context) -> Iterator[int]:
    # Pipelined: step n+1 is queued (async_eval) before token n goes back to Python.  The first
    # token goes back before any step: a step can block (cpu.py's NumPy routes evaluate eagerly),
    # and the time to the first token is the prompt's.
    # The context (for the repetition penalty) grows on the device only when it is used.
    context = mx.array(history if track_context else [], dtype=mx.uint32)
    decode = decoder(model)

    def step(y: mx.array) -> mx.array:
        nonlocal context
        if track_context:
            context = mx.concatenate([context, y.reshape(1).astype(mx.uint32)])
        y = sampler(decode(y.reshape(1, 1), cache)[0, -1], context)
        mx.async_eval(y)
        return y

    y = sampler(_prefill(model, pending, cache), context)
    yield y.item()
    next_y = step(y) if max_tokens > 1 else None
    for n in range(1, max_tokens):
        y = next_y
        if n + 1 < max_tokens:
            next_y = step(y)
        yield y.item()


def _speculative_steps(model, pending, cache, history, sampler, max_tokens, stats, propose, k, eos) -> Iterator[int]:
    # The cache holds everything but the last known token ``y``; each round feeds y plus
    # the drafts, samples the model at every position and keeps the agreeing prefix.
    if len(pending) > 1:
        _prefill(model, pending[:-1], cache)
    y = pending[-1]
    produced = 0
    while produced < max_tokens:
        drafts = propose(history, min(k, max_tokens - produced - 1)) if k > 0 else []
        logits = model.infer(mx.array([[y, *drafts]]), cache=cache)[0]
        base = mx.array(history, dtype=mx.uint32)
        picks = []
        for i in range(len(drafts) + 1):
            ctx = mx.concatenate([base, mx.array(drafts[:i], dtype=mx.uint32)]) if i else base
            picks.append(sampler(logits[i], ctx))
        mx.eval(picks)
        picks = [p.item() for p in picks]
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == picks[accepted]:
            accepted += 1
        stats.draft_proposed += len(drafts)
        stats.draft_accepted += accepted
        for c in cache:
            c.trim(len(drafts) - accepted)
        emitted = drafts[:accepted] + [picks[accepted]]
        if isinstance(propose, _DraftProposer):
            propose.rollback(len(history) + min(accepted, max(len(drafts) - 1, 0)))
        for tok in emitted:
            produced += 1
            yield tok
            if tok == eos or produced >= max_tokens:
                return
        y = emitted[-1]


class _DraftProposer:
    """Greedy drafts from a smaller OpenELM with its own cache (all eight share a tokenizer)."""

    def __init__(self, draft: OpenELM):
        self.draft, self.cache = draft, draft.make_cache()
        self.decode = decoder(draft)  # chosen once: the choice sums the model's weight bytes

    def __call__(self, ids: list[int], k: int) -> list[int]:
        if k <= 0:
            return []
        new = ids[self.cache[0].offset :]
        d = mx.argmax(_prefill(self.draft, new, self.cache))
        out = [d]
        for _ in range(k - 1):
            d = mx.argmax(self.decode(d.reshape(1, 1), self.cache)[0, -1])
            out.append(d)
        mx.eval(out)
        return [t.item() for t in out]

    def rollback(self, keep: int) -> None:
        for c in self.cache:
            c.trim(c.offset - keep)


def _lookup_proposer(ids: list[int], k: int, max_ngram: int = 3) -> list[int]:
    """Prompt-lookup decoding: continue the latest earlier occurrence of the last n-gram."""
    if k <= 0:
        return []
    for n in range(min(max_ngram, len(ids) - 1), 0, -1):
        tail = ids[-n:]
        for start in range(len(ids) - n - 1, -1, -1):
            if ids[start : start + n] == tail:
                return ids[start + n : start + n + k]
    return []


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
) -> Iterator[GenerationResponse]:
    """Yield a ``GenerationResponse`` per generated token: new text, ids and running figures."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise OpenELMError("the prompt is empty")
        text = format_prompt(prompt, getattr(model, "is_instruct", False), system_prompt, chat_template)
        ids = tokenizer.encode(text)
    else:
        ids = list(prompt)
    sampling = SamplingOptions(temp, top_p, top_k, min_p, repetition_penalty)
    stats = DecodeStats()
    detok = tokenizer.detokenizer()
    steps = generate_tokens(
        model,
        ids,
        max_tokens=max_tokens,
        sampling=sampling,
        seed=seed,
        draft_model=draft_model,
        num_draft_tokens=num_draft_tokens,
        prompt_lookup=prompt_lookup,
        stats=stats,
    )
    eos = model.config.eos_token_id
    for tok in steps:
        finish = "stop" if tok == eos else ("length" if stats.generated >= max_tokens else None)
        piece = "" if tok == eos else detok.add(tok)
        if finish:
            piece += detok.finalize()
        yield _response(piece, [tok], stats, finish)


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
