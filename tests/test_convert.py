"""The converter on checkpoints written in Apple's exact layouts (HF safetensors/.bin, CoreNet .pt)."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from helpers import (
    corenet_config,
    random_weights,
    rel_err,
    small_config,
    write_corenet_checkpoint,
    write_hf_folder,
)
from openelm_mlx.convert.pipeline import convert

from openelm_mlx import OpenELMConfig, reference
from openelm_mlx.errors import OpenELMError
from openelm_mlx.loading import load_model

QUIET = dict(log=lambda s: None)


def cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "openelm_mlx.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )


def logits_of(model_dir, tokens):
    return np.array(load_model(model_dir)(mx.array(tokens)).astype(mx.float32))


def assert_matches_reference(model_dir, config, weights, tol=1e-4):
    tokens = np.random.default_rng(5).integers(0, config.vocab_size, (1, 13))
    assert rel_err(logits_of(model_dir, tokens), reference.forward(config, weights, tokens)) < tol


@pytest.mark.parametrize(
    "fmt, shards, dtype",
    [
        ("safetensors", 1, "float32"),
        ("safetensors", 3, "float32"),
        ("safetensors", 1, "bfloat16"),
        ("bin", 1, "float32"),
        ("bin", 1, "bfloat16"),
        ("bin", 3, "float32"),
        ("bin", 2, "bfloat16"),
    ],
)
def test_hf_folder_round_trip(tmp_path, fmt, shards, dtype):
    config = small_config("tied")
    weights = random_weights(config)
    src = write_hf_folder(tmp_path / "src", config, weights, fmt=fmt, shards=shards, dtype=dtype)
    result = convert(str(src), tmp_path / "out", dtype="float32", **QUIET)
    assert result.report.passed and result.report.correctness.logit_err < 1e-4
    assert result.tokenizer and (tmp_path / "out" / "tokenizer.model").is_file()
    if dtype == "bfloat16":  # the reference sees the same rounded weights the converter read
        import torch

        weights = {k: torch.from_numpy(v).bfloat16().float().numpy() for k, v in weights.items()}
    assert_matches_reference(tmp_path / "out", config, weights)


@pytest.mark.parametrize("name", ["untied", "no_glu", "no_qk_norm"])
def test_architecture_variants_round_trip(tmp_path, name):
    config = small_config(name)
    weights = random_weights(config)
    src = write_hf_folder(tmp_path / "src", config, weights, tokenizer=False)
    convert(str(src), tmp_path / "out", **QUIET)
    assert_matches_reference(tmp_path / "out", config, weights)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("untied", [False, True])
def test_corenet_checkpoint(tmp_path, training, untied):
    config = corenet_config(share_input_output_layers=not untied)
    weights = random_weights(config)
    ckpt = write_corenet_checkpoint(tmp_path / "checkpoint_last.pt", weights, training=training)
    # shapes come from a config.json here; presets and CoreNet YAML are tested below
    cfg_file = tmp_path / "shapes.json"
    cfg_file.write_text(json.dumps(config.to_dict()))
    result = convert(str(ckpt), tmp_path / "out", config=str(cfg_file), **QUIET)
    assert result.report.passed
    assert_matches_reference(tmp_path / "out", config, weights)


def test_corenet_yaml_and_preset_give_the_shapes(tmp_path):
    yaml_text = (
        "model:\n  language_modeling:\n    name: general_gpt\n    general_gpt:\n"
        '      model_name: "OpenELM-270M"\n      vocab_size: 32128\n      max_context_length: 2048\n'
    )
    (tmp_path / "openelm_270M.yaml").write_text(yaml_text)
    from openelm_mlx.convert.sources import config_from_corenet_yaml

    assert config_from_corenet_yaml(tmp_path / "openelm_270M.yaml") == OpenELMConfig.from_preset("270M")
    # a preset that does not fit the checkpoint is a clear error naming the tensor
    weights = random_weights(corenet_config())
    ckpt = write_corenet_checkpoint(tmp_path / "checkpoint_1.pt", weights)
    out = cli("convert", "--hf-path", str(ckpt), "--mlx-path", str(tmp_path / "out"), "--preset", "270M")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "checkpoint_1.pt: missing tensor transformer.layers.3.attn_norm.weight" in out.stderr
    assert not (tmp_path / "out").exists()


def test_quantized_outputs_load_in_mlx_lm_with_the_same_logits(tmp_path):
    import mlx_lm

    config = small_config("tied")
    weights = random_weights(config)
    src = write_hf_folder(tmp_path / "src", config, weights)
    tokens = mx.array(np.random.default_rng(1).integers(0, config.vocab_size, (1, 12)))
    for tag, kwargs in {
        "f32": dict(dtype="float32"),
        "bf16": dict(dtype="bfloat16"),
        "q4": dict(quantize_model=True, q_bits=4, q_group_size=64),
        "q8g32": dict(quantize_model=True, q_bits=8, q_group_size=32),
        "mixed": dict(quant_recipe="mixed_3_6", q_group_size=64),
        "mxfp4": dict(quantize_model=True, q_mode="mxfp4", q_bits=4),
    }.items():
        out = tmp_path / tag
        convert(str(src), out, **kwargs, **QUIET)
        peer, tok = mlx_lm.load(str(out))
        assert tok.encode("ab ab")[0] == 1  # BOS added, from our tokenizer.model
        ours = np.array(load_model(out)(tokens).astype(mx.float32))
        theirs = np.array(peer(tokens).astype(mx.float32))
        assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max(), tag


def test_quantized_config_block_and_tensors(tmp_path):
    config = small_config("tied")
    src = write_hf_folder(tmp_path / "src", config, random_weights(config), tokenizer=False)
    convert(str(src), tmp_path / "out", quant_recipe="mixed_3_6", q_group_size=32, **QUIET)
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    q = raw["quantization"]
    assert (q["bits"], q["group_size"], q["mode"]) == (3, 32, "affine")
    assert q["transformer.token_embeddings"]["bits"] == 6
    assert q["transformer.layers.0.attn.qkv_proj"]["bits"] == 6
    assert "transformer.layers.1.attn.out_proj" not in q  # uses the 3-bit default
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "numpy") as f:
        keys = set(f.keys())
    assert {"transformer.token_embeddings.scales", "transformer.token_embeddings.biases"} <= keys
    assert raw["num_query_heads"] == config.num_query_heads


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_every_affine_bit_width_and_group_size(tmp_path, bits, group_size):
    config = small_config("tied")  # model_dim 128: every group size divides every input dimension
    weights = random_weights(config)
    src = write_hf_folder(tmp_path / "src", config, weights, tokenizer=False)
    result = convert(str(src), tmp_path / "out", quantize_model=True, q_bits=bits, q_group_size=group_size, **QUIET)
    assert result.report.passed, str(result.report)
    assert result.quantization["bits"] == bits and result.quantization["group_size"] == group_size


def test_4bit_group64_keeps_top1(tmp_path):
    config = small_config("tied")
    weights = random_weights(config)
    src = write_hf_folder(tmp_path / "src", config, weights, tokenizer=False)
    convert(str(src), tmp_path / "out", quantize_model=True, q_bits=4, q_group_size=64, **QUIET)
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, (4, 64))
    got = logits_of(tmp_path / "out", tokens)
    ref = reference.forward(config, weights, tokens)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


@pytest.mark.slow
def test_quantized_3b_shape_does_not_collapse(tmp_path):
    # The first and last layers of the real 3B (model_dim 3072, head_dim 128, vocab 32000):
    # users of other ports saw 4-bit 3B emit only <unk>.
    full = OpenELMConfig.from_preset("3B")
    config = OpenELMConfig(
        num_transformer_layers=2,
        model_dim=3072,
        head_dim=128,
        num_query_heads=[full.num_query_heads[0], full.num_query_heads[-1]],
        num_kv_heads=[full.num_kv_heads[0], full.num_kv_heads[-1]],
        ffn_multipliers=[full.ffn_multipliers[0], full.ffn_multipliers[-1]],
    )
    weights = random_weights(config, seed=11)
    src = write_hf_folder(tmp_path / "src", config, weights, tokenizer=False)
    result = convert(str(src), tmp_path / "q4", quantize_model=True, q_bits=4, verify_tokens=24, **QUIET)
    assert result.report.passed, str(result.report)
    tokens = np.random.default_rng(3).integers(3, 32000, (1, 48))
    got = logits_of(tmp_path / "q4", tokens)
    assert np.isfinite(got).all()
    preds = got.argmax(-1)
    assert len(set(preds[0].tolist())) > 10 and not (preds == 0).all()  # no <unk>-only collapse
    ref = reference.forward(config, weights, tokens)
    assert (preds == ref.argmax(-1)).mean() >= 0.9


def test_auto_dtype_on_cpu_is_float32_and_says_so(tmp_path):
    config = small_config("tied")
    src = write_hf_folder(tmp_path / "src", config, random_weights(config), tokenizer=False)
    messages = []
    result = convert(str(src), tmp_path / "out", quantize_model=True, log=messages.append)
    assert result.dtype == "float32"
    assert any(m.startswith("dtype: float32 (MLX CPU backend") for m in messages)
    scales = mx.load(str(tmp_path / "out" / "model.safetensors"))["transformer.layers.0.ffn.proj_1.scales"]
    assert scales.dtype == mx.float32


def test_destination_is_never_touched_without_force(tmp_path):
    config = small_config("tied")
    src = write_hf_folder(tmp_path / "src", config, random_weights(config), tokenizer=False)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "mine.txt").write_text("keep me")
    out = cli("convert", "--hf-path", str(src), "--mlx-path", str(dst))
    assert out.returncode == 1 and "--force" in out.stderr and "Traceback" not in out.stderr
    assert (dst / "mine.txt").read_text() == "keep me"
    out = cli("convert", "--hf-path", str(src), "--mlx-path", str(dst), "--force")
    assert out.returncode == 1 and "did not write (mine.txt)" in out.stderr  # not an earlier conversion
    assert (dst / "mine.txt").read_text() == "keep me"
    # Nor twice (issue 23: a user's folder is never replaced).
    out = cli("convert", "--hf-path", str(src), "--mlx-path", str(dst), "--force", "--force")
    assert out.returncode == 1 and "did not write (mine.txt)" in out.stderr
    assert (dst / "mine.txt").read_text() == "keep me" and not (dst / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_parent_directories_are_created(tmp_path):
    config = small_config("tied")
    src = write_hf_folder(tmp_path / "src", config, random_weights(config), tokenizer=False)
    convert(str(src), tmp_path / "a" / "b" / "out", **QUIET)
    assert (tmp_path / "a" / "b" / "out" / "config.json").is_file()


def test_missing_tokenizer_still_writes_weights_and_says_what_to_do(tmp_path):
    config = small_config("tied")
    src = write_hf_folder(tmp_path / "src", config, random_weights(config), tokenizer=False)
    out = cli("convert", "--hf-path", str(src), "--mlx-path", str(tmp_path / "out"))
    assert out.returncode == 0
    assert "no tokenizer.model" in out.stderr and "--tokenizer" in out.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_tokenizer_option_file_folder_and_mismatch(tmp_path):
    from helpers import train_tokenizer

    config = small_config("tied")
    src = write_hf_folder(tmp_path / "src", config, random_weights(config), tokenizer=False)
    train_tokenizer(tmp_path / "tok.model", config.vocab_size)
    convert(str(src), tmp_path / "a", tokenizer=str(tmp_path / "tok.model"), **QUIET)
    assert (tmp_path / "a" / "tokenizer.model").read_bytes() == (tmp_path / "tok.model").read_bytes()
    (tmp_path / "tokdir").mkdir()
    (tmp_path / "tokdir" / "tokenizer.model").write_bytes((tmp_path / "tok.model").read_bytes())
    convert(str(src), tmp_path / "b", tokenizer=str(tmp_path / "tokdir"), **QUIET)
    train_tokenizer(tmp_path / "small.model", 400)
    with pytest.raises(OpenELMError, match="400 pieces but the model's vocabulary is 512"):
        convert(str(src), tmp_path / "c", tokenizer=str(tmp_path / "small.model"), **QUIET)
    assert not (tmp_path / "c").exists()


def test_verify_cli_prints_and_enforces(tmp_path):
    config = small_config("tied")
    weights = random_weights(config)
    src = write_hf_folder(tmp_path / "src", config, weights, tokenizer=False)
    convert(str(src), tmp_path / "out", run_verify=False, **QUIET)
    ok = cli("verify", "--source", str(src), "--model", str(tmp_path / "out"), "--tokens", "20")
    assert ok.returncode == 0, ok.stderr
    assert "top-1 agreement" in ok.stdout and "mean KL" in ok.stdout and "PASS" in ok.stdout
    # corrupt one converted tensor: verify must notice and fail
    path = str(tmp_path / "out" / "model.safetensors")
    w = mx.load(path)
    w["transformer.layers.2.ffn.proj_2.weight"] = w["transformer.layers.2.ffn.proj_2.weight"] * 1.1
    mx.save_safetensors(path, w)
    bad = cli("verify", "--source", str(src), "--model", str(tmp_path / "out"))
    assert bad.returncode == 1 and "FAIL" in bad.stdout


# --- the Hub path, against a pre-filled huggingface_hub cache (the Hub is unreachable here) ------
def fill_hub_cache(hf_home, repo_id, files_from):
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    for f in files_from.iterdir():
        shutil.copy(f, snap / f.name)


def test_hub_repo_id_from_cache_offline(tmp_path):
    config = small_config("tied")
    weights = random_weights(config)
    src = write_hf_folder(tmp_path / "src", config, weights, tokenizer=False)
    fill_hub_cache(tmp_path / "hf", "apple/OpenELM-Tiny-Instruct", src)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    out = cli("convert", "--hf-path", "apple/OpenELM-Tiny-Instruct", "--mlx-path", str(tmp_path / "out"), env=env)
    assert out.returncode == 0, out.stderr
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    assert raw["openelm_mlx"]["instruct"] is True
    assert_matches_reference(tmp_path / "out", config, weights)


def test_hub_unreachable_or_uncached_is_one_clear_line(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    out = cli("convert", "--hf-path", "apple/OpenELM-270M", "--mlx-path", str(tmp_path / "out"), env=env)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "cannot reach the Hugging Face Hub" in out.stderr and "apple/OpenELM-270M" in out.stderr
    # not offline, but the endpoint refuses connections
    env = {
        "HF_HOME": str(tmp_path / "hf"),
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HUB_ETAG_TIMEOUT": "2",
        "HF_HUB_DOWNLOAD_TIMEOUT": "2",
    }
    out = cli("convert", "--hf-path", "apple/OpenELM-270M", "--mlx-path", str(tmp_path / "out"), env=env)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "cannot reach the Hugging Face Hub" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
