"""Perplexity of a model over a text, sliding over the model's context like HF's strided evaluation."""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
from tqdm import tqdm

from .errors import OpenELMError
from .model import OpenELM


def read_text(path: str | Path) -> str:
    """A ``--text`` file for ``eval`` and ``compare``, or a one-line error naming it."""
    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise OpenELMError(f"--text {path}: no such text file") from None
    except OSError as e:  # a directory, no permission, ...
        raise OpenELMError(f"--text {path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise OpenELMError(f"--text {path}: not valid UTF-8 (byte {e.start})") from None


def token_nll(
    model: OpenELM, ids: list[int], window: int | None = None, stride: int | None = None, progress: bool = True
) -> tuple[float, int]:
    """(total negative log-likelihood in nats, tokens scored) for ids[1:] given what precedes them.

    Each window of ``window`` tokens scores only the tokens the previous window did not, with
    at least ``window - stride`` tokens of context before them.
    """
    window = window or model.config.max_context_length
    stride = stride or window // 2
    if not 0 < stride <= window <= model.config.max_context_length:
        raise OpenELMError(f"window {window} / stride {stride}: need 0 < stride <= window <= context")
    if len(ids) < 2:
        raise OpenELMError("the text is too short to score (fewer than 2 tokens)")
    total, scored, prev_end = 0.0, 0, 1
    starts = range(0, len(ids) - 1, stride)
    for begin in tqdm(starts, desc="perplexity", unit="window", disable=not progress, leave=False):
        end = min(begin + window, len(ids))
        logits = model.infer(mx.array([ids[begin : end - 1]]))[0].astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        targets = mx.array(ids[begin + 1 : end])
        picked = mx.take_along_axis(logprobs, targets[:, None], axis=-1)[:, 0]
        first = prev_end - (begin + 1)  # skip targets an earlier window already scored
        total -= picked[first:].sum().item()
        scored += end - prev_end
        prev_end = end
        if end == len(ids):
            break
    return total, scored


def perplexity(model: OpenELM, ids: list[int], **kwargs) -> float:
    nll, n = token_nll(model, ids, **kwargs)
    return math.exp(nll / n)
