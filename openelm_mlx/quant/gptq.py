"""GPTQ: round each weight column while pushing its rounding error onto the columns not yet
rounded, weighted by the inverse Hessian of the layer's inputs (Frantar et al., 2022).

Per transformer block, in order: the block's inputs come from the blocks before it *already
quantized*, so each block corrects the error it inherits.  The Hessian of each projection is
``X^T X`` of its inputs on the calibration rows.  Groups follow MLX's affine format: a group's
scale and bias are MLX's own (``mx.quantize`` of the group's columns as updated so far), the
integer levels are GPTQ's, and the levels are packed exactly as MLX packs them, so the result
is an ordinary MLX quantized tensor.  The tied embedding is also the output head: it gets the
Hessian of the final hidden states, damped more (its rows are also looked up as embeddings,
where plain rounding is already best).  Projections whose input width the group size does not
divide stay in float, as in a plain conversion.
"""

from __future__ import annotations

import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..convert.quantize import QuantSpec
from ..model import OpenELM
from .progress import Progress

DAMP = 0.01  # of the Hessian's mean diagonal, as in the paper
# The tied embedding/head gets more damping than the projections, toward plain rounding error (its rows
# are also looked up). Bundled model, 3-bit g64, KL on the calibration held-out slice: damping 0.01
# 0.01051, 0.1 0.00913, 1.0 0.01005 (plain rounding 0.03286).
EMBED_DAMP = 0.1
BLOCK = 128  # columns per lazy update; a multiple of every group size, so groups never straddle blocks


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Integer levels [rows, cols] -> MLX's packed uint32 [rows, cols * bits / 32].

    MLX lays the levels out as one little-endian bit stream (checked against ``mx.quantize``
    for every width in tests/test_calibrate.py)."""
    rows, cols = q.shape
    eights = q.astype(np.uint64).reshape(rows, cols // 8, 8)
    word = np.zeros((rows, cols // 8), np.uint64)
    for k in range(8):
        word |= eights[..., k] << np.uint64(k * bits)
    as_bytes = word.view(np.uint8).reshape(rows, cols // 8, 8)[..., :bits]
    return np.ascontiguousarray(as_bytes).reshape(rows, -1).view(np.uint32)


def solve(w: np.ndarray, hessian: np.ndarray, spec: QuantSpec, damp: float = DAMP) -> dict[str, np.ndarray]:
    """GPTQ of one weight [out, in] given ``hessian`` [in, in]; returns packed weight, scales, biases."""
    W = np.array(w, dtype=np.float32)
    H = np.array(hessian, dtype=np.float64)
    n = W.shape[1]
    g, maxq = spec.group_size, 2**spec.bits - 1
    dead = np.diag(H) == 0  # inputs that were always zero: nothing to compensate with
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H[np.diag_indices(n)] += damp * np.mean(np.diag(H))
    # Upper Cholesky factor of H^-1 (the order of eliminations is the column order).
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T.astype(np.float32)
    q = np.zeros(W.shape, np.uint8)
    scales = np.zeros((W.shape[0], n // g), np.float32)
    biases = np.zeros_like(scales)
    for b1 in range(0, n, BLOCK):
        b2 = min(b1 + BLOCK, n)
        W1, E1, H1 = W[:, b1:b2], np.zeros((W.shape[0], b2 - b1), np.float32), Hinv[b1:b2, b1:b2]
        for i in range(b2 - b1):
            col = b1 + i
            if col % g == 0:
                _, s, b = mx.quantize(mx.array(W1[:, i : i + g]), group_size=g, bits=spec.bits)
                scales[:, col // g], biases[:, col // g] = np.array(s)[:, 0], np.array(b)[:, 0]
            s, b = scales[:, col // g], biases[:, col // g]
            level = np.clip(np.round((W1[:, i] - b) / s), 0, maxq)
            q[:, col] = level
            err = (W1[:, i] - (level * s + b)) / H1[i, i]
            W1[:, i:] -= np.outer(err, H1[i, i:])
            E1[:, i] = err
        W[:, b2:] -= E1 @ Hinv[b1:b2, b2:]
    return {"weight": pack(q, spec.bits), "scales": scales, "biases": biases}


class _Catcher(nn.Module):
    """Wraps a projection and sums ``x^T x`` over every row it sees."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.hessian = None

    def __call__(self, x: mx.array) -> mx.array:
        flat = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        h = flat.T @ flat
        self.hessian = h if self.hessian is None else self.hessian + h
        return self.inner(x)


PROJECTIONS = (("attn", "qkv_proj"), ("attn", "out_proj"), ("ffn", "proj_1"), ("ffn", "proj_2"))


def quantize(
    model: OpenELM,
    modules: dict[str, QuantSpec | None],
    rows: mx.array,
    batch: int,
    progress: Progress,
    dtype: mx.Dtype = mx.float32,
    timing: dict[str, float] | None = None,
) -> dict[str, dict[str, mx.array]]:
    """GPTQ for every module of ``modules`` with a spec; ``model`` (float) is left unchanged.

    Returns ``{module: {"weight", "scales", "biases"}}`` in MLX arrays of ``dtype`` (scales, biases);
    ``timing`` (if given) gets the seconds in all and those spent in the solves."""
    began, solving = time.perf_counter(), 0.0
    out: dict[str, dict[str, mx.array]] = {}
    layers = model.layers
    batches = [rows[s : s + batch] for s in range(0, rows.shape[0], batch)]
    hidden = [model.transformer.token_embeddings(b) for b in batches]
    mx.eval(hidden)
    progress.start("gptq", len(layers) + 1, "blocks")
    for i, block in enumerate(layers):
        names = [f"transformer.layers.{i}.{a}.{p}" for a, p in PROJECTIONS]
        parents = [getattr(block, a) for a, _ in PROJECTIONS]
        originals = [getattr(parent, p) for parent, (_, p) in zip(parents, PROJECTIONS, strict=True)]
        catchers = [_Catcher(m) for m in originals]
        for parent, (_, p), c in zip(parents, PROJECTIONS, catchers, strict=True):
            setattr(parent, p, c)
        for h in hidden:
            block(h)
            mx.eval([c.hessian for c in catchers])
        for parent, (_, p), orig in zip(parents, PROJECTIONS, originals, strict=True):
            setattr(parent, p, orig)
        # The block's output from its quantized weights feeds the next block.
        saved = [orig.weight for orig in originals]
        for name, orig, c in zip(names, originals, catchers, strict=True):
            spec = modules.get(name)
            if spec is None:
                continue
            t0 = time.perf_counter()
            out[name] = _solved(orig.weight, c.hessian, spec, DAMP, dtype)
            solving += time.perf_counter() - t0
            orig.weight = _dequantized(out[name], spec, orig.weight.dtype)
        hidden = [block(h) for h in hidden]
        mx.eval(hidden)
        for orig, w in zip(originals, saved, strict=True):
            orig.weight = w
        progress.step()
    name = "transformer.token_embeddings"
    spec = modules.get(name)
    if spec is not None and model.config.share_input_output_layers:
        H = None
        for h in hidden:
            f = model.transformer.norm(h).reshape(-1, h.shape[-1]).astype(mx.float32)
            H = f.T @ f if H is None else H + f.T @ f
        mx.eval(H)
        t0 = time.perf_counter()
        out[name] = _solved(model.transformer.token_embeddings.weight, H, spec, EMBED_DAMP, dtype)
        solving += time.perf_counter() - t0
    progress.step()
    progress.done()
    if timing is not None:
        timing.update(seconds=time.perf_counter() - began, solve_seconds=solving)
    return out


def _solved(w: mx.array, hessian: mx.array, spec: QuantSpec, damp: float, dtype: mx.Dtype) -> dict[str, mx.array]:
    parts = solve(np.array(w.astype(mx.float32)), np.array(hessian), spec, damp)
    return {
        "weight": mx.array(parts["weight"]),
        "scales": mx.array(parts["scales"]).astype(dtype),
        "biases": mx.array(parts["biases"]).astype(dtype),
    }


def _dequantized(parts: dict[str, mx.array], spec: QuantSpec, dtype: mx.Dtype) -> mx.array:
    w = mx.dequantize(parts["weight"], parts["scales"], parts["biases"], group_size=spec.group_size, bits=spec.bits)
    return w.astype(dtype)
