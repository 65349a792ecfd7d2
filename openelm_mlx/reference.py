"""A float64 NumPy forward pass of OpenELM: the oracle for tests and ``verify``.

Deliberately plain: one function per block, no cache, no tricks.  Weights come
from any mapping of HF tensor names to arrays; each is cast to float64 only when
its layer runs, so a large source can be checked one layer at a time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .config import OpenELMConfig


def _w(weights: Mapping[str, Any], name: str) -> np.ndarray:
    return np.asarray(weights[name], dtype=np.float64)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope(x: np.ndarray, base: float) -> np.ndarray:
    """Rotate-half RoPE over the last axis; x is [B, heads, S, head_dim], positions 0..S-1."""
    S, D = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / base ** (np.arange(0, D, 2, dtype=np.float64) / D)
    angles = np.arange(S, dtype=np.float64)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angles), np.sin(angles)
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def attention(config: OpenELMConfig, weights: Mapping[str, Any], i: int, x: np.ndarray) -> np.ndarray:
    p = f"transformer.layers.{i}.attn."
    B, S, _ = x.shape
    nq, nkv, hd = config.num_query_heads[i], config.num_kv_heads[i], config.head_dim
    qkv = (x @ _w(weights, p + "qkv_proj.weight").T).reshape(B, S, nq + 2 * nkv, hd)
    q, k, v = qkv[:, :, :nq], qkv[:, :, nq : nq + nkv], qkv[:, :, nq + nkv :]
    if config.normalize_qk_projections:
        q = rms_norm(q, _w(weights, p + "q_norm.weight"), config.rms_norm_eps)
        k = rms_norm(k, _w(weights, p + "k_norm.weight"), config.rms_norm_eps)
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    q, k = rope(q, config.rope_freq_constant), rope(k, config.rope_freq_constant)
    group = nq // nkv  # query head h reads KV head h // group
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    scores = np.where(np.tril(np.ones((S, S), dtype=bool)), scores, -np.inf)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = scores / scores.sum(axis=-1, keepdims=True)
    out = (probs @ v).transpose(0, 2, 1, 3).reshape(B, S, nq * hd)
    return out @ _w(weights, p + "out_proj.weight").T


def feed_forward(config: OpenELMConfig, weights: Mapping[str, Any], i: int, x: np.ndarray) -> np.ndarray:
    p = f"transformer.layers.{i}.ffn."
    y = x @ _w(weights, p + "proj_1.weight").T
    if config.ffn_with_glu:
        f = y.shape[-1] // 2
        y = silu(y[..., :f]) * y[..., f:]
    else:
        y = silu(y)
    return y @ _w(weights, p + "proj_2.weight").T


def forward(config: OpenELMConfig, weights: Mapping[str, Any], tokens: Any) -> np.ndarray:
    """Float64 logits [B, S, vocab] for integer tokens [B, S]."""
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    embed = _w(weights, "transformer.token_embeddings.weight")
    x = embed[tokens]
    eps = config.rms_norm_eps
    for i in range(config.num_transformer_layers):
        p = f"transformer.layers.{i}."
        h = x + attention(config, weights, i, rms_norm(x, _w(weights, p + "attn_norm.weight"), eps))
        x = h + feed_forward(config, weights, i, rms_norm(h, _w(weights, p + "ffn_norm.weight"), eps))
    x = rms_norm(x, _w(weights, "transformer.norm.weight"), eps)
    head = embed if config.share_input_output_layers else _w(weights, "lm_head.weight")
    return x @ head.T
