"""Check a converted model in two parts that answer different questions.

**Correctness** (pass/fail, tight): is the directory a faithful encoding of the source?
  1. every stored tensor, dequantized or cast back, lies within the rounding bound of its
     format (the dtype's unit roundoff; one quantization step of its group for affine
     modes, a fixed fraction of the group's largest value for the fp4/fp8 modes) of the
     source tensor. A transposed weight, swapped scales or a tensor under the wrong name
     exceeds it many times over;
  2. the converted model's logits equal the float64 reference run on the weights *as
     stored* (a config, layout, name or scale-interpretation bug in the written files or
     the loader fails by orders of magnitude; only the compute dtype's rounding remains).

**Quality** (reported, never a verdict of its own): how far the stored weights moved the
model from the original float weights, as mean KL divergence and top-1 agreement on real
text when a tokenizer is known (random ids otherwise). Above a typical figure for the
format it warns; it fails only on collapse (non-finite logits, one token everywhere) or
above a ``max_kl`` the user sets.  A 2-bit model is meant to be worse; that is not a bug.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .. import reference
from ..errors import OpenELMError
from ..loading import load_model, read_config
from .sources import Source

# max |logit - float64 reference on the stored weights| / max |reference logit|, by compute
# dtype. Measured at the 270M shape with N(0, 0.02) weights: float32 3e-6 (quantized or not),
# float16 2e-3, bfloat16 1.5e-2 to 1.8e-2; a layout or scale bug gives 0.3 and more.
LOGIT_LIMITS: dict[str, float] = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 8e-2}

# Unit roundoff of each stored dtype (round to nearest), and the smallest spacing near zero.
_ROUNDOFF: dict[str, tuple[float, float]] = {
    "float32": (2.0**-24, 2.0**-149),
    "float16": (2.0**-11, 2.0**-25),
    "bfloat16": (2.0**-8, 2.0**-133),
}

# Allowed error per element of a quantized weight, as a multiple of its group's unit: one
# affine step (max - min) / (2^bits - 1) (MLX rounds to the nearest level after pinning the
# larger-magnitude end exactly, so it stays below one step), or the group's max |w| for the
# fp modes (mxfp4/mxfp8 use power-of-two scales: at most 1/4 and 1/8 of the max; nvfp4's
# fp8 scales round to 1/3). Rounding of scales, biases and the result adds to this.
_QUANT_STEPS: dict[str, float] = {"affine": 1.0, "mxfp4": 0.25, "mxfp8": 0.125, "nvfp4": 0.375}
# Each bound is attained in the worst case; this absorbs the float32 rounding of checking it.
_SLACK = 1.02

# Mean KL divergence (nats per token) from the original float weights above which a
# conversion deserves a look: about 3x the worst that correct conversions measure on 270M-shape
# N(0, 0.02) checkpoints (flat, random distributions: q2 0.44, q3 0.23, q4 0.11 with mxfp4, q5
# 0.016, q6 0.004, q8 0.006 with mxfp8, bfloat16 8e-5). The trained bundled model measures less
# (q2 0.12, q4 0.01). Only a warning: fewer bits are meant to cost quality.
TYPICAL_KL: dict[str, float] = {
    "float32": 1e-6,
    "float16": 1e-4,
    "bfloat16": 1e-3,
    "q8": 2e-2,
    "q6": 2e-2,
    "q5": 5e-2,
    "q4": 0.35,
    "q3": 0.7,
    "q2": 1.5,
}

# Public-domain English (the opening of Jane Austen's Pride and Prejudice, then the preamble
# of the US Declaration of Independence): real text for the quality figures.
VERIFY_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
    "considered the rightful property of some one or other of their daughters. When in the Course of human "
    "events, it becomes necessary for one people to dissolve the political bands which have connected them "
    "with another, and to assume among the powers of the earth, the separate and equal station to which the "
    "Laws of Nature and of Nature's God entitle them, a decent respect to the opinions of mankind requires "
    "that they should declare the causes which impel them to the separation."
)


@dataclass
class Correctness:
    compute_dtype: str
    tensor_ratio: float  # worst stored-tensor error / its format's bound (<= 1 passes)
    worst_tensor: str
    logit_err: float  # max |logit error| / logit scale against the reference on the stored weights
    logit_limit: float
    problem: str = ""  # a missing or unexpected tensor, named
    calibrated: bool = False  # GPTQ/DWQ moved the tensors off round-to-nearest: no per-tensor bound

    @property
    def passed(self) -> bool:
        return (
            not self.problem
            and bool(np.isfinite([self.tensor_ratio, self.logit_err]).all())
            and self.tensor_ratio <= 1.0
            and self.logit_err <= self.logit_limit
        )

    def __str__(self) -> str:
        if self.problem:
            return f"correctness: {self.problem}: FAIL"
        tensors = (
            "stored tensors calibrated (GPTQ/DWQ choose them, so no rounding bound applies)"
            if self.calibrated
            else f"stored tensors at {self.tensor_ratio:.3f} of their rounding bound "
            f"(limit 1, worst {self.worst_tensor})"
        )
        return (
            f"correctness: {tensors}; logits vs the float64 reference on the stored weights: "
            f"{self.logit_err:.2e} of the logit scale ({self.compute_dtype} compute, limit {self.logit_limit:.0e}): "
            + ("PASS" if self.passed else "FAIL")
        )


@dataclass
class Quality:
    label: str  # q<lowest bits> or the dtype
    tokens: int
    on_text: bool
    kl: float  # mean KL(original || converted), nats per token
    top1: float  # share of positions where both pick the same top token
    max_kl: float | None = None  # the user's limit, if any
    collapse: str = ""

    @property
    def typical_kl(self) -> float:
        return TYPICAL_KL[self.label]

    @property
    def passed(self) -> bool:
        return not self.collapse and (self.max_kl is None or self.kl <= self.max_kl)

    @property
    def warning(self) -> str:
        if self.passed and self.kl > self.typical_kl:
            return (
                f"warning: mean KL {self.kl:.2e} is above the {self.typical_kl:.0e} typical for {self.label}; "
                "compare a few generations with the float model, or use more bits or a mixed recipe"
            )
        return ""

    def __str__(self) -> str:
        what = "text" if self.on_text else "random ids (no tokenizer)"
        line = (
            f"quality vs the original weights [{self.label}, {self.tokens} tokens of {what}]: mean KL "
            f"{self.kl:.2e} nats/token, top-1 agreement {self.top1:.3f}"
        )
        if self.collapse:
            return line + f": FAIL ({self.collapse})"
        if self.max_kl is not None:
            return line + f" (--max-kl {self.max_kl:g}): " + ("PASS" if self.passed else "FAIL")
        return line


@dataclass
class Report:
    correctness: Correctness
    quality: Quality | None
    warnings: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.correctness.passed and (self.quality is None or self.quality.passed)

    def __str__(self) -> str:
        lines = ["verify " + str(self.correctness)]
        if self.quality is not None:
            lines.append("verify " + str(self.quality))
            if self.quality.warning:
                lines.append("verify " + self.quality.warning)
        lines += ["verify " + w for w in self.warnings]
        return "\n".join(lines)


def quality_label(raw: dict[str, Any]) -> str:
    """'q<lowest bits>' for quantized models, else the stored dtype."""
    quant = raw.get("quantization")
    if isinstance(quant, dict) and "bits" in quant:
        bits = [quant["bits"]] + [v["bits"] for v in quant.values() if isinstance(v, dict) and "bits" in v]
        return f"q{min(bits)}"
    return _stored_dtype(raw)


def _stored_dtype(raw: dict[str, Any]) -> str:
    meta = raw.get("openelm_mlx")
    dtype = meta.get("dtype") if isinstance(meta, dict) else None
    return dtype if dtype in LOGIT_LIMITS else "float32"


def _dtype_name(a: mx.array) -> str:
    return {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}.get(a.dtype, "float32")


class StoredWeights(Mapping):
    """HF name -> what the converted directory holds, dequantized or cast back (float32 MLX).

    The arrays are the loaded model's own parameters (no second copy in memory); how to
    dequantize each module is read from ``config.json`` independently of the loader."""

    def __init__(self, params: dict[str, mx.array], quant: dict[str, Any] | None, dtype: str):
        self.params, self.quant = params, quant or {}
        self.roundoff = _ROUNDOFF[dtype][0]  # weights were cast to the model's dtype, then quantized
        self.names = [n for n in params if n.endswith(".weight")]

    def spec(self, module: str) -> dict[str, Any] | None:
        if f"{module}.scales" not in self.params:
            return None
        override = self.quant.get(module)
        base = {k: self.quant[k] for k in ("group_size", "bits", "mode") if k in self.quant}
        return {**base, **override} if isinstance(override, dict) else base

    def mlx(self, name: str) -> mx.array:
        module = name.rsplit(".", 1)[0]
        spec = self.spec(module)
        w = self.params[name]
        if spec is None:
            return w.astype(mx.float32)
        return mx.dequantize(
            w,
            self.params[f"{module}.scales"],
            self.params.get(f"{module}.biases"),
            group_size=spec["group_size"],
            bits=spec["bits"],
            mode=spec.get("mode", "affine"),
            dtype=mx.float32,
        )

    def __getitem__(self, name: str) -> np.ndarray:
        return np.array(self.mlx(name), dtype=np.float64)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def tensor_error_ratio(stored: StoredWeights, name: str, source: np.ndarray) -> float:
    """max over elements of |stored - source| / the bound of the tensor's format (<= 1 passes)."""
    module = name.rsplit(".", 1)[0]
    w = mx.array(np.asarray(source, dtype=np.float32))
    got = stored.mlx(name)
    if got.shape != w.shape:
        return float("inf")
    err = mx.abs(got - w)
    spec = stored.spec(module)
    if spec is None:
        u, tiny = _ROUNDOFF[_dtype_name(stored.params[name])]
        bound = (u + 2.0**-24) * mx.abs(w) + tiny
        return float(mx.max(err / (bound * _SLACK)))
    scales = stored.params[f"{module}.scales"]
    u = max(stored.roundoff, 2.0**-23)
    g, bits, mode = spec["group_size"], spec["bits"], spec.get("mode", "affine")
    if w.shape[-1] % g:
        return float("inf")
    groups = w.reshape(*w.shape[:-1], -1, g)
    if mode == "affine":
        unit = (groups.max(-1, keepdims=True) - groups.min(-1, keepdims=True)) / (2**bits - 1)
        biases = stored.params.get(f"{module}.biases")
        # scale, bias and the product round in the stored dtype: bound each rounding
        levels = (2**bits - 1) * mx.abs(scales.astype(mx.float32))[..., None]
        offset = mx.abs(biases.astype(mx.float32))[..., None] if biases is not None else 0.0
        rounding = u * (levels + offset)
    else:
        unit = mx.abs(groups).max(-1, keepdims=True)
        rounding = 0.0
    bound = _QUANT_STEPS[mode] * unit + rounding + u * (mx.abs(groups) + mx.abs(got.reshape(groups.shape)))
    bound = mx.maximum(bound, 2.0**-126) * _SLACK
    return float(mx.max(err.reshape(groups.shape) / bound))


def text_tokens(tokenizer: Path | None, vocab_size: int, bos: int, n: int, seed: int) -> tuple[np.ndarray, bool]:
    """[1, n] token ids: VERIFY_TEXT (repeated as needed) when a tokenizer is given, else random ids."""
    if tokenizer is not None:
        from ..tokenizer import Tokenizer

        tok = Tokenizer(tokenizer)
        body = tok.encode(VERIFY_TEXT, add_bos=False)
        if tok.vocab_size == vocab_size and body:
            ids = [bos] + body * (n // len(body) + 1)
            return np.array(ids[:n])[None], True
    rng = np.random.default_rng(seed)
    ids = np.concatenate([[bos], rng.integers(3, vocab_size, max(n - 1, 0))])
    return ids[:n][None], False


def _kl_top1(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    lp, lq = _log_softmax(ref), _log_softmax(got.astype(np.float64))
    kl = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
    return kl, float((got.argmax(-1) == ref.argmax(-1)).mean())


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    err = np.abs(got.astype(np.float64) - ref).max()
    return float(err / max(np.abs(ref).max(), 1e-30)) if err > 0 else 0.0  # 0/0 (all-zero logits) agrees


def _collapse(ref: np.ndarray, got: np.ndarray) -> str:
    if not np.isfinite(got).all():
        return "the converted model's logits hold NaN or Inf"
    top, ref_top = got.argmax(-1).ravel(), ref.argmax(-1).ravel()
    if top.size >= 4 and len(set(top.tolist())) == 1 and len(set(ref_top.tolist())) > 1:
        return f"the converted model predicts token {int(top[0])} at every position"
    return ""


def verify(
    source: Source,
    model_dir: Path,
    num_tokens: int = 32,
    seed: int = 0,
    tokenizer: Path | None = None,
    max_kl: float | None = None,
    quality: bool = True,
) -> Report:
    """Both checks of ``model_dir`` against ``source``; ``tokenizer`` picks real text for quality."""
    if num_tokens < 1:
        raise OpenELMError(f"--tokens {num_tokens}: verify needs at least 1 token")
    if max_kl is not None and not max_kl >= 0:
        raise OpenELMError(f"--max-kl {max_kl}: must be a number >= 0")
    config = source.config
    num_tokens = min(num_tokens, config.max_context_length)
    _, raw = read_config(model_dir)
    model = load_model(model_dir)
    compute = _stored_dtype(raw)
    stored = StoredWeights(dict(tree_flatten(model.parameters())), raw.get("quantization"), compute)
    limit = LOGIT_LIMITS[compute]

    expected = list(source.tensors)
    missing = [n for n in expected if n not in stored]
    extra = [n for n in stored if n not in source.tensors]
    if missing or extra:
        problem = f"missing tensor {missing[0]}" if missing else f"unexpected tensor {extra[0]}"
        return Report(Correctness(compute, float("inf"), "", float("inf"), limit, problem), None)

    meta = raw.get("openelm_mlx")
    calibrated = isinstance(meta, dict) and isinstance(meta.get("calibration"), dict)
    worst, worst_name, identical = 0.0, "", not calibrated
    for name in [] if calibrated else expected:
        src = source.tensors[name]
        ratio = tensor_error_ratio(stored, name, src)
        identical = identical and ratio == 0.0 and src.dtype != "float64"
        if not ratio <= worst:  # also catches NaN
            worst, worst_name = ratio, name
        mx.clear_cache()
    tokens, on_text = text_tokens(tokenizer, config.vocab_size, config.bos_token_id, num_tokens, seed)
    got = np.array(model(mx.array(tokens)).astype(mx.float32))
    ref_source = reference.forward(config, source.tensors, tokens)
    ref_stored = ref_source if identical else reference.forward(config, stored, tokens)
    correctness = Correctness(
        compute, worst, worst_name or expected[0], _rel_err(got, ref_stored), limit, calibrated=calibrated
    )
    if not quality:
        return Report(correctness, None)
    kl, top1 = _kl_top1(ref_source, got)
    q = Quality(quality_label(raw), tokens.shape[1], on_text, kl, top1, max_kl, _collapse(ref_source, got))
    return Report(correctness, q)
