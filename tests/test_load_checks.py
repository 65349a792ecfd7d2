"""Load-time checks of converted directories, and generation under bad input."""

import json
import subprocess
import sys

import mlx.core as mx
import pytest
from helpers import random_weights, small_config, write_hf_folder
from openelm_mlx.convert.pipeline import convert

from openelm_mlx.errors import CheckpointError, OpenELMError
from openelm_mlx.loading import load, load_model

QUIET = dict(log=lambda s: None)


@pytest.fixture
def converted(tmp_path):
    config = small_config("tied")
    src = write_hf_folder(tmp_path / "src", config, random_weights(config))
    convert(str(src), tmp_path / "f32", **QUIET)
    convert(str(src), tmp_path / "q4", quantize_model=True, **QUIET)
    return tmp_path


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_is_named_at_load(converted, bad):
    path = str(converted / "f32" / "model.safetensors")
    w = mx.load(path)
    name = "transformer.layers.2.attn.out_proj.weight"
    w[name] = mx.where(mx.arange(w[name].size).reshape(w[name].shape) == 7, bad, w[name])
    mx.save_safetensors(path, w)
    with pytest.raises(CheckpointError, match=f"tensor {name} contains NaN or Inf"):
        load_model(converted / "f32")


def test_config_claiming_more_layers_than_the_weights(converted):
    cfg = json.loads((converted / "f32" / "config.json").read_text())
    for key in ("num_query_heads", "num_kv_heads", "ffn_multipliers"):
        cfg[key].append(cfg[key][-1])
    cfg["num_transformer_layers"] += 1
    (converted / "f32" / "config.json").write_text(json.dumps(cfg))
    # Checked from the headers before a model of that config is built (issue 23).
    with pytest.raises(CheckpointError, match="config.json: num_transformer_layers=5 but the weights hold 4 layers"):
        load_model(converted / "f32")


def test_config_with_other_shapes_than_the_weights(converted):
    cfg = json.loads((converted / "f32" / "config.json").read_text())
    cfg["ffn_multipliers"][0] = 4.0  # FFN width 512 instead of 256
    (converted / "f32" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="transformer.layers.0.ffn.proj_1.weight has shape"):
        load_model(converted / "f32")


def test_quantization_block_disagreeing_with_the_tensors(converted):
    cfg = json.loads((converted / "q4" / "config.json").read_text())
    cfg["quantization"]["bits"] = 8
    (converted / "q4" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quantization block .* disagrees with the tensors"):
        load_model(converted / "q4")
    cfg["quantization"] = {"group_size": 64, "bits": 4, "mode": "bogus"}
    (converted / "q4" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(OpenELMError, match="quantization"):
        load_model(converted / "q4")


def test_unquantized_weights_under_a_quantization_block(converted):
    cfg = json.loads((converted / "f32" / "config.json").read_text())
    cfg["quantization"] = {"group_size": 64, "bits": 4, "mode": "affine", "transformer.layers.0.ffn.proj_1": True}
    (converted / "f32" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="transformer.layers.0.ffn.proj_1"):
        load_model(converted / "f32")


def run_generate(model_dir, *args, input=None):
    return subprocess.run(
        [sys.executable, "-m", "openelm_mlx.cli", "generate", "--model", str(model_dir), *args],
        capture_output=True,
        input=input,
    )


def test_generation_under_bad_input(converted):
    model = converted / "f32"
    long = run_generate(model, "--prompt", "-", "--max-tokens", "4", input=("word " * 20_000).encode())
    assert long.returncode == 1 and b"Traceback" not in long.stderr and b"context of 2048 tokens" in long.stderr
    ctrl = run_generate(model, "--prompt", "-", "--max-tokens", "5", input=b"a\x00b\x07c\x1b[31m\r\n\tz")
    assert ctrl.returncode == 0, ctrl.stderr
    binary = run_generate(model, "--prompt", "-", input=b"ok \xc3\x28 bad")
    assert binary.returncode == 1 and b"not valid UTF-8" in binary.stderr and b"Traceback" not in binary.stderr
    (model / "tokenizer.model").write_bytes(b"")
    empty = run_generate(model, "--prompt", "hi")
    assert empty.returncode == 1 and b"tokenizer file is empty" in empty.stderr
    (model / "tokenizer.model").write_bytes(b"\x00garbage" * 10)
    garbage = run_generate(model, "--prompt", "hi")
    assert garbage.returncode == 1 and b"not a SentencePiece model" in garbage.stderr
    assert b"Traceback" not in empty.stderr + garbage.stderr


def test_model_directory_without_tokenizer(converted):
    (converted / "f32" / "tokenizer.model").unlink()
    with pytest.raises(OpenELMError, match="no tokenizer.model"):
        load(converted / "f32")
