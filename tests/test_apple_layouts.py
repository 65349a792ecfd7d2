"""Apple's untied layouts convert as Apple's code runs them (issue 11, point 2).

Apple's ``OpenELMModel`` builds ``transformer.classifier`` whenever ``share_input_output_layers``
is false and never uses it; its config never sets ``tie_word_embeddings``, whose Hugging Face
default (true) ties ``lm_head`` to the embedding, so ``save_pretrained`` writes no
``lm_head.weight``. Only with both false is the head untied. CoreNet's ``classifier.weight`` is
its untied head.
"""

import json
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from helpers import corenet_config, random_weights, rel_err, small_config, write_apple_untied, write_corenet_checkpoint
from openelm_mlx.convert.pipeline import convert

from openelm_mlx import reference
from openelm_mlx.loading import load_model


def logits_match_reference(model_dir, config, weights, tol=1e-4):
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, (1, 11))
    got = np.array(load_model(model_dir)(mx.array(tokens)).astype(mx.float32))
    return rel_err(got, reference.forward(config, weights, tokens)) < tol


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("tie", [None, True])
def test_share_false_alone_is_tied_and_the_classifier_is_dropped(tmp_path, fmt, tie):
    config = small_config("tied")  # as it runs: the head is the embedding
    weights = random_weights(config)
    src = write_apple_untied(tmp_path / "src", config, weights, tie_word_embeddings=tie, fmt=fmt)
    messages = []
    result = convert(str(src), tmp_path / "out", log=messages.append)
    assert result.report.passed, str(result.report)
    assert any("dropped transformer.classifier.weight" in m for m in messages)
    assert any(m.startswith("head: tied to the embedding") for m in messages)
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    assert raw["share_input_output_layers"] is True  # so mlx_lm ties it too
    stored = mx.load(str(tmp_path / "out" / "model.safetensors"))
    assert "lm_head.weight" not in stored and not any("classifier" in k for k in stored)
    assert logits_match_reference(tmp_path / "out", config, weights)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_both_false_is_untied_with_lm_head(tmp_path, fmt):
    config = small_config("untied")
    weights = random_weights(config)
    src = write_apple_untied(tmp_path / "src", config, weights, tie_word_embeddings=False, fmt=fmt)
    result = convert(str(src), tmp_path / "out", log=lambda s: None)
    assert result.report.passed, str(result.report)
    stored = mx.load(str(tmp_path / "out" / "model.safetensors"))
    assert np.array_equal(np.array(stored["lm_head.weight"]), weights["lm_head.weight"])
    assert not any("classifier" in k for k in stored)
    assert logits_match_reference(tmp_path / "out", config, weights)
    # and the head really is lm_head, not the classifier nor the embedding
    tied = {**weights, "lm_head.weight": weights["transformer.token_embeddings.weight"]}
    assert not logits_match_reference(tmp_path / "out", config, tied, tol=1e-2)
    # the output says tie_word_embeddings false, so converting it again keeps the head untied
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    convert(str(tmp_path / "out"), tmp_path / "again", log=lambda s: None)
    assert logits_match_reference(tmp_path / "again", config, weights)


def test_quantized_apple_tied_layout(tmp_path):
    config = small_config("tied")
    src = write_apple_untied(tmp_path / "src", config, random_weights(config))
    result = convert(str(src), tmp_path / "out", quantize_model=True, q_bits=4, log=lambda s: None)
    assert result.report.passed, str(result.report)
    assert "lm_head" not in result.quantization


def test_corenet_classifier_stays_the_untied_head(tmp_path):
    # An HF-style config.json beside a CoreNet file says share_input_output_layers false and no
    # tie_word_embeddings; CoreNet has no tying: classifier.weight is the head.
    config = corenet_config(share_input_output_layers=False)
    weights = random_weights(config)
    ckpt = write_corenet_checkpoint(tmp_path / "checkpoint_best.pt", weights)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    result = convert(str(ckpt), tmp_path / "out", log=lambda s: None)
    assert result.report.passed, str(result.report)
    assert logits_match_reference(tmp_path / "out", config, weights)
    assert not logits_match_reference(tmp_path / "out", replace(config, share_input_output_layers=True), weights)


def test_bad_tie_word_embeddings_is_named(tmp_path):
    config = small_config("tied")
    src = write_apple_untied(tmp_path / "src", config, random_weights(config))
    raw = json.loads((src / "config.json").read_text())
    raw["tie_word_embeddings"] = "yes"
    (src / "config.json").write_text(json.dumps(raw))
    from openelm_mlx.errors import ConfigError

    with pytest.raises(ConfigError, match="config.json: tie_word_embeddings='yes'"):
        convert(str(src), tmp_path / "out", log=lambda s: None)
