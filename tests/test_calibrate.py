"""Issue 25: calibrated quantization (``convert -q --calibrate gptq|dwq|dynamic``).

Each method, run on the bundled model with a small budget, must lower the mean KL divergence
from the float model on held-out text (``kjv-valid.txt``, which calibration never reads) against
plain round-to-nearest at the same bits and group size, by a margin; the outputs load in both
loaders; bad calibration data is a one-line error."""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import INTERRUPTIBLE
from openelm_mlx.convert.pipeline import convert
from openelm_mlx.convert.quantize import QuantSpec

from openelm_mlx.compare import compare
from openelm_mlx.loading import load, load_model
from openelm_mlx.quant import dwq, gptq, recipe

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "openelm_mlx" / "bundled" / "openelm-tiny-kjv"
VALID = ROOT / "openelm_mlx" / "bundled" / "kjv-valid.txt"
QUIET = dict(run_verify=False, log=lambda s: None)
# A small budget: 8 rows of 128 tokens (dwq: 24 steps of 2 rows).
SMALL = dict(seq_len=128, samples=8, progress=False)


def small(methods, **kw):
    return recipe.Options(methods=methods, **{**SMALL, **kw})


@pytest.fixture(scope="module")
def held_out():
    reference, tok = load(BUNDLED)
    ids = tok.encode(VALID.read_text(), add_bos=False)[:4096]  # 16 chunks of 256, 2,048 scored tokens
    return reference, ids, tok.bos_id


def kld(path, held_out):
    reference, ids, bos = held_out
    model, _ = load(path)
    return compare(model, reference, ids, bos, context=256, progress=False).kld_mean


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Plain and calibrated 3-bit g64 conversions of the bundled model."""
    root = tmp_path_factory.mktemp("calibrated")
    runs = {
        "plain": {},
        "gptq": dict(calibrate=small(("gptq",))),
        "dwq": dict(calibrate=small(("dwq",), dwq=dwq.Options(steps=24, batch=2))),
        "dynamic": dict(calibrate=small(("dynamic",), target_bpw=4.5)),
    }
    for name, kw in runs.items():
        convert(str(BUNDLED), root / name, quantize_model=True, q_bits=3, q_group_size=64, **kw, **QUIET)
    return root


@pytest.mark.parametrize("method,margin", [("gptq", 0.6), ("dwq", 0.8), ("dynamic", 0.5)])
def test_each_method_lowers_held_out_kld(converted, held_out, method, margin):
    plain = kld(converted / "plain", held_out)
    got = kld(converted / method, held_out)
    assert got < margin * plain, (method, got, plain)


def test_recipe_is_recorded(converted):
    raw = json.loads((converted / "gptq" / "config.json").read_text())
    r = raw["openelm_mlx"]["calibration"]
    text = (ROOT / "openelm_mlx" / "bundled" / "kjv-calibration.txt").read_bytes()
    assert r["methods"] == ["gptq"] and r["data_sha256"] == hashlib.sha256(text).hexdigest()
    assert r["seq_len"] == 128 and r["sequences"] == 8 and r["seed"] == 0
    assert 0 < r["held_out_kl"] < r["held_out_kl_round_to_nearest"]
    plain = json.loads((converted / "plain" / "config.json").read_text())
    assert "calibration" not in plain["openelm_mlx"]


def test_dynamic_writes_per_module_bits_and_meets_the_target(converted):
    raw = json.loads((converted / "dynamic" / "config.json").read_text())
    q = raw["quantization"]
    widths = {v["bits"] for k, v in q.items() if isinstance(v, dict)}
    assert widths and widths <= {4, 5, 6, 8} and q["bits"] == 3
    # stored bits per weight of the quantized modules, from the tensors themselves
    model = load_model(converted / "dynamic")
    from mlx.utils import tree_flatten

    params = dict(tree_flatten(model.parameters()))
    bits = n = 0
    for name, scales in params.items():
        if name.endswith(".scales"):
            module = name[: -len(".scales")]
            bits += 8 * (params[module + ".weight"].nbytes + scales.nbytes + params[module + ".biases"].nbytes)
            n += scales.size * 64
    assert 4.0 < bits / n <= 4.5 + 1e-6
    assert raw["openelm_mlx"]["calibration"]["dynamic"]["bpw"] == pytest.approx(bits / n, abs=1e-3)


def test_mixed_output_loads_in_mlx_lm_and_generates(converted):
    import mlx_lm

    for name in ("dynamic", "dwq"):
        peer, tok = mlx_lm.load(str(converted / name))
        ours = load_model(converted / name)
        tokens = mx.array([[1] + tok.encode("In the beginning God", add_special_tokens=False)])
        a, b = np.array(ours(tokens)), np.array(peer(tokens))
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max(), name
        text = mlx_lm.generate(peer, tok, "And God said", max_tokens=8)
        assert len(tok.encode(text, add_special_tokens=False)) >= 4, text


def test_same_seed_same_output(tmp_path):
    opts = small(("dwq",), dwq=dwq.Options(steps=3, batch=2, seed=3), seed=3, seq_len=64, samples=4)
    for name in ("a", "b"):
        convert(str(BUNDLED), tmp_path / name, quantize_model=True, q_bits=4, calibrate=opts, **QUIET)
    a, b = (mx.load(str(tmp_path / n / "model.safetensors")) for n in ("a", "b"))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_is_mlx_layout(bits):
    w = mx.random.normal((8, 128), key=mx.random.key(bits))
    packed, scales, biases = mx.quantize(w, group_size=32, bits=bits)
    dq = np.array(mx.dequantize(packed, scales, biases, group_size=32, bits=bits)).reshape(8, 4, 32)
    levels = np.round((dq - np.array(biases)[..., None]) / np.array(scales)[..., None]).reshape(8, 128)
    assert np.array_equal(gptq.pack(levels.astype(np.int64), bits), np.array(packed))


def test_gptq_solve_lowers_output_error_on_correlated_inputs():
    """Independent check of the solver: on inputs with correlated features, the layer-output error
    ||X (W_q - W)^T||^2 of GPTQ is well below plain rounding's, at the same scales' format."""
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(128, 128))
    x = rng.normal(size=(2048, 128)) @ mix  # correlated features
    w = rng.normal(size=(64, 128)).astype(np.float32)
    spec = QuantSpec(3, 32)
    parts = gptq.solve(w, x.T @ x, spec)
    got = np.array(mx.dequantize(*(mx.array(parts[k]) for k in ("weight", "scales", "biases")), group_size=32, bits=3))
    rtn = np.array(mx.dequantize(*mx.quantize(mx.array(w), group_size=32, bits=3), group_size=32, bits=3))
    err = lambda q: float(np.sum((x @ (q - w).T) ** 2))  # noqa: E731
    assert err(got) < 0.7 * err(rtn)  # measured 0.55


# --- bad calibration data: one line, non-zero exit -------------------------------------------------
def cli(*args):
    out = subprocess.run([sys.executable, "-m", "openelm_mlx.cli", *args], capture_output=True, env=dict(os.environ))
    return out.returncode, out.stderr.decode("utf-8", "replace")


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "the file is empty"),
        (b"\x00\x01\x02binary\xff" * 50, "binary data"),
        (b"\xff\xfe" + "caf\u00e9".encode("latin-1") * 20, "not UTF-8 text"),
        (b"In the beginning God created the heaven and the earth.\n", "shorter than two sequences"),
        (b'{"txt": "no text field"}\n', 'expected an object with a "text" string'),
    ],
)
def test_bad_calibration_data_is_one_line(tmp_path, content, message):
    suffix = ".jsonl" if content.startswith(b"{") else ".txt"
    data = tmp_path / f"calib{suffix}"
    data.write_bytes(content)
    rc, err = cli(
        "convert", "--hf-path", str(BUNDLED), "--mlx-path", str(tmp_path / "out"), "-q", "--calibrate", "gptq",
        "--calibration-data", str(data), "--no-verify",
    )  # fmt: skip
    assert rc == 1 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0] and str(data) in errors[0], err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize(
    "args,message",
    [
        (["-q", "--calibrate", "awq"], "--calibrate awq: unknown method awq"),
        (["--calibrate", "gptq"], "--calibrate needs -q"),
        (["-q", "--calibrate", "dynamic"], "--calibrate dynamic needs --target-bpw"),
        (["-q", "--calibrate", "gptq", "--dwq-steps", "5"], "--dwq-steps is for --calibrate dwq"),
        (["-q", "--target-bpw", "4"], "--target-bpw is for --calibrate"),
        (["-q", "--calibrate", "dynamic", "--target-bpw", "2.5"], "--target-bpw 2.5: below the smallest width"),
    ],
)
def test_bad_calibration_flags_are_one_line(tmp_path, args, message):
    rc, err = cli("convert", "--hf-path", str(BUNDLED), "--mlx-path", str(tmp_path / "out"), "--no-verify", *args)
    assert rc == 1 and "Traceback" not in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_compare_shows_the_recipe(converted, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(VALID.read_text()[:3000])
    args = ["compare", "--model", str(converted / "gptq"), "--reference", str(BUNDLED), "--text", str(text)]
    out = subprocess.run([sys.executable, "-m", "openelm_mlx.cli", *args, "--context", "64"], capture_output=True)
    assert out.returncode == 0, out.stderr
    first = out.stdout.decode().splitlines()[0]
    assert first.startswith("model: calibrated with gptq on bundled:kjv-calibration.txt (sha256 "), first
    assert "round-to-nearest" in first


def test_ctrl_c_during_calibration_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "openelm_mlx.cli", "convert", "--hf-path", str(BUNDLED), "--mlx-path", str(out),
         "-q", "--calibrate", "dwq", "--dwq-steps", "10000", "--calibration-samples", "8"],
        stderr=subprocess.PIPE,
        **INTERRUPTIBLE,
    )  # fmt: skip
    seen = b""
    while b"calibration data:" not in seen:  # the float model is built; calibration has begun
        line = proc.stderr.readline()
        assert line, seen.decode()
        seen += line
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and b"Traceback" not in err, err.decode()
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dwq_training_route_matches_mlx_quantized_matmul(bits):
    """DWQ trains through unpacked levels x scales + biases (dwq._Levels) instead of MLX's CPU
    quantized kernel: the same outputs and the same gradients for scales and biases."""
    from openelm_mlx.model import QuantizedLinear

    layer = QuantizedLinear(128, 48, bias=False, group_size=64, bits=bits)
    w = mx.random.normal((48, 128), key=mx.random.key(bits))
    layer.weight, layer.scales, layer.biases = mx.quantize(w, group_size=64, bits=bits)
    x = mx.random.normal((3, 5, 128), key=mx.random.key(7))
    route = dwq._Levels(layer)

    def ours(s, b):
        return route.quantized_matmul_t(x, layer.weight, s, b, 64, bits, "affine")

    def mlx(s, b):
        return mx.quantized_matmul(x, layer.weight, s, b, transpose=True, group_size=64, bits=bits)

    assert mx.allclose(ours(layer.scales, layer.biases), mlx(layer.scales, layer.biases), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda s, b: (f(s, b) ** 2).sum()  # noqa: E731
    got = mx.grad(loss(ours), argnums=(0, 1))(layer.scales, layer.biases)
    want = mx.grad(loss(mlx), argnums=(0, 1))(layer.scales, layer.biases)
    for g, e in zip(got, want, strict=True):
        assert mx.allclose(g, e, rtol=1e-4, atol=1e-4 * mx.abs(e).max().item())
