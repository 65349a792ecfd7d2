import json
import subprocess
import sys

import pytest

from openelm_mlx import OpenELMConfig
from openelm_mlx.config import PRESETS, layerwise_scaling, make_divisible
from openelm_mlx.errors import ConfigError

EXPECTED_PARAMETERS = {"270M": 271_527_168, "450M": 457_179_136, "1_1B": 1_079_891_456, "3B": 3_036_647_424}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_parameter_counts(preset):
    config = OpenELMConfig.from_preset(preset)
    assert config.num_parameters() == EXPECTED_PARAMETERS[preset]
    # the checklist of tensor shapes adds up to the same count
    total = 0
    for shape in config.weight_shapes().values():
        n = 1
        for s in shape:
            n *= s
        total += n
    assert total == EXPECTED_PARAMETERS[preset]


def test_270m_per_layer_lists():
    c = OpenELMConfig.from_preset("OpenELM-270M")
    assert c.num_query_heads == [12] * 5 + [16] * 7 + [20] * 4
    assert c.num_kv_heads == [h // 4 for h in c.num_query_heads]
    assert c.ffn_dims == [
        768,
        1024,
        1280,
        1536,
        1792,
        2048,
        2560,
        2816,
        3072,
        3328,
        3584,
        3840,
        4352,
        4608,
        4864,
        5120,
    ]


def test_make_divisible_never_loses_more_than_ten_percent():
    assert make_divisible(100, 64) == 128
    assert make_divisible(1280 * 0.53, 256) == 768
    for v in range(1, 3000, 7):
        assert make_divisible(v, 64) >= 0.9 * v and make_divisible(v, 64) % 64 == 0


@pytest.mark.parametrize("name", ["270M", "OpenELM-270M", "apple/OpenELM-270M-Instruct", "openelm-270m", "1.1B"])
def test_preset_names(name):
    OpenELMConfig.from_preset(name)


def test_hf_config_short_and_expanded_forms_agree(tmp_path):
    full = OpenELMConfig.from_preset("450M")
    short = {k: v for k, v in full.to_dict().items() if k not in ("num_query_heads", "num_kv_heads")}
    short["ffn_multipliers"] = [0.5, 4.0]
    assert OpenELMConfig.from_dict(short) == full
    path = tmp_path / "config.json"
    path.write_text(json.dumps(full.to_dict()))
    assert OpenELMConfig.from_json(path) == full


def test_custom_shape_uses_the_same_scaling():
    c = OpenELMConfig.scaled(num_transformer_layers=6, model_dim=256, head_dim=32)
    q, kv, ffn = layerwise_scaling(6, 256, 32)
    assert (c.num_query_heads, c.num_kv_heads, c.ffn_multipliers) == (q, kv, ffn)
    assert c.num_query_heads[0] < c.num_query_heads[-1]


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(num_query_heads=[4, 4], num_kv_heads=[1, 1, 1], ffn_multipliers=[1, 1, 1]), "num_query_heads"),
        (dict(num_query_heads=[4, 6, 4], num_kv_heads=[1, 4, 1], ffn_multipliers=[1, 1, 1]), "not divisible"),
        (
            dict(num_query_heads=[4, 4, 4], num_kv_heads=[1, 1, 1], ffn_multipliers=[1, 1, 1], model_dim=0),
            "model_dim=0",
        ),
        (
            dict(num_query_heads=[4, 4, 4], num_kv_heads=[1, 1, 1], ffn_multipliers=[1, -1, 1]),
            "ffn_multipliers",
        ),
        (dict(num_query_heads=[4, 0, 4], num_kv_heads=[1, 0, 1], ffn_multipliers=[1, 1, 1]), "positive"),
    ],
)
def test_validation_names_field_and_value(kwargs, words):
    base = dict(num_transformer_layers=3, model_dim=64, head_dim=16)
    with pytest.raises(ConfigError, match=words):
        OpenELMConfig(**{**base, **kwargs})


def test_unknown_preset_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="preset='7B': unknown preset"):
        OpenELMConfig.from_preset("7B")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        OpenELMConfig.from_json(bad)
    bad.write_text(json.dumps({"model_type": "llama", "num_transformer_layers": 2}))
    with pytest.raises(ConfigError, match="model_type='llama'"):
        OpenELMConfig.from_json(bad)


def test_info_cli_3b():
    out = subprocess.run(
        [sys.executable, "-m", "openelm_mlx.cli", "info", "--preset", "3B"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "total parameters: 3,036,647,424" in out.stdout
    lines = [ln.split() for ln in out.stdout.splitlines() if ln.strip() and ln.split()[0].isdigit()]
    assert len(lines) == 36
    assert lines[0][1:4] == ["12", "3", "1536"] and lines[-1][1:4] == ["24", "6", "12288"]
    assert "KV cache per token" in out.stdout


def test_info_cli_unknown_preset_is_one_line_error():
    out = subprocess.run(
        [sys.executable, "-m", "openelm_mlx.cli", "info", "--preset", "9B"], capture_output=True, text=True
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and "unknown preset" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
