"""OpenELM in MLX.

Module and parameter names mirror the Hugging Face checkpoint
(``transformer.layers.3.attn.qkv_proj.weight`` ...), so HF weights load unchanged
and the converted directories also load in ``mlx_lm``.
"""

from __future__ import annotations

import contextlib

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .cache import KVCache, make_cache
from .config import OpenELMConfig

# --- the matmul plug-in --------------------------------------------------------------------------


class MLXRoutes:
    """Every matmul as MLX's own op: the default, and what the GPU runtimes (and ``gpu-path`` on
    the CPU) use.  A runtime swaps in its own routes at load (runtime.py; the CPU runtime's are
    cpu.py's ``CPURoutes``); the layers below call whichever they hold."""

    @staticmethod
    def matmul_t(x: mx.array, w: mx.array) -> mx.array:
        return x @ w.T

    @staticmethod
    def quantized_matmul_t(
        x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int, bits: int, mode: str
    ) -> mx.array:
        return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits, mode=mode)

    @staticmethod
    def inference() -> contextlib.AbstractContextManager:
        """Entered around inference-only model calls (``OpenELM.infer``)."""
        return contextlib.nullcontext()


class QuantizedLinear(nn.QuantizedLinear):
    routes = MLXRoutes

    def __call__(self, x: mx.array) -> mx.array:
        if "bias" in self:
            return super().__call__(x)
        return self.routes.quantized_matmul_t(
            x, self.weight, self.scales, self.get("biases"), self.group_size, self.bits, self.mode
        )


class QuantizedEmbedding(nn.QuantizedEmbedding):
    routes = MLXRoutes

    def as_linear(self, x: mx.array) -> mx.array:
        return self.routes.quantized_matmul_t(
            x, self.weight, self.scales, self.get("biases"), self.group_size, self.bits, self.mode
        )


class Linear(nn.Linear):
    """nn.Linear through the runtime's routes, whose quantized form is the QuantizedLinear above."""

    routes = MLXRoutes

    def __call__(self, x: mx.array) -> mx.array:
        if "bias" in self:
            return super().__call__(x)
        return self.routes.matmul_t(x, self.weight)

    def to_quantized(
        self, group_size: int | None = None, bits: int | None = None, mode: str = "affine", quantize_input: bool = False
    ) -> nn.Module:
        if quantize_input:
            return super().to_quantized(group_size, bits, mode, quantize_input)
        q = QuantizedLinear.from_linear(self, group_size, bits, mode)
        q.routes = self.routes
        return q


class Embedding(nn.Embedding):
    """nn.Embedding whose tied head goes through the runtime's routes; its quantized form is the
    QuantizedEmbedding above."""

    routes = MLXRoutes

    def as_linear(self, x: mx.array) -> mx.array:
        return self.routes.matmul_t(x, self.weight)

    def to_quantized(self, group_size: int | None = None, bits: int | None = None, mode: str = "affine") -> nn.Module:
        q = QuantizedEmbedding.from_embedding(self, group_size, bits, mode)
        q.routes = self.routes
        return q


class Attention(nn.Module):
    def __init__(self, config: OpenELMConfig, layer: int):
        super().__init__()
        self.head_dim = hd = config.head_dim
        self.n_heads = config.num_query_heads[layer]
        self.n_kv_heads = config.num_kv_heads[layer]
        self.scale = hd**-0.5
        self.rope_base = config.rope_freq_constant
        # One fused projection: rows are all Q heads, then K heads, then V heads.
        self.qkv_proj = Linear(config.model_dim, (self.n_heads + 2 * self.n_kv_heads) * hd, bias=False)
        self.out_proj = Linear(self.n_heads * hd, config.model_dim, bias=False)
        self.normalize_qk = config.normalize_qk_projections
        if self.normalize_qk:
            self.q_norm = nn.RMSNorm(hd, eps=config.rms_norm_eps)
            self.k_norm = nn.RMSNorm(hd, eps=config.rms_norm_eps)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        """``cache``: anything with ``offset`` (an int, one position per row [B], or one per
        token [B, S]), ``update_and_fetch`` and ``mask`` (cache.py: a sequence's ``KVCache``, the
        engine's ``Rows``/``SlotCache`` over its batch cache, scoring's ``PackedRows``)."""
        B, S, _ = x.shape
        nq, nkv = self.n_heads, self.n_kv_heads
        # One transpose of the fused projection to [B, heads, S, head_dim], then views per part.
        qkv = self.qkv_proj(x).reshape(B, S, nq + 2 * nkv, self.head_dim).transpose(0, 2, 1, 3)
        q, k, v = mx.split(qkv, [nq, nq + nkv], axis=1)
        if self.normalize_qk:  # per head, over head_dim, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        offset = cache.offset if cache is not None else 0
        q, k = self._rope(q, offset), self._rope(k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        # GQA is native to the fused kernel; masked positions add exact zeros.
        mask = cache.mask(S) if cache is not None else KVCache.mask(S)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, S, -1))

    def _rope(self, x: mx.array, offset: int | mx.array) -> mx.array:
        """RoPE from ``offset``: one position for all rows, one per row ([B]), or one per token ([B, S])."""
        if isinstance(offset, mx.array) and offset.ndim == 2:
            # The kernel takes at most one offset per row, so each token becomes a row of its own
            # (same kernel, same numbers): packed rows repeat positions (scoring.py).
            B, H, S, D = x.shape
            rows = x.transpose(0, 2, 1, 3).reshape(B * S, H, 1, D)
            return self._rope(rows, offset.reshape(-1)).reshape(B, S, H, D).transpose(0, 2, 1, 3)
        return mx.fast.rope(x, self.head_dim, traditional=False, base=self.rope_base, scale=1.0, offset=offset)


@mx.compile
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    # Compiled so SiLU and the product are one fused pass (exp is the slow part on CPUs).
    return nn.silu(gate) * up


class FeedForward(nn.Module):
    def __init__(self, config: OpenELMConfig, layer: int):
        super().__init__()
        f = config.ffn_dims[layer]
        self.glu = config.ffn_with_glu
        self.proj_1 = Linear(config.model_dim, (2 if self.glu else 1) * f, bias=False)
        self.proj_2 = Linear(f, config.model_dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.proj_1(x)
        if self.glu:
            gate, up = mx.split(y, 2, axis=-1)  # gate is the first half
            return self.proj_2(swiglu(gate, up))
        return self.proj_2(nn.silu(y))


class TransformerBlock(nn.Module):
    def __init__(self, config: OpenELMConfig, layer: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.model_dim, eps=config.rms_norm_eps)
        self.attn = Attention(config, layer)
        self.ffn_norm = nn.RMSNorm(config.model_dim, eps=config.rms_norm_eps)
        self.ffn = FeedForward(config, layer)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        h = x + self.attn(self.attn_norm(x), cache)
        return h + self.ffn(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, config: OpenELMConfig):
        super().__init__()
        self.token_embeddings = Embedding(config.vocab_size, config.model_dim)
        self.layers = [TransformerBlock(config, i) for i in range(config.num_transformer_layers)]
        self.norm = nn.RMSNorm(config.model_dim, eps=config.rms_norm_eps)

    def __call__(self, tokens: mx.array, cache: list | None = None) -> mx.array:
        """``cache``: one entry per layer (see Attention)."""
        h = self.token_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, cache[i] if cache is not None else None)
        return self.norm(h)


class OpenELM(nn.Module):
    """``model(tokens[B, S], cache=None) -> logits[B, S, vocab]``."""

    routes = MLXRoutes  # set with every layer's by runtime.prepare

    def __init__(self, config: OpenELMConfig):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        if not config.share_input_output_layers:
            self.lm_head = Linear(config.model_dim, config.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, cache: list[KVCache] | None = None, last_only: bool = False) -> mx.array:
        """Logits for every position, or with ``last_only`` just the last (all a prefill needs)."""
        h = self.transformer(tokens, cache)
        return self.logits(h[:, -1:] if last_only else h)

    def logits(self, h: mx.array) -> mx.array:
        """The output head over final hidden states (``self.transformer``'s, normed): scoring
        picks the positions it needs first."""
        if self.config.share_input_output_layers:
            # as_linear also serves a QuantizedEmbedding, so a quantized tied head works.
            return self.transformer.token_embeddings.as_linear(h)
        return self.lm_head(h)

    def infer(self, tokens: mx.array, cache: list[KVCache] | None = None, last_only: bool = False) -> mx.array:
        """``self(...)`` for inference: the CPU runtime's matmuls may then take cpu.py's NumPy
        routes, which are faster there but neither differentiable nor compilable."""
        with self.routes.inference():
            return self(tokens, cache, last_only)

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights: what one decoding step reads (the tied head re-reads the embedding, counted once)."""
        return sum(v.nbytes for _, v in tree_flatten(self.parameters()))

    @property
    def layers(self) -> list[TransformerBlock]:
        return self.transformer.layers

    def make_cache(self) -> list[KVCache]:
        return make_cache(len(self.layers))
