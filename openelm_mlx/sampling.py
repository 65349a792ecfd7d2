"""Logit processing and sampling, on the device.

Order and semantics follow Hugging Face's ``generate``: repetition penalty over the
whole context (prompt and generated tokens), then temperature, top-k, top-p, min-p.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

from .errors import OpenELMError

# Where sampling degenerates to argmax, it is done as argmax.  Below GREEDY_TEMP, logits / temp
# overflow float32 (1e-30 turns logits ~10 into 1e31 and logsumexp into inf - inf = NaN); and
# only a runner-up within 1e-5 * 88 nats of the top token could still be drawn (exp(-88) is
# float32's smallest normal).  Below GREEDY_TOP_P the nucleus is the top token alone.
GREEDY_TEMP = 1e-5
GREEDY_TOP_P = 1e-6


@dataclass(frozen=True)
class SamplingOptions:
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.temp < math.inf:  # also refuses NaN
            raise OpenELMError(f"--temp {self.temp}: must be a finite number >= 0")
        if not 0 < self.top_p <= 1:
            raise OpenELMError(f"--top-p {self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise OpenELMError(f"--top-k {self.top_k}: must be >= 0 (0 disables it)")
        if not 0 <= self.min_p < 1:
            raise OpenELMError(f"--min-p {self.min_p}: must be in [0, 1)")
        if not 0 < self.repetition_penalty < math.inf:
            raise OpenELMError(f"--repetition-penalty {self.repetition_penalty}: must be a finite number > 0")


SEED_LIMIT = 2**64  # MLX's random keys take an unsigned 64-bit seed


def check_seed(seed: object) -> None:
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < SEED_LIMIT):
        raise OpenELMError(f"--seed {seed}: must be a whole number from 0 to 2**64 - 1")


def apply_repetition_penalty(logits: mx.array, context: mx.array, penalty: float) -> mx.array:
    """HF semantics: each token seen in ``context`` has its logit divided by ``penalty`` if
    positive, multiplied if negative.  ``logits`` is [V], ``context`` a 1-D array of ids."""
    if penalty == 1.0 or context.size == 0:
        return logits
    seen = logits[context]
    logits[context] = mx.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def filter_logits(logits: mx.array, opts: SamplingOptions) -> mx.array:
    """Scaled log-probabilities with everything outside top-k / top-p / min-p at -inf."""
    logprobs = logits / opts.temp
    logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
    neg_inf = mx.array(-float("inf"), logprobs.dtype)
    if 0 < opts.top_k < logprobs.shape[-1]:
        kth = mx.sort(logprobs)[-opts.top_k]
        logprobs = mx.where(logprobs >= kth, logprobs, neg_inf)
    if opts.top_p < 1.0:
        order = mx.argsort(-logprobs)
        sorted_probs = mx.exp(logprobs[order])
        # keep a token if the mass strictly before it is < top_p (so the top token always stays)
        before = mx.cumsum(sorted_probs) - sorted_probs
        keep_sorted = before < opts.top_p
        keep = mx.zeros(logprobs.shape, dtype=mx.bool_)
        keep[order] = keep_sorted
        logprobs = mx.where(keep, logprobs, neg_inf)
    if opts.min_p > 0.0:
        threshold = mx.max(logprobs) + mx.log(mx.array(opts.min_p, logprobs.dtype))
        logprobs = mx.where(logprobs >= threshold, logprobs, neg_inf)
    return logprobs


def is_greedy(opts: SamplingOptions) -> bool:
    """Whether sampling with ``opts`` degenerates to argmax (GREEDY_TEMP, GREEDY_TOP_P)."""
    return opts.temp < GREEDY_TEMP or opts.top_p < GREEDY_TOP_P


def make_sampler(opts: SamplingOptions, seed: int | None = None) -> Callable[[mx.array, mx.array], mx.array]:
    """``sample(logits[V], context_ids) -> token id`` (an mx scalar, still lazy).

    With a seed, every call draws from its own split of one key, so a seeded run
    reproduces exactly; greedy decoding (temp 0) ignores the seed.
    """
    check_seed(seed)
    key = [mx.random.key(seed)] if seed is not None else None
    greedy = is_greedy(opts)

    def sample(logits: mx.array, context: mx.array) -> mx.array:
        logits = apply_repetition_penalty(logits.astype(mx.float32), context, opts.repetition_penalty)
        if greedy:
            return mx.argmax(logits, axis=-1)
        logprobs = filter_logits(logits, opts)
        if key is None:
            return mx.random.categorical(logprobs)
        key[0], sub = mx.random.split(key[0])
        return mx.random.categorical(logprobs, key=sub)

    return sample
