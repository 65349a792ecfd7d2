"""verify: correctness (tight, against the float64 reference on the stored weights) and quality
(reported, against the original weights) are separate (issue 11, point 1).

A correct quantizer passes at every width and recipe, at the real 270M shape with Apple's
N(0, 0.02) initialisation and on the bundled trained model; a deliberately broken one (swapped
scales, wrong group size, a transposed weight) fails, as does a converted config or file that
does not say what the source says.
"""

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from helpers import random_weights, small_config, std_weights, train_tokenizer, write_hf_folder
from openelm_mlx.convert import quantize, verify
from openelm_mlx.convert.pipeline import convert
from openelm_mlx.convert.sources import load_source

from openelm_mlx import OpenELMConfig
from openelm_mlx.errors import OpenELMError

QUIET = dict(log=lambda s: None)
WIDTHS = [2, 3, 4, 5, 6, 8]
RECIPES = list(quantize.RECIPES)
FP_MODES = [("mxfp4", 4), ("nvfp4", 4), ("mxfp8", 8)]
BUNDLED = "openelm_mlx/bundled/openelm-tiny-kjv"


@pytest.fixture(scope="module")
def small_src(tmp_path_factory):
    config = small_config("tied")  # model_dim 128; layers 1-3 have a square out_proj [128, 128]
    return write_hf_folder(tmp_path_factory.mktemp("verify") / "src", config, random_weights(config))


def _kwargs(what):
    if what in RECIPES:
        return dict(quant_recipe=what)
    if isinstance(what, tuple):
        return dict(quantize_model=True, q_mode=what[0], q_bits=what[1])
    return dict(quantize_model=True, q_bits=what)


# --- every width, recipe and dtype passes -------------------------------------------------------
@pytest.mark.parametrize(
    "dtype, what",
    [(d, w) for d in ("float32", "float16", "bfloat16") for w in (None, 4)]
    + [("bfloat16", 8), ("float32", ("mxfp4", 4)), ("bfloat16", ("nvfp4", 4)), ("float32", ("mxfp8", 8))],
)
def test_every_dtype_passes_correctness_tightly(tmp_path, small_src, dtype, what):
    kwargs = _kwargs(what) if what else {}
    result = convert(str(small_src), tmp_path / "out", dtype=dtype, **kwargs, **QUIET)
    c = result.report.correctness
    assert result.report.passed, str(result.report)
    assert c.tensor_ratio <= 1.0 and c.logit_err <= verify.LOGIT_LIMITS[dtype]
    if dtype == "float32":
        assert c.logit_err < 1e-5  # quantized or not: the model computes exactly what the stored weights say


@pytest.mark.parametrize("what", WIDTHS + RECIPES)
def test_bundled_model_every_width_and_recipe(tmp_path, what):
    result = convert(BUNDLED, tmp_path / "out", **_kwargs(what), **QUIET)
    r = result.report
    assert r.passed, str(r)
    assert r.quality.on_text and r.quality.tokens == 32  # the bundled tokenizer gives real text
    assert r.correctness.logit_err < 1e-5
    assert not r.quality.warning, str(r)  # a trained model stays within the typical KL of its width


def _model_270m(tmp_path):
    config = OpenELMConfig.from_preset("270M")
    return write_hf_folder(tmp_path / "src270", config, std_weights(config, 0.02), tokenizer=False)


@pytest.fixture(scope="module")
def src_270m(tmp_path_factory):
    return _model_270m(tmp_path_factory.mktemp("270m"))


def test_270m_width_4bit_passes(tmp_path):
    # The first and last layers of the real 270M (model_dim 1280, head_dim 64, vocab 32000) with
    # Apple's N(0, 0.02) initialisation: the fast version of the test below.
    full = OpenELMConfig.from_preset("270M")
    config = OpenELMConfig(
        num_transformer_layers=2,
        model_dim=1280,
        head_dim=64,
        num_query_heads=[full.num_query_heads[0], full.num_query_heads[-1]],
        num_kv_heads=[full.num_kv_heads[0], full.num_kv_heads[-1]],
        ffn_multipliers=[full.ffn_multipliers[0], full.ffn_multipliers[-1]],
    )
    src = write_hf_folder(tmp_path / "src", config, std_weights(config, 0.02), tokenizer=False)
    r = convert(str(src), tmp_path / "q4", quantize_model=True, **QUIET).report
    assert r.passed and r.correctness.tensor_ratio <= 1.0 and r.correctness.logit_err < 1e-4, str(r)


@pytest.mark.slow
def test_270m_shape_4bit_passes(tmp_path, src_270m):
    # The case: the real 270M shape, weights N(0, 0.02), `convert -q`. It used to fail with
    # "max |logit error| / logit scale = 4.85e-01 (limit 4e-01)" and write nothing.
    messages = []
    result = convert(str(src_270m), tmp_path / "q4", quantize_model=True, log=messages.append)
    r = result.report
    print("\n".join(m for m in messages if m.startswith("verify")))
    assert r.passed and (tmp_path / "q4" / "model.safetensors").is_file()
    assert r.correctness.tensor_ratio <= 1.0 and r.correctness.logit_err < 1e-4
    assert not r.quality.on_text and np.isfinite(r.quality.kl)


# Each 270M-shape conversion with its verification takes 30-60 s on the 2-core CI machine: CI runs
# the hardest cases (2 bits, the widest 8 bits, a mixed recipe); OPENELM_FULL_SWEEP=1 runs every
# width, recipe and fp mode (all pass; figures in convert/verify.py's comments).
SWEEP_270M = WIDTHS + RECIPES + FP_MODES if os.environ.get("OPENELM_FULL_SWEEP") else [2, 8, "mixed_2_6"]


@pytest.mark.slow
@pytest.mark.parametrize("what", SWEEP_270M)
def test_270m_shape_every_width_and_recipe(tmp_path, src_270m, what):
    result = convert(str(src_270m), tmp_path / "out", **_kwargs(what), **QUIET)
    assert result.report.passed, str(result.report)
    print(result.report)


# --- a broken quantizer fails ---------------------------------------------------------------------
def _broken(monkeypatch, how, target="transformer.layers.1.attn.out_proj"):
    real = quantize.quantize_weight

    def broken(name, w, spec):
        if name != target:
            return real(name, w, spec)
        if how == "transposed":
            return real(name, w.T, spec)
        parts = real(name, w, spec)
        if how == "swapped scales and biases":
            parts[f"{name}.scales"], parts[f"{name}.biases"] = parts[f"{name}.biases"], parts[f"{name}.scales"]
        elif how == "scales of other rows":
            parts[f"{name}.scales"] = parts[f"{name}.scales"][::-1]
        elif how == "wrong group size":
            return real(name, w, quantize.QuantSpec(spec.bits, spec.group_size * 2, spec.mode))
        return parts

    monkeypatch.setattr(quantize, "quantize_weight", broken)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("how", ["transposed", "swapped scales and biases", "scales of other rows"])
def test_broken_quantizer_fails_correctness(tmp_path, small_src, monkeypatch, bits, how):
    _broken(monkeypatch, how)
    messages = []
    with pytest.raises(OpenELMError, match="verification failed; nothing was written"):
        convert(
            str(small_src), tmp_path / "out", quantize_model=True, q_bits=bits, q_group_size=32, log=messages.append
        )
    assert not (tmp_path / "out").exists()
    line = next(m for m in messages if m.startswith("verify correctness"))
    assert "worst transformer.layers.1.attn.out_proj.weight" in line and line.endswith("FAIL")
    ratio = float(line.split("stored tensors at ")[1].split(" ")[0])
    assert ratio > 1.5, line  # 2-bit is the closest call: a step is a third of a group's range


def test_wrong_group_size_fails(tmp_path, small_src, monkeypatch):
    _broken(monkeypatch, "wrong group size")
    with pytest.raises(OpenELMError) as err:
        convert(str(small_src), tmp_path / "out", quantize_model=True, q_bits=4, q_group_size=32, **QUIET)
    message = str(err.value)
    assert "transformer.layers.1.attn.out_proj.biases has shape [128, 2], the config expects [128, 4]" in message
    assert "partial" not in message and "nothing was written" in message
    assert not (tmp_path / "out").exists()


def test_broken_written_files_fail_by_orders_of_magnitude(tmp_path, small_src):
    out = tmp_path / "out"
    convert(str(small_src), out, quantize_model=True, q_bits=4, **QUIET)
    source = load_source(str(small_src))
    assert verify.verify(source, out).passed
    # a config that disagrees with the source (here RoPE's base): the model is consistent with its
    # weights but not with the source's architecture; the logit check catches it
    raw = json.loads((out / "config.json").read_text())
    raw["rope_freq_constant"] = 500.0
    (out / "config.json").write_text(json.dumps(raw))
    c = verify.verify(source, out).correctness
    assert not c.passed and c.logit_err > 100 * verify.LOGIT_LIMITS["float32"], str(c)
    # two layers' tensors under each other's names (a naming bug): the tensor check catches it
    raw["rope_freq_constant"] = 10000.0
    (out / "config.json").write_text(json.dumps(raw))
    path = str(out / "model.safetensors")
    w = mx.load(path)
    for suffix in ("weight", "scales", "biases"):
        a, b = f"transformer.layers.2.ffn.proj_1.{suffix}", f"transformer.layers.3.ffn.proj_1.{suffix}"
        w[a], w[b] = w[b], w[a]
    mx.save_safetensors(path, w)
    c = verify.verify(source, out).correctness
    assert not c.passed and c.tensor_ratio > 10, str(c)
    assert c.worst_tensor in ("transformer.layers.2.ffn.proj_1.weight", "transformer.layers.3.ffn.proj_1.weight")


# --- quality: reported, warned, failed only on collapse or a user's --max-kl ---------------------
def test_quality_is_reported_on_text_and_warns_above_the_typical_kl(tmp_path, small_src, monkeypatch):
    messages = []
    convert(str(small_src), tmp_path / "q2", quantize_model=True, q_bits=2, log=messages.append)
    quality = next(m for m in messages if m.startswith("verify quality"))
    assert "[q2, 32 tokens of text]" in quality and "mean KL" in quality and "top-1 agreement" in quality
    monkeypatch.setitem(verify.TYPICAL_KL, "q2", 1e-9)
    messages = []
    result = convert(str(small_src), tmp_path / "again", quantize_model=True, q_bits=2, log=messages.append)
    assert result.report.passed  # a warning only
    assert any(m.startswith("verify warning: mean KL") and "typical for q2" in m for m in messages)


def test_max_kl_is_the_users_gate(tmp_path, small_src):
    with pytest.raises(OpenELMError, match="verification failed"):
        convert(str(small_src), tmp_path / "a", quantize_model=True, q_bits=2, max_kl=1e-6, **QUIET)
    assert not (tmp_path / "a").exists()
    out = subprocess.run(
        [sys.executable, "-m", "openelm_mlx.cli", "convert", "--hf-path", str(small_src), "--mlx-path",
         str(tmp_path / "b"), "-q", "--q-bits", "8", "--max-kl", "1"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0 and "(--max-kl 1): PASS" in out.stderr, out.stderr


def test_collapse_fails_quality():
    ref = np.random.default_rng(0).standard_normal((1, 8, 50))
    same = np.zeros_like(ref)
    same[..., 7] = 5.0
    assert "predicts token 7 at every position" in verify._collapse(ref, same)
    assert "NaN or Inf" in verify._collapse(ref, np.full_like(ref, np.nan))
    assert verify._collapse(ref, ref) == ""
    q = verify.Quality("q4", 8, False, 0.1, 1.0, None, verify._collapse(ref, same))
    assert not q.passed and "FAIL (the converted model predicts" in str(q)


def test_random_ids_without_a_tokenizer(tmp_path):
    config = small_config("tied")
    src = write_hf_folder(tmp_path / "src", config, random_weights(config), tokenizer=False)
    result = convert(str(src), tmp_path / "out", **QUIET)
    assert "32 tokens of random ids (no tokenizer)" in str(result.report)
    train_tokenizer(tmp_path / "tok.model", config.vocab_size)
    source = load_source(str(src))
    r = verify.verify(source, tmp_path / "out", num_tokens=20, tokenizer=tmp_path / "tok.model")
    assert r.quality.on_text and r.quality.tokens == 20


def cli(*args):
    return subprocess.run([sys.executable, "-m", "openelm_mlx.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("tokens", ["0", "-3"])
def test_verify_tokens_must_be_positive(tmp_path, small_src, tokens):
    out = cli("verify", "--source", str(small_src), "--model", str(tmp_path), "--tokens", tokens)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "--tokens must be at least 1" in out.stderr
