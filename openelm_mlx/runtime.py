"""How this process runs a model, chosen once when the model is loaded (``prepare``).

A runtime fixes:

- the device: Metal or CUDA when MLX has a GPU, else the CPU;
- the matmul plug-in the model's layers call (``model.MLXRoutes``: every matmul in MLX; the CPU
  runtime's ``cpu.CPURoutes``: NumPy's gemv/gemm and the two-stream quantized matmul where they
  were measured faster, cpu.py);
- which decode steps are compiled (step.py): all of them, except on the CPU runtime a lone
  sequence of a float32 model whose matmuls take NumPy's gemv, which cannot be traced
  (``cpu.numpy_decoding``);
- the memory policy: on Metal the weights are wired (``mx.set_wired_limit`` to the device's
  recommended working set, as mlx_lm does, so a large model's pages are not evicted between
  steps); a cap on MLX's buffer cache; ``clear_cache`` after a long prefill and when a server
  goes idle.

``OPENELM_MLX_RUNTIME=gpu-path`` runs the GPU runtime's code on the CPU: MLX matmuls only,
compiled step, the same batch cache and masks as on Metal, so a machine without a GPU (and CI)
tests the code a Mac runs.  ``cpu`` forces the CPU runtime; ``auto`` (the default) picks by device.

The compute dtype is the model's (its weights' or its quantization scales'); ``step.activation_dtype``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import mlx.core as mx

from . import cpu
from .errors import OpenELMError
from .model import MLXRoutes, OpenELM

ENV = "OPENELM_MLX_RUNTIME"
CHOICES = ("auto", "cpu", "gpu-path")
# A prefill of this many tokens or more leaves its activations' buffers in MLX's cache; they are
# handed back (``after_prefill``).  A 600-token prompt on the 270M model leaves about 0.4 GB.
LONG_PREFILL_TOKENS = 1024
# MLX keeps freed buffers for reuse up to this share of the memory limit (its default is all of
# it, so after one long prompt the process keeps the peak for good).
CACHE_LIMIT_FRACTION = 0.25


@dataclass(frozen=True)
class Runtime:
    name: str  # "metal", "cuda", "cpu" or "gpu-path"
    routes: type  # the matmul plug-in: model.MLXRoutes or cpu.CPURoutes

    @property
    def gpu_code(self) -> bool:
        """Whether this runs the GPU runtime's code (on a GPU, or gpu-path on the CPU)."""
        return self.routes is MLXRoutes

    def numpy_gemv_for(self, model: OpenELM) -> bool:
        """Whether a lone sequence of ``model`` decodes eagerly through NumPy's gemv (step.py):
        only on the CPU runtime, for float32 models with large layers (``cpu.numpy_decoding``)."""
        if self.gpu_code:
            return False
        embedding = model.transformer.token_embeddings
        if embedding.weight.dtype != mx.float32 or "scales" in embedding:
            return False
        return cpu.numpy_decoding(model.weight_bytes // len(model.layers))

    def describe(self) -> str:
        if self.routes is MLXRoutes:
            return f"{self.name}: MLX kernels, compiled decode step"
        return f"{self.name}: {cpu.describe()}"


def choice() -> str:
    value = os.environ.get(ENV, "auto")
    if value not in CHOICES:
        raise OpenELMError(f"{ENV}={value}: expected one of {', '.join(CHOICES)}")
    return value


def select() -> Runtime:
    """The runtime for this process's default device and ``OPENELM_MLX_RUNTIME``."""
    wanted = choice()
    if mx.default_device() != mx.cpu:
        name = "metal" if mx.metal.is_available() else "cuda"
        return Runtime(name, MLXRoutes)
    if wanted == "gpu-path":
        return Runtime("gpu-path", MLXRoutes)
    return Runtime("cpu", cpu.CPURoutes)


def prepare(model: OpenELM, runtime: Runtime | None = None) -> Runtime:
    """Choose the runtime for ``model`` (once: a model already prepared keeps its runtime),
    swap its matmul plug-in into every layer and apply the memory policy."""
    if runtime is None and getattr(model, "runtime", None) is not None:
        return model.runtime
    runtime = runtime or select()
    for m in model.modules():
        if hasattr(m, "routes"):
            m.routes = runtime.routes
    model.runtime = runtime
    _memory_policy(runtime, model)
    return runtime


def of(model: OpenELM) -> Runtime:
    """``model``'s runtime, choosing it now if the model was built without ``load``."""
    return getattr(model, "runtime", None) or prepare(model)


def _memory_policy(runtime: Runtime, model: OpenELM) -> None:
    if runtime.name == "metal":
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        recommended = int(info["max_recommended_working_set_size"])
        if model.weight_bytes > 0.9 * recommended:
            print(
                f"[openelm-mlx] warning: the model ({model.weight_bytes / 2**30:.1f} GiB) is close to the "
                f"recommended working set ({recommended / 2**30:.1f} GiB); generation may be slow",
            )
        mx.set_wired_limit(recommended)
    mx.set_cache_limit(int(memory_limit() * CACHE_LIMIT_FRACTION))


def memory_limit() -> int:
    """MLX's memory limit (``mx.get_memory_limit`` is new in 0.32; before it, setting the limit
    returns the previous one, so set it and put it back)."""
    if hasattr(mx, "get_memory_limit"):
        return mx.get_memory_limit()
    previous = mx.set_memory_limit(1 << 40)
    mx.set_memory_limit(previous)
    return previous


def after_prefill(tokens: int) -> None:
    """Hand MLX's cached buffers back after a long prefill (``LONG_PREFILL_TOKENS``)."""
    if tokens >= LONG_PREFILL_TOKENS:
        mx.clear_cache()


def on_idle() -> None:
    """A server with nothing to run hands its cached buffers back."""
    mx.clear_cache()
