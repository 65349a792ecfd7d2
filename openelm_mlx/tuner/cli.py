"""``openelm-mlx lora`` and ``openelm-mlx fuse``: argparse setup and the run functions.

Flag names are mlx_lm.lora's where they overlap; defaults are Apple's OpenELM PEFT recipe
(rank 32, alpha 32, dropout 0.1 on the embeddings and all four projections of every block,
AdamW 0.9/0.95, cosine from 3e-4 to 3e-5 after a warmup).  ``-c config.yaml`` takes the same
names with underscores (and mlx_lm's ``lora_parameters: {rank, alpha or scale, dropout, keys}``);
flags given on the command line win over the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from ..destinations import ADAPTER_FILES, check_replaceable, write_marker
from ..errors import OpenELMError
from .lora import ADAPTER_FILE, CONFIG_FILE, FINE_TUNE_TYPES, TARGETS
from .trainer import TrainConfig

DEFAULTS: dict[str, Any] = {
    "model": None,
    "data": None,
    "tokenizer": None,
    "fine_tune_type": "lora",
    "rank": 32,
    "alpha": 32.0,
    "dropout": 0.1,
    "targets": list(TARGETS),
    "num_layers": -1,
    "mask_prompt": False,
    "adapter_path": "adapters",
    "resume_adapter_file": None,
    "test": False,
    "test_batches": -1,
    "force": False,
    **{f.name: f.default for f in dataclasses.fields(TrainConfig)},
}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lora", help="fine-tune with LoRA, DoRA or fully (QLoRA on a quantized model)")
    p.add_argument("--model", help="base model: a converted directory or anything convert reads (default: bundled)")
    p.add_argument("--data", help="folder with train/valid[/test].jsonl, or a UTF-8 text file (.txt or .xz)")
    p.add_argument("--tokenizer", help="tokenizer.model to use instead of the model directory's")
    p.add_argument("--fine-tune-type", choices=FINE_TUNE_TYPES, help="lora (default), dora or full")
    p.add_argument("--rank", type=int, help="adapter rank (default 32)")
    p.add_argument("--alpha", type=float, help="adapter alpha; the scale is alpha / rank (default 32)")
    p.add_argument("--dropout", type=float, help="dropout on the adapters' input (default 0.1)")
    p.add_argument("--targets", nargs="+", metavar="NAME", help=f"modules to adapt (default all: {' '.join(TARGETS)})")
    p.add_argument("--num-layers", type=int, help="adapt the last N blocks (default -1: all)")
    p.add_argument("--iters", type=int, help="optimizer updates (default 1000)")
    p.add_argument("--batch-size", type=int, help="sequences per update and process group (default 8)")
    p.add_argument("--learning-rate", type=float, help="peak learning rate (default 3e-4)")
    p.add_argument("--lr-schedule", choices=["cosine", "constant"], help="cosine to lr/10 after warmup (default)")
    p.add_argument("--warmup", type=int, help="linear warmup updates (default 10%% of --iters)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    p.add_argument("--grad-accumulation-steps", type=int, help="micro-batches of --batch-size per update")
    p.add_argument("--grad-checkpoint", action="store_true", default=None, help="recompute activations: less memory")
    p.add_argument("--mask-prompt", action="store_true", default=None, help="train on completions only")
    p.add_argument("--max-seq-length", type=int, help="longest sequence; a text file is cut to it (default 2048)")
    p.add_argument("--steps-per-report", type=int, help="report every N updates (default 10)")
    p.add_argument("--steps-per-eval", type=int, help="validation loss every N updates (default 200)")
    p.add_argument("--val-batches", type=int, help="validation batches, -1 for all (default 25)")
    p.add_argument("--save-every", type=int, help="numbered checkpoint every N updates (default 100)")
    p.add_argument("--adapter-path", help="output folder for adapters.safetensors (default adapters)")
    p.add_argument("--resume-adapter-file", help="continue from a checkpoint (its optimizer state and step too)")
    p.add_argument("--force", action="store_true", default=None, help="replace adapters already in --adapter-path")
    p.add_argument("--seed", type=int, help="seed for initialisation, batch order and dropout (default 0)")
    p.add_argument("--test", action="store_true", default=None, help="report the test loss after training")
    p.add_argument("--test-batches", type=int, help="test batches, -1 for all (default)")
    p.add_argument("-c", "--config", help="YAML file with any of these options (underscored names)")
    p.set_defaults(func=run_lora)

    p = sub.add_parser("fuse", help="merge an adapter into its base model: an ordinary converted directory")
    p.add_argument("--model", required=True, help="the base model directory the adapter was trained on")
    p.add_argument("--adapter-path", required=True, help="folder holding adapters.safetensors and adapter_config.json")
    p.add_argument("--mlx-path", required=True, help="output directory (must not exist unless --force)")
    p.add_argument("--dequantize", action="store_true", help="write float weights for a quantized base")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the fused model")
    p.add_argument("--q-bits", type=int, default=4, help="bits per weight with -q (default 4)")
    p.add_argument("--q-group-size", type=int, default=None, help="group size with -q (default 64 for affine)")
    p.add_argument("--q-mode", default="affine", choices=["affine", "mxfp4", "mxfp8", "nvfp4"])
    p.add_argument("--force", action="store_true", help="replace an existing --mlx-path")
    p.set_defaults(func=run_fuse)


def read_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise OpenELMError(f"-c {path}: no such file") from None
    except yaml.YAMLError as e:
        raise OpenELMError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise OpenELMError(f"{path}: expected a mapping of option names to values")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    lora = data.pop("lora_parameters", None) or {}
    if not isinstance(lora, dict):
        raise OpenELMError(f"{path}: lora_parameters must be a mapping")
    for key, value in lora.items():
        if key not in ("rank", "alpha", "scale", "dropout", "keys"):
            raise OpenELMError(f"{path}: lora_parameters.{key}: unknown (rank, alpha, scale, dropout, keys)")
        data["targets" if key == "keys" else key] = value
    if "scale" in data:  # mlx_lm's form: scale = alpha / rank
        data["alpha"] = float(data.pop("scale")) * int(data.get("rank", DEFAULTS["rank"]))
    for key in data:
        if key not in DEFAULTS:
            raise OpenELMError(f"{path}: unknown option {key!r}")
    return data


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Command line, then the YAML file, then the defaults."""
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("func", "command", "config")}
    opts = {**DEFAULTS, **(read_yaml(args.config) if args.config else {}), **given}
    if opts["data"] is None:
        raise OpenELMError("--data is required (on the command line or in -c)")
    if opts["model"] is None:
        from ..loading import BUNDLED_MODEL

        print(f"no --model given: fine-tuning the bundled OpenELM-tiny-KJV ({BUNDLED_MODEL})", file=sys.stderr)
        opts["model"] = str(BUNDLED_MODEL)
    if isinstance(opts["targets"], str):
        opts["targets"] = opts["targets"].split(",")
    return opts


def run_lora(args: argparse.Namespace) -> int:
    import mlx.core as mx

    from ..loading import load
    from . import datasets, lora, trainer

    opts = resolve(args)
    cfg = TrainConfig(**{f.name: opts[f.name] for f in dataclasses.fields(TrainConfig)})
    trainer.check_config(cfg)
    group = mx.distributed.init()
    rank = group.rank()
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if rank == 0 else (lambda s: None)
    out = Path(opts["adapter_path"])
    resume = Path(opts["resume_adapter_file"]) if opts["resume_adapter_file"] else None
    resuming_here = resume is not None and resume.resolve().parent == out.resolve()
    if cfg.iters and (out / ADAPTER_FILE).exists() and not (opts["force"] or resuming_here):
        raise OpenELMError(f"--adapter-path {out} already holds {ADAPTER_FILE}; pass --force or another folder")
    if cfg.iters:  # files there get replaced: only in a folder lora wrote, or an empty one
        check_replaceable(out, "--adapter-path", ADAPTER_FILES, legacy=_written_by_lora(out))

    model, tok = load(opts["model"], tokenizer=opts["tokenizer"])
    data = datasets.load(opts["data"], tok, cfg.max_seq_length, bool(opts["mask_prompt"]), bool(opts["test"]))
    mx.random.seed(cfg.seed)  # every process initialises the same adapters
    lora.apply_adapters(
        model, opts["fine_tune_type"], opts["rank"], opts["alpha"], opts["dropout"], opts["targets"], opts["num_layers"]
    )
    trainable, total = lora.count_parameters(model)
    say(
        f"{opts['fine_tune_type']}: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.3f}%); "
        f"data: {', '.join(f'{k} {len(v):,} sequences' for k, v in data.items())}; {group.size()} process(es)"
    )
    if resume is not None:  # before anything is written or trained
        check_resume(resume, opts, lora.trainable_weights(model))
    base_dir = Path(getattr(model, "source_dir", opts["model"]))
    if rank == 0 and cfg.iters:
        out.mkdir(parents=True, exist_ok=True)
        write_marker(out, "lora")
        write_adapter_config(out, opts, base_dir)
    result = trainer.train(model, data, cfg, out if cfg.iters else None, resume, say)
    if result.interrupted:
        say("interrupted")
        return 130
    if opts["test"]:
        loss = trainer.evaluate(model, data["test"], cfg, opts["test_batches"])
        say(f"test loss {loss:.4f}, test ppl {math.exp(loss):.3f}")
    return 0


RESUME_FIELDS = ("fine_tune_type", "rank", "alpha", "targets", "num_layers")


def check_resume(file: Path, opts: dict[str, Any], expected: dict[str, Any]) -> None:
    """The adapter file a run resumes from against this run: the settings recorded beside it
    (adapter_config.json: type, rank, alpha, targets, layers), then every tensor's name and shape
    from the file's header (nothing loaded), so a mismatch is one line before the first step."""
    from ..convert.safetensors_reader import read_safetensors
    from ..loading import check_names

    flag = f"--resume-adapter-file {file}"
    if not file.is_file():
        raise OpenELMError(f"{flag}: no such file")
    beside = file.parent / CONFIG_FILE
    if beside.is_file():
        try:
            recorded = json.loads(beside.read_text())
        except (OSError, ValueError, RecursionError):
            raise OpenELMError(f"{flag}: {beside} is not valid JSON") from None
        if not isinstance(recorded, dict):
            raise OpenELMError(f"{flag}: {beside} is not a JSON object")
        for key in RESUME_FIELDS:
            if key not in recorded or (key in ("rank", "alpha") and opts["fine_tune_type"] == "full"):
                continue
            theirs, ours = recorded[key], opts[key]
            if key == "targets":
                same = isinstance(theirs, list) and sorted(map(str, theirs)) == sorted(ours)
            elif key == "alpha":
                same = isinstance(theirs, (int, float)) and float(theirs) == float(ours)
            else:
                same = theirs == ours
            if not same:
                option = "--" + key.replace("_", "-")
                raise OpenELMError(
                    f"{flag}: trained with {key} {theirs!r:.80} ({beside.name}), this run has {option} {ours!r}; "
                    "resume with the same settings"
                )
    try:
        shapes = {name: t.shape for name, t in read_safetensors(file).items()}
    except OpenELMError as e:
        raise OpenELMError(f"{flag}: {e}") from None
    check_names(expected, shapes, file, "; the adapter was trained with other --targets/--num-layers/--rank")
    for name, shape in shapes.items():
        if shape != tuple(expected[name].shape):
            raise OpenELMError(
                f"{flag}: tensor {name} has shape {list(shape)}, this run's adapters have {list(expected[name].shape)} "
                "(another --rank?)"
            )


def _written_by_lora(folder: Path) -> bool:
    """An adapter folder from before markers: its adapter_config.json has lora's own fields."""
    try:
        cfg = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "base_model_sha256" in cfg and "fine_tune_type" in cfg


def write_adapter_config(out: Path, opts: dict[str, Any], base_dir: Path) -> None:
    from .lora import BLOCK_TARGETS, model_hash

    cfg = {k: v for k, v in opts.items() if k not in ("force", "resume_adapter_file")}
    cfg.update(
        base_model=str(base_dir.absolute()),
        base_model_sha256=model_hash(base_dir),
        scale=opts["alpha"] / opts["rank"],
        # mlx_lm's names for the same numbers: with the default layers it loads these adapters of the
        # blocks' projections (its own LoRA/DoRA layers compute the same); it has no embedding adapter.
        lora_parameters={
            "rank": opts["rank"],
            "scale": opts["alpha"] / opts["rank"],
            "dropout": opts["dropout"],
            "keys": [BLOCK_TARGETS[t] for t in opts["targets"] if t in BLOCK_TARGETS],
        },
    )
    tmp = out / f".{CONFIG_FILE}.tmp-{os.getpid()}"
    try:
        tmp.write_text(json.dumps(cfg, indent=2, default=str) + "\n")
        os.replace(tmp, out / CONFIG_FILE)
    except OSError as e:
        raise OpenELMError(f"cannot write {out / CONFIG_FILE} ({e.strerror})") from None


def run_fuse(args: argparse.Namespace) -> int:
    from .fuse import fuse

    fuse(
        args.model,
        args.adapter_path,
        args.mlx_path,
        dequantize=args.dequantize,
        quantize_model=args.quantize,
        q_bits=args.q_bits,
        q_group_size=args.q_group_size,
        q_mode=args.q_mode,
        force=args.force,
    )
    return 0
