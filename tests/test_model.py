"""The MLX model against the float64 NumPy reference and against mlx_lm's OpenELM."""

import mlx.core as mx
import numpy as np
import pytest
from helpers import SMALL_CONFIGS, build_model, random_weights, rel_err, small_config
from mlx_lm.models import openelm as mlx_lm_openelm

from openelm_mlx import OpenELM, OpenELMConfig, reference

TOL = 1e-4  # max abs logit error relative to the logit scale, float32


def tokens_for(config, batch=2, length=11, seed=1):
    return np.random.default_rng(seed).integers(0, config.vocab_size, (batch, length))


@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
def test_float32_matches_reference(name):
    config = small_config(name)
    assert len(set(config.num_query_heads)) > 1, "configs must exercise layer-wise scaling"
    weights = random_weights(config)
    tokens = tokens_for(config)
    logits = np.array(build_model(config, weights)(mx.array(tokens)))
    ref = reference.forward(config, weights, tokens)
    assert logits.shape == ref.shape == (2, 11, config.vocab_size)
    assert rel_err(logits, ref) < TOL


@pytest.mark.parametrize("name", [n for n in SMALL_CONFIGS if SMALL_CONFIGS[n].get("ffn_with_glu", True)])
def test_matches_mlx_lm(name):
    # mlx_lm's OpenELM has no ffn_with_glu=false path, so those configs are covered by the reference only.
    config = small_config(name)
    weights = random_weights(config, seed=3)
    peer = mlx_lm_openelm.Model(mlx_lm_openelm.ModelArgs.from_dict(config.to_dict()))
    peer.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    tokens = mx.array(tokens_for(config, seed=4))
    ours = np.array(build_model(config, weights)(tokens))
    theirs = np.array(peer(tokens))
    assert rel_err(ours, theirs.astype(np.float64)) < TOL


def test_reference_detects_a_wrong_weight():
    # The oracle must be sensitive: a perturbed norm weight moves the logits far past TOL.
    config = small_config("tied")
    weights = random_weights(config)
    tokens = tokens_for(config)
    ours = np.array(build_model(config, weights)(mx.array(tokens)))
    weights["transformer.layers.1.attn.k_norm.weight"] = weights["transformer.layers.1.attn.k_norm.weight"] * 1.5
    assert rel_err(ours, reference.forward(config, weights, tokens)) > 100 * TOL


@pytest.mark.parametrize("name", ["tied", "untied", "no_glu"])
def test_cached_decoding_equals_full_forward(name):
    config = small_config(name)
    model = build_model(config, random_weights(config))
    tokens = mx.array(tokens_for(config, batch=1, length=300))  # crosses the cache's 256-step growth
    full = np.array(model(tokens))
    cache = model.make_cache()
    parts = [np.array(model(tokens[:, :5], cache=cache))]  # prefill
    parts += [np.array(model(tokens[:, i : i + 1], cache=cache)) for i in range(5, 200)]
    parts.append(np.array(model(tokens[:, 200:], cache=cache)))  # a second prefill on top of the cache
    incremental = np.concatenate(parts, axis=1)
    assert cache[0].offset == 300
    assert rel_err(incremental, full.astype(np.float64)) < TOL


def test_cache_trim_rewinds():
    config = small_config("tied")
    model = build_model(config, random_weights(config))
    tokens = mx.array(tokens_for(config, batch=1, length=8))
    cache = model.make_cache()
    model(tokens[:, :6], cache=cache)
    for c in cache:
        assert c.trim(2) == 2
    step = np.array(model(tokens[:, 4:5], cache=cache))
    full = np.array(model(tokens[:, :5]))
    assert rel_err(step[0, -1], full[0, -1].astype(np.float64)) < TOL


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_half_precision_top1_agreement(dtype):
    config = small_config("tied")
    weights = random_weights(config)
    tokens = mx.array(tokens_for(config, batch=4, length=64))
    f32 = np.array(build_model(config, weights)(tokens))
    low_model = build_model(config, weights, dtype=dtype)
    low = build_model(config, weights, dtype=dtype)(tokens)
    assert low.dtype == dtype and low_model.transformer.layers[0].attn.qkv_proj.weight.dtype == dtype
    agreement = (np.array(low.astype(mx.float32)).argmax(-1) == f32.argmax(-1)).mean()
    assert agreement >= 0.98


@pytest.mark.slow
def test_real_270m_shape_end_to_end():
    config = OpenELMConfig.from_preset("270M")
    weights = random_weights(config, seed=7)
    model = build_model(config, weights)
    from mlx.utils import tree_flatten

    assert sum(v.size for _, v in tree_flatten(model.parameters())) == 271_527_168
    tokens = tokens_for(config, batch=1, length=12, seed=8)
    logits = np.array(model(mx.array(tokens)))
    ref = reference.forward(config, weights, tokens)
    assert rel_err(logits, ref) < TOL
    cache = model.make_cache()
    model(mx.array(tokens[:, :11]), cache=cache)
    last = np.array(model(mx.array(tokens[:, 11:]), cache=cache))
    assert rel_err(last[0, -1], ref[0, -1]) < TOL


def test_model_is_an_mlx_module_with_hf_names():
    config = small_config("untied")
    model = OpenELM(config)
    from mlx.utils import tree_flatten

    names = {k for k, _ in tree_flatten(model.parameters())}
    assert names == set(config.weight_shapes())


def test_cache_trim_clamps_to_what_it_holds():
    config = small_config("tied")
    model = build_model(config, random_weights(config))
    cache = model.make_cache()
    model(mx.array(tokens_for(config, batch=1, length=5)), cache=cache)
    assert cache[0].trim(-1) == 0 and cache[0].offset == 5
    assert cache[0].trim(9) == 5 and cache[0].offset == 0
