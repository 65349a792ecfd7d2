"""``convert -q --calibrate METHOD[,METHOD]``: the methods in their fixed order, dynamic bit
allocation, then GPTQ rounding, then DWQ distillation, on a float model in memory, giving the
weights to write, the per-module specs and the recipe for config.json."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .. import runtime
from ..convert.quantize import QuantSpec, quantize_weight
from ..errors import OpenELMError
from ..loading import quantization_predicate
from ..model import OpenELM
from ..tokenizer import Tokenizer
from . import data as calibration_data
from . import dwq, dynamic, gptq
from .kl import mean_kl
from .progress import Progress

METHODS = ("dynamic", "gptq", "dwq")
SEQ_LEN = 256  # tokens per calibration row (the bundled model's context is 512)
SAMPLES = 128  # calibration rows at most: 32,768 tokens at 256
SENSITIVITY_ROWS = 4  # rows scored per module by dynamic (1,024 tokens at 256)
GPTQ_BATCH = 8  # rows per forward pass while collecting the Hessians


@dataclass
class Options:
    methods: tuple[str, ...]
    data: str | None = None  # None: the bundled KJV training excerpt
    seq_len: int = SEQ_LEN
    samples: int = SAMPLES
    target_bpw: float | None = None
    dwq: dwq.Options = field(default_factory=dwq.Options)
    seed: int = 0
    progress: bool = True


def parse_methods(text: str) -> tuple[str, ...]:
    """``"gptq,dwq"`` -> ("gptq", "dwq"), in the order they run."""
    given = [m.strip().lower() for m in text.split(",") if m.strip()]
    unknown = [m for m in given if m not in METHODS]
    if unknown or not given:
        raise OpenELMError(f"--calibrate {text}: unknown method {unknown[0] if unknown else '(none)'}; "
                           f"choose from {', '.join(METHODS)}, comma-separated to combine")  # fmt: skip
    return tuple(m for m in METHODS if m in given)


@dataclass
class Result:
    weights: dict[str, mx.array]
    modules: dict[str, QuantSpec | None]
    recipe: dict


def calibrate(
    model: OpenELM,
    tokenizer: Tokenizer,
    modules: dict[str, QuantSpec | None],
    opts: Options,
    log: Callable[[str], None],
) -> Result:
    """Quantize the float ``model`` (left unchanged) with ``opts.methods``; ``modules`` is the plain plan."""
    mx.random.seed(opts.seed)
    if "dynamic" in opts.methods and opts.target_bpw is None:
        raise OpenELMError("--calibrate dynamic needs --target-bpw (say 4.5: between 3- and 4-bit at group size 64)")
    if opts.target_bpw is not None and "dynamic" not in opts.methods:
        raise OpenELMError("--target-bpw is for --calibrate dynamic")
    if any(s is not None and s.mode != "affine" for s in modules.values()):
        raise OpenELMError("--calibrate needs --q-mode affine (its scales and biases are what GPTQ and DWQ set)")
    data = calibration_data.load(opts.data, tokenizer, opts.seq_len, opts.samples)
    log(f"calibration data: {data.describe()}")
    progress = Progress(opts.progress)
    recipe: dict = {
        "methods": list(opts.methods),
        "data": data.path,
        "data_sha256": data.sha256,
        "sequences": int(data.train.shape[0]),
        "held_out_sequences": int(data.held_out.shape[0]),
        "seq_len": data.seq_len,
        "seed": opts.seed,
    }
    if "dynamic" in opts.methods:
        rows = data.train[:SENSITIVITY_ROWS]
        t0 = time.perf_counter()
        modules, recipe["dynamic"] = dynamic.allocate(model, modules, opts.target_bpw, rows, progress)
        recipe["dynamic"]["seconds"] = round(time.perf_counter() - t0, 1)
        d = recipe["dynamic"]
        log(f"dynamic: {d['bpw']} bits per weight (target {d['target_bpw']}): {d['modules_per_width']}")
    dtype = model.transformer.token_embeddings.weight.dtype
    solved = {}
    if "gptq" in opts.methods:
        timing: dict[str, float] = {}
        solved = gptq.quantize(model, modules, data.train, GPTQ_BATCH, progress, dtype, timing)
        recipe["gptq"] = {"damp": gptq.DAMP, "seconds": round(timing["seconds"], 1),
                          "solve_seconds": round(timing["solve_seconds"], 1)}  # fmt: skip
        log(
            f"gptq: {len(solved)} modules solved in {timing['seconds']:.0f} s ({timing['solve_seconds']:.0f} s solving)"
        )
    student = _student(model, modules, solved)
    # Each held-out scoring is a teacher and a student forward pass over every held-out row, so
    # none is repeated: plain rounding's, the starting point's (if GPTQ changed it), DWQ's result.
    t0 = time.perf_counter()
    plain = _student(model, modules, {}) if solved else student
    rtn = mean_kl(plain, model, data.held_out)
    recipe["held_out_kl_round_to_nearest"] = round(rtn, 6)
    del plain
    kl = mean_kl(student, model, data.held_out) if solved else rtn
    recipe["scoring_seconds"] = round(time.perf_counter() - t0, 1)  # the held-out scorings before DWQ
    if "dwq" in opts.methods:
        d = dwq.distill(student, model, data.train, data.held_out, opts.dwq, progress, before=kl)
        recipe["dwq"] = d
        log(f"dwq: held-out KL {d['held_out_kl_before']:.5f} -> {d['held_out_kl_after']:.5f} in {d['seconds']} s")
        kl = min(d["held_out_kl_before"], d["held_out_kl_after"])  # the kept model's
    recipe["held_out_kl"] = round(kl, 6)
    log(
        f"calibrated: held-out KL {recipe['held_out_kl']:.5f} "
        f"(round-to-nearest at the same bits {recipe['held_out_kl_round_to_nearest']:.5f})"
    )
    weights = dict(tree_flatten(student.parameters()))
    return Result(weights, modules, recipe)


def _student(model: OpenELM, modules: dict[str, QuantSpec | None], solved: dict[str, dict[str, mx.array]]) -> OpenELM:
    """A quantized copy of ``model``: GPTQ's tensors where given, else plain rounding."""
    weights = {}
    for name, value in tree_flatten(model.parameters()):
        module = name.rsplit(".", 1)[0]
        spec = modules.get(module)
        if spec is None:
            weights[name] = value
        elif module in solved:
            weights.update({f"{module}.{k}": v for k, v in solved[module].items()})
        else:
            weights.update(quantize_weight(module, value, spec))
    student = OpenELM(model.config)
    block = {"group_size": 64, "bits": 4}  # defaults never used: every quantized module has its entry
    block.update({m: s.as_dict() for m, s in modules.items() if s is not None})
    nn.quantize(student, class_predicate=quantization_predicate(block, weights))
    student.load_weights(list(weights.items()))
    mx.eval(student.parameters())
    # The teacher's matmul plug-in (on the CPU: dequantize and BLAS for many rows, not MLX's
    # single-threaded quantized kernel; a held-out scoring of the bundled model at 3 bits, 13 rows of
    # 256 tokens, took 23 s through the plain MLX layers on the loaded box).
    runtime.prepare(student, runtime.of(model))
    return student
