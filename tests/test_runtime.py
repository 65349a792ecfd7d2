"""runtime.py: one runtime chosen at load; gpu-path runs the GPU code (MLX matmuls, compiled
step) on the CPU with the same tokens as the CPU runtime."""

import mlx.core as mx
import numpy as np
import pytest
from helpers import build_model, random_weights, small_config

from openelm_mlx import cpu, runtime, step
from openelm_mlx.engine import Engine, GenParams
from openelm_mlx.errors import OpenELMError
from openelm_mlx.model import MLXRoutes


def built(monkeypatch, choice: str):
    monkeypatch.setenv(runtime.ENV, choice)
    config = small_config("untied")
    return build_model(config, random_weights(config, seed=3))


def greedy(model, prompts, max_batch=4):
    engine = Engine(model, max_batch=max_batch)
    ids = {engine.submit(p, GenParams(max_tokens=16, ignore_eos=True)): i for i, p in enumerate(prompts)}
    got = {i: [] for i in ids.values()}
    while engine.has_work():
        for o in engine.step():
            got[ids[o.seq_id]] += o.tokens
    return [got[i] for i in range(len(prompts))]


def test_gpu_path_swaps_in_mlx_routes_and_matches_the_cpu_runtime(monkeypatch):
    monkeypatch.setenv(cpu.ENV, "numpy")  # the CPU runtime's NumPy routes, forced
    cpu.numpy_routes.cache_clear()
    rng = np.random.default_rng(8)
    prompts = [[1] + rng.integers(3, 300, n).tolist() for n in (3, 17, 40)]
    on_cpu = built(monkeypatch, "cpu")
    assert on_cpu.runtime.name == "cpu" and step.lone_decodes_eagerly(on_cpu)
    assert all(m.routes is cpu.CPURoutes for m in on_cpu.modules() if hasattr(m, "routes"))
    gpu_path = built(monkeypatch, "gpu-path")
    assert gpu_path.runtime.name == "gpu-path" and not step.lone_decodes_eagerly(gpu_path)
    assert all(m.routes is MLXRoutes for m in gpu_path.modules() if hasattr(m, "routes"))
    calls = []
    real = cpu._np_matmul_t
    monkeypatch.setattr(cpu, "_np_matmul_t", lambda x, w: calls.append(1) or real(x, w))
    expected = greedy(on_cpu, prompts)
    assert calls  # the CPU runtime did take NumPy's routes
    calls.clear()
    assert greedy(gpu_path, prompts) == expected
    assert not calls  # every matmul of the GPU code stayed in MLX
    assert step.decoder(gpu_path).traces >= 1
    cpu.numpy_routes.cache_clear()


def test_the_runtime_is_chosen_once(monkeypatch):
    model = built(monkeypatch, "gpu-path")
    monkeypatch.setenv(runtime.ENV, "cpu")
    assert runtime.prepare(model).name == "gpu-path" and runtime.of(model).name == "gpu-path"


def test_quantizing_after_load_keeps_the_routes(monkeypatch):
    import mlx.nn as nn

    model = built(monkeypatch, "cpu")
    nn.quantize(model, group_size=32, bits=4)
    assert all(m.routes is cpu.CPURoutes for m in model.modules() if hasattr(m, "routes"))


def test_memory_policy_caps_the_buffer_cache(monkeypatch):
    limits = []
    monkeypatch.setattr(mx, "set_cache_limit", lambda n: limits.append(n) or 0)
    built(monkeypatch, "gpu-path")
    assert limits and 0 < limits[-1] <= runtime.memory_limit() * runtime.CACHE_LIMIT_FRACTION
    cleared = []
    monkeypatch.setattr(mx, "clear_cache", lambda: cleared.append(1))
    runtime.after_prefill(runtime.LONG_PREFILL_TOKENS - 1)
    assert not cleared
    runtime.after_prefill(runtime.LONG_PREFILL_TOKENS)
    assert cleared


def test_a_bad_runtime_name_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(runtime.ENV, "metal-please")
    with pytest.raises(OpenELMError, match="OPENELM_MLX_RUNTIME=metal-please: expected one of auto, cpu, gpu-path"):
        runtime.select()
