"""load() on a source that needs converting: the cache follows the source (issue 11, point 3)."""

import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from helpers import random_weights, rel_err, small_config, write_hf_folder

from openelm_mlx import reference
from openelm_mlx.loading import load


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("OPENELM_MLX_CACHE", str(root))
    return root


def cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "openelm_mlx.cli", *args], capture_output=True, text=True, env={**os.environ, **env}
    )


def logits(model, tokens):
    return np.array(model(mx.array(tokens)).astype(mx.float32))


def test_changed_source_converts_again(tmp_path, cache, capfd):
    config = small_config("tied")
    weights = random_weights(config)
    src = write_hf_folder(tmp_path / "src", config, weights, fmt="bin")
    tokens = np.random.default_rng(0).integers(3, config.vocab_size, (1, 9))
    model, _ = load(src)
    assert "converting" in capfd.readouterr().err
    assert np.abs(logits(model, tokens)).max() > 1
    assert rel_err(logits(model, tokens), reference.forward(config, weights, tokens)) < 1e-4
    entry = next(cache.iterdir())
    inode = (entry / "model.safetensors").stat().st_ino
    load(src)  # unchanged: reused, no second conversion
    assert "converting" not in capfd.readouterr().err
    assert (entry / "model.safetensors").stat().st_ino == inode

    changed = {
        **weights,
        "transformer.token_embeddings.weight": np.zeros_like(weights["transformer.token_embeddings.weight"]),
    }
    write_hf_folder(src, config, changed, fmt="bin", tokenizer=False)  # same names, same sizes
    model, _ = load(src)
    assert "changed since it was converted" in capfd.readouterr().err
    assert np.abs(logits(model, tokens)).max() == 0  # zeroed embeddings: zero logits, not the old model's
    assert [p.name for p in cache.iterdir()] == [entry.name]  # replaced in place, nothing piles up


def test_cache_list_and_clear(tmp_path, cache):
    config = small_config("tied")
    weights = random_weights(config)
    src = write_hf_folder(tmp_path / "src", config, weights, fmt="bin")
    env = {"OPENELM_MLX_CACHE": str(cache)}
    empty = cli("cache", "--list", env=env)
    assert empty.returncode == 0 and "no cached conversions" in empty.stdout
    load(src)
    listed = cli("cache", "--list", env=env)
    assert listed.returncode == 0 and "current" in listed.stdout and str(src) in listed.stdout
    write_hf_folder(src, config, random_weights(config, seed=1), fmt="bin", tokenizer=False)
    assert "stale (source changed)" in cli("cache", env=env).stdout  # --list is the default
    mine = cache / "not-ours"
    mine.mkdir()
    (mine / "keep.txt").write_text("the cache folder holds something of the user's")
    cleared = cli("cache", "--clear", env=env)
    assert cleared.returncode == 0 and "removed 1 cached conversion" in cleared.stdout
    assert [p.name for p in cache.iterdir()] == ["not-ours"] and (mine / "keep.txt").is_file()


def test_entries_are_keyed_on_dtype_and_backend(tmp_path, cache, capfd):
    from openelm_mlx.conversion_cache import backend, convert_into_cache

    config = small_config("tied")
    src = write_hf_folder(tmp_path / "src", config, random_weights(config), fmt="bin")
    f32 = convert_into_cache(str(src), "float32")
    bf16 = convert_into_cache(str(src), "bfloat16")
    assert f32 != bf16 and "float32" in f32.name and "bfloat16" in bf16.name and backend() in f32.name
    capfd.readouterr()
    assert convert_into_cache(str(src), "float32") == f32  # reused, not converted again
    assert "converting" not in capfd.readouterr().err
    weights = {k: v for k, v in mx.load(str(bf16 / "model.safetensors")).items()}
    assert all(v.dtype == mx.bfloat16 for v in weights.values())
    # "auto" is the backend's dtype: float32 on the CPU, so the float32 entry.
    assert convert_into_cache(str(src)) == (f32 if backend() == "cpu" else bf16)
