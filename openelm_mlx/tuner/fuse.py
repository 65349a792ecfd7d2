"""``fuse``: merge an adapter into its base model and write an ordinary converted directory.

The output is what ``convert`` writes (the converter's writer: staged, then renamed into place;
its quantizer for ``-q``), so ``openelm_mlx.load`` and ``mlx_lm.load`` read it like any other.
A quantized base stays quantized with its own bits: the adapted layers are fused in float and
quantized again, the others keep their exact weights; ``--dequantize`` writes float weights.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..convert import quantize, writer
from ..convert.pipeline import TOKENIZER_CONFIG
from ..loading import load_model, read_config
from .lora import attach, dequantize_in_place, fuse_in_place, model_hash


def fuse(
    model_dir: str | Path,
    adapter_path: str | Path,
    mlx_path: str | Path,
    *,
    dequantize: bool = False,
    quantize_model: bool = False,
    q_bits: int = 4,
    q_group_size: int | None = None,
    q_mode: str = "affine",
    force: bool = False,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> Path:
    model_dir, adapter_path = Path(model_dir), Path(adapter_path)
    dst = Path(mlx_path).expanduser().absolute()
    for message in writer.clean_stale(dst):
        log(message)
    # Never the base model or the adapters, and with --force only an earlier output or an empty folder.
    writer.check_destination(dst, force, [model_dir, adapter_path])
    spec = quantize.check_spec(q_bits, q_group_size, q_mode) if quantize_model else None
    config, raw = read_config(model_dir)
    model = load_model(model_dir)
    adapter = attach(model, adapter_path)
    check_base(adapter, model_dir, log)
    n = fuse_in_place(model, requantize=not (dequantize or quantize_model))
    if dequantize or quantize_model:
        dequantize_in_place(model)
    weights = dict(tree_flatten(model.parameters()))
    block = raw.get("quantization") if not (dequantize or quantize_model) else None
    if spec is not None:
        modules = quantize.plan(config, spec)
        for module, mspec in modules.items():
            if mspec is not None:
                parts = quantize.quantize_weight(module, weights.pop(f"{module}.weight"), mspec)
                mx.eval(*parts.values())
                weights.update(parts)
        block = quantize.config_block(spec, modules)
    log(f"fused {n} adapted modules ({adapter['fine_tune_type']}) of {adapter_path} into {model_dir}")

    out_config = {k: v for k, v in raw.items() if k != "quantization"}
    if block:
        out_config["quantization"] = block
    meta = out_config.get("openelm_mlx") if isinstance(out_config.get("openelm_mlx"), dict) else {}
    out_config["openelm_mlx"] = {**meta, "fused_from": {"base": str(model_dir), "adapter": str(adapter_path)}}
    with writer.staging_dir(dst, force) as tmp:
        writer.save_weights(tmp, weights)
        writer.write_json(tmp / "config.json", out_config)
        for name in ("generation_config.json", "tokenizer.model"):
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, tmp / name)
        if (model_dir / "tokenizer.model").is_file():
            writer.write_json(tmp / "tokenizer_config.json", TOKENIZER_CONFIG)
        q = f"{block['bits']}-bit (group size {block['group_size']})" if block else "none"
        writer.write_text(
            tmp / "README.md",
            f"# OpenELM in MLX, fine-tuned\n\nopenelm-mlx fused the adapter `{adapter_path}` into `{model_dir}`.\n\n"
            f"- fine-tuning: {adapter['fine_tune_type']}, rank {adapter['rank']}, alpha {adapter['alpha']}\n"
            f"- quantization: {q}\n\nLoad with `openelm_mlx.load(path)` or `mlx_lm.load(path)`.\n",
        )
    log(f"wrote {dst}")
    return dst


def check_base(adapter: dict, model_dir: Path, log: Callable[[str], None]) -> None:
    """Warn when the adapter was trained on other weights than ``model_dir``'s (its recorded hash)."""
    want = adapter.get("base_model_sha256")
    if want and model_hash(model_dir) != want:
        log(
            f"warning: the adapter was trained on {adapter.get('base_model', 'another model')} "
            f"(sha256 {want[:12]}), not on the weights of {model_dir}"
        )
