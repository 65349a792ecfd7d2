"""One decoding step over the engine's batch KV cache (cache.BatchKVCache), compiled with
``mx.compile`` where MLX runs the whole step.

A compiled function is traced once per distinct set of input shapes.  The step's inputs are the
tokens ``[slots, 1]``, the slots' positions ``[slots]`` and per layer the buffers ``[slots,
kv_heads, capacity, head_dim]``; the step writes each row's key and value at its own position
(one scatter per layer) and attends over the whole capacity under a mask of the positions each
row has written.  So the shapes change only when the buffer does: its slots are bucketed (1, 2,
4, 8 ... ``cache.slot_bucket``) and its capacity grows through 64, 128, then steps of 256
positions (``cache.capacity_bucket``), and the step is traced at most once per (slots,
capacity) bucket it meets.  ``TRACES`` counts the traces and
the time they took (``/metrics``, ``bench --batch``).

Every step goes through the compiled function, a batch of one slot included (its mask hides the
positions past its offset): compiled, the bundled model decoded one sequence at 131 against 100
tok/s eagerly on the GPU path here (examples/bench_decode_step.py), and on a GPU the compiled
step is about half the kernels (270M: 1230 ops against 2294 eagerly, bench_batch.py --ops).
One exception, the CPU runtime's: a lone sequence of a float32 model whose layers are large
enough for NumPy's gemv to beat MLX's sgemm (``cpu.numpy_decoding``: the 270M shape, 1.74x
mlx_lm at one sequence) decodes eagerly, since those matmuls leave MLX and cannot be traced;
with no padding to hide it passes no mask.  Two slots or more always take the compiled step:
NumPy's gemm beside MLX's own BLAS pool stalled the eager step (270M, 4 rows: 15.8 against 22.3
tok/s compiled; 8 rows: 4.0 against 39.2, medians of 3 alternating runs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx

from . import runtime
from .cache import BatchKVCache, Rows, RowsShared
from .model import OpenELM


@dataclass
class TraceCount:
    """Traces of compiled steps in this process, and the seconds spent tracing them."""

    traces: int = 0
    seconds: float = 0.0


TRACES = TraceCount()


def activation_dtype(model: OpenELM) -> mx.Dtype:
    """The dtype of the model's activations, and so of its KV cache."""
    embedding = model.transformer.token_embeddings
    return embedding.scales.dtype if "scales" in embedding else embedding.weight.dtype


class DecodeStep:
    """``step(tokens[slots, 1], batch, decoding) -> logits[slots, 1, vocab]``: one token for every
    slot of ``batch`` (free slots and slots still prefilling take a padding token, and their
    results are dropped); the slots listed in ``decoding`` advance by one position."""

    def __init__(self, model: OpenELM, compiled: bool = True, eager_lone: bool = False):
        # compiled=False: every step eager (the op-count tests' reference); eager_lone: a batch of
        # one slot eager (the CPU runtime's NumPy gemv, above).
        self.model, self.compiled, self.eager_lone = model, compiled, eager_lone
        self.dtype = activation_dtype(model)
        self.traces = 0
        self.buckets: set[tuple[int, int]] = set()  # (slots, capacity) shapes the compiled step met
        self._step = mx.compile(self._traced, inputs=model.state) if compiled else None

    def _traced(self, tokens: mx.array, positions: mx.array, keys: list, values: list):
        # Runs only while MLX traces (once per input shapes): the count is of traces.
        self.traces += 1
        TRACES.traces += 1
        shared = RowsShared(keys, values, positions, 1, keys[0].shape[2])
        logits = self.model(tokens, cache=_rows(shared, len(keys)))
        return logits, shared.keys, shared.values

    def __call__(self, tokens: mx.array, batch: BatchKVCache, decoding: list[int]) -> mx.array:
        every = list(range(batch.slots))
        if self._step is None or (self.eager_lone and batch.slots == 1):
            logits = self.model.infer(tokens, cache=batch.rows(every, 1, self.dtype))
        else:
            batch.rows(every, 1, self.dtype)  # allocates and reserves the position
            self.buckets.add((batch.slots, batch.capacity))
            before, t0 = self.traces, time.perf_counter()
            positions = mx.array(batch.offsets, dtype=mx.int32)
            logits, keys, values = self._step(tokens, positions, list(batch.keys), list(batch.values))
            if self.traces != before:
                TRACES.seconds += time.perf_counter() - t0
            batch.keys[:], batch.values[:] = keys, values
        batch.advance(decoding, 1)
        return logits


def _rows(shared: RowsShared, n_layers: int) -> list[Rows]:
    return [Rows(shared, i) for i in range(n_layers)]


def decoder(model: OpenELM) -> DecodeStep:
    """The decode step for ``model`` here, one per model so its traces are reused from one
    engine to the next."""
    step = getattr(model, "_decode_step", None)
    if step is None:
        step = model._decode_step = DecodeStep(model, eager_lone=lone_decodes_eagerly(model))
    return step


def lone_decodes_eagerly(model: OpenELM) -> bool:
    """Whether a lone sequence of ``model`` decodes eagerly (NumPy's gemv): its runtime's choice."""
    return runtime.of(model).numpy_gemv_for(model)
