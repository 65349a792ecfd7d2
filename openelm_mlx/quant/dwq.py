"""DWQ: distil the float model into the quantized one by training only what quantization keeps
continuous, each quantized module's scales and biases and the (unquantized) RMSNorm weights,
to minimise KL(teacher || student) on calibration rows.

Adam's step is about the learning rate in absolute terms, whatever the gradient's size, while a
scale is (max - min) / (2^bits - 1): at 8 bits a hundred times smaller than at 2.  So each
parameter's step is multiplied by its starting magnitude (``|scale|`` for a module's scales
and biases, ``|weight|`` for a norm): the learning rate is a relative change per step, and one
rate serves every width (a plain absolute 1e-4 made a 3-to-8-bit mixed model ten times worse).

The integer levels stay as rounded (plainly or by GPTQ); the teacher's logits are computed for
each batch as it comes and dropped after the step, so memory is one batch of logits, not the
data set's.  The held-out rows are scored after training (the caller gives the score before):
if training made them worse (too high a learning rate, too little data) the starting point is kept.

Training does not go through MLX's quantized matmul: on the CPU it is a single-threaded kernel,
and its backward pass is as slow (bundled model, 4 rows of 256 tokens, 3-bit: a forward and
backward step took 16.1 s through it against 1.7 s this way, loaded box).  Each quantized module's
integer levels are unpacked once (uint8, a quarter of the float weights' memory) and each step
multiplies the input by ``levels * scales + biases`` with the BLAS: the same weights as
``mx.dequantize`` gives (bit for bit), so the same loss and gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..model import OpenELM, QuantizedEmbedding, QuantizedLinear
from .kl import kl_per_token, log_probs, mean_kl
from .progress import Progress

# Defaults measured on the bundled model, g64, rows of 256 tokens, all 128 calibration rows.
# Steps and rows (3-bit, held-out KL on the calibration slice, plain rounding 0.0321): 4 rows a
# step at a relative rate of 1e-2: 20 steps 0.0157, 30 steps 0.0128, 50 steps 0.0114; 50 steps of
# 2 rows 0.0125, better than 30 of 4 for fewer tokens.  The cost is the tokens: a step is a
# teacher forward and a student forward and backward, about 4x a forward's work, so on the 270M
# shape a 4-row step took 55 s on the shared 2-core box (load 3-4) and 50 of them would not fit
# the 30 minutes; 50 steps of 2 rows (25,600 tokens) took 14.9 minutes in all there
# (load 2-3; MLX peak 5.4 GB; BENCHMARKS.md).
# The rate (50 steps of 2 rows, mean KL against float32 on kjv-valid.txt, BENCHMARKS.md's slice):
#   4-bit: 1e-3 0.00243, 2e-3 0.00229, 3e-3 0.00224, 5e-3 0.00256, 1e-2 0.00346, 2e-2 no gain
#   3-bit: 3e-3 0.01117, 5e-3 0.01046, 1e-2 0.01112
#   2-bit: 3e-3 0.05003, 5e-3 0.04845, 1e-2 0.06017
# 5e-3 is best at 3 and 2 bits and within 15% of the best at 4.  (A temperature of 2 on both
# distributions, mlx-lm's loss, was worse at 1e-2: 4-bit 0.00476, 3-bit 0.01154.)
STEPS = 50
BATCH = 2
LEARNING_RATE = 5e-3


@dataclass
class Options:
    steps: int = STEPS
    batch: int = BATCH
    learning_rate: float = LEARNING_RATE
    seed: int = 0


BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # Adam's usual constants


def _units(start: dict[str, mx.array]) -> dict[str, mx.array]:
    """Each trainable parameter's scale of change: its module's |scales|, or a norm's |weight|."""
    units = {}
    for k, v in start.items():
        module, leaf = k.rsplit(".", 1)
        base = start[f"{module}.scales"] if leaf in ("scales", "biases") else v
        units[k] = mx.maximum(mx.abs(base), 1e-6)  # a zero scale (a constant group) still moves a little
    return units


def _trainable(model: OpenELM) -> None:
    model.freeze()

    def unfreeze(_, m: nn.Module) -> None:
        if isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding) and m.mode == "affine":
            m.unfreeze(keys=["scales", "biases"], recurse=False)
        elif isinstance(m, nn.RMSNorm):
            m.unfreeze(keys=["weight"], recurse=False)

    model.apply_to_modules(unfreeze)


class _Levels:
    """A quantized module's matmul plug-in while training (``routes``): its integer levels, unpacked
    once, times the current scales plus biases, then the BLAS matmul; differentiable in both."""

    def __init__(self, m: QuantizedLinear | QuantizedEmbedding):
        ones, zeros = mx.ones_like(m.scales), mx.zeros_like(m.scales)
        self.levels = mx.dequantize(m.weight, ones, zeros, group_size=m.group_size, bits=m.bits).astype(mx.uint8)

    def quantized_matmul_t(
        self, x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int, mode: str
    ) -> mx.array:
        rows, groups = scales.shape
        q = self.levels.reshape(rows, groups, group_size).astype(scales.dtype)
        return x @ (q * scales[..., None] + biases[..., None]).reshape(rows, -1).T


def _training_routes(model: OpenELM) -> list[tuple[nn.Module, object]]:
    """Swap each affine quantized module's plug-in for a ``_Levels``; returns the ones to restore."""
    saved = []
    for _, m in model.named_modules():
        if isinstance(m, QuantizedLinear | QuantizedEmbedding) and m.mode == "affine":
            saved.append((m, m.routes))
            m.routes = _Levels(m)
            mx.eval(m.routes.levels)
    return saved


def distill(
    student: OpenELM,
    teacher: OpenELM,
    train: mx.array,
    held_out: mx.array,
    opts: Options,
    progress: Progress,
    before: float | None = None,
) -> dict:
    """Train ``student`` in place; returns the figures for the recipe.  ``before``: the student's
    held-out KL if the caller has it already (scored here otherwise)."""
    if before is None:
        before = mean_kl(student, teacher, held_out)
    _trainable(student)
    start = {k: v for k, v in tree_flatten(student.trainable_parameters())}
    routes = _training_routes(student)
    units = _units(start)
    adam = {k: (mx.zeros_like(v), mx.zeros_like(v)) for k, v in start.items()}
    rng = np.random.default_rng(opts.seed)

    def loss_fn(model: OpenELM, x: mx.array, target: mx.array) -> mx.array:
        return kl_per_token(target, model(x)).mean()

    step = nn.value_and_grad(student, loss_fn)
    order: list[int] = []
    progress.start("dwq: distilling", opts.steps, "steps")
    running, t = None, 0
    for _ in range(opts.steps):
        if len(order) < opts.batch:  # a fresh shuffle of the rows each epoch
            order += rng.permutation(train.shape[0]).tolist()
        idx, order = order[: opts.batch], order[opts.batch :]
        x = train[mx.array(idx)]
        target = mx.stop_gradient(log_probs(teacher(x)))
        loss, grads = step(student, x, target)
        t += 1
        params = dict(tree_flatten(student.trainable_parameters()))
        new = {}
        for k, g in tree_flatten(grads):
            m, v = adam[k]
            m, v = BETA1 * m + (1 - BETA1) * g, BETA2 * v + (1 - BETA2) * g * g
            adam[k] = (m, v)
            step_size = opts.learning_rate * units[k] * (1 - BETA2**t) ** 0.5 / (1 - BETA1**t)
            new[k] = params[k] - step_size * m / (mx.sqrt(v) + EPS)
        student.update(tree_unflatten(list(new.items())))
        mx.eval(loss, list(new.values()), list(adam.values()))
        running = float(loss) if running is None else 0.9 * running + 0.1 * float(loss)
        progress.step(kl=running)
    seconds = progress.done()
    for m, r in routes:
        m.routes = r
    after = mean_kl(student, teacher, held_out)
    kept = after <= before
    if not kept:
        student.update(tree_unflatten(list(start.items())))
    student.unfreeze()
    return {
        "steps": opts.steps,
        "batch_size": opts.batch,
        "learning_rate": opts.learning_rate,
        "seq_len": int(train.shape[1]),
        "held_out_kl_before": round(before, 6),
        "held_out_kl_after": round(after, 6),
        "kept": "trained" if kept else "start (training did not lower the held-out KL)",
        "seconds": round(seconds, 1),
    }
