"""Dynamic bit allocation: measured sensitivity, then bits where they buy the most, to a target
bits per weight.

Each quantizable module is rounded alone to the lowest width that fits the target, and the
KL it causes on a few calibration rows is measured (one forward pass per module).  The KL at a
higher width is estimated from it by the square of the step ratio, ((2^lo - 1) / (2^b - 1))^2:
rounding error scales with the step, and KL is quadratic in small perturbations.  Then,
greedily, the upgrade (module, next width) with the largest estimated KL saved per extra bit is
taken while the total stays within the target.  The result is per-module entries in
config.json's ``quantization`` block, which both loaders honour.

Bits per weight count what is stored: the levels plus each group's scale and bias in the
model's dtype (float32 on CPU: 64 / group size bits more; 4-bit g64 is 5.0 bpw there).
"""

from __future__ import annotations

import heapq

import mlx.core as mx

from ..convert.quantize import MODES, QuantSpec
from ..errors import OpenELMError
from ..model import OpenELM
from .kl import kl_per_token, log_probs
from .progress import Progress


def bpw(bits: int, group_size: int, scale_bits: int) -> float:
    return bits + 2 * scale_bits / group_size


def _module(model: OpenELM, name: str):
    m = model
    for part in name.split("."):
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m


def sensitivities(
    model: OpenELM, modules: dict[str, QuantSpec | None], bits: int, rows: mx.array, progress: Progress
) -> dict[str, float]:
    """KL on ``rows`` when only that module is rounded to ``bits`` (the rest float)."""
    teacher = log_probs(model.infer(rows))
    mx.eval(teacher)
    out = {}
    names = [n for n, s in modules.items() if s is not None]
    progress.start("dynamic: sensitivities", len(names), "modules")
    for name in names:
        layer, spec = _module(model, name), modules[name]
        w = layer.weight
        q = mx.quantize(w, group_size=spec.group_size, bits=bits, mode="affine")
        layer.weight = mx.dequantize(*q, group_size=spec.group_size, bits=bits).astype(w.dtype)
        out[name] = max(float(kl_per_token(teacher, model.infer(rows)).mean()), 0.0)
        layer.weight = w
        progress.step(kl=out[name])
    progress.done()
    return out


def allocate(
    model: OpenELM,
    modules: dict[str, QuantSpec | None],
    target_bpw: float,
    rows: mx.array,
    progress: Progress,
) -> tuple[dict[str, QuantSpec | None], dict]:
    """Per-module specs meeting ``target_bpw`` and a summary for the recipe."""
    specs = [s for s in modules.values() if s is not None]
    if not specs:
        raise OpenELMError("--calibrate dynamic: no module of this model can be quantized at this group size")
    group = specs[0].group_size
    scale_bits = 8 * model.transformer.token_embeddings.weight.dtype.size
    widths = sorted(MODES["affine"][0])
    fitting = [b for b in widths if bpw(b, group, scale_bits) <= target_bpw + 1e-9]
    if not fitting:
        low = bpw(widths[0], group, scale_bits)
        raise OpenELMError(
            f"--target-bpw {target_bpw:g}: below the smallest width, {widths[0]}-bit at group size {group} "
            f"({low:g} bits per weight with {scale_bits}-bit scales and biases)"
        )
    lo = fitting[-1]
    sens = sensitivities(model, modules, lo, rows, progress)
    sizes = {n: _module(model, n).weight.size for n in sens}

    def estimate(name: str, b: int) -> float:
        return sens[name] * ((2**lo - 1) / (2**b - 1)) ** 2

    chosen = dict.fromkeys(sens, lo)
    budget = target_bpw * sum(sizes.values())
    used = sum(bpw(lo, group, scale_bits) * n for n in sizes.values())
    heap: list[tuple[float, str, int]] = []

    def push(name: str) -> None:
        b = chosen[name]
        higher = [w for w in widths if w > b]
        if higher:
            nb = higher[0]
            cost = (bpw(nb, group, scale_bits) - bpw(b, group, scale_bits)) * sizes[name]
            heapq.heappush(heap, (-(estimate(name, b) - estimate(name, nb)) / cost, name, nb))

    for name in sens:
        push(name)
    while heap:
        _, name, nb = heapq.heappop(heap)
        cost = (bpw(nb, group, scale_bits) - bpw(chosen[name], group, scale_bits)) * sizes[name]
        if used + cost > budget:
            continue  # a cheaper upgrade further down may still fit
        used += cost
        chosen[name] = nb
        push(name)
    result = dict(modules)
    for name, b in chosen.items():
        result[name] = QuantSpec(b, group, "affine")
    counts: dict[str, int] = {}
    for b in chosen.values():
        counts[f"{b}-bit"] = counts.get(f"{b}-bit", 0) + 1
    summary = {
        "target_bpw": target_bpw,
        "bpw": round(used / sum(sizes.values()), 4),
        "modules_per_width": dict(sorted(counts.items())),
        "sensitivity_tokens": int(rows.size),
    }
    return result, summary
