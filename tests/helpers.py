"""Shared test helpers: small layer-wise-scaled configs and random weights."""

from __future__ import annotations

import signal
from contextlib import contextmanager

import mlx.core as mx
import numpy as np

from openelm_mlx import OpenELM, OpenELMConfig, runtime

# Small configs covering every architectural switch; query heads differ per layer in all.
SMALL_CONFIGS = {
    "tied": dict(num_transformer_layers=4, model_dim=128, head_dim=16, vocab_size=512),
    "untied": dict(num_transformer_layers=3, model_dim=96, head_dim=8, vocab_size=300, share_input_output_layers=False),
    "no_qk_norm": dict(
        num_transformer_layers=3, model_dim=128, head_dim=16, vocab_size=256, normalize_qk_projections=False
    ),
    "no_glu": dict(num_transformer_layers=3, model_dim=64, head_dim=8, vocab_size=200, ffn_with_glu=False),
    "mqa_groups2": dict(
        num_transformer_layers=5,
        model_dim=128,
        head_dim=16,
        vocab_size=256,
        num_gqa_groups=2,
        qkv_multipliers=(0.25, 1.0),
    ),
}


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# Popen keywords for a child that a test sends SIGINT: Ctrl-C's handling as at a terminal.  A job
# a non-interactive shell starts with `&` begins with SIGINT ignored, its children inherit that and
# Python then installs no KeyboardInterrupt handler: the Ctrl-C tests timed out (or, with rc 0
# allowed, passed without testing anything) under `sh -c 'bash .ci/run' &`.
INTERRUPTIBLE = {"preexec_fn": _default_sigint}


def small_config(name: str) -> OpenELMConfig:
    return OpenELMConfig.scaled(**SMALL_CONFIGS[name])


def random_weights(config: OpenELMConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 weights in HF names; scaled like a trained model so logits are not flat."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in config.weight_shapes().items():
        if len(shape) == 1:  # norm weights: around 1, not exactly 1, so a skipped norm shows
            w = 1.0 + 0.2 * rng.standard_normal(shape)
        elif "token_embeddings" in name or name == "lm_head.weight":
            w = rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[1])
        weights[name] = w.astype(np.float32)
    return weights


def build_model(config: OpenELMConfig, weights: dict[str, np.ndarray], dtype=mx.float32) -> OpenELM:
    model = OpenELM(config)
    model.load_weights([(k, mx.array(v).astype(dtype)) for k, v in weights.items()])
    runtime.prepare(model)  # as load() does
    mx.eval(model.parameters())
    return model


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    """Max absolute error relative to the logit scale (max |ref|)."""
    return float(np.abs(np.asarray(a, np.float64) - ref).max() / np.abs(ref).max())


def train_tokenizer(path, vocab_size: int, seed: int = 0) -> None:
    """A real SentencePiece model of exactly ``vocab_size`` pieces, trained on seeded pseudo-words."""
    from openelm_mlx.tokenizer import train_sentencepiece

    rng = np.random.default_rng(seed)
    letters = list("etaoinshrdlucmfwypvbgkjqxz")
    words = ["".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(600)]
    sentences = [" ".join(rng.choice(words, rng.integers(4, 15))).capitalize() + "." for _ in range(3000)]
    train_sentencepiece(sentences, vocab_size, path)


# --- checkpoints in Apple's layouts -------------------------------------------------------------
def require_torch():
    """torch for writing real torch.save files; CI sets OPENELM_REQUIRE_TORCH so a missing torch fails."""
    import os

    import pytest

    if os.environ.get("OPENELM_REQUIRE_TORCH"):
        import torch

        return torch
    return pytest.importorskip("torch")


def require_lm_eval():
    """lm-eval (the [eval] extra); CI sets OPENELM_REQUIRE_EVAL so a missing lm-eval fails instead of skipping."""
    import os

    import pytest

    if os.environ.get("OPENELM_REQUIRE_EVAL"):
        import lm_eval

        return lm_eval
    return pytest.importorskip("lm_eval")


def _shards(weights: dict, n: int) -> list[dict]:
    names = list(weights)
    size = -(-len(names) // n)
    return [{k: weights[k] for k in names[i : i + size]} for i in range(0, len(names), size)]


def write_hf_folder(
    folder, config, weights, fmt="safetensors", shards=1, dtype="float32", tokenizer=True, config_overrides=None
):
    """An HF OpenELM folder: config.json + model.safetensors / pytorch_model.bin, optionally sharded."""
    import json
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # An untied HF checkpoint says so twice, as Apple's code needs (tests/test_apple_layouts.py);
    # an override of None leaves a key out.
    raw = {**config.to_dict(), **({} if config.share_input_output_layers else {"tie_word_embeddings": False})}
    raw = {k: v for k, v in {**raw, **(config_overrides or {})}.items() if v is not None}
    (folder / "config.json").write_text(json.dumps(raw))
    parts = _shards(weights, shards)
    if fmt == "safetensors":
        torch = require_torch() if dtype == "bfloat16" else None
        if torch is not None:
            from safetensors.torch import save_file as save_torch

            def save(d, p):
                save_torch({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in d.items()}, str(p))
        else:
            from safetensors.numpy import save_file as save_np

            def save(d, p):
                save_np({k: v.astype(dtype) for k, v in d.items()}, str(p))

        stem, ext, index = "model", "safetensors", "model.safetensors.index.json"
    else:
        torch = require_torch()
        tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]

        def save(d, p):
            torch.save({k: torch.from_numpy(v).to(tdtype) for k, v in d.items()}, str(p))

        stem, ext, index = "pytorch_model", "bin", "pytorch_model.bin.index.json"
    if shards == 1:
        save(parts[0], folder / f"{stem}.{ext}")
    else:
        weight_map = {}
        for i, part in enumerate(parts):
            fname = f"{stem}-{i + 1:05d}-of-{len(parts):05d}.{ext}"
            save(part, folder / fname)
            weight_map.update(dict.fromkeys(part, fname))
        (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if tokenizer:
        train_tokenizer(folder / "tokenizer.model", config.vocab_size)
    return folder


def write_apple_untied(folder, config, weights, tie_word_embeddings=None, fmt="safetensors", seed=7):
    """What Apple's HF code saves with ``share_input_output_layers: false``: OpenELMModel's unused
    ``transformer.classifier.weight`` always; ``lm_head.weight`` only when ``tie_word_embeddings``
    is false too (transformers' default, true, ties lm_head to the embedding and save_pretrained
    drops it). ``config`` and ``weights`` describe the model as it runs (tied unless both are false);
    ``tie_word_embeddings=None`` leaves the key out of config.json, as Apple's configuration does."""
    untied = tie_word_embeddings is False
    assert config.share_input_output_layers is not untied, "pass the config as Apple's code runs it"
    rng = np.random.default_rng(seed)
    saved = {k: v for k, v in weights.items() if k != "lm_head.weight" or untied}
    saved["transformer.classifier.weight"] = rng.standard_normal((config.vocab_size, config.model_dim)).astype(
        np.float32
    )
    overrides = {"share_input_output_layers": False, "tie_word_embeddings": tie_word_embeddings}
    return write_hf_folder(folder, config, saved, fmt=fmt, tokenizer=False, config_overrides=overrides)


def std_weights(config: OpenELMConfig, std: float = 0.02, seed: int = 0) -> dict[str, np.ndarray]:
    """Weights as Apple's initialiser draws them: N(0, std) matrices, norms at 1 (float32)."""
    rng = np.random.default_rng(seed)
    return {
        n: np.ones(s, np.float32) if len(s) == 1 else rng.standard_normal(s, dtype=np.float32) * np.float32(std)
        for n, s in config.weight_shapes().items()
    }


def write_corenet_checkpoint(path, weights, training=False, dtype="float32"):
    """CoreNet's checkpoint_*.pt: names without 'transformer.', vocabulary padded to 32128 rows,
    an untied head named classifier.weight; training checkpoints wrap it with optimizer state."""
    from collections import OrderedDict

    torch = require_torch()
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    sd = OrderedDict()
    for name, w in weights.items():
        name = "classifier.weight" if name == "lm_head.weight" else name[len("transformer.") :]
        t = torch.from_numpy(w).to(tdtype)
        if name in ("token_embeddings.weight", "classifier.weight"):
            t = torch.cat([t, torch.randn(32128 - t.shape[0], t.shape[1]).to(tdtype)])
        sd[name] = t
    obj = sd
    if training:
        obj = {
            "epoch": 3,
            "iterations": 5000,
            "model_state_dict": sd,
            "optim_state_dict": {
                "state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(4)}},
                "param_groups": [{"lr": 1e-3, "params": [0]}],
            },
            "best_metric": 2.5,
        }
    torch.save(obj, str(path))
    return path


def corenet_config(**overrides):
    """A small layer-wise-scaled config with the real vocabulary (CoreNet pads it to 32128)."""
    return OpenELMConfig.scaled(num_transformer_layers=3, model_dim=64, head_dim=16, vocab_size=32000, **overrides)


@contextmanager
def running_server(models: dict, settings=None, **kw):
    """``openelm-mlx serve``'s real uvicorn server on a free loopback port, in a thread; yields its URL."""
    import threading
    import time

    from openelm_mlx.server.cli import build_server

    server = build_server(models, settings=settings, log_level="warning", **kw)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.sock.getsockname()[1]}"
    finally:
        server.stop()
        thread.join(30)
        assert not thread.is_alive()


def openai_error(r, status: int, param: str | None = None) -> str:
    """Assert ``r`` (an httpx response) is an OpenAI-shaped error with this status (and field);
    its message."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param
    return err["message"]


def response_head(sock) -> bytes:
    """What a raw socket receives up to the end of the HTTP response head (or until the server
    closes or resets the connection)."""
    answer = b""
    try:
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    except (ConnectionResetError, TimeoutError):
        pass
    return answer
