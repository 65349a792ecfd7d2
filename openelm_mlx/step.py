"""One decoding step, compiled with ``mx.compile`` where MLX runs the whole step.

A compiled function is retraced whenever an input's shape changes, and the usual decode step
changes shape every token (the attended history grows by one).  Here the step attends over the
cache's whole allocated buffer under a mask of the positions written so far, and takes the
position as an array, so one trace serves the 256 positions of a cache allocation step
(``cache.KVCache.step``); a longer buffer is a new shape and one new trace.

The compiled step runs where MLX's kernels do the work: GPUs, and CPU models whose matmuls
stay in MLX (quantized or half-precision weights, small float32 models, or
``OPENELM_MLX_MATMUL=mlx``).  A float32 model with large layers (every OpenELM) decodes eagerly
on the CPU instead, through cpu.py's NumPy gemv, which is faster there and cannot be traced
(``cpu.numpy_decoding`` has the measured size rule).
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

from . import cpu
from .cache import KVCache
from .model import OpenELM


class StepCache:
    """One layer's cache inside the compiled step: a fixed buffer written at ``offset`` (an array)."""

    def __init__(self, keys: mx.array, values: mx.array, offset: mx.array):
        self.keys, self.values, self.offset = keys, values, offset

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys = mx.slice_update(self.keys, keys, self.offset, axes=(2,))
        self.values = mx.slice_update(self.values, values, self.offset, axes=(2,))
        return self.keys, self.values

    def mask(self, n: int) -> mx.array:
        # Buffer positions beyond the new token hold zeros (or rejected drafts): never attended.
        return mx.arange(self.keys.shape[2]) < self.offset + n


class CompiledStep:
    """``step(token[1, 1], cache) -> logits[1, 1, vocab]``, advancing the cache like ``model(...)``."""

    def __init__(self, model: OpenELM):
        self.model = model

        def step(tokens: mx.array, offset: mx.array, keys: list, values: list):
            caches = [StepCache(k, v, offset) for k, v in zip(keys, values, strict=True)]
            logits = model(tokens, cache=caches)
            return logits, [c.keys for c in caches], [c.values for c in caches]

        # The weights are captured as inputs, so a model updated later is not baked in stale.
        self._step = mx.compile(step, inputs=model.state)

    def __call__(self, tokens: mx.array, cache: list[KVCache]) -> mx.array:
        if cache[0].keys is None:  # nothing to shape the buffers after yet
            return self.model.infer(tokens, cache=cache)
        for c in cache:
            c.reserve(1)
        offset = cache[0].offset
        logits, keys, values = self._step(
            tokens, mx.array([offset]), [c.keys for c in cache], [c.values for c in cache]
        )
        for c, k, v in zip(cache, keys, values, strict=True):
            c.keys, c.values, c.offset = k, v, offset + 1
        return logits


def decoder(model: OpenELM) -> Callable[[mx.array, list[KVCache]], mx.array]:
    """The fastest one-token forward for ``model`` here: ``decode(token[1, 1], cache) -> logits``."""
    if not uses_compiled_step(model):
        return lambda tokens, cache: model.infer(tokens, cache=cache)
    step = getattr(model, "_compiled_step", None)
    if step is None:  # one per model, so its traces are reused from one generation to the next
        step = model._compiled_step = CompiledStep(model)
    return step


def uses_compiled_step(model: OpenELM) -> bool:
    """Whether decoding ``model`` here goes through ``CompiledStep`` (see the module docstring)."""
    if not cpu.on_cpu():
        return True
    embedding = model.transformer.token_embeddings
    if embedding.weight.dtype != mx.float32 or "scales" in embedding:
        return True
    return not cpu.numpy_decoding(model.weight_bytes // len(model.layers))
