"""The training loop: AdamW (betas 0.9/0.95) on a warmup + cosine schedule, gradient accumulation
and checkpointing, periodic validation, atomic checkpoints that resume exactly, and data
parallelism over ``mx.distributed``.

The loss is the mean next-token cross-entropy over every trained token of one optimizer step:
all micro-batches (``--grad-accumulation-steps``) and all processes together.  Each micro-batch
contributes the gradient of its summed loss; at the update the sums of all processes are added
(``mx.distributed`` collectives) and divided by the step's global token count.  So 2 processes
with half the rows each, or 2 accumulated half batches, compute the same update as one process
with the whole batch (up to float rounding), whatever the padding.

An iteration is one optimizer update.  Batches are drawn as a function of the draw index (see
datasets.batch_order) and dropout is seeded per draw, so a run resumed from a checkpoint (its
adapters, optimizer state and step) continues the same loss curve as one never stopped.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from ..errors import OpenELMError
from ..model import TransformerBlock
from . import datasets
from .lora import trainable_weights

STATE_FORMAT = "openelm-mlx-train-state-1"


@dataclass
class TrainConfig:
    iters: int = 1000
    batch_size: int = 8
    learning_rate: float = 3e-4
    lr_schedule: str = "cosine"  # cosine: warmup, then cosine decay to learning_rate / 10 (Apple's 3e-4 -> 3e-5)
    warmup: int | None = None  # None: 10% of iters
    weight_decay: float = 0.0
    grad_accumulation_steps: int = 1
    grad_checkpoint: bool = False
    max_seq_length: int = 2048
    steps_per_report: int = 10
    steps_per_eval: int = 200
    val_batches: int = 25
    save_every: int = 100
    seed: int = 0


@dataclass
class TrainResult:
    step: int
    train_losses: list[tuple[int, float]] = field(default_factory=list)  # (iteration, mean loss of the report window)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    tokens_per_second: float = 0.0
    peak_memory_gb: float = 0.0
    interrupted: bool = False


def check_config(cfg: TrainConfig) -> None:
    for name in ("iters", "batch_size", "grad_accumulation_steps", "max_seq_length", "steps_per_report"):
        if getattr(cfg, name) < (0 if name == "iters" else 1):
            raise OpenELMError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least 1")
    if cfg.max_seq_length < 2:
        raise OpenELMError(f"--max-seq-length {cfg.max_seq_length}: must be at least 2")
    if cfg.lr_schedule not in ("cosine", "constant"):
        raise OpenELMError(f"--lr-schedule {cfg.lr_schedule}: choose cosine or constant")
    if cfg.learning_rate <= 0:
        raise OpenELMError(f"--learning-rate {cfg.learning_rate}: must be positive")
    if cfg.warmup is not None and not 0 <= cfg.warmup <= cfg.iters:
        raise OpenELMError(f"--warmup {cfg.warmup}: must be between 0 and --iters {cfg.iters}")


def schedule(cfg: TrainConfig) -> Callable[[mx.array], mx.array] | float:
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    warmup = cfg.iters // 10 if cfg.warmup is None else cfg.warmup
    decay = optim.cosine_decay(cfg.learning_rate, max(1, cfg.iters - warmup), cfg.learning_rate / 10)
    if warmup == 0:
        return decay
    # Step k (0-based) of warmup trains at lr * (k + 1) / warmup: no update at a zero rate.
    ramp = optim.linear_schedule(cfg.learning_rate / warmup, cfg.learning_rate, max(1, warmup - 1))
    return optim.join_schedules([ramp, decay], [warmup])


def make_optimizer(cfg: TrainConfig) -> optim.Optimizer:
    return optim.AdamW(learning_rate=schedule(cfg), betas=[0.9, 0.95], weight_decay=cfg.weight_decay)


def loss(model: nn.Module, tokens: mx.array, spans: mx.array) -> tuple[mx.array, mx.array]:
    """(mean next-token cross-entropy over the trained targets, their count).

    Callers weight it by the count to get sums.  (Written as mlx_lm writes its loss: computing the
    mean here rather than a sum measured 20 MB less peak memory in the compiled training step.)"""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits = model(inputs)
    mask = datasets.target_mask(spans, targets.shape[1])
    ce = nn.losses.cross_entropy(logits, targets) * mask
    count = mask.sum()
    return ce.astype(mx.float32).sum() / mx.maximum(count, 1), count


class _CheckpointedBlock(TransformerBlock):
    """A block that recomputes its activations in the backward pass (``--grad-checkpoint``)."""

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        def inner(params, x):
            self.update(params)
            return TransformerBlock.__call__(self, x, cache)

        return mx.checkpoint(inner)(self.trainable_parameters(), x)


def enable_grad_checkpoint(model: nn.Module) -> None:
    for block in model.layers:
        block.__class__ = _CheckpointedBlock


def _all_sum(x: mx.array, world: int) -> mx.array:
    return mx.distributed.all_sum(x, stream=mx.cpu) if world > 1 else x


def evaluate(model: nn.Module, ds: datasets.Dataset, cfg: TrainConfig, num_batches: int = -1) -> float:
    """Mean loss per token over ``num_batches`` fixed batches (-1: all), split over the processes."""
    group = mx.distributed.init()
    rank, world = group.rank(), group.size()
    size = min(cfg.batch_size, len(ds) // world * world)
    if size < 1:
        raise OpenELMError(f"{ds.source}: {len(ds)} examples, fewer than the {world} processes")
    groups = datasets.length_batches(ds, size)
    order = range(len(groups)) if num_batches == -1 else range(min(num_batches, len(groups)))
    was_training = model.training
    model.eval()
    total, count = mx.array(0.0), mx.array(0.0)
    for k in order:
        batch = datasets.make_batch(
            ds, groups[datasets.batch_order(len(groups), 0, k)], cfg.max_seq_length, rank, world
        )
        mean, n = loss(model, *batch)
        total, count = total + mean * n, count + n
        mx.eval(total, count)
    model.train(was_training)
    sums = _all_sum(mx.stack([total, count]), world)
    return (sums[0] / sums[1]).item()


# --- checkpoints ----------------------------------------------------------------------------------


def state_file(adapter_file: Path) -> Path:
    """Where the optimizer state and step of ``X.safetensors`` go: ``X_state.safetensors`` beside it."""
    return adapter_file.with_name(adapter_file.stem + "_state.safetensors")


def atomic_save(path: Path, arrays: dict[str, mx.array], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file so that a reader (or a crash) never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.safetensors")  # MLX wants the suffix
    try:
        mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        raise OpenELMError(f"cannot write {path} ({e}); is the disk full?") from None


def save_checkpoint(model: nn.Module, optimizer: optim.Optimizer, step: int, file: Path) -> None:
    atomic_save(file, trainable_weights(model), {"format": "mlx", "step": str(step)})
    opt = dict(tree_flatten(optimizer.state))
    atomic_save(state_file(file), opt, {"format": STATE_FORMAT, "step": str(step)})


def restore(model: nn.Module, optimizer: optim.Optimizer, file: Path, log: Callable[[str], None]) -> int:
    """Load adapters from ``file`` and, when its state file is beside it, the optimizer; returns the step."""
    from .lora import load_adapter_weights

    load_adapter_weights(model, file)
    sfile = state_file(file)
    if not sfile.is_file():
        log(f"no training state ({sfile.name}) beside {file}: training these weights from step 0")
        return 0
    try:
        saved, meta = mx.load(str(sfile), return_metadata=True)
    except Exception as e:  # MLX raises ValueError/RuntimeError on bad files
        raise OpenELMError(f"{sfile}: cannot load safetensors ({e})") from None
    if meta.get("format") != STATE_FORMAT or "step" not in meta:
        raise OpenELMError(f"{sfile}: not an openelm-mlx training state")

    def take(path: str, current: mx.array) -> mx.array:
        if path not in saved or saved[path].shape != current.shape:
            raise OpenELMError(f"{sfile}: optimizer state {path} is missing or has another shape")
        return saved[path]

    optimizer.state = tree_map_with_path(take, optimizer.state)
    return int(meta["step"])


# --- the loop -------------------------------------------------------------------------------------


def train(
    model: nn.Module,
    data: dict[str, datasets.Dataset],
    cfg: TrainConfig,
    adapter_dir: Path | None = None,
    resume: Path | None = None,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> TrainResult:
    """Train ``model``'s trainable parameters; rank 0 writes ``adapter_dir/adapters.safetensors``
    (and every ``save_every`` iterations a numbered checkpoint).  Ctrl-C saves and returns."""
    check_config(cfg)
    group = mx.distributed.init()
    rank, world = group.rank(), group.size()
    say = log if rank == 0 else (lambda s: None)
    optimizer = make_optimizer(cfg)
    optimizer.init(model.trainable_parameters())
    start = restore(model, optimizer, Path(resume), say) if resume else 0
    if start > cfg.iters:
        raise OpenELMError(f"--resume-adapter-file {resume} is at iteration {start}, past --iters {cfg.iters}")
    if cfg.grad_checkpoint:
        enable_grad_checkpoint(model)
    value_and_grad = nn.value_and_grad(model, loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, spans, acc_grads, acc_tokens, update):
        (mean, tokens), grads = value_and_grad(model, batch, spans)
        grads = tree_map(lambda g: g * tokens, grads)  # the gradient of the summed loss
        if acc_grads is not None:
            grads = tree_map(mx.add, grads, acc_grads)
            tokens_so_far = tokens + acc_tokens
        else:
            tokens_so_far = tokens
        if not update:
            return mean * tokens, tokens, grads, tokens_so_far
        if world > 1:  # the sums of every process (average_gradients packs them into few messages)
            grads = tree_map(lambda g: g * world, nn.utils.average_gradients(grads))
            tokens_so_far = mx.distributed.all_sum(tokens_so_far)
        optimizer.update(model, tree_map(lambda g: g / tokens_so_far, grads))
        return mean * tokens, tokens, None, None

    micro = cfg.grad_accumulation_steps
    if cfg.batch_size % world:
        raise OpenELMError(f"--batch-size {cfg.batch_size} must be a multiple of the {world} processes")
    # One draw per update: batch_size x micro similar-length rows; micro-batch k takes rows k::micro
    # and this process its share of those, so accumulation and processes split one global batch.
    groups = datasets.iterate(data["train"], cfg.batch_size * micro, cfg.seed, start)
    result = TrainResult(step=start)
    valid = data.get("valid")

    def validate(it: int) -> None:
        if valid is None or cfg.val_batches == 0:
            return
        tic = time.perf_counter()
        loss = evaluate(model, valid, cfg, cfg.val_batches)
        result.val_losses.append((it, loss))
        say(f"iter {it}: val loss {loss:.4f}, val ppl {math.exp(loss):.3f} ({time.perf_counter() - tic:.1f} s)")

    def save(it: int, numbered: bool) -> None:
        if rank != 0 or adapter_dir is None:
            return
        if numbered:
            save_checkpoint(model, optimizer, it, adapter_dir / f"{it:07d}_adapters.safetensors")
        save_checkpoint(model, optimizer, it, adapter_dir / "adapters.safetensors")

    if start == 0:
        validate(0)
    model.train()
    window_loss, window_tokens = mx.array(0.0), mx.array(0.0)
    window_time, window_iters, total_time, total_tokens = 0.0, 0, 0.0, 0.0
    mx.reset_peak_memory()
    it = start
    try:
        for it in range(start + 1, cfg.iters + 1):
            tic = time.perf_counter()
            acc: tuple = (None, None)
            rows = next(groups)
            for k in range(micro):
                mx.random.seed(cfg.seed * 1_000_003 + (it - 1) * micro + k)  # dropout: a function of the draw
                batch = datasets.make_batch(data["train"], rows[k::micro], cfg.max_seq_length, rank, world)
                summed, tokens, *acc = step(*batch, *acc, k == micro - 1)
                if k == micro - 1:  # the update is in the graph now: saving from here on saves it
                    result.step = it
                window_loss, window_tokens = window_loss + summed, window_tokens + tokens
                mx.eval(state, window_loss, window_tokens, acc)
            window_time, window_iters = window_time + time.perf_counter() - tic, window_iters + 1
            if it % cfg.steps_per_report == 0 or it == cfg.iters:
                sums = _all_sum(mx.stack([window_loss, window_tokens]), world).tolist()
                total_time, total_tokens = total_time + window_time, total_tokens + sums[1]
                result.train_losses.append((it, sums[0] / sums[1]))
                result.peak_memory_gb = mx.get_peak_memory() / 1e9
                result.tokens_per_second = total_tokens / total_time
                lr = optimizer.learning_rate
                say(
                    f"iter {it}/{cfg.iters}: train loss {sums[0] / sums[1]:.4f}, "
                    f"lr {float(lr.item() if isinstance(lr, mx.array) else lr):.3e}, "
                    f"{sums[1] / window_time:,.0f} tokens/s, {window_iters / window_time:.2f} it/s, "
                    f"peak memory {result.peak_memory_gb:.3f} GB"
                )
                window_loss, window_tokens, window_time, window_iters = mx.array(0.0), mx.array(0.0), 0.0, 0
            if it % cfg.steps_per_eval == 0 or it == cfg.iters:
                validate(it)
            if cfg.save_every and it % cfg.save_every == 0:
                save(it, numbered=True)
                say(f"iter {it}: saved checkpoint {it:07d}_adapters.safetensors")
    except KeyboardInterrupt:
        result.interrupted = True
    save(result.step, numbered=False)
    if adapter_dir is not None:
        say(f"saved adapters of iteration {result.step} to {adapter_dir / 'adapters.safetensors'}")
    return result
