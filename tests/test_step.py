"""The compiled decoding step (step.py) against the model's own full forward pass."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import build_model, random_weights, rel_err, small_config

from openelm_mlx import cpu, step
from openelm_mlx.generate import generate_tokens

TOL = 1e-4  # as in test_model


@pytest.fixture
def mlx_routes(monkeypatch):
    monkeypatch.setenv(cpu.ENV, "mlx")
    cpu.numpy_routes.cache_clear()
    yield
    cpu.numpy_routes.cache_clear()


@pytest.mark.parametrize("name", ["tied", "untied", "no_glu", "mqa_groups2"])
def test_compiled_steps_equal_the_full_forward(name):
    config = small_config(name)
    model = build_model(config, random_weights(config))
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (1, 300))
    full = np.array(model(mx.array(tokens)))
    cache = model.make_cache()
    parts = [np.array(model(mx.array(tokens[:, :5]), cache=cache))]
    decode = step.CompiledStep(model)
    # 295 steps: the buffer grows past 256 positions (a new shape, a new trace) on the way.
    parts += [np.array(decode(mx.array(tokens[:, i : i + 1]), [cache])) for i in range(5, 300)]
    assert cache[0].offset == 300 and cache[0].keys.shape[2] == 512
    assert rel_err(np.concatenate(parts, axis=1), full.astype(np.float64)) < TOL


def test_positions_past_the_offset_are_masked():
    # After a trim (rejected drafts) the buffer still holds the dropped positions' keys.
    config = small_config("tied")
    model = build_model(config, random_weights(config))
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (1, 12))
    cache = model.make_cache()
    model(mx.array(tokens[:, :10]), cache=cache)
    for c in cache:
        c.trim(4)  # 6 kept; positions 6..9 are stale in the buffer
    logits = np.array(step.CompiledStep(model)(mx.array(tokens[:, 6:7]), [cache]))
    expected = np.array(model(mx.array(tokens[:, :7])))[:, -1:]
    assert rel_err(logits, expected.astype(np.float64)) < TOL


def test_quantized_compiled_step_equals_eager():
    config = small_config("untied")
    model = build_model(config, random_weights(config))
    nn.quantize(model, group_size=32, bits=4)
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, (1, 30))
    eager_cache, compiled_cache = model.make_cache(), model.make_cache()
    model(mx.array(tokens[:, :5]), cache=eager_cache)
    model(mx.array(tokens[:, :5]), cache=compiled_cache)
    decode = step.CompiledStep(model)
    a = [np.array(decode(mx.array(tokens[:, i : i + 1]), [compiled_cache])) for i in range(5, 30)]
    b = [np.array(model(mx.array(tokens[:, i : i + 1]), cache=eager_cache)) for i in range(5, 30)]
    assert rel_err(np.concatenate(a, 1), np.concatenate(b, 1).astype(np.float64)) < TOL


def test_which_models_decode_compiled(monkeypatch):
    config = small_config("tied")
    float32 = build_model(config, random_weights(config))
    monkeypatch.setenv(cpu.ENV, "numpy")
    cpu.numpy_routes.cache_clear()
    assert not step.uses_compiled_step(float32)  # NumPy's gemv, eagerly
    assert step.uses_compiled_step(build_model(config, random_weights(config), dtype=mx.bfloat16))
    quantized = build_model(config, random_weights(config))
    nn.quantize(quantized, group_size=32, bits=4)
    assert step.uses_compiled_step(quantized)
    monkeypatch.setenv(cpu.ENV, "mlx")
    cpu.numpy_routes.cache_clear()
    assert step.uses_compiled_step(float32)
    cpu.numpy_routes.cache_clear()


def test_float32_decoding_route_follows_layer_size(monkeypatch):
    # Automatic choice: a small float32 model decodes in the compiled step (per-op cost dominates),
    # one with large layers through NumPy's gemv (sgemm's repacking dominates).
    monkeypatch.delenv(cpu.ENV, raising=False)
    monkeypatch.setattr(cpu, "numpy_routes", lambda: (True, False))
    config = small_config("tied")
    model = build_model(config, random_weights(config))
    layer_bytes = model.weight_bytes // config.num_transformer_layers
    assert layer_bytes < cpu.NUMPY_DECODE_MIN_LAYER_BYTES and step.uses_compiled_step(model)
    monkeypatch.setattr(cpu, "NUMPY_DECODE_MIN_LAYER_BYTES", layer_bytes)
    assert not step.uses_compiled_step(model)
    assert f"from {layer_bytes / 1e6:.0f} MB of weights per layer" in cpu.describe()
    monkeypatch.setattr(cpu, "numpy_routes", lambda: (False, False))  # e.g. macOS: no NumPy route at all
    assert step.uses_compiled_step(model)


def test_generation_continues_a_cache_through_compiled_steps(mlx_routes, monkeypatch):
    calls = []
    real = step.CompiledStep.__call__
    monkeypatch.setattr(step.CompiledStep, "__call__", lambda self, t, c: calls.append(1) or real(self, t, c))
    config = small_config("untied")
    model = build_model(config, random_weights(config, seed=7))
    cache, history = model.make_cache(), []
    first = list(generate_tokens(model, list(range(3, 20)), max_tokens=12, cache=cache, history=history))
    second = list(generate_tokens(model, [5, 6, 7], max_tokens=12, cache=cache, history=history))
    assert len(calls) == 22  # every token after each prompt's first came from the compiled step
    fresh = list(generate_tokens(model, list(range(3, 20)) + first + [5, 6, 7], max_tokens=12))
    assert second == fresh
