"""cpu.py's NumPy routes: same numbers as MLX's matmuls, taken only for inference."""

import mlx.core as mx
import numpy as np
import pytest
from helpers import build_model, random_weights, rel_err, small_config

from openelm_mlx import cpu, reference
from openelm_mlx.errors import OpenELMError
from openelm_mlx.generate import generate_tokens

TOL = 1e-4  # as in test_model: max abs logit error relative to the logit scale, float32


@pytest.fixture
def routes(monkeypatch):
    """Force the routes with OPENELM_MLX_MATMUL; the decision is cached per process, so reset it."""

    def force(choice: str) -> None:
        monkeypatch.setenv(cpu.ENV, choice)
        cpu.numpy_routes.cache_clear()

    yield force
    cpu.numpy_routes.cache_clear()


def count_numpy_calls(monkeypatch) -> list:
    calls = []
    real = cpu._np_matmul_t

    def spy(x, w):
        calls.append(x.shape)
        return real(x, w)

    monkeypatch.setattr(cpu, "_np_matmul_t", spy)
    return calls


@pytest.mark.parametrize("name", ["tied", "untied", "no_glu"])
def test_numpy_routes_match_reference_prompt_and_decode(name, routes, monkeypatch):
    routes("numpy")
    calls = count_numpy_calls(monkeypatch)
    config = small_config(name)
    weights = random_weights(config)
    model = build_model(config, weights)
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, (1, 24))
    cache = model.make_cache()
    parts = [np.array(model.infer(mx.array(tokens[:, :16]), cache=cache))]  # 16 rows: a prompt
    parts += [np.array(model.infer(mx.array(tokens[:, i : i + 1]), cache=cache)) for i in range(16, 24)]
    ref = reference.forward(config, weights, tokens)
    assert rel_err(np.concatenate(parts, axis=1), ref) < TOL
    per_forward = 4 * config.num_transformer_layers + 1  # qkv, out, proj_1, proj_2 per layer, and the head
    assert len(calls) == 9 * per_forward  # the prompt and all 8 decoding steps went through NumPy
    assert sum(shape[0] == 1 for shape in calls) == 8 * per_forward


def test_plain_calls_stay_in_mlx_and_batched_decoding_rows_take_numpy(routes, monkeypatch):
    routes("numpy")
    calls = count_numpy_calls(monkeypatch)
    config = small_config("tied")
    model = build_model(config, random_weights(config))
    one = mx.array([[5]])
    model(one)  # not inside inference(): differentiable, compilable MLX
    assert calls == []
    # 4 rows (a batch of decoding sequences, or speculative verification) take the decoding route.
    model.infer(mx.array([[5, 6, 7, 8]]))
    assert calls and all(shape[0] == 4 for shape in calls)
    calls.clear()

    # Gradients through a one-token forward are real (a NumPy route would cut the graph).
    def loss(params):
        model.update(params)
        return model(one).sum()

    grads = mx.grad(loss)(model.trainable_parameters())
    assert float(mx.abs(grads["transformer"]["layers"][0]["ffn"]["proj_2"]["weight"]).max()) > 0
    compiled = mx.compile(lambda t: model(t))
    assert np.allclose(np.array(compiled(one)), np.array(model(one)), atol=1e-5)


def test_greedy_generation_is_the_same_on_both_routes(routes):
    config = small_config("untied")
    model = build_model(config, random_weights(config, seed=5))
    prompt = list(range(3, 40))
    out = {}
    for choice in ("mlx", "numpy"):
        routes(choice)
        out[choice] = list(generate_tokens(model, prompt, max_tokens=20, ignore_eos=True))
    assert out["mlx"] == out["numpy"] and len(out["mlx"]) == 20


def test_half_precision_and_gpu_never_take_numpy(routes, monkeypatch):
    routes("numpy")
    calls = count_numpy_calls(monkeypatch)
    config = small_config("tied")
    model = build_model(config, random_weights(config), dtype=mx.bfloat16)
    model.infer(mx.array([[5]]))
    assert calls == []
    monkeypatch.setattr(cpu, "on_cpu", lambda: False)
    build_model(config, random_weights(config)).infer(mx.array([[5]]))
    assert calls == []


def test_auto_follows_mlx_blas_and_bad_choice_is_named(routes, monkeypatch):
    from openelm_mlx import blas

    routes("auto")
    monkeypatch.setattr(blas, "mlx_blas_is_reference", lambda: True)
    assert cpu.numpy_routes() == (True, True) or cpu.sys.platform == "darwin"
    routes("auto")
    monkeypatch.setattr(blas, "mlx_blas_is_reference", lambda: False)
    assert cpu.numpy_routes()[1] is False
    routes("fast")
    with pytest.raises(OpenELMError, match="OPENELM_MLX_MATMUL=fast"):
        cpu.numpy_routes()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_dequantize_equals_mlx(bits, group_size):
    # The compiled elementwise kernel (2, 4, 8 bits) and the fallback give mx.dequantize's numbers.
    w = mx.random.normal((97, 256), key=mx.random.key(bits * group_size))
    q = mx.quantize(w, group_size=group_size, bits=bits)
    ours = cpu.dequantize(*q, group_size, bits, "affine")
    expected = mx.dequantize(*q, group_size=group_size, bits=bits)
    assert ours.shape == expected.shape == w.shape and ours.dtype == expected.dtype
    np.testing.assert_allclose(np.array(ours), np.array(expected), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode, bits, group_size", [("affine", 4, 64), ("affine", 3, 32), ("mxfp4", 4, 32)])
@pytest.mark.parametrize("rows", [1, 4, 6, 24])  # decoding, a batch or speculative verification, a prompt
def test_quantized_matmul_routes_equal_mlx(mode, bits, group_size, rows):
    # 97 output rows: the two streams get unequal halves.
    w = mx.random.normal((97, 256), key=mx.random.key(1))
    x = mx.random.normal((1, rows, 256), key=mx.random.key(2))
    wq, scales, *biases = mx.quantize(w, group_size=group_size, bits=bits, mode=mode)
    b = biases[0] if biases else None
    ours = cpu.quantized_matmul_t(x, wq, scales, b, group_size, bits, mode)
    expected = mx.quantized_matmul(x, wq, scales, b, transpose=True, group_size=group_size, bits=bits, mode=mode)
    assert ours.shape == (1, rows, 97)
    scale = float(mx.abs(expected).max())
    assert float(mx.abs(ours - expected).max()) / scale < 1e-5  # float32 summation order only


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 12, 16, 17])
def test_numpy_matmul_every_row_count_equals_mlx(routes, rows):
    """One row (gemv), two (two gemvs), row blocks padded to GEMM_ROW_BLOCK, and past MAX_DECODE_ROWS."""
    routes("numpy")
    rng = np.random.default_rng(rows)
    x = mx.array(rng.standard_normal((rows, 96), dtype=np.float32))
    w = mx.array(rng.standard_normal((200, 96), dtype=np.float32))
    with cpu.inference():
        ours = cpu.matmul_t(x, w)
    expected = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    assert ours.shape == (rows, 200)
    assert np.abs(np.asarray(ours) - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("rows", [1, 3, 12, 16, 17, 40])
def test_mlx_matmul_padded_to_its_row_block_equals_float64(routes, rows):
    """The MLX route pads rows to MLX_GEMM_ROW_BLOCK on the CPU; the padding never shows."""
    routes("mlx")
    rng = np.random.default_rng(rows)
    x = mx.array(rng.standard_normal((2, rows, 96), dtype=np.float32))  # [batch, rows, in]: reshaped and back
    w = mx.array(rng.standard_normal((200, 96), dtype=np.float32))
    with cpu.inference():
        ours = cpu.matmul_t(x, w)
    expected = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    assert ours.shape == (2, rows, 200)
    assert np.abs(np.asarray(ours) - expected).max() <= 1e-5 * np.abs(expected).max()


def test_fast_blas_env_preloads_once_and_honours_the_opt_out(monkeypatch):
    from openelm_mlx import blas

    lib = blas.find_fast_blas()
    if lib is None:
        pytest.skip("no OpenBLAS with cblas_sgemm installed here")
    base = {"LD_PRELOAD": "", "PATH": "/usr/bin"}
    env = blas.fast_blas_env(base)
    assert env["LD_PRELOAD"] == lib and env["PATH"] == "/usr/bin" and base["LD_PRELOAD"] == ""
    assert blas.fast_blas_env(env)["LD_PRELOAD"] == lib  # not twice
    monkeypatch.setenv(blas.ENV, "reference")
    assert blas.fast_blas_env(base) == base
