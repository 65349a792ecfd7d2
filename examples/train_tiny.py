"""Train the small OpenELM that ships with openelm-mlx, on the King James Bible, with MLX.

    python examples/train_tiny.py            # about 20 minutes on a 2-core CPU (with OpenBLAS)

MLX's CPU backend evaluates exp (in SiLU and softmax) at about 60M elements/s, which bounds
training speed here more than the matmuls do; hence a modest FFN ramp (0.5 to 2.5).

It builds a layer-wise-scaled OpenELM with the library's own ``OpenELMConfig.scaled`` and
``OpenELM`` (no second model definition), trains a SentencePiece tokenizer (BPE, byte
fallback) on the training split, trains the model with AdamW, reports the loss and the
held-out validation loss, and writes the checkpoint in Hugging Face's OpenELM layout
(config.json, model.safetensors, tokenizer.model) so that the quickstart runs it through
the real converter.  Every 40th chapter is held out (``openelm_mlx/bundled/kjv-valid.txt``).
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from openelm_mlx import OpenELM, OpenELMConfig
from openelm_mlx.tokenizer import train_sentencepiece

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "examples" / "data" / "kjv.txt.xz"
OUT = ROOT / "openelm_mlx" / "bundled" / "openelm-tiny-kjv"
VALID_EVERY = 40


def split_corpus() -> tuple[list[str], list[str]]:
    chapters = lzma.decompress(CORPUS.read_bytes()).decode().strip().split("\n\n")
    train = [c for i, c in enumerate(chapters) if i % VALID_EVERY != VALID_EVERY - 1]
    valid = [c for i, c in enumerate(chapters) if i % VALID_EVERY == VALID_EVERY - 1]
    return train, valid


def train_tokenizer(chapters: list[str], vocab_size: int, path: Path) -> None:
    train_sentencepiece((line for c in chapters for line in c.split("\n")), vocab_size, path, character_coverage=1.0)


def encode(chapters: list[str], tokenizer_path: Path) -> np.ndarray:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    ids: list[int] = []
    for c in chapters:  # each chapter starts with BOS, as generation will
        ids += [1] + sp.encode(c)
    return np.array(ids, dtype=np.int32)


def batches(data: np.ndarray, batch: int, seq: int, rng: np.random.Generator):
    while True:
        starts = rng.integers(0, len(data) - seq - 1, batch)
        x = np.stack([data[s : s + seq + 1] for s in starts])
        yield mx.array(x[:, :-1]), mx.array(x[:, 1:])


def loss_fn(model: OpenELM, x: mx.array, y: mx.array) -> mx.array:
    return nn.losses.cross_entropy(model(x), y, reduction="mean")


def evaluate(model: OpenELM, data: np.ndarray, seq: int) -> float:
    """Mean next-token loss over non-overlapping windows of the held-out tokens."""
    n = (len(data) - 1) // seq
    total = 0.0
    for i in range(0, n, 16):
        rows = range(i, min(n, i + 16))
        x = mx.array(np.stack([data[r * seq : r * seq + seq] for r in rows]))
        y = mx.array(np.stack([data[r * seq + 1 : r * seq + seq + 1] for r in rows]))
        total += nn.losses.cross_entropy(model(x), y, reduction="sum").item()
    return total / (n * seq)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    mx.random.seed(args.seed)
    rng = np.random.default_rng(args.seed)

    train_text, valid_text = split_corpus()
    args.out.mkdir(parents=True, exist_ok=True)
    tok_path = args.out / "tokenizer.model"
    print(f"training the tokenizer ({args.vocab} pieces) on {len(train_text)} chapters ...", flush=True)
    train_tokenizer(train_text, args.vocab, tok_path)
    train_ids, valid_ids = encode(train_text, tok_path), encode(valid_text, tok_path)
    (args.out.parent / "kjv-valid.txt").write_text("\n\n".join(valid_text) + "\n")
    print(f"tokens: {len(train_ids):,} train, {len(valid_ids):,} validation", flush=True)

    config = OpenELMConfig.scaled(
        num_transformer_layers=8,
        model_dim=256,
        head_dim=32,
        num_gqa_groups=2,
        ffn_multipliers=(0.5, 2.5),
        ffn_dim_divisor=64,
        vocab_size=args.vocab,
        max_context_length=512,
    )
    model = OpenELM(config)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"model: {n_params:,} parameters; query heads {config.num_query_heads}, FFN {config.ffn_dims}", flush=True)

    warmup = min(40, args.steps // 10)
    schedule = optim.join_schedules(
        [
            optim.linear_schedule(1e-5, args.lr, warmup),
            optim.cosine_decay(args.lr, args.steps - warmup, args.lr / 10),
        ],
        [warmup],
    )
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.1)
    step_fn = nn.value_and_grad(model, loss_fn)

    def train_step(x, y):
        loss, grads = step_fn(model, x, y)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        return loss

    state = [model.state, optimizer.state]
    train_step = mx.compile(train_step, inputs=state, outputs=state)
    data = batches(train_ids, args.batch, args.seq, rng)
    t0, smooth = time.time(), None
    for step in range(1, args.steps + 1):
        x, y = next(data)
        loss = train_step(x, y)
        mx.eval(state)
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        if step % 50 == 0 or step == 1:
            elapsed = time.time() - t0
            tps = step * args.batch * args.seq / elapsed
            eta = elapsed / step * (args.steps - step)
            print(
                f"step {step:5d}/{args.steps}  loss {smooth:.3f}  {tps:,.0f} tok/s  eta {eta / 60:.1f} min", flush=True
            )
        if step % 100 == 0 or step == args.steps:
            val = evaluate(model, valid_ids, args.seq)
            print(f"step {step:5d}  validation loss {val:.3f}  perplexity {math.exp(val):.2f}", flush=True)

    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(args.out / "model.safetensors"), weights, metadata={"format": "pt"})
    hf_config = {**config.to_dict(), "architectures": ["OpenELMForCausalLM"]}
    (args.out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    counts = np.bincount(train_ids, minlength=args.vocab) + 1
    unigram = -(np.log(counts / counts.sum())[valid_ids[1:]]).mean()
    print(f"wrote {args.out}; unigram baseline perplexity on validation {math.exp(unigram):.2f}", flush=True)


if __name__ == "__main__":
    main()
