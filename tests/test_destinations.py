"""No user folder is ever deleted (issue #23): ``convert``, ``fuse``, ``lora`` and ``cache
--clear`` replace only folders openelm-mlx wrote (its ``.openelm-mlx-output`` marker and nothing
else of the user's) or empty ones; anything else is one line naming the folder and what is in
it, exit 1, nothing touched.  The real CLI in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from helpers import random_weights, small_config, write_hf_folder

from openelm_mlx.destinations import MARKER
from openelm_mlx.loading import load_model
from openelm_mlx.tuner import lora
from openelm_mlx.tuner.cli import write_adapter_config

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "openelm_mlx" / "bundled" / "openelm-tiny-kjv"
TEXT = ROOT / "examples" / "data" / "devil.txt.xz"


def cli(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "openelm_mlx.cli", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_refusal(out: subprocess.CompletedProcess, folder: Path, *shown: str) -> None:
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if "not replaced" in line]
    assert len(lines) == 1, out.stderr
    assert str(folder) in lines[0], lines[0]
    for name in shown:
        assert name in lines[0], lines[0]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    config = small_config("tied")
    return write_hf_folder(tmp_path_factory.mktemp("dest") / "src", config, random_weights(config))


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A small LoRA adapter of the bundled model, written as ``lora`` writes one."""
    folder = tmp_path_factory.mktemp("adapter") / "adapters"
    folder.mkdir()
    model = load_model(BUNDLED)
    mx.random.seed(0)
    lora.apply_adapters(model, "lora", rank=2, alpha=4.0, dropout=0.0, targets=["qkv_proj"])
    mx.save_safetensors(str(folder / "adapters.safetensors"), lora.trainable_weights(model))
    opts = {"fine_tune_type": "lora", "rank": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["qkv_proj"]}
    write_adapter_config(folder, {**opts, "num_layers": -1}, BUNDLED)
    return folder


def fake_home(root: Path) -> Path:
    home = root / "home"
    (home / "src" / "project").mkdir(parents=True)
    (home / ".bashrc").write_text("export PATH\n")
    (home / "notes.txt").write_text("mine")
    (home / "src" / "project" / "main.c").write_text("int main(void) { return 0; }\n")
    return home


def test_fuse_force_into_home_is_refused(tmp_path, adapter):
    home = fake_home(tmp_path)
    before = snapshot(home)
    for mlx_path in ("~", str(home)):
        out = cli("fuse", "--model", str(BUNDLED), "--adapter-path", str(adapter), "--mlx-path", mlx_path, "--force",
                  env={"HOME": str(home)})  # fmt: skip
        one_line_refusal(out, home, ".bashrc", "notes.txt", "src")
    assert snapshot(home) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]  # no staging folder left beside it


def test_fuse_never_replaces_its_base_or_adapter(tmp_path, adapter):
    before = snapshot(adapter)
    out = cli("fuse", "--model", str(BUNDLED), "--adapter-path", str(adapter), "--mlx-path", str(adapter), "--force")
    assert out.returncode == 1 and "is the source" in out.stderr and "Traceback" not in out.stderr
    assert snapshot(adapter) == before


def test_fuse_replaces_its_own_output_and_an_empty_folder(tmp_path, adapter):
    dst = tmp_path / "fused"
    dst.mkdir()  # empty: fine without anything to lose
    args = ("fuse", "--model", str(BUNDLED), "--adapter-path", str(adapter), "--mlx-path", str(dst), "--force")
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    marker = json.loads((dst / MARKER).read_text())
    assert marker["written_by"].startswith("openelm-mlx")
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    (dst / "my-eval.txt").write_text("the user's")
    refused = cli(*args)
    one_line_refusal(refused, dst, "my-eval.txt")
    assert (dst / "my-eval.txt").read_text() == "the user's" and (dst / "model.safetensors").is_file()


def test_convert_force_never_replaces_a_folder_it_did_not_write(tmp_path, source):
    checkout = tmp_path / "checkout"
    (checkout / ".git").mkdir(parents=True)
    (checkout / "setup.py").write_text("")
    before = snapshot(checkout)
    for forces in (1, 2):  # --force --force no longer means "anything"
        out = cli("convert", "--hf-path", str(source), "--mlx-path", str(checkout), *["--force"] * forces)
        one_line_refusal(out, checkout, ".git", "setup.py")
    assert snapshot(checkout) == before
    # A folder holding only names a conversion writes, but no marker: not ours either.
    lookalike = tmp_path / "lookalike"
    lookalike.mkdir()
    (lookalike / "config.json").write_text('{"model_type": "llama"}')
    one_line_refusal(cli("convert", "--hf-path", str(source), "--mlx-path", str(lookalike), "--force"),
                     lookalike, "no .openelm-mlx-output marker", "config.json")  # fmt: skip
    # A file where the folder would go.
    afile = tmp_path / "model"
    afile.write_text("a file of the user's")
    one_line_refusal(cli("convert", "--hf-path", str(source), "--mlx-path", str(afile), "--force"), afile, "a file")
    assert afile.read_text() == "a file of the user's"


def test_convert_replaces_its_own_output_and_an_empty_folder(tmp_path, source):
    dst = tmp_path / "out"
    dst.mkdir()
    assert cli("convert", "--hf-path", str(source), "--mlx-path", str(dst), "--force").returncode == 0
    assert (dst / MARKER).is_file()
    again = cli("convert", "--hf-path", str(source), "--mlx-path", str(dst), "--force", "-q")
    assert again.returncode == 0, again.stderr
    assert "quantization" in (dst / "config.json").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the previous one swapped out and removed


def test_lora_refuses_an_adapter_folder_it_did_not_write(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"from": "another tool"}')
    (folder / "thesis.tex").write_text("\\documentclass{article}")
    before = snapshot(folder)
    out = cli("lora", "--model", str(BUNDLED), "--data", str(TEXT), "--iters", "1", "--adapter-path", str(folder),
              "--force")  # fmt: skip
    one_line_refusal(out, folder, "thesis.tex")
    assert snapshot(folder) == before


def test_cache_clear_keeps_an_entry_holding_the_users_files(tmp_path):
    root = tmp_path / "cache"
    ours, touched = root / "a-12345678", root / "b-12345678"
    for d in (ours, touched):
        d.mkdir(parents=True)
        marker = {"source": "x", "path": str(tmp_path), "fingerprint": ""}
        (d / "openelm-mlx-source.json").write_text(json.dumps(marker))
        (d / "config.json").write_text("{}")
    (touched / "results.csv").write_text("the user's")
    (root / "unrelated").mkdir()
    (root / "unrelated" / "keep.txt").write_text("not a cache entry")
    out = cli("cache", "--clear", env={"OPENELM_MLX_CACHE": str(root)})
    assert out.returncode == 0, out.stderr
    assert "removed 1 cached conversion" in out.stdout
    assert f"kept {touched}" in out.stderr and "results.csv" in out.stderr
    assert not ours.exists() and (touched / "results.csv").is_file() and (root / "unrelated" / "keep.txt").is_file()
