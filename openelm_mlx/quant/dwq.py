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
data set's.  The held-out rows are scored before and after: if training made them worse (too
high a learning rate, too little data) the starting point is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..model import OpenELM
from .kl import kl_per_token, log_probs, mean_kl
from .progress import Progress

# Defaults measured on the bundled model, 3-bit g64, rows of 256 tokens, batch 4 (held-out KL of
# plain rounding 0.0329): 30 steps at a relative rate of 1e-3 reached 0.0172, at 1e-2 0.0152;
# a step costs about 6 s on the shared 2-core box (1,024 tokens forward and back, and the teacher).
STEPS = 50
BATCH = 4
LEARNING_RATE = 1e-2


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


def distill(
    student: OpenELM, teacher: OpenELM, train: mx.array, held_out: mx.array, opts: Options, progress: Progress
) -> dict:
    """Train ``student`` in place; returns the figures for the recipe."""
    _trainable(student)
    start = {k: v for k, v in tree_flatten(student.trainable_parameters())}
    before = mean_kl(student, teacher, held_out)
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
