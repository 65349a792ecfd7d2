"""bench runs both engines on a tiny converted model and writes well-formed JSON (no timing assertions)."""

import json
import subprocess
import sys

import pytest
from helpers import random_weights, small_config, write_hf_folder
from openelm_mlx.convert.pipeline import convert


def test_bench_writes_well_formed_json(tmp_path):
    config = small_config("tied")
    src = write_hf_folder(tmp_path / "src", config, random_weights(config), tokenizer=False)
    convert(str(src), tmp_path / "model", quantize_model=True, log=lambda s: None)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "openelm_mlx.cli",
            "bench",
            "--model",
            str(tmp_path / "model"),
            "-p",
            "16",
            "-g",
            "8",
            "-n",
            "2",
            "--json",
            str(tmp_path / "b.json"),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "b.json").read_text())
    assert {"model", "backend", "blas", "runs", "ratio", "same_tokens", "bandwidth_gbps", "bandwidth_fraction"} <= set(
        report
    )
    assert len(report["runs"]) == 4 and {r["engine"] for r in report["runs"]} == {"openelm-mlx", "mlx-lm"}
    for run in report["runs"]:
        assert set(run) == {
            "engine",
            "prompt_tokens",
            "generation_tokens",
            "prompt_tps",
            "generation_tps",
            "peak_memory_gb",
        }
        assert run["prompt_tokens"] == 16 and run["generation_tokens"] == 8 and run["generation_tps"] > 0
    assert set(report["ratio"]) == {"prompt_tps", "generation_tps"}
    assert report["same_tokens"] is True  # both engines decode the same weights greedily
    assert report["bandwidth_gbps"] > 0 and 0 < report["bandwidth_fraction"] < 10
    ours, theirs = report["median"]["openelm-mlx"], report["median"]["mlx-lm"]
    assert ours["bandwidth_fraction"] == report["bandwidth_fraction"]
    # Same weights read per token by both engines: their fractions stand as their decode speeds.
    assert theirs["bandwidth_fraction"] * report["ratio"]["generation_tps"] == pytest.approx(ours["bandwidth_fraction"])
    assert "ratio openelm-mlx / mlx-lm" in out.stdout
    # A quantized model's decoding step stays in MLX, compiled.
    assert report["decode_step"] == "compiled (mx.compile)" and "decoding matmuls" in report["matmul_routes"]
    assert report["bandwidth_measured_gbps"]["read"] > 0 and report["bandwidth_measured_gbps"]["copy"] > 0
