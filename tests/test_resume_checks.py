"""``lora --resume-adapter-file`` checks the file against the run before anything is written or
trained (issue #23): after a crash, resuming with another rank, type, alpha, targets or layer
count is one line naming the setting, exit 1, and the new adapter folder is not created."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "examples" / "data" / "devil.txt.xz"
RUN = ["--data", str(TEXT), "--max-seq-length", "48", "--batch-size", "2", "--val-batches", "0"]
RUN += ["--steps-per-report", "1", "--num-layers", "2", "--rank", "4", "--alpha", "8"]


def lora(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "openelm_mlx.cli", "lora", *RUN, *argv], capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "a"
    done = lora("--iters", "2", "--save-every", "1", "--adapter-path", str(out))
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize(
    "change, expected",
    [
        (["--rank", "8"], "trained with rank 4 (adapter_config.json), this run has --rank 8"),
        (["--alpha", "16"], "trained with alpha 8.0 (adapter_config.json), this run has --alpha 16.0"),
        (["--num-layers", "3"], "trained with num_layers 2 (adapter_config.json), this run has --num-layers 3"),
        (["--fine-tune-type", "dora"], "trained with fine_tune_type 'lora'"),
        (["--targets", "qkv_proj"], "this run has --targets ['qkv_proj']"),
    ],
)
def test_resume_with_other_settings_is_refused_before_anything_is_written(tmp_path, trained, change, expected):
    new = tmp_path / "new"
    ckpt = trained / "0000001_adapters.safetensors"
    out = lora("--iters", "3", "--adapter-path", str(new), "--resume-adapter-file", str(ckpt), *change)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    errors = [ln for ln in out.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and f"--resume-adapter-file {ckpt}" in errors[0] and expected in errors[0], out.stderr
    assert "iter 1" not in out.stderr and not new.exists()


def test_a_resume_file_without_its_config_is_checked_by_its_tensors(tmp_path, trained):
    alone = tmp_path / "moved"
    alone.mkdir()
    shutil.copyfile(trained / "adapters.safetensors", alone / "adapters.safetensors")
    out = lora("--iters", "3", "--adapter-path", str(tmp_path / "new"), "--resume-adapter-file",
               str(alone / "adapters.safetensors"), "--rank", "8")  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "lora_a has shape [256, 4], this run's adapters have [256, 8] (another --rank?)" in out.stderr, out.stderr
    assert not (tmp_path / "new").exists()


def test_resume_with_the_same_settings_goes_on(tmp_path, trained):
    new = tmp_path / "new"
    out = lora("--iters", "2", "--adapter-path", str(new), "--resume-adapter-file",
               str(trained / "0000001_adapters.safetensors"))  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "iter 2/2" in out.stderr and "iter 1/2" not in out.stderr and (new / "adapters.safetensors").is_file()
