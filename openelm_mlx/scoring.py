"""Scoring text with a model: log-likelihoods of continuations, rolling log-likelihoods, per-token distributions.

What an evaluation harness asks of a model, independent of any harness (``evaluate.py`` adapts it
to lm-eval, ``compare.py`` reads per-token distributions from it):

* ``loglikelihoods``: log P(continuation | context) and whether greedy decoding would produce the
  continuation.  Requests that share a context (the choices of a multiple-choice question) prefill
  it once; many requests run together as the rows of one batch.  Each row attends over its own KV
  cache with the shapes it would have alone (``model.Attention``'s per-row caches), so a request's
  score does not depend on what else is in its batch beyond float rounding in the batched matmuls.
* ``rolling_loglikelihoods``: the log-likelihood of whole documents, cut into windows of the model's
  context the way lm-eval does (every token scored once, the last window with a full context).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import mlx.core as mx
from tqdm import tqdm

from .cache import KVCache
from .errors import OpenELMError
from .model import OpenELM

Request = tuple[Sequence[int], Sequence[int]]  # (context tokens, continuation tokens)


def _fit(ctx: Sequence[int], cont: Sequence[int], window: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Drop context tokens from the left so context + continuation[:-1] fits the window (as lm-eval's HFLM)."""
    if not cont:
        raise OpenELMError("a continuation to score is empty (it tokenized to no tokens)")
    if not ctx:
        raise OpenELMError("a context to score is empty: it needs at least the BOS token")
    if len(cont) > window:
        raise OpenELMError(f"a continuation of {len(cont)} tokens does not fit the model's context of {window} tokens")
    keep = window - len(cont) + 1
    return tuple(int(t) for t in ctx[-keep:]), tuple(int(t) for t in cont)


def _pad(rows: list[Sequence[int]]) -> mx.array:
    width = max(len(r) for r in rows)
    # Right padding: with causal attention, pads after a row's tokens change none of its positions.
    return mx.array([list(r) + [0] * (width - len(r)) for r in rows], dtype=mx.uint32)


def _view(c: KVCache) -> KVCache:
    """A cache that starts from ``c``'s state; writing to it leaves ``c`` alone (MLX arrays are values)."""
    out = KVCache()
    if c.keys is not None and c.offset > 0:
        out.keys, out.values, out.offset = c.keys[..., :, :], c.values[..., :, :], c.offset
    return out


def _prefill(model: OpenELM, contexts: list[tuple[int, ...]]) -> list[list[KVCache]]:
    """Per context, the layer caches holding all its tokens but the last (the scoring pass feeds that one)."""
    caches = [model.make_cache() for _ in contexts]
    todo = [i for i, ctx in enumerate(contexts) if len(ctx) > 1]
    if todo:
        rows = [contexts[i][:-1] for i in todo]
        per_layer = [[caches[i][layer] for i in todo] for layer in range(len(model.layers))]
        model.infer(_pad(rows), cache=per_layer, last_only=True)
        width = max(len(r) for r in rows)
        for i, r in zip(todo, rows, strict=True):
            for c in caches[i]:
                c.trim(width - len(r))  # forget the pads
        mx.eval([[(c.keys, c.values) for c in caches[i]] for i in todo])
    return caches


def _score_rows(
    model: OpenELM, rows: list[tuple[int, ...]], targets: list[tuple[int, ...]], caches: list[list[KVCache]]
) -> tuple[list[float], list[bool]]:
    """Sum of log-probabilities of ``targets[r]`` and greedy agreement, row r fed over ``caches[r]``."""
    per_layer = [[_view(caches[r][layer]) for r in range(len(rows))] for layer in range(len(model.layers))]
    logits = model.infer(_pad(rows), cache=per_layer).astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    tgt = _pad(targets)
    picked = mx.take_along_axis(logprobs, tgt[..., None], axis=-1)[..., 0]
    lengths = mx.array([len(t) for t in targets])
    real = mx.arange(tgt.shape[1])[None, :] < lengths[:, None]
    scores = mx.where(real, picked, 0.0).sum(axis=1)
    greedy = mx.where(real, mx.argmax(logits, axis=-1) == tgt, True).all(axis=1)
    mx.eval(scores, greedy)
    return scores.tolist(), greedy.tolist()


def loglikelihoods(
    model: OpenELM,
    requests: Sequence[Request],
    batch_size: int = 8,
    progress: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> list[tuple[float, bool]]:
    """(log P(continuation | context), is_greedy) for each request, in the order given.

    A context holds at least one token (lm-eval passes BOS for an empty one).  Contexts too long
    for the model lose tokens from the left.  ``batch_size`` continuations run per forward pass;
    ``on_batch(n)`` is told how many requests each pass finished."""
    if batch_size < 1:
        raise OpenELMError(f"--batch-size {batch_size}: must be at least 1")
    window = model.config.max_context_length
    fitted = [_fit(ctx, cont, window) for ctx, cont in requests]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(fitted):
        groups.setdefault(ctx, []).append(i)
    # Longest first, so a batch holds contexts of similar lengths (little padding) and the slowest
    # batch comes first (a run that will not fit memory fails at once).
    order = [
        i
        for ctx in sorted(groups, key=lambda c: -len(c) - max(len(fitted[j][1]) for j in groups[c]))
        for i in groups[ctx]
    ]
    results: list[tuple[float, bool] | None] = [None] * len(fitted)
    cached: dict[tuple[int, ...], list[KVCache]] = {}  # the contexts of the current batch (and one straddling it)
    bar = tqdm(total=len(fitted), desc="loglikelihood", unit="req", disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        contexts = list(dict.fromkeys(fitted[i][0] for i in batch))
        new = [c for c in contexts if c not in cached]
        cached = {c: cached[c] for c in contexts if c in cached}
        cached.update(zip(new, _prefill(model, new), strict=True))
        rows = [(fitted[i][0][-1], *fitted[i][1][:-1]) for i in batch]
        scores, greedy = _score_rows(model, rows, [fitted[i][1] for i in batch], [cached[fitted[i][0]] for i in batch])
        for i, s, g in zip(batch, scores, greedy, strict=True):
            results[i] = (s, bool(g))
        bar.update(len(batch))
        if on_batch is not None:
            on_batch(len(batch))
    bar.close()
    return results  # type: ignore[return-value]


def rolling_windows(tokens: Sequence[int], prefix: int, window: int) -> Iterator[Request]:
    """lm-eval's rolling windows (``get_rolling_token_windows`` with context 1, made disjoint) as
    (context, continuation) requests: every token predicted once, the first after ``prefix``,
    each window at most ``window`` tokens long, the last one with as much context as fits."""
    tokens = list(tokens)
    if not tokens:
        return
    first = min(window, len(tokens))
    yield [prefix], tokens[:first]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, window)
        end = done + n
        yield tokens[max(0, end - window - 1) : done], tokens[done:end]
        done = end


def rolling_loglikelihoods(
    model: OpenELM, documents: Sequence[Sequence[int]], prefix: int, batch_size: int = 8, progress: bool = False
) -> list[float]:
    """Log-likelihood of each document's tokens given ``prefix`` (BOS), in model-context windows."""
    window = model.config.max_context_length
    requests: list[Request] = []
    owner: list[int] = []
    for d, doc in enumerate(documents):
        for req in rolling_windows(doc, prefix, window):
            requests.append(req)
            owner.append(d)
    totals = [0.0] * len(documents)
    for d, (score, _) in zip(owner, loglikelihoods(model, requests, batch_size, progress), strict=True):
        totals[d] += score
    return totals
