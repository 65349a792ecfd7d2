"""Scoring text with a model: log-likelihoods of continuations, rolling log-likelihoods, per-token distributions.

What an evaluation harness asks of a model, independent of any harness (``evaluate.py`` adapts it
to lm-eval, ``compare.py`` reads per-token distributions from it):

* ``loglikelihoods``: log P(continuation | context) and whether greedy decoding would produce the
  continuation.  A context and its continuations (the choices of a multiple-choice question) are
  packed into one row, ``context, choice 1, choice 2, ...``, in which each choice sees the context
  and itself only, at the positions it would have alone (``cache.PackedRows``): the context is
  computed once, no token is padded inside a row, and one forward pass scores a whole batch.  The
  output head runs only where a continuation token is predicted.  A request's score does not
  depend on what else is in its batch beyond float rounding in the batched matmuls.
* ``rolling_loglikelihoods``: the log-likelihood of whole documents, cut into windows of the model's
  context the way lm-eval does (every token scored once, the last window with a full context).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from . import cpu
from .cache import PackedRows
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


def _pack(rows: list[tuple[tuple[int, ...], list[tuple[int, ...]]]]):
    """Token, position and attention arrays for rows of (context, continuations), and where each
    continuation token is predicted: the flat index of the position before it, and the token."""
    width = max(len(ctx) + sum(len(c) - 1 for c in conts) for ctx, conts in rows)
    tokens = np.zeros((len(rows), width), np.uint32)
    positions = np.zeros((len(rows), width), np.int32)
    segment = np.full((len(rows), width), -1, np.int32)  # 0: the context, j: continuation j, -1: pad
    picks: list[int] = []
    targets: list[int] = []
    starts: list[int] = []  # where each continuation's targets begin in ``targets``
    for r, (ctx, conts) in enumerate(rows):
        n, at = len(ctx), len(ctx)
        tokens[r, :n], positions[r, :n], segment[r, :n] = ctx, np.arange(n), 0
        for j, cont in enumerate(conts, 1):
            k = len(cont) - 1  # the last token is only predicted, never fed
            span = slice(at, at + k)
            tokens[r, span], positions[r, span], segment[r, span] = cont[:-1], np.arange(n, n + k), j
            starts.append(len(targets))
            picks += [r * width + n - 1, *range(r * width + at, r * width + at + k)]
            targets += cont
            at += k
    index = np.arange(width)
    # A token sees earlier tokens of the context and of its own continuation (pads see the
    # context and earlier pads, so no row of the mask is empty).
    seen = (segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None])
    allowed = (index[None, None, :] <= index[None, :, None]) & seen
    return tokens, positions, allowed[:, None], picks, targets, starts


def _score_packed(
    model: OpenELM, rows: list[tuple[tuple[int, ...], list[tuple[int, ...]]]]
) -> list[tuple[float, bool]]:
    """(sum of log-probabilities, greedy agreement) of every continuation of ``rows``, in order."""
    tokens, positions, allowed, picks, targets, starts = _pack(rows)
    packed = PackedRows(mx.array(positions), mx.array(allowed))
    with cpu.inference():
        h = model.transformer(mx.array(tokens), [packed] * len(model.layers))
        logits = model.logits(h.reshape(-1, h.shape[-1])[mx.array(picks)]).astype(mx.float32)
    tgt = mx.array(targets)
    picked = mx.take_along_axis(logits, tgt[:, None], axis=-1)[:, 0] - mx.logsumexp(logits, axis=-1)
    agree = mx.argmax(logits, axis=-1) == tgt
    mx.eval(picked, agree)
    scores = np.add.reduceat(np.array(picked, np.float64), starts)
    greedy = np.logical_and.reduceat(np.array(agree), starts)
    return [(float(s), bool(g)) for s, g in zip(scores, greedy, strict=True)]


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
    # A row: one context and up to batch_size of its continuations.  Longest first, so a batch
    # holds rows of similar lengths (little padding) and the slowest batch comes first (a run
    # that will not fit memory fails at once).
    rows = [(ctx, idx[k : k + batch_size]) for ctx, idx in groups.items() for k in range(0, len(idx), batch_size)]
    rows.sort(key=lambda row: -len(row[0]) - sum(len(fitted[i][1]) - 1 for i in row[1]))
    batches: list[list[tuple[tuple[int, ...], list[int]]]] = []
    for row in rows:  # whole rows, at most batch_size requests a batch
        if not batches or sum(len(r[1]) for r in batches[-1]) + len(row[1]) > batch_size:
            batches.append([])
        batches[-1].append(row)
    results: list[tuple[float, bool] | None] = [None] * len(fitted)
    bar = tqdm(total=len(fitted), desc="loglikelihood", unit="req", disable=not progress, leave=False)
    for batch in batches:
        done = [i for _, idx in batch for i in idx]
        scored = _score_packed(model, [(ctx, [fitted[i][1] for i in idx]) for ctx, idx in batch])
        for i, result in zip(done, scored, strict=True):
            results[i] = result
        bar.update(len(done))
        if on_batch is not None:
            on_batch(len(done))
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
