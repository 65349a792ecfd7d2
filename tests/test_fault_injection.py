"""Faults during convert: SIGKILL at random points, a full disk, a source that vanishes mid-read.

After each: no partial destination, an earlier destination intact byte for byte (or the new one
complete), and leftovers cleaned or restored by the next run.
"""

import hashlib
import os
import random
import resource
import signal
import subprocess
import sys
import time

import pytest
from helpers import random_weights, write_hf_folder
from openelm_mlx.convert import writer
from openelm_mlx.convert.pipeline import convert

from openelm_mlx import OpenELMConfig
from openelm_mlx.errors import OpenELMError
from openelm_mlx.loading import load_model

QUIET = dict(log=lambda s: None)
KILL_TRIALS = int(os.environ.get("OPENELM_KILL_TRIALS", "24"))


def tree_digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(p.name.encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    # big enough that conversion takes a noticeable while after start-up
    config = OpenELMConfig.scaled(num_transformer_layers=6, model_dim=256, head_dim=32, vocab_size=4096)
    return write_hf_folder(root / "src", config, random_weights(config), shards=2, tokenizer=False)


def convert_cmd(src, dst, *extra):
    return [sys.executable, "-m", "openelm_mlx.cli", "convert", "--hf-path", str(src), "--mlx-path", str(dst), *extra]


def test_sigkill_at_random_points_never_leaves_a_broken_destination(tmp_path, source):
    dst = tmp_path / "model"
    convert(str(source), dst, quantize_model=True, q_bits=8, **QUIET)  # the user's earlier model
    earlier = tree_digest(dst)
    t0 = time.perf_counter()
    subprocess.run(convert_cmd(source, tmp_path / "timing", "-q"), check=True, capture_output=True)
    full = time.perf_counter() - t0
    rng = random.Random(0)
    outcomes = {"earlier kept": 0, "new complete": 0, "restored": 0}
    for trial in range(KILL_TRIALS):
        proc = subprocess.Popen(
            convert_cmd(source, dst, "-q", "--force"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(rng.uniform(0.05, full * 1.1))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        messages = writer.clean_stale(dst)  # what the next run does first
        leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
        assert leftovers == [], (trial, leftovers)
        assert dst.is_dir(), f"trial {trial}: the destination vanished"
        if tree_digest(dst) == earlier:
            outcomes["restored" if any("restored" in m for m in messages) else "earlier kept"] += 1
        else:  # the kill came after the final rename: the new model must be complete and loadable
            load_model(dst)
            outcomes["new complete"] += 1
            convert(str(source), dst, quantize_model=True, q_bits=8, force=True, **QUIET)
            assert tree_digest(dst) == earlier  # conversion is deterministic
    print(f"{KILL_TRIALS} kills: {outcomes}")
    assert sum(outcomes.values()) == KILL_TRIALS


def test_kill_without_an_earlier_destination_leaves_nothing(tmp_path, source):
    rng = random.Random(1)
    for _ in range(4):
        dst = tmp_path / "fresh"
        proc = subprocess.Popen(convert_cmd(source, dst), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        writer.clean_stale(dst)
        if dst.exists():
            load_model(dst)  # finished before the kill: complete
            import shutil

            shutil.rmtree(dst)
        assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_interrupted_swap_is_restored_by_the_next_run(tmp_path, source):
    # A --force run killed between moving the old destination aside and renaming the new one in.
    dst = tmp_path / "model"
    convert(str(source), dst, **QUIET)
    earlier = tree_digest(dst)
    dead_pid = 2**22 + 12345  # above Linux's largest pid_max: no live process has it
    os.rename(dst, tmp_path / f".model.old-{dead_pid}")
    partial = tmp_path / f".model.partial-{dead_pid}"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half a file")
    messages = []
    with pytest.raises(OpenELMError, match="already exists"):  # restored first, so not overwritten
        convert(str(source), dst, log=messages.append)
    assert any(m.startswith("restored") for m in messages) and any(m.startswith("removed") for m in messages)
    assert tree_digest(dst) == earlier
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_full_disk_is_a_clear_error_and_leaves_nothing(tmp_path, source):
    dst = tmp_path / "model"
    out = subprocess.run(convert_cmd(source, dst), capture_output=True, text=True, preexec_fn=_limit_file_size)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr and "disk full" in out.stderr
    assert not dst.exists() and [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_full_disk_keeps_the_earlier_destination(tmp_path, source):
    dst = tmp_path / "model"
    convert(str(source), dst, quantize_model=True, q_bits=4, **QUIET)
    earlier = tree_digest(dst)
    out = subprocess.run(
        convert_cmd(source, dst, "--force"), capture_output=True, text=True, preexec_fn=_limit_file_size
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert tree_digest(dst) == earlier


@pytest.mark.parametrize("how", ["deleted", "truncated"])
def test_source_disappearing_mid_read(tmp_path, source, monkeypatch, how):
    import shutil

    from openelm_mlx.convert.tensors import LazyTensor

    src = tmp_path / "src"
    shutil.copytree(source, src)
    real_read = LazyTensor.read
    calls = {"n": 0}

    def flaky_read(self):
        calls["n"] += 1
        if calls["n"] == 5:
            for f in src.glob("*.safetensors"):
                if how == "deleted":
                    f.unlink()
                else:
                    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
        return real_read(self)

    monkeypatch.setattr(LazyTensor, "read", flaky_read)
    with pytest.raises(OpenELMError, match="safetensors") as err:
        convert(str(src), tmp_path / "out", **QUIET)
    assert "cannot read tensor" in str(err.value) or "truncated" in str(err.value)
    assert not (tmp_path / "out").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []
