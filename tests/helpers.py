"""Shared test helpers: small layer-wise-scaled configs and random weights."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from openelm_mlx import OpenELM, OpenELMConfig

# Small configs covering every architectural switch; query heads differ per layer in all.
SMALL_CONFIGS = {
    "tied": dict(num_transformer_layers=4, model_dim=128, head_dim=16, vocab_size=512),
    "untied": dict(
        num_transformer_layers=3, model_dim=96, head_dim=8, vocab_size=300, share_input_output_layers=False
    ),
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
    mx.eval(model.parameters())
    return model


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    """Max absolute error relative to the logit scale (max |ref|)."""
    return float(np.abs(np.asarray(a, np.float64) - ref).max() / np.abs(ref).max())


def train_tokenizer(path, vocab_size: int, seed: int = 0) -> None:
    """A real SentencePiece model (byte fallback, unk/bos/eos = 0/1/2) of exactly ``vocab_size`` pieces."""
    import io

    import sentencepiece as spm

    rng = np.random.default_rng(seed)
    letters = list("etaoinshrdlucmfwypvbgkjqxz")
    words = ["".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(600)]
    sentences = [" ".join(rng.choice(words, rng.integers(4, 15))).capitalize() + "." for _ in range(3000)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    with open(path, "wb") as f:
        f.write(buf.getvalue())
