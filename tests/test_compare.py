"""``openelm-mlx compare``: perplexities, KL divergence and top-token agreement of two models,
checked against a float64 NumPy computation from the reference forward pass."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import build_model, random_weights, small_config
from openelm_mlx.convert.pipeline import convert

from openelm_mlx import reference
from openelm_mlx.compare import compare
from openelm_mlx.loading import load

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "openelm_mlx" / "bundled" / "openelm-tiny-kjv"
VALID = ROOT / "openelm_mlx" / "bundled" / "kjv-valid.txt"


@pytest.fixture(scope="module")
def text_ids():
    _, tok = load(BUNDLED)
    return tok, tok.encode(VALID.read_text()[:12000], add_bos=False)[:2048]


def test_a_model_against_itself_diverges_nowhere(text_ids):
    tok, ids = text_ids
    a, _ = load(BUNDLED)
    b, _ = load(BUNDLED)
    r = compare(a, b, ids, tok.bos_id, context=128, progress=False)
    assert r.tokens == (len(ids) // 128) * 64
    assert r.kld_mean == pytest.approx(0.0, abs=1e-7) and r.kld_max == pytest.approx(0.0, abs=1e-6)
    assert r.top1_agreement == 1.0
    assert r.ppl_ratio == pytest.approx(1.0, abs=1e-9) and r.top_p_change_max == pytest.approx(0.0, abs=1e-7)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def test_figures_match_a_float64_computation():
    cfg = small_config("tied")
    wf = random_weights(cfg, seed=0)
    rng = np.random.default_rng(1)
    wq = {k: (v + 0.3 * np.abs(v).mean() * rng.standard_normal(v.shape)).astype(np.float32) for k, v in wf.items()}
    ids = [int(t) for t in rng.integers(3, cfg.vocab_size, 3 * 64 + 10)]
    r = compare(build_model(cfg, wq), build_model(cfg, wf), ids, 1, context=64, progress=False)
    nll_q, nll_f, kld, same, dp = [], [], [], [], []
    for c in range(3):
        chunk = ids[c * 64 : (c + 1) * 64]
        rows = [1] + chunk[:-1]
        lq = _log_softmax(reference.forward(cfg, wq, np.array(rows))[0])[32:]
        lf = _log_softmax(reference.forward(cfg, wf, np.array(rows))[0])[32:]
        t = np.array(chunk[32:])
        nll_q += list(-lq[np.arange(32), t])
        nll_f += list(-lf[np.arange(32), t])
        kld += list((np.exp(lf) * (lf - lq)).sum(axis=-1))
        same += list(lf.argmax(-1) == lq.argmax(-1))
        top = lf.argmax(-1)
        dp += list(np.exp(lq[np.arange(32), top]) - np.exp(lf[np.arange(32), top]))
    kld = np.array(kld)
    assert r.tokens == 96
    assert r.ppl_model == pytest.approx(np.exp(np.mean(nll_q)), rel=1e-4)
    assert r.ppl_reference == pytest.approx(np.exp(np.mean(nll_f)), rel=1e-4)
    assert r.kld_mean == pytest.approx(kld.mean(), rel=1e-3) and kld.mean() > 1e-3
    for got, q in ((r.kld_p90, 90), (r.kld_p99, 99), (r.kld_p999, 99.9)):
        # float32 log-probabilities carry ~1e-7 of rounding, which matters only for near-zero positions
        assert got == pytest.approx(np.percentile(kld, q), rel=1e-3, abs=2e-6)
    assert r.kld_max == pytest.approx(kld.max(), rel=1e-3, abs=2e-6)
    assert r.top1_agreement == pytest.approx(np.mean(same))
    assert r.top_p_change_mean == pytest.approx(np.mean(dp), abs=1e-5)
    assert r.top_p_change_max == pytest.approx(np.abs(dp).max(), abs=1e-5)


def test_mean_kld_grows_as_bits_fall(text_ids, tmp_path):
    tok, ids = text_ids
    ref, _ = load(BUNDLED)
    reports = {}
    for bits in (8, 4, 3, 2):
        convert(
            str(BUNDLED), tmp_path / f"q{bits}", quantize_model=True, q_bits=bits, run_verify=False, log=lambda s: None
        )
        model, _ = load(tmp_path / f"q{bits}")
        reports[bits] = compare(model, ref, ids, tok.bos_id, context=128, progress=False)
    klds = [reports[b].kld_mean for b in (8, 4, 3, 2)]
    assert klds == sorted(klds) and klds[0] > 0, klds
    assert reports[8].top1_agreement > reports[2].top1_agreement
    assert reports[8].ppl_ratio < reports[2].ppl_ratio


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "openelm_mlx.cli", "compare", *args], capture_output=True, text=True)


def test_cli_json_and_one_line_errors(tmp_path, text_ids):
    tok, ids = text_ids
    text = tmp_path / "t.txt"
    text.write_text(VALID.read_text()[:6000])
    out = cli("--model", str(BUNDLED), "--reference", str(BUNDLED), "--text", str(text), "--context", "64", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["top1_agreement"] == 1.0 and data["kld_mean"] == pytest.approx(0, abs=1e-7) and data["context"] == 64
    for args, words in (
        (["--text", str(tmp_path / "absent.txt")], ["--text", "absent.txt"]),
        (["--text", str(text), "--context", "100000"], ["--context 100000"]),
    ):
        bad = cli("--model", str(BUNDLED), "--reference", str(BUNDLED), *args)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr
        assert lines[-1].startswith("openelm-mlx compare: error:") and all(w in lines[-1] for w in words), lines[-1]


def test_models_with_different_vocabularies_are_refused(text_ids):
    from openelm_mlx.errors import OpenELMError

    tok, ids = text_ids
    cfg = small_config("tied")
    other = build_model(cfg, random_weights(cfg))
    bundled, _ = load(BUNDLED)
    with pytest.raises(OpenELMError, match="vocabularies differ"):
        compare(other, bundled, ids, tok.bos_id, progress=False)
