"""Broken and hostile checkpoints: a one-line error naming file and tensor, exit 1, nothing written."""

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from helpers import random_weights, require_torch, small_config, write_hf_folder


def convert_cli(src, dst, *extra):
    out = subprocess.run(
        [sys.executable, "-m", "openelm_mlx.cli", "convert", "--hf-path", str(src), "--mlx-path", str(dst), *extra],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    errors = [ln for ln in out.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and out.stderr.strip().splitlines()[-1] == errors[0], out.stderr
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}")]  # no leftovers
    return out.stderr


@pytest.fixture
def hf_src(tmp_path):
    config = small_config("tied")
    return write_hf_folder(tmp_path / "src", config, random_weights(config), tokenizer=False)


class Evil:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path):
    torch = require_torch()
    sentinel = tmp_path / "pwned"
    config = small_config("tied")
    sd = {k: torch.from_numpy(v) for k, v in random_weights(config).items()}
    sd["transformer.norm.weight"] = Evil(sentinel)
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config.to_dict()))
    torch.save(sd, src / "pytorch_model.bin")
    err = convert_cli(src, tmp_path / "out")
    assert "refused" in err and "'posix.system'" in err and "pytorch_model.bin" in err
    assert not sentinel.exists()


def test_truncated_torch_zip(tmp_path, hf_src):
    torch = require_torch()
    src = tmp_path / "bin"
    src.mkdir()
    (src / "config.json").write_text((hf_src / "config.json").read_text())
    config = small_config("tied")
    torch.save({k: torch.from_numpy(v) for k, v in random_weights(config).items()}, src / "pytorch_model.bin")
    data = (src / "pytorch_model.bin").read_bytes()
    (src / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    err = convert_cli(src, tmp_path / "out")
    assert "pytorch_model.bin" in err


def test_truncated_safetensors(tmp_path, hf_src):
    f = hf_src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    err = convert_cli(hf_src, tmp_path / "out")
    assert "model.safetensors: tensor" in err and "outside the file" in err


def _rewrite_header(path, edit):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (n - len(raw)) if len(raw) <= n else b""
    assert len(raw) == n, "keep the header length so only the lie changes"
    path.write_bytes(data[:8] + raw + data[8 + n :])


def test_safetensors_header_lying_about_offsets(tmp_path, hf_src):
    def lie(h):
        h["transformer.norm.weight"]["data_offsets"] = [0, 10**12]

    _rewrite_header(hf_src / "model.safetensors", lie)
    err = convert_cli(hf_src, tmp_path / "out")
    assert "tensor 'transformer.norm.weight'" in err


def test_safetensors_header_lying_about_size(tmp_path, hf_src):
    def lie(h):
        h["transformer.norm.weight"]["shape"] = [4096]

    _rewrite_header(hf_src / "model.safetensors", lie)
    err = convert_cli(hf_src, tmp_path / "out")
    assert "transformer.norm.weight" in err and "needs" in err


def test_safetensors_huge_header_size(tmp_path, hf_src):
    f = hf_src / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 2**62) + f.read_bytes()[8:])
    err = convert_cli(hf_src, tmp_path / "out")
    assert "header claims" in err


def _resave(folder, edit):
    from safetensors.numpy import load_file, save_file

    w = load_file(str(folder / "model.safetensors"))
    edit(w)
    save_file(w, str(folder / "model.safetensors"))


def test_missing_tensor(tmp_path, hf_src):
    _resave(hf_src, lambda w: w.pop("transformer.layers.1.ffn.proj_2.weight"))
    err = convert_cli(hf_src, tmp_path / "out")
    assert "missing tensor transformer.layers.1.ffn.proj_2.weight" in err


def test_extra_tensor(tmp_path, hf_src):
    _resave(hf_src, lambda w: w.update({"transformer.layers.9.attn_norm.weight": np.ones(128, np.float32)}))
    err = convert_cli(hf_src, tmp_path / "out")
    assert "unexpected tensor transformer.layers.9.attn_norm.weight" in err


def test_wrong_shape(tmp_path, hf_src):
    _resave(hf_src, lambda w: w.update({"transformer.layers.0.attn.out_proj.weight": np.ones((128, 7), np.float32)}))
    err = convert_cli(hf_src, tmp_path / "out")
    assert "tensor transformer.layers.0.attn.out_proj.weight has shape [128, 7]" in err


def test_float16_overflow_is_named(tmp_path, hf_src):
    _resave(hf_src, lambda w: w["transformer.layers.0.ffn.proj_1.weight"].__setitem__((0, 0), 1e6))
    err = convert_cli(hf_src, tmp_path / "out", "--dtype", "float16")
    assert "transformer.layers.0.ffn.proj_1.weight" in err and "bfloat16" in err


def test_bare_pickle_and_garbage_files(tmp_path, hf_src):
    import pickle

    (hf_src / "model.safetensors").unlink()
    (hf_src / "pytorch_model.bin").write_bytes(pickle.dumps({"a": 1}))
    err = convert_cli(hf_src, tmp_path / "out")
    assert "bare pickle" in err
    (hf_src / "pytorch_model.bin").write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    err = convert_cli(hf_src, tmp_path / "out")
    assert "not a zip-format PyTorch checkpoint" in err


def test_bad_flags(tmp_path, hf_src):
    err = convert_cli(hf_src, tmp_path / "out", "-q", "--q-bits", "7")
    assert "--q-bits 7" in err
    err = convert_cli(hf_src, tmp_path / "out", "-q", "--q-group-size", "48")
    assert "--q-group-size 48" in err
    err = convert_cli(hf_src, tmp_path / "out", "--quant-recipe", "mixed_9_9")
    assert "--quant-recipe mixed_9_9" in err
    err = convert_cli(tmp_path / "nowhere", tmp_path / "out")
    assert "no such file or directory" in err
