"""The bundled OpenELM-tiny-KJV: it converts, quantizes, verifies, generates English, and its
perplexity matches the figures recorded by examples/eval_tiny.py."""

import json
import lzma
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from openelm_mlx.convert.pipeline import convert

from openelm_mlx.generate import generate
from openelm_mlx.loading import load
from openelm_mlx.perplexity import perplexity

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "openelm_mlx" / "bundled" / "openelm-tiny-kjv"
VALID = ROOT / "openelm_mlx" / "bundled" / "kjv-valid.txt"
RECORDED = json.loads((ROOT / "examples" / "data" / "tiny-kjv-perplexity.json").read_text())
QUIET = dict(log=lambda s: None)


def test_bundled_checkpoint_is_in_hf_layout_and_small():
    names = sorted(p.name for p in BUNDLED.iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer.model"]
    assert sum(p.stat().st_size for p in BUNDLED.iterdir()) <= 20 * 2**20
    cfg = json.loads((BUNDLED / "config.json").read_text())
    assert cfg["model_type"] == "openelm" and len(set(cfg["num_query_heads"])) > 1  # layer-wise scaled


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundled")
    out = {}
    for name, options in {"float32": {}, "4-bit": {"quantize_model": True, "q_bits": 4}}.items():
        result = convert(str(BUNDLED), root / name, **options, **QUIET)
        assert result.report.passed, str(result.report)  # verified against the float64 reference
        out[name] = root / name
    return out


def test_float32_perplexity_matches_the_recorded_figure(converted):
    model, tok = load(converted["float32"])
    ppl = perplexity(model, tok.encode(VALID.read_text()), progress=False)
    recorded = RECORDED["perplexity"]["float32"]
    assert abs(ppl - recorded) / recorded < 0.02, (ppl, recorded)
    assert ppl < RECORDED["perplexity"]["unigram baseline"] / 3  # it learned far more than word frequencies


def test_4bit_perplexity_stays_within_the_recorded_margin(converted):
    model, tok = load(converted["4-bit"])
    ppl = perplexity(model, tok.encode(VALID.read_text()), progress=False)
    assert abs(ppl - RECORDED["perplexity"]["4-bit"]) / RECORDED["perplexity"]["4-bit"] < 0.02
    assert ppl <= RECORDED["perplexity"]["float32"] * (1 + RECORDED["q4_margin"])


def test_generates_recognisable_english(converted):
    model, tok = load(converted["4-bit"])
    text = generate(model, tok, "And God said unto Moses,", max_tokens=80, repetition_penalty=1.2)
    corpus = lzma.decompress((ROOT / "examples" / "data" / "kjv.txt.xz").read_bytes()).decode()
    vocabulary = set(re.findall(r"[A-Za-z]+", corpus))
    words = re.findall(r"[A-Za-z]+", text)
    assert len(words) >= 30, text
    known = sum(w in vocabulary for w in words) / len(words)
    assert known >= 0.9, (known, text)
    assert len(set(words)) >= 12, text  # not one word repeated


def test_generate_without_model_uses_the_bundled_one():
    out = subprocess.run(
        [sys.executable, "-m", "openelm_mlx.cli", "generate", "--prompt", "In the beginning", "--max-tokens", "20"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr
    assert "using the bundled OpenELM-tiny-KJV" in out.stderr
    assert len(re.findall(r"[A-Za-z]+", out.stdout)) >= 8


def test_eval_cli_reports_perplexity(converted, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(VALID.read_text()[:3000])
    out = subprocess.run(
        [sys.executable, "-m", "openelm_mlx.cli", "eval", "--model", str(converted["float32"]), "--text", str(text)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    value = float(re.search(r"perplexity: ([0-9.]+) over", out.stdout).group(1))
    model, tok = load(converted["float32"])
    assert abs(value - perplexity(model, tok.encode(text.read_text()), progress=False)) < 1e-2
