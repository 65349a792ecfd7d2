"""Checkpoints built to exhaust memory or crash the readers (issue #23): a stride-0 view over a
tiny storage, pickles that amplify references, configs asking for 1e9 layers or a 1e12
vocabulary, group_size 0, nesting deep enough for RecursionError, overlapping safetensors
tensors, shard indexes naming files outside the folder.  Each is one line naming the file and
the field, exit 1, no traceback, nothing written.  The hostile files are written here."""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import random_weights, require_torch, small_config, write_hf_folder
from openelm_mlx.convert.pipeline import convert

from openelm_mlx.errors import OpenELMError
from openelm_mlx.loading import load_model


def _one_line_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 1, (out.returncode, out.stderr[-2000:])  # not -8 (SIGFPE) or -9 (OOM)
    assert "Traceback" not in out.stderr and "RecursionError" not in out.stderr, out.stderr[-2000:]
    errors = [ln for ln in out.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and out.stderr.strip().splitlines()[-1] == errors[0], out.stderr
    return errors[0]


def convert_refused(src: Path, dst: Path, *extra: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "openelm_mlx.cli", "convert", "--hf-path", str(src), "--mlx-path", str(dst), *extra],
        capture_output=True,
        text=True,
    )
    line = _one_line_error(out)
    assert not dst.exists() and not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}")]
    return line


def generate_refused(model: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "openelm_mlx.cli", "generate", "--model", str(model), "--prompt", "In", "--max-tokens",
         "1"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.stdout == ""
    return _one_line_error(out)


@pytest.fixture
def hf_src(tmp_path) -> Path:
    config = small_config("tied")
    return write_hf_folder(tmp_path / "src", config, random_weights(config), tokenizer=False)


@pytest.fixture(scope="module")
def q4(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("q4")
    config = small_config("tied")
    src = write_hf_folder(root / "src", config, random_weights(config))
    convert(str(src), root / "q4", quantize_model=True, log=lambda s: None)
    return root / "q4"


def _edited_copy(model: Path, dst: Path, edit) -> Path:
    shutil.copytree(model, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


# --- what a file may expand to ---------------------------------------------------------------------


def _torch_bin(tmp_path: Path, state_dict: dict) -> Path:
    torch = require_torch()
    src = tmp_path / "bin"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(small_config("tied").to_dict()))
    torch.save(state_dict, src / "pytorch_model.bin")
    return src


def test_stride_0_view_past_the_budget_is_refused_before_reading(tmp_path):
    torch = require_torch()
    config = small_config("tied")
    sd = {k: torch.from_numpy(v) for k, v in random_weights(config).items()}
    sd["extra.weight"] = torch.zeros(1).expand(20_000, 20_000)  # 1.6 GB declared over 4 stored bytes
    src = _torch_bin(tmp_path, sd)
    size = (src / "pytorch_model.bin").stat().st_size
    line = convert_refused(src, tmp_path / "out")
    assert "pytorch_model.bin" in line and "'extra.weight'" in line and "strides [0, 0]" in line, line
    assert f"{size:,}" in line


def test_stride_0_view_within_the_budget_is_materialized(tmp_path):
    """A stride-0 tensor that stays small (here the whole final norm, one stored value) is read as
    the full tensor it declares: refusing every stride-0 view would refuse legitimate saves."""
    torch = require_torch()
    config = small_config("tied")
    weights = random_weights(config)
    sd = {k: torch.from_numpy(v) for k, v in weights.items()}
    sd["transformer.norm.weight"] = torch.full((1,), 1.25).expand(config.model_dim)
    src = _torch_bin(tmp_path, sd)
    convert(str(src), tmp_path / "out", log=lambda s: None)
    model = load_model(tmp_path / "out")
    np.testing.assert_array_equal(np.asarray(model.transformer.norm.weight), np.full(config.model_dim, 1.25))


def test_a_state_dict_of_many_names_for_one_tensor_is_refused(tmp_path):
    torch = require_torch()
    one = torch.zeros(4)
    src = _torch_bin(tmp_path, {f"x{i}": one for i in range(120_000)})  # memo references, ~2 MB of pickle
    line = convert_refused(src, tmp_path / "out")
    assert "pytorch_model.bin" in line and "120,000 entries" in line, line


def test_a_pickle_of_millions_of_memo_references_is_refused(tmp_path):
    # EMPTY_LIST, MEMOIZE, MARK, then 2M x BINGET 0, APPENDS: 4 MiB asking for millions of objects.
    pkl = b"\x80\x04]\x94(" + b"h\x00" * 2_000_000 + b"e."
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/version", "3\n")
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(small_config("tied").to_dict()))
    (src / "pytorch_model.bin").write_bytes(buf.getvalue())
    line = convert_refused(src, tmp_path / "out")
    assert "pytorch_model.bin" in line and "opcodes" in line, line


def _safetensors(header: dict | bytes, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_overlapping_safetensors_tensors_are_refused(tmp_path, hf_src):
    n = 128 * 128 * 4
    header = {f"t{i}": {"dtype": "F32", "shape": [128, 128], "data_offsets": [0, n]} for i in range(50)}
    (hf_src / "model.safetensors").write_bytes(_safetensors(header, b"\0" * n))
    line = convert_refused(hf_src, tmp_path / "out")
    assert "model.safetensors" in line and "overlap" in line, line


# --- nesting -------------------------------------------------------------------------------------


def test_deeply_nested_config_json_is_one_line(tmp_path, hf_src):
    for doc in ("[" * 200_000 + "]" * 200_000, json.dumps({"num_transformer_layers": 4, "x": [[[[[[[[1]]]]]]]] * 5})):
        (hf_src / "config.json").write_text(doc if doc.startswith("[") else doc.replace("[1]", "[" * 40 + "]" * 40))
        line = convert_refused(hf_src, tmp_path / "out")
        assert "config.json" in line and ("nests" in line or "too deeply" in line), line


def test_deeply_nested_safetensors_header_is_one_line(tmp_path, hf_src):
    header = b'{"__metadata__": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    (hf_src / "model.safetensors").write_bytes(_safetensors(header, b""))
    line = convert_refused(hf_src, tmp_path / "out")
    assert "model.safetensors" in line and "nests" in line, line


# --- config fields against limits and the tensors -------------------------------------------------


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("num_transformer_layers", 1_000_000_000, "num_transformer_layers=1000000000: over the limit"),
        ("vocab_size", 10**12, "vocab_size=1000000000000: over the limit"),
        ("model_dim", 2**40, "model_dim=1099511627776: over the limit"),
        ("head_dim", 0, "head_dim=0: must be a positive integer"),
        ("ffn_multipliers", [1e300] * 4, "ffn_multipliers=1e+300: must be in (0, 64]"),
        ("max_context_length", 2**60, "max_context_length=1152921504606846976: over the limit"),
        ("eos_token_id", 10**6, "eos_token_id=1000000: outside the vocabulary"),
    ],
)
def test_config_fields_out_of_range_are_refused_before_building(tmp_path, hf_src, field, value, expected):
    cfg = json.loads((hf_src / "config.json").read_text())
    cfg[field] = value
    if field == "num_transformer_layers":  # the short form, so nothing forbids expanding 1e9 layers
        for key in ("num_query_heads", "num_kv_heads", "ffn_multipliers"):
            cfg.pop(key, None)
    (hf_src / "config.json").write_text(json.dumps(cfg))
    line = convert_refused(hf_src, tmp_path / "out")
    assert "config.json" in line and expected in line, line


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda c: c["quantization"].update(group_size=0), "quantization.group_size=0: mode affine supports"),
        (lambda c: c["quantization"].update(bits=7), "quantization.bits=7: mode affine supports"),
        (lambda c: c["quantization"].update(mode="fp3"), "quantization.mode='fp3'"),
        (
            lambda c: c["quantization"].update({"transformer.layers.0.attn.qkv_proj": {"group_size": 0, "bits": 4}}),
            "quantization.transformer.layers.0.attn.qkv_proj.group_size=0",
        ),
        (lambda c: c.update(vocab_size=1000), "vocab_size=1000 but the embedding has 512 rows"),
        (lambda c: c.update(vocab_size=10**12), "vocab_size=1000000000000: over the limit"),
        (
            lambda c: c.update(
                num_transformer_layers=2,
                **{k: c[k][:2] for k in ("num_query_heads", "num_kv_heads", "ffn_multipliers")},
            ),
            "num_transformer_layers=2 but the weights hold 4 layers",
        ),  # fmt: skip
    ],
)
def test_a_converted_folder_whose_config_lies_is_refused_at_load(tmp_path, q4, edit, expected):
    bad = _edited_copy(q4, tmp_path / "bad", edit)
    line = generate_refused(bad)
    assert "config.json" in line and expected in line, line
    with pytest.raises(OpenELMError, match="config.json"):
        load_model(bad)


def test_deep_safetensors_header_in_a_converted_folder(tmp_path, q4):
    bad = tmp_path / "bad"
    shutil.copytree(q4, bad)
    (bad / "model.safetensors").write_bytes(_safetensors(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b""))
    line = generate_refused(bad)
    assert "model.safetensors" in line and "nests" in line, line


# --- shard names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shard", ["/etc/passwd", "../outside.safetensors", "sub/model.safetensors", "..", 7])
def test_shard_index_names_outside_the_folder_are_refused(tmp_path, hf_src, shard):
    (tmp_path / "outside.safetensors").write_bytes((hf_src / "model.safetensors").read_bytes())
    names = json.loads(json.dumps(list(random_weights(small_config("tied")))))
    index = {"weight_map": {n: "model.safetensors" for n in names}}
    index["weight_map"][names[0]] = shard
    (hf_src / "model.safetensors.index.json").write_text(json.dumps(index))
    line = convert_refused(hf_src, tmp_path / "out")
    assert "model.safetensors.index.json" in line and "not a file name in" in line, line
