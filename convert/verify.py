"""Check a converted model against the float64 reference run on the source weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .. import reference
from ..loading import load_model, read_config
from .sources import Source


@dataclass(frozen=True)
class Tolerance:
    max_rel_err: float  # max |logit error| / max |reference logit|
    min_top1: float
    max_kl: float


# Calibrated on random-weight and trained models (see tests/test_verify.py); quantized rows
# bound the damage that a correct quantizer does, so a broken one (wrong layout, collapsed
# scales) fails by orders of magnitude.
TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(1e-4, 0.99, 1e-6),
    "float16": Tolerance(2e-2, 0.9, 1e-2),
    "bfloat16": Tolerance(6e-2, 0.85, 5e-2),
    "q8": Tolerance(0.1, 0.85, 5e-2),
    "q6": Tolerance(0.15, 0.8, 0.1),
    "q5": Tolerance(0.25, 0.75, 0.2),
    "q4": Tolerance(0.4, 0.6, 0.5),
    "q3": Tolerance(0.8, 0.4, 1.5),
    "q2": Tolerance(2.0, 0.1, 5.0),
}


# A position is decisive when the reference's top token leads its runner-up by more than this
# many logits (a probability ratio of e): only there must the converted model pick the same token.
# Where the reference is nearly tied, a flip says nothing; KL and the logit error still count.
DECISIVE_MARGIN = 1.0


@dataclass
class Report:
    label: str
    tokens: int
    max_rel_err: float
    top1: float  # over all positions (reported)
    top1_decisive: float  # over decisive positions (enforced)
    decisive: int
    kl: float
    tolerance: Tolerance

    @property
    def passed(self) -> bool:
        t = self.tolerance
        finite = np.isfinite([self.max_rel_err, self.kl]).all()
        top1_ok = self.decisive == 0 or self.top1_decisive >= t.min_top1
        return bool(finite and self.max_rel_err <= t.max_rel_err and top1_ok and self.kl <= t.max_kl)

    def __str__(self) -> str:
        t = self.tolerance
        verdict = "PASS" if self.passed else "FAIL"
        return (
            f"verify [{self.label}, {self.tokens} tokens]: max |logit error| / logit scale = {self.max_rel_err:.2e} "
            f"(limit {t.max_rel_err:.0e}), top-1 agreement = {self.top1:.3f} "
            f"({self.top1_decisive:.3f} on {self.decisive} decisive positions, min {t.min_top1}), "
            f"mean KL = {self.kl:.2e} (limit {t.max_kl:.0e}): {verdict}"
        )


def tolerance_label(model_dir: Path) -> str:
    """'q<lowest bits>' for quantized models, else the embedding's dtype."""
    _, raw = read_config(model_dir)
    quant = raw.get("quantization")
    if quant:
        bits = [quant["bits"]] + [v["bits"] for v in quant.values() if isinstance(v, dict)]
        return f"q{min(bits)}"
    return raw.get("openelm_mlx", {}).get("dtype", "float32")


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(ref: np.ndarray, got: np.ndarray) -> tuple[float, float, float, int, float]:
    """(max error / logit scale, top-1 agreement, top-1 on decisive positions, their count, mean KL)."""
    got = got.astype(np.float64)
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    agree = got.argmax(-1) == ref.argmax(-1)
    top2 = np.sort(ref, axis=-1)[..., -2:]
    decisive = (top2[..., 1] - top2[..., 0]) > DECISIVE_MARGIN
    n = int(decisive.sum())
    top1_decisive = float(agree[decisive].mean()) if n else 1.0
    lp, lq = log_softmax(ref), log_softmax(got)
    kl = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
    return rel, float(agree.mean()), top1_decisive, n, kl


def verify(source: Source, model_dir: Path, num_tokens: int = 32, seed: int = 0) -> Report:
    config = source.config
    rng = np.random.default_rng(seed)
    tokens = np.concatenate([[config.bos_token_id], rng.integers(3, config.vocab_size, num_tokens - 1)])[None]
    tokens = tokens[:, : config.max_context_length]
    ref = reference.forward(config, source.tensors, tokens)
    model = load_model(model_dir)
    got = np.array(model(mx.array(tokens)).astype(mx.float32))
    label = tolerance_label(model_dir)
    rel, top1, top1_decisive, decisive, kl = compare(ref, got)
    return Report(label, tokens.shape[1], rel, top1, top1_decisive, decisive, kl, TOLERANCES[label])
