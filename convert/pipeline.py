"""``convert``: read a source, cast or quantize tensor by tensor, write, verify, publish."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from ..config import PRESETS, OpenELMConfig
from ..errors import CheckpointError, OpenELMError
from . import hub, llama2_tokenizer, quantize, writer
from .sources import Source, load_source
from .verify import Report, verify

if TYPE_CHECKING:
    from ..quant.recipe import Options as CalibrateOptions

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
FLOAT16_MAX = 65504.0
LLAMA2_TOKENIZER_HINT = (
    "OpenELM uses the Llama-2 SentencePiece tokenizer. Pass --tokenizer with a local tokenizer.model, a folder "
    "holding one, or a Hub repo id (meta-llama/Llama-2-7b-hf is gated: accept Meta's licence there first), "
    "or copy a tokenizer.model into the output directory later"
)


@dataclass
class Result:
    path: Path
    dtype: str
    quantization: dict | None
    tokenizer: bool
    report: Report | None


def pick_dtype(requested: str) -> tuple[str, str]:
    """(dtype, why). ``auto`` takes the fastest safe dtype for the running backend."""
    if requested != "auto":
        if requested not in DTYPES:
            raise OpenELMError(f"--dtype {requested}: choose auto, {', '.join(DTYPES)}")
        return requested, "as requested"
    if mx.default_device() == mx.cpu:
        return "float32", "MLX CPU backend: float32 compute and quantization scales run fastest there"
    return (
        "bfloat16",
        "GPU backend: 16-bit halves the bytes read per token; bfloat16 because float16 overflows 3B",
    )


def find_tokenizer(option: str | None, source: Source, log: Callable[[str], None] = lambda s: None) -> Path | None:
    if option is None:
        if source.tokenizer is not None or source.config.vocab_size != llama2_tokenizer.VOCAB_SIZE:
            return source.tokenizer
        try:  # Apple's checkpoints ship none: Llama 2's, checked by its hash
            return llama2_tokenizer.fetch(log)
        except OpenELMError as e:
            log(f"warning: {e}")
            return None
    return hub.tokenizer_option(option)


def check_tokenizer(path: Path, vocab_size: int) -> None:
    import sentencepiece as spm

    try:
        n = spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()
    except Exception as e:  # sentencepiece raises RuntimeError/OSError on garbage
        raise OpenELMError(f"{path}: not a SentencePiece model ({str(e).splitlines()[0][:120]})") from None
    if n != vocab_size:
        raise OpenELMError(f"{path}: tokenizer has {n} pieces but the model's vocabulary is {vocab_size}")


def convert(
    hf_path: str,
    mlx_path: str | Path,
    *,
    dtype: str = "auto",
    quantize_model: bool = False,
    q_bits: int = 4,
    q_group_size: int | None = None,
    q_mode: str = "affine",
    quant_recipe: str | None = None,
    tokenizer: str | None = None,
    preset: str | None = None,
    config: str | None = None,
    run_verify: bool = True,
    verify_tokens: int = 32,
    max_kl: float | None = None,
    force: bool | int = False,
    calibrate: CalibrateOptions | None = None,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> Result:
    """Convert ``hf_path`` into ``mlx_path``. ``force`` (or 1) replaces an earlier conversion there;
    2 replaces whatever is there, except the source or a folder holding it.  ``calibrate`` quantizes
    with GPTQ / DWQ / dynamic bit allocation (``openelm_mlx.quant``) instead of plain rounding."""
    dst = Path(mlx_path).expanduser().absolute()
    for message in writer.clean_stale(dst):
        log(message)
    local = [Path(hf_path).expanduser()] if Path(hf_path).expanduser().exists() else []
    writer.check_destination(dst, int(force), local)  # fail before any download
    spec = quantize.check_spec(q_bits, q_group_size, q_mode, quant_recipe) if (quantize_model or quant_recipe) else None
    if calibrate is not None and (spec is None or quant_recipe):
        raise OpenELMError(
            "--calibrate needs -q and no --quant-recipe (for mixed bits, use --calibrate dynamic --target-bpw)"
        )
    source = load_source(hf_path, preset=preset, config_file=config)
    writer.check_destination(dst, int(force), local + source.files)  # a Hub source lives in its cache
    cfg = source.config
    out_dtype, why = pick_dtype(dtype)
    log(f"source: {hf_path} ({len(source.files)} file(s), {source.source_dtype}, {cfg.num_parameters():,} parameters)")
    log(f"dtype: {out_dtype} ({why})")
    for note in source.notes:
        log(note)
    modules = quantize.plan(cfg, spec, quant_recipe) if spec else {}
    if spec:
        what = f"recipe {quant_recipe}" if quant_recipe else f"{spec.bits}-bit"
        log(f"quantizing: {what}, group size {spec.group_size}, mode {spec.mode}")
    tok_path = find_tokenizer(tokenizer, source, log)
    if tok_path is not None:
        check_tokenizer(tok_path, cfg.vocab_size)
    elif calibrate is not None:
        raise OpenELMError(f"--calibrate tokenizes its text and the source has no tokenizer. {LLAMA2_TOKENIZER_HINT}")

    recipe = None
    with writer.staging_dir(dst, force) as tmp:
        if calibrate is not None:
            weights, modules, recipe = _calibrated(source, DTYPES[out_dtype], modules, tok_path, calibrate, log)
        else:
            weights = _convert_tensors(source, DTYPES[out_dtype], modules)
        log(f"writing {_size(sum(w.nbytes for w in weights.values()))} of weights ...")
        writer.save_weights(tmp, weights)
        del weights
        mx.clear_cache()  # hand the written buffers back before verify loads the model again
        block = quantize.config_block(spec, modules) if spec else None
        config_json = cfg.to_dict()
        if not cfg.share_input_output_layers:  # read again as an HF config, it must stay untied
            config_json["tie_word_embeddings"] = False
        if block:
            config_json["quantization"] = block
        config_json["openelm_mlx"] = {"source": hf_path, "dtype": out_dtype, "instruct": source.is_instruct}
        if recipe is not None:
            config_json["openelm_mlx"]["calibration"] = recipe
        writer.write_json(tmp / "config.json", config_json)
        gen = source.generation_config or {}
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, **gen}
        writer.write_json(tmp / "generation_config.json", gen)
        if tok_path is not None:
            shutil.copyfile(tok_path, tmp / "tokenizer.model")
            writer.write_json(tmp / "tokenizer_config.json", TOKENIZER_CONFIG)
        writer.write_text(tmp / "README.md", _model_card(hf_path, cfg, out_dtype, block, tok_path, recipe))
        report = None
        if run_verify:
            try:
                report = verify(source, tmp, num_tokens=verify_tokens, tokenizer=tok_path, max_kl=max_kl)
            except OpenELMError as e:  # the written files do not even load: name them as the user will
                raise OpenELMError(f"verification: {str(e).replace(str(tmp), str(dst))}; nothing was written") from None
            for line in str(report).splitlines():
                log(line)
            if not report.passed:
                raise OpenELMError(f"verification failed; nothing was written to {dst}")
    log(f"wrote {dst}")
    if tok_path is None:
        log(f"warning: no tokenizer.model beside the source. {LLAMA2_TOKENIZER_HINT}")
    return Result(dst, out_dtype, block, tok_path is not None, report)


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def _calibrated(
    source: Source, dtype: mx.Dtype, modules: dict, tok_path: Path, opts: CalibrateOptions, log: Callable
) -> tuple[dict[str, mx.array], dict, dict]:
    """The float model in memory, then ``openelm_mlx.quant``'s methods on it."""
    from ..model import OpenELM
    from ..quant.recipe import calibrate
    from ..tokenizer import Tokenizer

    model = OpenELM(source.config)
    model.load_weights(list(_convert_tensors(source, dtype, {}).items()))
    mx.eval(model.parameters())
    result = calibrate(model, Tokenizer(tok_path), modules, opts, log)
    return result.weights, result.modules, result.recipe


def _convert_tensors(source: Source, dtype: mx.Dtype, modules: dict) -> dict[str, mx.array]:
    out: dict[str, mx.array] = {}
    total = sum(t.nbytes for t in source.tensors.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="converting", leave=False) as bar:
        for name, t in source.tensors.items():
            w = t.to_mlx()
            if dtype == mx.float16 and t.dtype != "float16":
                peak = float(mx.abs(w.astype(mx.float32)).max())
                if not np.isfinite(peak) or peak > FLOAT16_MAX:
                    raise CheckpointError(
                        f"{t.file}: tensor {name} holds {peak:g}, beyond float16's range; use --dtype bfloat16"
                    )
            w = w.astype(dtype)
            module = name.rsplit(".", 1)[0]
            spec = modules.get(module)
            parts = quantize.quantize_weight(module, w, spec) if spec else {name: w}
            mx.eval(*parts.values())
            out.update(parts)
            bar.update(t.nbytes)
    return out


# Lets transformers (and so mlx_lm.load) build the tokenizer from tokenizer.model alone.
TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
    "legacy": True,
}


def is_apple_model(src: str, config: OpenELMConfig) -> bool:
    """One of Apple's eight checkpoints (by repo id, or by the shape of one of its four sizes)."""
    if src.lower().startswith("apple/"):
        return True
    shape = (config.num_transformer_layers, config.model_dim, config.head_dim, config.vocab_size)
    return any(
        shape == (p.num_transformer_layers, p.model_dim, p.head_dim, p.vocab_size)
        for p in map(OpenELMConfig.from_preset, PRESETS)
    )


def _model_card(
    src: str, cfg: OpenELMConfig, dtype: str, quant: dict | None, tokenizer: Path | None, recipe: dict | None = None
) -> str:
    apple = is_apple_model(src, cfg)
    q = f"{quant['bits']}-bit ({quant['mode']}, group size {quant['group_size']})" if quant else "none"
    if recipe:
        q += (
            f", calibrated ({'+'.join(recipe['methods'])} on {recipe['data']}: held-out KL {recipe['held_out_kl']:g}, "
            f"round-to-nearest {recipe['held_out_kl_round_to_nearest']:g}; recipe in config.json)"
        )
    if tokenizer is None:
        tok = "none: add a Llama-2 tokenizer.model" if apple else "none: add the source's tokenizer.model"
    else:
        pieces = "Llama-2 SentencePiece" if apple else f"SentencePiece, {cfg.vocab_size} pieces"
        tok = f"tokenizer.model ({pieces})"
    licence = (
        "The weights are Apple's and are under Apple's licence (apple-sample-code-license) for OpenELM.\n"
        if apple
        else f"The weights are those of `{src}`, under its licence; openelm-mlx adds none.\n"
    )
    return (
        f"# OpenELM in MLX\n\nConverted by openelm-mlx from `{src}`.\n\n"
        f"- parameters: {cfg.num_parameters():,}\n- dtype: {dtype}\n- quantization: {q}\n- tokenizer: {tok}\n\n"
        "Load with `openelm_mlx.load(path)` or `mlx_lm.load(path)`; generate with\n"
        "`openelm-mlx generate --model PATH --prompt ...`.\n\n" + licence
    )
