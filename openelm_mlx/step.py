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
    """``step(tokens[B, 1], rows) -> logits[B, 1, vocab]``: one token for each of B sequences, each
    with its own cache (``rows[b]`` is sequence b's list of per-layer caches), advanced like ``model(...)``.

    Retrace rule: a trace is keyed on the input shapes, that is on B and on each row's buffer
    length (a multiple of ``KVCache.step``); MLX keeps every trace, so a batch shape seen before
    reuses its trace, and a lone sequence retraces once per 256 positions."""

    def __init__(self, model: OpenELM):
        self.model = model
        n_layers = len(model.layers)

        def step(tokens: mx.array, offsets: mx.array, keys: list, values: list):
            B = tokens.shape[0]
            # keys/values are flat, row-major: row b's layer l is at b * n_layers + l.
            rows = [
                [
                    StepCache(keys[b * n_layers + i], values[b * n_layers + i], offsets[b : b + 1])
                    for i in range(n_layers)
                ]
                for b in range(B)
            ]
            per_layer = [[rows[b][i] for b in range(B)] for i in range(n_layers)]
            logits = model(tokens, cache=per_layer)
            flat = [c for row in rows for c in row]
            return logits, [c.keys for c in flat], [c.values for c in flat]

        # The weights are captured as inputs, so a model updated later is not baked in stale.
        self._step = mx.compile(step, inputs=model.state)

    def __call__(self, tokens: mx.array, rows: list[list[KVCache]]) -> mx.array:
        if any(cache[0].keys is None for cache in rows):  # nothing to shape the buffers after yet
            return eager_step(self.model, tokens, rows)
        for cache in rows:
            for c in cache:
                c.reserve(1)
        offsets = [cache[0].offset for cache in rows]
        flat = [c for cache in rows for c in cache]
        logits, keys, values = self._step(tokens, mx.array(offsets), [c.keys for c in flat], [c.values for c in flat])
        for c, k, v in zip(flat, keys, values, strict=True):
            c.keys, c.values = k, v
        for cache, offset in zip(rows, offsets, strict=True):
            for c in cache:
                c.offset = offset + 1
        return logits


def eager_step(model: OpenELM, tokens: mx.array, rows: list[list[KVCache]]) -> mx.array:
    """The same step without compiling (cpu.py's NumPy routes may run inside)."""
    if len(rows) == 1:
        return model.infer(tokens, cache=rows[0])
    return model.infer(tokens, cache=[list(layer) for layer in zip(*rows, strict=True)])


def decoder(model: OpenELM) -> Callable[[mx.array, list[list[KVCache]]], mx.array]:
    """The fastest one-token forward for ``model`` here: ``decode(tokens[B, 1], rows) -> logits``."""
    if not uses_compiled_step(model):
        return lambda tokens, rows: eager_step(model, tokens, rows)
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
