"""The decode step over the batch KV cache (step.py, cache.BatchKVCache) against the model's own
full forward pass; its op count does not grow with the batch; traces stay one per bucket."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import build_model, random_weights, rel_err, small_config

from openelm_mlx import cpu, runtime, step
from openelm_mlx.cache import BatchKVCache, KVCache
from openelm_mlx.generate import generate_tokens

TOL = 1e-4  # as in test_model


@pytest.fixture
def mlx_routes(monkeypatch):
    monkeypatch.setenv(cpu.ENV, "mlx")
    cpu.numpy_routes.cache_clear()
    yield
    cpu.numpy_routes.cache_clear()


def batch_for(model, slots: int) -> BatchKVCache:
    c = model.config
    batch = BatchKVCache(c.num_kv_heads, c.head_dim, max_slots=slots)
    for _ in range(slots):
        batch.take()
    return batch


def prefill_slots(model, batch, prompts):
    for slot, p in enumerate(prompts):
        model(mx.array([p]), cache=batch.view(slot))


@pytest.mark.parametrize("name", ["tied", "untied", "no_glu", "mqa_groups2"])
def test_compiled_steps_equal_the_full_forward(name):
    # Two rows of different lengths decoding together, 295 steps: the buffer grows through 64,
    # 128, 256 and 512 positions (a new shape each, one trace each) on the way.
    config = small_config(name)
    model = build_model(config, random_weights(config))
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 300))
    full = [np.array(model(mx.array(tokens[i : i + 1]))) for i in range(2)]
    batch = batch_for(model, 2)
    prefill_slots(model, batch, [tokens[0, :5].tolist(), tokens[1, :9].tolist()])
    decode = step.DecodeStep(model, compiled=True)
    parts = [[], []]
    for i in range(295):
        fed = [int(tokens[0, 5 + i]), int(tokens[1, min(9 + i, 299)])]
        live = [0, 1] if 9 + i < 300 else [0]
        logits = np.array(decode(mx.array(fed, dtype=mx.uint32)[:, None], batch, live))
        for r in live:
            parts[r].append(logits[r : r + 1])
    assert batch.offsets == [300, 300] and batch.capacity == 512 and decode.traces == 4
    assert rel_err(np.concatenate(parts[0], axis=1), full[0][:, 5:].astype(np.float64)) < TOL
    assert rel_err(np.concatenate(parts[1], axis=1), full[1][:, 9:].astype(np.float64)) < TOL


def test_positions_past_the_offset_are_masked():
    # After a trim (rejected drafts) the buffer still holds the dropped positions' keys.
    config = small_config("tied")
    model = build_model(config, random_weights(config))
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 12))
    batch = batch_for(model, 2)
    prefill_slots(model, batch, [tokens[0, :10].tolist(), tokens[1, :3].tolist()])
    batch.trim(0, 4)  # 6 kept; positions 6..9 are stale in the buffer
    fed = mx.array([int(tokens[0, 6]), int(tokens[1, 3])], dtype=mx.uint32)[:, None]
    logits = np.array(step.DecodeStep(model, compiled=True)(fed, batch, [0, 1]))
    expected = np.array(model(mx.array(tokens[:1, :7])))[:, -1:]
    assert rel_err(logits[:1], expected.astype(np.float64)) < TOL


def test_quantized_compiled_step_equals_eager():
    config = small_config("untied")
    model = build_model(config, random_weights(config))
    nn.quantize(model, group_size=32, bits=4)
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, (2, 30))
    eager = [model.make_cache(), model.make_cache()]
    batch = batch_for(model, 2)
    prefill_slots(model, batch, [tokens[0, :5].tolist(), tokens[1, :5].tolist()])
    for r in range(2):
        model(mx.array(tokens[r : r + 1, :5]), cache=eager[r])
    decode = step.DecodeStep(model, compiled=True)
    a = [np.array(decode(mx.array(tokens[:, i : i + 1]).astype(mx.uint32), batch, [0, 1])) for i in range(5, 30)]
    for r in range(2):
        b = [np.array(model(mx.array(tokens[r : r + 1, i : i + 1]), cache=eager[r])) for i in range(5, 30)]
        got = np.concatenate([x[r : r + 1] for x in a], 1)
        assert rel_err(got, np.concatenate(b, 1).astype(np.float64)) < TOL


def test_which_models_decode_a_lone_sequence_eagerly(monkeypatch):
    # Only a float32 model on the CPU runtime's NumPy gemv; bfloat16, quantized and MLX-routed
    # models take the compiled step for every batch size.
    monkeypatch.setenv(runtime.ENV, "cpu")  # the CPU runtime's choice, whatever this run forces
    config = small_config("tied")
    float32 = build_model(config, random_weights(config))
    monkeypatch.setenv(cpu.ENV, "numpy")
    cpu.numpy_routes.cache_clear()
    assert step.lone_decodes_eagerly(float32)  # NumPy's gemv, eagerly
    assert not step.lone_decodes_eagerly(build_model(config, random_weights(config), dtype=mx.bfloat16))
    quantized = build_model(config, random_weights(config))
    nn.quantize(quantized, group_size=32, bits=4)
    assert not step.lone_decodes_eagerly(quantized)
    monkeypatch.setenv(cpu.ENV, "mlx")
    cpu.numpy_routes.cache_clear()
    assert not step.lone_decodes_eagerly(float32)
    cpu.numpy_routes.cache_clear()


def test_float32_decoding_route_follows_layer_size(monkeypatch):
    # Automatic choice: a small float32 model decodes in the compiled step (per-op cost dominates),
    # one with large layers through NumPy's gemv when alone (sgemm's repacking dominates).
    monkeypatch.setenv(runtime.ENV, "cpu")  # the CPU runtime's choice, whatever this run forces
    monkeypatch.delenv(cpu.ENV, raising=False)
    monkeypatch.setattr(cpu, "numpy_routes", lambda: (True, False))
    config = small_config("tied")
    model = build_model(config, random_weights(config))
    layer_bytes = model.weight_bytes // config.num_transformer_layers
    assert layer_bytes < cpu.NUMPY_DECODE_MIN_LAYER_BYTES and not step.lone_decodes_eagerly(model)
    monkeypatch.setattr(cpu, "NUMPY_DECODE_MIN_LAYER_BYTES", layer_bytes)
    assert step.lone_decodes_eagerly(model)
    assert f"from {layer_bytes / 1e6:.0f} MB of weights per layer" in cpu.describe()
    monkeypatch.setattr(cpu, "numpy_routes", lambda: (False, False))  # e.g. macOS: no NumPy route at all
    assert not step.lone_decodes_eagerly(model)


def test_several_slots_decode_compiled_even_where_one_decodes_eagerly(monkeypatch):
    # The CPU runtime's NumPy gemv serves a lone sequence; a batch goes through the compiled step
    # (no NumPy matmul inside it) and gives the same logits as each row's eager step.
    monkeypatch.setenv(runtime.ENV, "cpu")  # the CPU runtime's choice, whatever this run forces
    monkeypatch.setenv(cpu.ENV, "numpy")
    cpu.numpy_routes.cache_clear()
    config = small_config("untied")
    model = build_model(config, random_weights(config, seed=4))
    calls = []
    real = cpu._np_matmul_t
    monkeypatch.setattr(cpu, "_np_matmul_t", lambda x, w: calls.append(x.shape[0]) or real(x, w))
    tokens = np.random.default_rng(4).integers(0, config.vocab_size, (2, 9))
    decode = step.DecodeStep(model, eager_lone=True)
    lone = batch_for(model, 1)
    prefill_slots(model, lone, [tokens[0, :8].tolist()])
    calls.clear()
    alone = np.array(decode(mx.array(tokens[:1, 8:9], dtype=mx.uint32), lone, [0]))
    assert calls and set(calls) == {1} and decode.traces == 0  # gemv, eagerly
    both = batch_for(model, 2)
    prefill_slots(model, both, [tokens[0, :8].tolist(), tokens[1, :5].tolist()])
    calls.clear()
    fed = mx.array([[int(tokens[0, 8])], [int(tokens[1, 5])]], dtype=mx.uint32)
    together = np.array(decode(fed, both, [0, 1]))
    assert not calls and decode.traces == 1
    assert rel_err(together[:1], alone.astype(np.float64)) < TOL
    cpu.numpy_routes.cache_clear()


def test_generation_continues_a_cache_through_decode_steps(mlx_routes, monkeypatch):
    calls = []
    real = step.DecodeStep.__call__
    monkeypatch.setattr(step.DecodeStep, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    config = small_config("untied")
    model = build_model(config, random_weights(config, seed=7))
    cache, history = model.make_cache(), []
    first = list(generate_tokens(model, list(range(3, 20)), max_tokens=12, cache=cache, history=history))
    assert cache[0].offset == len(history) - 1  # the conversation's state came back, all but the last token
    second = list(generate_tokens(model, [5, 6, 7], max_tokens=12, cache=cache, history=history))
    assert len(calls) == 22  # every token after each prompt's first came from the decode step
    fresh = list(generate_tokens(model, list(range(3, 20)) + first + [5, 6, 7], max_tokens=12))
    assert second == fresh


# --- ops per step and traces ---------------------------------------------------------------------------


def count_ops(tmp_path, *outputs: mx.array) -> int:
    """Primitives in the (unevaluated) graph behind ``outputs``: on a GPU, kernels launched."""
    path = tmp_path / "graph.dot"
    mx.export_to_dot(str(path), *outputs)
    return path.read_text().count("shape=rectangle")


def decode_graph(model, slots: int, compiled: bool) -> mx.array:
    """The logits of one decode step at ``slots`` rows of different lengths, not yet evaluated."""
    rng = np.random.default_rng(slots)
    batch = batch_for(model, slots)
    prefill_slots(model, batch, [rng.integers(3, 200, 2 + 3 * r).tolist() for r in range(slots)])
    mx.eval(batch.keys, batch.values)
    tokens = mx.array(rng.integers(3, 200, (slots, 1)), dtype=mx.uint32)
    mx.eval(tokens)
    decode = step.DecodeStep(model, compiled=compiled)
    return decode(tokens, batch, list(range(slots)))


def test_ops_per_decode_step_do_not_grow_with_the_batch(mlx_routes, tmp_path):
    config = small_config("untied")
    model = build_model(config, random_weights(config))
    compiled = {b: count_ops(tmp_path, decode_graph(model, b, True)) for b in (1, 2, 16, 32)}
    assert compiled[2] == compiled[16] == compiled[32], compiled
    assert abs(compiled[1] - compiled[2]) <= 1, compiled  # one slot: MLX fuses one size-1 broadcast differently
    # Eagerly (cpu.py pads a CPU matmul's rows to 16: 16 and 32 rows add no padding ops).
    eager = {b: count_ops(tmp_path, decode_graph(model, b, False)) for b in (16, 32)}
    assert eager[16] == eager[32], eager


def test_masks_of_one_slot(mlx_routes):
    # Eagerly (the CPU runtime's gemv) a lone slot's keys end at its last position: no mask.
    # In the compiled step it attends over its capacity bucket, masked past its offset.
    config = small_config("tied")
    model = build_model(config, random_weights(config))
    batch = batch_for(model, 1)
    prefill_slots(model, batch, [[1, 5, 9]])
    rows = batch.rows([0], 1, mx.float32)
    assert rows[0].mask(1) is None and batch.rows([0], 1, mx.float32)[0].shared.span == 4
    assert batch.capacity == 64  # short sequences get a short buffer (cache.capacity_bucket)
    two = batch_for(model, 2)
    prefill_slots(model, two, [[1, 5, 9], [1, 5]])
    assert two.rows([0, 1], 1, mx.float32)[0].mask(1).shape == (2, 1, 1, 4)
    assert KVCache.mask(1) is None
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, 12)
    one = batch_for(model, 1)
    prefill_slots(model, one, [tokens[:10].tolist()])
    one.trim(0, 4)  # positions 6..9 stale in the buffer: the mask must hide them
    decode = step.DecodeStep(model)
    got = np.array(decode(mx.array([[int(tokens[6])]], dtype=mx.uint32), one, [0]))
    assert decode.traces == 1 and one.offsets == [7]
    expected = np.array(model(mx.array(tokens[None, :7])))[:, -1:]
    assert rel_err(got, expected.astype(np.float64)) < TOL


def test_staggered_load_traces_at_most_once_per_bucket(mlx_routes):
    # 40 requests, prompts of 1 to 600 tokens, arriving a few per round while others finish:
    # the compiled step is traced at most once per (slots, capacity) bucket it meets.
    from openelm_mlx.engine import Engine, GenParams

    config = small_config("untied")
    config.max_context_length = 1024
    model = build_model(config, random_weights(config, seed=5))
    rng = np.random.default_rng(11)
    lengths = [1, 600] + rng.integers(1, 601, 38).tolist()
    queue = [([1] + rng.integers(3, 300, n - 1).tolist(), int(rng.integers(4, 40))) for n in lengths]
    engine = Engine(model, max_batch=16, prefill_chunk=256)
    decode = engine.decode
    assert decode.compiled and not decode.eager_lone
    rounds = 0
    while queue or engine.has_work():
        for _ in range(int(rng.integers(0, 3))):
            if queue:
                prompt, n = queue.pop(0)
                engine.submit(prompt, GenParams(max_tokens=n, ignore_eos=True))
        engine.step()
        rounds += 1
    assert len(decode.buckets) >= 4  # the load did move between shapes
    assert decode.traces <= len(decode.buckets), (decode.traces, sorted(decode.buckets))
    assert step.TRACES.traces >= decode.traces and step.TRACES.seconds > 0
