"""KL(teacher || student) over next-token distributions: the one measure every method uses."""

from __future__ import annotations

import mlx.core as mx

from ..model import OpenELM


def log_probs(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def kl_per_token(teacher_logp: mx.array, student_logits: mx.array) -> mx.array:
    """[B, S] KL divergences; ``teacher_logp`` already log-softmaxed."""
    return (mx.exp(teacher_logp) * (teacher_logp - log_probs(student_logits))).sum(axis=-1)


def mean_kl(student: OpenELM, teacher: OpenELM, rows: mx.array, batch: int = 4) -> float:
    """Mean KL over every position of ``rows`` (teacher logits computed batch by batch, never all kept)."""
    total, count = 0.0, 0
    for s in range(0, rows.shape[0], batch):
        x = rows[s : s + batch]
        kl = kl_per_token(log_probs(teacher.infer(x)), student.infer(x))
        total += float(kl.sum())
        count += kl.size
    return max(total / count, 0.0)
