"""Faster routes for the matmuls that MLX's CPU backend runs slowly, used for inference only.

Measured with MLX 0.32 on a 2-core x86_64 (BENCHMARKS.md):

- A one-row float32 matmul (every decoding step) goes to BLAS ``sgemm``, which repacks the
  whole weight matrix on each call.  NumPy's ``sgemv`` on a zero-copy view of the same MLX
  buffer reads it once: 1280 x 10240 takes 1.4 ms instead of 3.5 ms.
- MLX's Linux wheel links the reference BLAS unless the CLI preloaded OpenBLAS (``blas.py``),
  while NumPy's wheel brings its own optimised BLAS, so many-row matmuls (prompts) can go
  there too when MLX's is slower.
- The quantized matmul is a single-threaded kernel.  With many rows, dequantizing and using
  the BLAS matmul is about 20x faster; with one row, splitting the output rows over two CPU
  streams, which MLX runs on two threads, is about 1.9x faster.  The dequantize kernel is
  single-threaded and scalar too: a compiled elementwise version, split over the two streams,
  takes 19 ms instead of 125 ms for 10240 x 1280 at 4 bits.

The NumPy routes leave MLX's graph: they are not differentiable and cannot be compiled.  So
they are taken only inside ``inference()`` (the generation engine, ``perplexity``, ``bench``)
and only on the CPU device; a plain ``model(tokens)`` is pure MLX, on every device.  Which
matmuls take them is decided in ``numpy_routes``; ``OPENELM_MLX_MATMUL=mlx|numpy`` forces a
choice.  (A run-time race between the two was tried and dropped: two OpenBLAS thread pools
on two cores disturb each other's timings enough to pick wrongly.)
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from collections.abc import Iterator
from contextvars import ContextVar

import mlx.core as mx
import numpy as np

from .errors import OpenELMError

ENV = "OPENELM_MLX_MATMUL"
# Up to here a float32 matmul goes to NumPy's BLAS (decoding up to 8 sequences, speculative
# verification); above, it stays in MLX (on OpenBLAS, rows padded: MLX_GEMM_ROW_BLOCK) unless MLX
# runs on the reference BLAS.  All 270M layers with 8 rows: 67 ms through NumPy against 114 ms in
# MLX (1 row: 2.1 ms against 3.5 ms per 1280 x 10240).  From 9 rows MLX's padded sgemm is as fast
# as NumPy's and the step stays one MLX graph, where each NumPy matmul evaluates the graph before
# it: the engine at 12 and 16 sequences decoded 65 -> 78 and 77 -> 96 tok/s with this at 8 than at 16.
MAX_DECODE_ROWS = 8
# From this many rows a quantized matmul dequantizes and calls the BLAS: MLX's CPU quantized matmul
# costs a fixed amount per row (4-bit 1280 x 10240: 7.6 ms per row on two streams), dequantizing a
# fixed amount in all (19-57 ms).  A whole 270M 4-bit decode step of the batched engine: 426 ms
# with 4 rows through the quantized matmul against 552 ms dequantizing; 8 rows 824 against 500 ms.
QUANTIZED_DEQUANTIZE_MIN_ROWS = 6
# Below this many float32 weight bytes per layer, decoding is faster in the compiled MLX step
# (step.py) than eagerly through NumPy's gemv: with small matrices the per-op cost of the eager
# step outweighs sgemm's repacking.  Measured here (8-16 layers, random weights; eager / compiled
# tok/s): 2.3 MB/layer (the bundled model) 0.61x, 10.4 MB 0.89x, 11.6 MB 0.90x, 17.7 MB 1.16x,
# 25.5 MB 1.15x, 68 MB (270M) 1.58x.
NUMPY_DECODE_MIN_LAYER_BYTES = 14_000_000
_inference: ContextVar[bool] = ContextVar("openelm_mlx_inference", default=False)
# MLX streams belong to the thread that made them (a server's engine thread clears its own when
# it ends), so each thread makes its own second stream the first time it needs one.
_streams = threading.local()


@contextlib.contextmanager
def inference() -> Iterator[None]:
    """Allow the NumPy routes for the model calls made inside (they return evaluated arrays)."""
    token = _inference.set(True)
    try:
        yield
    finally:
        _inference.reset(token)


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def _rows(x: mx.array) -> int:
    return x.size // x.shape[-1]


def _choice() -> str:
    choice = os.environ.get(ENV, "auto")
    if choice not in ("auto", "numpy", "mlx"):
        raise OpenELMError(f"{ENV}={choice}: expected auto, numpy or mlx")
    return choice


@functools.cache
def numpy_routes() -> tuple[bool, bool]:
    """(decoding matmuls of up to ``MAX_DECODE_ROWS`` rows, prompt matmuls): which go to NumPy.

    Decoding: NumPy's gemv (one row) or gemm (a batch) wherever NumPy is not on Accelerate
    (macOS, where MLX's matmul is on Accelerate too and nothing was measured).
    Prompts: only when MLX runs on the reference BLAS; with OpenBLAS preloaded MLX's own matmul
    was faster (210 vs 135 prompt tok/s, 270M float32; 80 vs 43 on a 2-core AMD EPYC)."""
    from .blas import mlx_blas_is_reference

    choice = _choice()
    if choice != "auto":
        return (choice == "numpy",) * 2
    return sys.platform != "darwin", mlx_blas_is_reference()


def numpy_decoding(layer_bytes: int) -> bool:
    """Whether a float32 model with ``layer_bytes`` of weights per layer decodes through NumPy's
    gemv (eagerly) rather than in the compiled MLX step; ``OPENELM_MLX_MATMUL=numpy`` forces it."""
    return numpy_routes()[0] and (_choice() == "numpy" or layer_bytes >= NUMPY_DECODE_MIN_LAYER_BYTES)


# OpenBLAS's sgemm runs a few rows fastest in multiples of this many (its kernel's row block):
# the 270M layers with 4 rows took 3.98 ms for 10240 x 1280 against 2.93 ms padded to 8, and 12
# rows 5.26 ms against 3.92 ms padded to 16 (all layers, cold: 94 -> 77 ms for 12 rows).
GEMM_ROW_BLOCK = 8
# MLX's sgemm on the preloaded OpenBLAS is fast for row counts that are multiples of 16 and up to
# 2x slower between them; padding costs a copy of the input rows.  All 270M layers: 12 rows
# 186 -> 93 ms, 20 rows 154 -> 124 ms, 40 rows 195 -> 153 ms (16 and 32 rows: 96 and 130 ms).
MLX_GEMM_ROW_BLOCK = 16


def _np_matmul_t(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    # One row as matrix @ vector, so NumPy calls gemv rather than gemm; two rows as two gemvs
    # (45.6 against 78.5 ms through gemm for all 270M layers); more rows (a batch of sequences
    # decoding) through gemm, which reads the weights once for all of them, in whole row blocks.
    rows = x.shape[0]
    if rows == 1:
        return w @ x[0]
    if rows == 2:
        return np.stack([w @ x[0], w @ x[1]])
    pad = -rows % GEMM_ROW_BLOCK
    if pad and rows <= 2 * GEMM_ROW_BLOCK:  # measured up to 16 rows; many rows (prompts) as they are
        x = np.concatenate([x, np.zeros((pad, x.shape[1]), x.dtype)])
        return (x @ w.T)[:rows]
    return x @ w.T


def _cpu_float32_inference(x: mx.array, w: mx.array) -> bool:
    """Whether a matmul may leave MLX's plain ``x @ w.T``: float32, on the CPU, inside ``inference()``."""
    return _inference.get() and on_cpu() and x.dtype == mx.float32 and w.dtype == mx.float32


def _numpy_route(x: mx.array, w: mx.array) -> bool:
    if not _cpu_float32_inference(x, w):
        return False
    rows, (one, many) = _rows(x), numpy_routes()
    return one if rows <= MAX_DECODE_ROWS else many


def _mlx_matmul_t(x: mx.array, w: mx.array) -> mx.array:
    rows = _rows(x)
    pad = -rows % MLX_GEMM_ROW_BLOCK
    if not (pad and _cpu_float32_inference(x, w) and sys.platform != "darwin"):
        return x @ w.T
    flat = mx.concatenate([x.reshape(rows, x.shape[-1]), mx.zeros((pad, x.shape[-1]), x.dtype)])
    return (flat @ w.T)[:rows].reshape(*x.shape[:-1], w.shape[0])


def matmul_t(x: mx.array, w: mx.array) -> mx.array:
    """``x @ w.T`` (``w`` is [out, in], as in every checkpoint) by the fastest route here."""
    if not _numpy_route(x, w):
        return _mlx_matmul_t(x, w)
    # np.asarray evaluates x and views the MLX buffers without copying them.
    y = _np_matmul_t(np.asarray(x).reshape(-1, x.shape[-1]), np.asarray(w))
    return mx.array(y).reshape(*x.shape[:-1], w.shape[0])


def _halves(rows: int) -> tuple[tuple[slice, mx.Stream], tuple[slice, mx.Stream]]:
    """Output rows split in two, one half per CPU stream (MLX runs each stream on its own thread)."""
    second = getattr(_streams, "second", None)
    if second is None:
        second = _streams.second = mx.new_stream(mx.cpu)
    n = rows // 2
    return (slice(0, n), mx.default_stream(mx.cpu)), (slice(n, None), second)


@functools.cache
def _affine_dequantizer(bits: int):
    # The same numbers as mx.dequantize, as elementwise ops that mx.compile fuses into one
    # vectorised kernel: 2x faster than MLX's CPU dequantize kernel (10240 x 1280, 4-bit).
    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)  # MLX packs the first element in the low bits

    def dequantize(w: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
        q = (w[..., None] >> shifts) & ((1 << bits) - 1)
        q = q.reshape(w.shape[0], scales.shape[-1], -1).astype(scales.dtype)
        return (q * scales[..., None] + biases[..., None]).reshape(w.shape[0], -1)

    return mx.compile(dequantize)


def dequantize(
    w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int, bits: int, mode: str
) -> mx.array:
    """``mx.dequantize``, through the faster compiled kernel where the packing allows (affine 2, 4, 8 bits)."""
    if mode == "affine" and bits in (2, 4, 8) and biases is not None:
        return _affine_dequantizer(bits)(w, scales, biases)
    return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode)


def quantized_matmul_t(
    x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int, bits: int, mode: str
) -> mx.array:
    """``x @ dequantize(w).T`` on the CPU by the fastest route for the number of rows in ``x``.

    Both routes split the output rows over two CPU streams: decoding runs two quantized matmuls
    at once; a prompt dequantizes the two halves at once and multiplies them with BLAS, whose
    own threads already use every core, one after the other on the default stream."""
    prompt = _rows(x) >= QUANTIZED_DEQUANTIZE_MIN_ROWS
    out = []
    for rows, stream in _halves(w.shape[0]):
        part = (w[rows], scales[rows], biases[rows] if biases is not None else None)
        with mx.stream(stream):
            if prompt:
                weight = dequantize(*part, group_size, bits, mode)
            else:
                out.append(mx.quantized_matmul(x, *part, transpose=True, group_size=group_size, bits=bits, mode=mode))
        if prompt:
            out.append(matmul_t(x, weight))
    return mx.concatenate(out, axis=-1)


def describe() -> str:
    """Which routes inference takes in this process, for ``--verbose`` and ``bench``."""
    if not on_cpu():
        return "MLX kernels"
    blas = np.__config__.CONFIG.get("Build Dependencies", {}).get("blas", {})
    numpy_blas = f"NumPy ({blas.get('name', '?')} {blas.get('version', '')})".replace(" )", ")")
    one, many = numpy_routes()
    if one and _choice() == "auto":
        one_row = f"{numpy_blas} from {NUMPY_DECODE_MIN_LAYER_BYTES / 1e6:.0f} MB of weights per layer, else MLX"
    else:
        one_row = numpy_blas if one else "MLX"
    return f"float32 decoding matmuls: {one_row}; prompt matmuls: {numpy_blas if many else 'MLX'}"


class CPURoutes:
    """The CPU runtime's matmul plug-in (runtime.py swaps it into the model's layers at load)."""

    matmul_t = staticmethod(matmul_t)
    quantized_matmul_t = staticmethod(quantized_matmul_t)
    inference = staticmethod(inference)
