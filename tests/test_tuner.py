"""Fine-tuning (openelm_mlx/tuner): adapter layers against NumPy, short fine-tunes of the bundled
model on a text it never saw (float32 and 4-bit QLoRA), fuse, resume, data errors, and a real
2-process data-parallel run through mlx.launch."""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import INTERRUPTIBLE
from mlx.utils import tree_flatten
from openelm_mlx.convert.pipeline import convert

from openelm_mlx.cli import main
from openelm_mlx.errors import OpenELMError
from openelm_mlx.loading import load, load_model
from openelm_mlx.model import Embedding, Linear
from openelm_mlx.perplexity import perplexity
from openelm_mlx.tokenizer import Tokenizer
from openelm_mlx.tuner import datasets, lora
from openelm_mlx.tuner.cli import write_adapter_config

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "openelm_mlx" / "bundled" / "openelm-tiny-kjv"
TEXT = ROOT / "examples" / "data" / "devil.txt.xz"
SEQ = 64
# A short run: 16 updates of 8 x 64 tokens.  Measured here: validation perplexity 845 -> ~330
# (float32) and 860 -> ~340 (4-bit); the tests ask for at least a 40% drop.
TRAIN = ["--data", str(TEXT), "--max-seq-length", str(SEQ), "--iters", "16", "--batch-size", "8"]
TRAIN += ["--learning-rate", "2e-3", "--val-batches", "6", "--steps-per-eval", "100", "--steps-per-report", "4"]
MIN_PPL_DROP = 0.40


def run_cli(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, err.getvalue()


def val_losses(log: str) -> dict[int, float]:
    return {int(i): float(v) for i, v in re.findall(r"iter (\d+): val loss ([\d.]+)", log)}


def train_losses(log: str) -> dict[int, float]:
    return {int(i): float(v) for i, v in re.findall(r"iter (\d+)/\d+: train loss ([\d.]+)", log)}


def assert_same_adapters(a: Path, b: Path, atol: float, rtol: float) -> None:
    wa, wb = mx.load(str(a / "adapters.safetensors")), mx.load(str(b / "adapters.safetensors"))
    assert wa.keys() == wb.keys()
    assert max(float(mx.abs(wa[k]).max()) for k in wa if k.endswith("lora_b")) > 1e-4  # it trained (B starts at 0)
    for k in wa:
        np.testing.assert_allclose(np.asarray(wb[k]), np.asarray(wa[k]), atol=atol, rtol=rtol, err_msg=k)


# --- the layers against NumPy (float64) -------------------------------------------------------------


def _linear(rng, out_dims=20, in_dims=64, quantized=False):
    base = Linear(in_dims, out_dims, bias=False)
    base.weight = mx.array(rng.standard_normal((out_dims, in_dims)).astype(np.float32) / 8)
    return base.to_quantized(group_size=32, bits=4) if quantized else base


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "4-bit base"])
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_linear_adapters_forward_and_gradient_match_numpy(kind, quantized):
    rng = np.random.default_rng(0)
    base = _linear(rng, quantized=quantized)
    cls = lora.DoRALinear if kind == "dora" else lora.LoRALinear
    layer = cls(base, rank=4, alpha=8.0, dropout=0.0)
    layer.lora_b = mx.array(rng.standard_normal(layer.lora_b.shape).astype(np.float32))  # B = 0 at init
    if kind == "dora":
        layer.m = mx.array(rng.uniform(0.5, 1.5, layer.m.shape).astype(np.float32))
    x = rng.standard_normal((3, 5, 64)).astype(np.float32)
    g = rng.standard_normal((3, 5, 20)).astype(np.float32)  # upstream gradient: loss = sum(y * g)

    W = np.asarray(lora.base_weight(base), np.float64)
    A, B, s = np.asarray(layer.lora_a, np.float64), np.asarray(layer.lora_b, np.float64), 2.0
    z = x @ W.T + s * (x @ A) @ B
    if kind == "dora":
        m = np.asarray(layer.m, np.float64)
        norm = np.linalg.norm(W + s * (A @ B).T, axis=1)  # a constant in the backward pass (DoRA 4.3)
        y, gz = z * (m / norm), g * (m / norm)
        grad_m = (g * z / norm).sum(axis=(0, 1))
    else:
        y, gz = z, g
    grad_a = s * x.reshape(-1, 64).T @ (gz.reshape(-1, 20) @ B.T)
    grad_b = s * (x.reshape(-1, 64) @ A).T @ gz.reshape(-1, 20)
    grad_x = gz @ W + s * (gz @ B.T) @ A.T

    np.testing.assert_allclose(np.asarray(layer(mx.array(x))), y, rtol=1e-4, atol=1e-4)
    layer.freeze()
    layer.unfreeze(keys=["lora_a", "lora_b", "m"], recurse=False, strict=False)

    def loss(params, x):
        layer.update(params)
        return (layer(x) * mx.array(g)).sum()

    grads, gx = mx.grad(loss, argnums=(0, 1))(layer.trainable_parameters(), mx.array(x))
    np.testing.assert_allclose(np.asarray(grads["lora_a"]), grad_a, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.asarray(grads["lora_b"]), grad_b, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.asarray(gx), grad_x, rtol=1e-4, atol=1e-3)
    if kind == "dora":
        np.testing.assert_allclose(np.asarray(grads["m"]), grad_m, rtol=1e-4, atol=1e-3)
    trained = {k for k, _ in tree_flatten(grads)}
    assert trained == ({"lora_a", "lora_b", "m"} if kind == "dora" else {"lora_a", "lora_b"})  # the base is frozen


def test_embedding_adapter_and_tied_head_match_numpy():
    rng = np.random.default_rng(1)
    base = Embedding(50, 16)
    base.weight = mx.array(rng.standard_normal((50, 16)).astype(np.float32))
    layer = lora.LoRAEmbedding(base, rank=4, alpha=4.0)
    layer.lora_a = mx.array(rng.standard_normal((50, 4)).astype(np.float32))
    E = np.asarray(base.weight, np.float64) + np.asarray(layer.lora_a, np.float64) @ np.asarray(
        layer.lora_b, np.float64
    )
    ids = np.array([[3, 7, 7, 49]])
    h = rng.standard_normal((1, 4, 16)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(layer(mx.array(ids))), E[ids], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(layer.as_linear(mx.array(h))), h @ E.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(layer.fused_weight()), E, rtol=1e-5, atol=1e-5)
    g = rng.standard_normal((1, 4, 50)).astype(np.float32)
    layer.freeze()
    layer.unfreeze(keys=["lora_a", "lora_b"], recurse=False)

    def loss(params):
        layer.update(params)
        return (layer.as_linear(mx.array(h)) * mx.array(g)).sum()

    grads = mx.grad(loss)(layer.trainable_parameters())
    gE = g.reshape(-1, 50).T @ h.reshape(-1, 16)  # d loss / d E, [50, 16]
    np.testing.assert_allclose(np.asarray(grads["lora_a"]), gE @ np.asarray(layer.lora_b).T, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.asarray(grads["lora_b"]), np.asarray(layer.lora_a).T @ gE, rtol=1e-4, atol=1e-3)


def test_adapters_start_at_the_base_model_and_freeze_it():
    model = load_model(BUNDLED)
    x = mx.array([[1, 40, 200, 7, 9]])
    before = model(x)
    paths = lora.apply_adapters(model, "dora", rank=8, alpha=16.0, dropout=0.1)
    assert len(paths) == 1 + 4 * len(model.layers)  # Apple's targets: embeddings and the four projections
    model.eval()
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(before), atol=1e-5)
    trainable = lora.trainable_weights(model)
    assert trainable and all(k.rsplit(".", 1)[1] in ("lora_a", "lora_b", "m") for k in trainable)


# --- short fine-tunes on The Devil's Dictionary ---------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("tuner")
    convert(str(BUNDLED), root / "tiny-4bit", quantize_model=True, q_bits=4, run_verify=False, log=lambda s: None)
    return root


@pytest.fixture(scope="module")
def tuned_float(work):
    out = work / "adapters-float"
    rc, log = run_cli("lora", "--model", str(BUNDLED), *TRAIN, "--adapter-path", str(out))
    assert rc == 0, log
    return out, log


@pytest.fixture(scope="module")
def tuned_4bit(work):
    out = work / "adapters-4bit"
    rc, log = run_cli("lora", "--model", str(work / "tiny-4bit"), *TRAIN, "--adapter-path", str(out))
    assert rc == 0, log
    return out, log


def _valid_ids() -> list[int]:
    tok = Tokenizer(BUNDLED / "tokenizer.model")
    split = datasets.cut_text(TEXT, tok, SEQ)["valid"]
    return [t for e in split.examples[:24] for t in e.tokens]


def test_float32_fine_tune_lowers_validation_perplexity(tuned_float):
    out, log = tuned_float
    val = val_losses(log)
    assert math.exp(val[16]) <= (1 - MIN_PPL_DROP) * math.exp(val[0]), log
    assert re.search(r"iter 16/16: train loss [\d.]+, lr [\d.e+-]+, [\d,]+ tokens/s, .* peak memory", log), log
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["rank"] == 32 and cfg["alpha"] == 32 and cfg["dropout"] == 0.1  # Apple's recipe
    assert cfg["base_model"] == str(BUNDLED) and cfg["base_model_sha256"] == lora.model_hash(BUNDLED)
    # The engine's perplexity (an independent path) over validation text, through load(adapter_path=).
    ids = _valid_ids()
    base = perplexity(load(BUNDLED)[0], ids, window=256, progress=False)
    tuned = perplexity(load(BUNDLED, adapter_path=out)[0], ids, window=256, progress=False)
    assert tuned <= (1 - MIN_PPL_DROP) * base, (base, tuned)


def test_qlora_fine_tune_on_the_4bit_model_keeps_the_base_quantized(work, tuned_4bit):
    out, log = tuned_4bit
    val = val_losses(log)
    assert math.exp(val[16]) <= (1 - MIN_PPL_DROP) * math.exp(val[0]), log
    weights = mx.load(str(out / "adapters.safetensors"))
    assert weights and all(k.endswith(("lora_a", "lora_b")) for k in weights)
    assert all(w.dtype == mx.float32 for w in weights.values())  # float32 adapters on a 4-bit base
    model, _ = load(work / "tiny-4bit", adapter_path=out)
    qkv = model.layers[0].attn.qkv_proj
    assert isinstance(qkv, lora.LoRALinear) and "scales" in qkv.base  # still quantized, not fused
    saved = mx.load(str(work / "tiny-4bit" / "model.safetensors"))
    assert mx.array_equal(qkv.base.weight, saved["transformer.layers.0.attn.qkv_proj.weight"])


def _logits(model, ids=(1, 30, 400, 9, 77, 1000, 5, 300)) -> np.ndarray:
    return np.asarray(model(mx.array([list(ids)])), np.float64)


def test_fuse_gives_base_plus_adapter_and_loads_in_mlx_lm(work, tuned_float):
    import mlx_lm

    out, _ = tuned_float
    adapted = load_model(BUNDLED)
    lora.attach(adapted, out)
    ref = _logits(adapted)
    rc, log = run_cli("fuse", "--model", str(BUNDLED), "--adapter-path", str(out), "--mlx-path", str(work / "fused"))
    assert rc == 0, log
    scale = np.abs(ref).max()
    fused, _ = load(work / "fused")
    assert np.abs(_logits(fused) - ref).max() <= 1e-5 * scale
    theirs, _ = mlx_lm.load(str(work / "fused"))
    assert np.abs(_logits(theirs) - ref).max() <= 1e-5 * scale
    assert np.abs(_logits(load(BUNDLED, adapter_path=out)[0]) - ref).max() <= 1e-5 * scale
    rc, log = run_cli("fuse", "--model", str(BUNDLED), "--adapter-path", str(out), "--mlx-path", str(work / "fused"))
    assert rc == 1 and "already exists; pass --force" in log  # nothing overwritten without opt-in


def test_fuse_a_4bit_base_requantized_dequantized_and_with_q(work, tuned_4bit):
    import mlx_lm

    out, _ = tuned_4bit
    base_dir = work / "tiny-4bit"
    adapted = load_model(base_dir)
    lora.attach(adapted, out)
    ref = _logits(adapted)
    scale = np.abs(ref).max()
    # Quantizing the fused weights again costs about what quantizing the base did in the first place.
    quant_err = np.abs(_logits(load_model(BUNDLED)) - _logits(load_model(base_dir))).max()
    for name, flags, tol in (
        ("deq", ["--dequantize"], 1e-5 * scale),
        ("requant", [], 2 * quant_err),
        ("q8", ["-q", "--q-bits", "8"], 0.25 * quant_err),
    ):
        dst = work / f"fused-4bit-{name}"
        rc, log = run_cli("fuse", "--model", str(base_dir), "--adapter-path", str(out), "--mlx-path", str(dst), *flags)
        assert rc == 0, log
        cfg = json.loads((dst / "config.json").read_text())
        assert ("quantization" in cfg) == (name != "deq")
        assert np.abs(_logits(load(dst)[0]) - ref).max() <= tol, name
        assert np.abs(_logits(mlx_lm.load(str(dst))[0]) - _logits(load(dst)[0])).max() <= 1e-4 * scale


def _random_adapter(folder: Path, kind: str, targets: list[str]) -> np.ndarray:
    """An adapter with trained-looking (all non-zero) weights written to ``folder``; returns base + adapter logits."""
    model = load_model(BUNDLED)
    mx.random.seed(3)
    lora.apply_adapters(model, kind, rank=4, alpha=8.0, dropout=0.0, targets=targets)
    rng = np.random.default_rng(0)
    for _, module in model.named_modules():
        if isinstance(module, lora.ADAPTER_LAYERS):  # trained-looking adapters: both factors non-zero
            for key in ("lora_a", "lora_b"):
                module[key] = mx.array(rng.standard_normal(module[key].shape).astype(np.float32) * 0.05)
            if isinstance(module, lora.DoRALinear):
                module.m = module.m * mx.array(rng.uniform(0.8, 1.2, module.m.shape).astype(np.float32))
    model.eval()
    folder.mkdir()
    mx.save_safetensors(str(folder / "adapters.safetensors"), lora.trainable_weights(model))
    opts = {"fine_tune_type": kind, "rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": targets}
    write_adapter_config(folder, {**opts, "num_layers": -1}, BUNDLED)
    return _logits(model)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_fuse_random_adapters_on_every_target(tmp_path, kind):
    adapter = tmp_path / "adapter"
    ref = _random_adapter(adapter, kind, list(lora.TARGETS))
    rc, log = run_cli(
        "fuse", "--model", str(BUNDLED), "--adapter-path", str(adapter), "--mlx-path", str(tmp_path / "f")
    )
    assert rc == 0, log
    assert np.abs(_logits(load(tmp_path / "f")[0]) - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_mlx_lm_loads_adapters_of_the_projections(tmp_path, kind):
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model as mlx_lm_load_model

    ref = _random_adapter(tmp_path / "adapter", kind, ["qkv_proj", "out_proj", "proj_1", "proj_2"])
    theirs = mlx_lm_load_model(BUNDLED)[0]
    load_adapters(theirs, str(tmp_path / "adapter"))
    assert np.abs(_logits(theirs) - ref).max() <= 1e-5 * np.abs(ref).max()


# --- resume ---------------------------------------------------------------------------------------

SHORT = ["--data", str(TEXT), "--max-seq-length", "48", "--iters", "6", "--batch-size", "4", "--val-batches", "0"]
SHORT += ["--steps-per-report", "1", "--learning-rate", "1e-3", "--num-layers", "3"]


def test_resume_continues_the_same_loss_curve(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    rc, log_full = run_cli("lora", "--model", str(BUNDLED), *SHORT, "--save-every", "3", "--adapter-path", str(full))
    assert rc == 0, log_full
    assert (full / "0000003_adapters.safetensors").is_file() and (full / "0000003_adapters_state.safetensors").is_file()
    ckpt = str(full / "0000003_adapters.safetensors")
    rc, log_res = run_cli(
        "lora", "--model", str(BUNDLED), *SHORT, "--adapter-path", str(resumed), "--resume-adapter-file", ckpt
    )
    assert rc == 0, log_res
    a, b = train_losses(log_full), train_losses(log_res)
    assert sorted(b) == [4, 5, 6]  # it went on from iteration 4, with the dropout of the full run
    for it in (4, 5, 6):
        assert abs(a[it] - b[it]) <= 1e-4, (it, a[it], b[it])
    assert_same_adapters(full, resumed, atol=1e-5, rtol=1e-4)


# --- data -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(BUNDLED / "tokenizer.model")


def _folder(root: Path, lines: list[str], valid: list[str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    (root / "valid.jsonl").write_text("\n".join(valid or lines) + "\n")
    return root


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "fine"', r"train\.jsonl:2: not valid JSON"),
        ('["a list"]', r"train\.jsonl:2: expected a JSON object, got list"),
        ('{"txt": "typo"}', r"train\.jsonl:2: no 'text', 'prompt'/'completion' or 'messages' field"),
        ('{"prompt": "only a prompt"}', r"train\.jsonl:2: 'prompt' and 'completion' must both be strings"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', r"train\.jsonl:2: the last message must be"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', r"train\.jsonl:2: messages\[0\] has role 'robot'"),
        ('{"text": 3}', r"train\.jsonl:2: 'text' must be a string"),
    ],
)
def test_a_bad_line_is_an_error_naming_file_and_line(tmp_path, tok, line, message):
    folder = _folder(tmp_path / "d", ['{"text": "a fine first line"}', line])
    with pytest.raises(OpenELMError, match=message):
        datasets.load(folder, tok, 64)
    rc, log = run_cli("lora", "--model", str(BUNDLED), "--data", str(folder), "--adapter-path", str(tmp_path / "a"))
    assert rc == 1 and len(log.strip().splitlines()) == 1 and re.search(message, log), log
    assert not (tmp_path / "a").exists()


def test_missing_data_and_bad_flags_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    for args, message in (
        (["--data", str(tmp_path / "empty")], "no train.jsonl"),
        (["--data", str(tmp_path / "nope.txt")], "no such folder or text file"),
        (["--data", str(TEXT), "--targets", "q_proj"], "--targets q_proj: unknown"),
        (["--data", str(TEXT), "--num-layers", "99"], "--num-layers 99: the model has 8 layers"),
        (["--data", str(TEXT), "--mask-prompt"], "--mask-prompt needs prompt/completion or messages data"),
    ):
        rc, log = run_cli("lora", "--model", str(BUNDLED), *args, "--adapter-path", str(tmp_path / "a"))
        assert rc == 1 and message in log and len(log.strip().splitlines()) == 1, log
    (tmp_path / "c.yaml").write_text("rnak: 8\n")
    rc, log = run_cli("lora", "--model", str(BUNDLED), "--data", str(TEXT), "-c", str(tmp_path / "c.yaml"))
    assert rc == 1 and "c.yaml: unknown option 'rnak'" in log


def test_formats_masks_and_length_batches(tmp_path, tok):
    lines = [
        json.dumps({"prompt": "Q: what is a cynic?\nA:", "completion": " a blackguard"}),
        json.dumps({"text": "ABASEMENT, n. A decent and customary mental attitude."}),
        json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Define abasement."},
                    {"role": "assistant", "content": "A mental attitude."},
                    {"role": "user", "content": "And abatis?"},
                    {"role": "assistant", "content": "Rubbish in front of a fort."},
                ]
            }
        ),
    ]
    folder = _folder(tmp_path / "d", lines)
    with pytest.raises(OpenELMError, match="train.jsonl:2: --mask-prompt needs prompt/completion or messages"):
        datasets.load(folder, tok, 64, mask_prompt=True)
    folder = _folder(tmp_path / "m", [lines[0], lines[2]])
    ds = datasets.load(folder, tok, 256, mask_prompt=True)["train"]
    pc, chat = ds.examples
    assert pc.tokens == tok.encode("Q: what is a cynic?\nA: a blackguard</s>")
    assert pc.offset == len(tok.encode("Q: what is a cynic?\nA:"))
    context = (
        "<|system|>\nBe brief.</s>\n<|user|>\nDefine abasement.</s>\n<|assistant|>\n"
        "A mental attitude.</s>\n<|user|>\nAnd abatis?</s>\n<|assistant|>\n"
    )
    assert chat.tokens == tok.encode(context + "Rubbish in front of a fort.</s>")
    assert chat.offset == len(tok.encode(context))
    tokens, spans = datasets.make_batch(ds, [0, 1], 256)
    assert (tokens.shape[1] - 1) % datasets.PAD_TO == 0
    m, targets = np.asarray(datasets.target_mask(spans, tokens.shape[1] - 1)), np.asarray(tokens)[:, 1:]
    for row, e in enumerate((pc, chat)):  # exactly the completion's tokens are trained on
        assert np.flatnonzero(m[row]).tolist() == list(range(e.offset - 1, len(e.tokens) - 1))
        assert targets[row, e.offset - 1] == e.tokens[e.offset]
    text = datasets.cut_text(TEXT, tok, 128)
    assert {len(e.tokens) for e in text["train"].examples[:-1]} == {128}
    groups = datasets.length_batches(ds, 1)
    assert [len(ds.examples[g[0]].tokens) for g in groups] == sorted(len(e.tokens) for e in ds.examples)


# --- data parallel over mx.distributed ------------------------------------------------------------


def test_two_processes_train_the_same_adapters_as_one(tmp_path):
    launcher = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")
    args = ["lora", "--model", str(BUNDLED), "--data", str(TEXT), "--max-seq-length", "48", "--iters", "3"]
    args += [
        "--batch-size",
        "8",
        "--dropout",
        "0",
        "--val-batches",
        "0",
        "--num-layers",
        "4",
        "--learning-rate",
        "1e-3",
    ]
    one = subprocess.run(
        [sys.executable, "-m", "openelm_mlx.cli", *args, "--adapter-path", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr
    port = str(random.randint(20000, 60000))
    two = subprocess.run(
        [launcher, "--backend", "ring", "-n", "2", "--starting-port", port, sys.executable, "-m", "openelm_mlx.cli"]
        + [*args, "--adapter-path", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stdout + two.stderr
    assert "2 process(es)" in two.stdout + two.stderr
    assert_same_adapters(tmp_path / "one", tmp_path / "two", atol=2e-5, rtol=1e-3)


def test_grad_accumulation_equals_the_whole_batch(tmp_path):
    base = ["--data", str(TEXT), "--max-seq-length", "48", "--iters", "2", "--dropout", "0", "--val-batches", "0"]
    base += ["--num-layers", "2", "--learning-rate", "1e-3"]
    rc, log = run_cli(
        "lora", "--model", str(BUNDLED), *base, "--batch-size", "8", "--adapter-path", str(tmp_path / "a")
    )
    assert rc == 0, log
    rc, log = run_cli(
        "lora", "--model", str(BUNDLED), *base, "--batch-size", "4", "--grad-accumulation-steps", "2",
        "--grad-checkpoint", "--adapter-path", str(tmp_path / "b"),
    )  # fmt: skip
    assert rc == 0, log
    assert_same_adapters(tmp_path / "a", tmp_path / "b", atol=2e-5, rtol=1e-3)  # one global batch, as 2 x 4 rows


def test_ctrl_c_saves_the_last_adapters(tmp_path):
    import signal

    out = tmp_path / "a"
    cmd = [sys.executable, "-m", "openelm_mlx.cli", "lora", "--model", str(BUNDLED), *SHORT]
    cmd += ["--iters", "100000", "--adapter-path", str(out)]  # the last --iters wins
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, **INTERRUPTIBLE)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("iter 2/"):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, "".join(lines) + rest
    assert "saved adapters of iteration" in rest and "interrupted" in rest
    _, meta = mx.load(str(out / "adapters.safetensors"), return_metadata=True)
    assert int(meta["step"]) >= 2
    assert (out / "adapters_state.safetensors").is_file()  # so it can be resumed


def test_full_fine_tune_trains_whole_blocks_and_fuses(tmp_path, work):
    out = tmp_path / "full"
    args = [*SHORT, "--iters", "2", "--fine-tune-type", "full", "--num-layers", "1", "--targets", "qkv_proj"]
    rc, log = run_cli("lora", "--model", str(BUNDLED), *args, "--adapter-path", str(out))
    assert rc == 0, log
    weights = mx.load(str(out / "adapters.safetensors"))
    assert weights and all(k.startswith("transformer.layers.7.") for k in weights)  # the last block, whole
    assert "transformer.layers.7.ffn_norm.weight" in weights
    tuned = load(BUNDLED, adapter_path=out)[0]
    rc, log = run_cli("fuse", "--model", str(BUNDLED), "--adapter-path", str(out), "--mlx-path", f"{tmp_path}/f")
    assert rc == 0, log
    ref = _logits(tuned)
    assert np.abs(_logits(load(tmp_path / "f")[0]) - ref).max() <= 1e-6 * np.abs(ref).max()
    assert np.abs(_logits(load_model(BUNDLED)) - ref).max() > 1e-4  # and it did change the model
    rc, log = run_cli("lora", "--model", str(work / "tiny-4bit"), *args, "--adapter-path", str(tmp_path / "q"))
    assert rc == 1 and "--fine-tune-type full needs an unquantized model" in log


def test_serve_applies_the_adapter(tmp_path):
    """``serve --adapter-path``: a real server on a loopback port answers as base + adapter."""
    import openai
    from helpers import running_server

    from openelm_mlx.cli import build_parser
    from openelm_mlx.generate import generate
    from openelm_mlx.server.cli import load_models

    adapter = tmp_path / "adapter"
    _random_adapter(adapter, "lora", list(lora.TARGETS))
    args = build_parser().parse_args(["serve", "--model", str(BUNDLED), "--adapter-path", str(adapter)])
    models, _ = load_models(args)
    expected = generate(*load(BUNDLED, adapter_path=adapter), "And God said", max_tokens=16)
    assert expected != generate(*load(BUNDLED), "And God said", max_tokens=16)  # the adapter matters
    with running_server(models) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        r = c.completions.create(model=BUNDLED.name, prompt="And God said", max_tokens=16, temperature=0)
        assert r.choices[0].text == expected
