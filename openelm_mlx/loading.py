"""Load a converted model directory (``config.json`` + ``model*.safetensors``).

The directory layout is mlx_lm's, so the same files load in ``mlx_lm.load``:
quantized modules are those whose ``<path>.scales`` exist, with the defaults
and per-module overrides of the ``quantization`` block in ``config.json``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import runtime
from .config import OpenELMConfig, parse_json
from .convert.hub import looks_local_path
from .errors import CheckpointError, ConfigError, OpenELMError, check_names
from .model import OpenELM
from .tokenizer import Tokenizer


def read_config(model_dir: str | Path) -> tuple[OpenELMConfig, dict[str, Any]]:
    """The parsed config and the raw ``config.json`` dict (which also holds quantization)."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise OpenELMError(f"{model_dir}: no such model directory")
    if not model_dir.is_dir():
        raise OpenELMError(f"{model_dir}: not a directory (expected a converted model directory)")
    path = model_dir / "config.json"
    if not path.is_file():
        raise OpenELMError(
            f"{model_dir}: not a converted model directory (no config.json); "
            "create one with `openelm-mlx convert --hf-path SRC --mlx-path DIR`"
        )
    config = OpenELMConfig.from_json(path)
    return config, parse_json(path.read_bytes(), path)


def weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise OpenELMError(f"{model_dir}: not a converted model directory (no model*.safetensors)")
    return files


def quantization_predicate(quant: dict[str, Any], weights: dict[str, mx.array]) -> Any:
    """mlx_lm's rule: per-module override if given, else quantized iff its scales were saved."""

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if path in quant:
            return quant[path]
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

    return predicate


def load_model(model_dir: str | Path) -> OpenELM:
    """Build an ``OpenELM`` from a converted directory, checking every tensor's name and shape."""
    model_dir = Path(model_dir)
    config, raw = read_config(model_dir)
    files = weight_files(model_dir)
    # Before MLX reads a byte or anything is built: every header parsed by the reader that trusts
    # nothing (offsets inside the file, no overlapping tensors, bounded nesting), and the config's
    # sizes checked against what the tensors hold.
    check_headers(config, raw.get("quantization"), files, model_dir / "config.json")
    weights: dict[str, mx.array] = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:  # MLX raises ValueError/RuntimeError on bad files
            raise CheckpointError(f"{f}: cannot load safetensors ({e})") from None
    model = OpenELM(config)
    quant = raw.get("quantization")
    if quant is not None:
        # Shapes first: a wrong model_dim would otherwise surface as a quantization error.
        _check_unquantized_shapes(model, weights, model_dir / "config.json")
        if not isinstance(quant, dict) or not {"group_size", "bits"} <= quant.keys():
            raise ConfigError(f"{model_dir / 'config.json'}: quantization block needs group_size and bits")
        try:
            nn.quantize(
                model,
                group_size=quant["group_size"],
                bits=quant["bits"],
                mode=quant.get("mode", "affine"),
                class_predicate=quantization_predicate(quant, weights),
            )
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{model_dir / 'config.json'}: invalid quantization block ({e})") from None
    check_weights(model, weights, model_dir, quantized=quant is not None)
    check_finite(weights, model_dir)
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    meta = raw.get("openelm_mlx") if isinstance(raw.get("openelm_mlx"), dict) else {}
    model.is_instruct = bool(meta.get("instruct")) or "instruct" in model_dir.name.lower()
    runtime.prepare(model)  # the device's matmul routes, decode step and memory policy, once
    return model


def check_headers(config: OpenELMConfig, quant: Any, files: list[Path], where: Path) -> None:
    """The config's layers, width and vocabulary against the tensors' headers, and the
    quantization block's numbers, before a model of that config is built."""
    from .convert.safetensors_reader import read_safetensors

    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        shapes.update({name: t.shape for name, t in read_safetensors(f).items()})
    emb = shapes.get("transformer.token_embeddings.weight")
    if emb is not None and emb[:1] != (config.vocab_size,):
        raise CheckpointError(f"{where}: vocab_size={config.vocab_size} but the embedding has {emb[0]} rows")
    norm = shapes.get("transformer.norm.weight")
    if norm is not None and norm != (config.model_dim,):
        raise CheckpointError(
            f"{where}: tensor transformer.norm.weight has shape {list(norm)}, the config expects "
            f"[{config.model_dim}]; its shapes (model_dim, head_dim, heads) do not match the weights"
        )
    layers = {int(m.group(1)) for n in shapes if (m := _LAYER.match(n))}
    if layers and max(layers) + 1 != config.num_transformer_layers:
        raise CheckpointError(
            f"{where}: num_transformer_layers={config.num_transformer_layers} but the weights hold "
            f"{max(layers) + 1} layers"
        )
    if quant is not None:
        check_quantization(quant, where)


_LAYER = re.compile(r"transformer\.layers\.(\d{1,6})\.")


def check_quantization(quant: Any, where: Path) -> None:
    """The quantization block (and each per-module override): a mode MLX has, with its bits and
    group size.  ``group_size: 0`` reached MLX's kernels and killed the process with SIGFPE."""
    from .convert.quantize import MODES

    if not isinstance(quant, dict) or not {"group_size", "bits"} <= quant.keys():
        raise ConfigError(f"{where}: quantization block needs group_size and bits")
    overrides = {k: v for k, v in quant.items() if isinstance(v, dict)}
    for field, spec in [("quantization", quant)] + [(f"quantization.{k}", v) for k, v in overrides.items()]:
        mode = spec.get("mode", quant.get("mode", "affine"))
        if mode not in MODES:
            raise ConfigError(f"{where}: {field}.mode={mode!r:.40}: choose one of {', '.join(MODES)}")
        bits_ok, groups_ok, _ = MODES[mode]
        for key, allowed in (("bits", bits_ok), ("group_size", groups_ok)):
            value = spec.get(key, quant[key])
            if isinstance(value, bool) or value not in allowed:
                raise ConfigError(
                    f"{where}: {field}.{key}={value!r:.40}: mode {mode} supports {', '.join(map(str, allowed))}"
                )


def _check_unquantized_shapes(model: nn.Module, weights: dict[str, mx.array], where: Path) -> None:
    expected = dict(tree_flatten(model.parameters()))
    for name, value in weights.items():
        quantized = f"{name.rsplit('.', 1)[0]}.scales" in weights
        if name in expected and not quantized and value.shape != expected[name].shape:
            raise CheckpointError(
                f"{where}: tensor {name} has shape {list(value.shape)}, the config expects "
                f"{list(expected[name].shape)}; its shapes (model_dim, head_dim, heads) do not match the weights"
            )


def check_finite(weights: dict[str, mx.array], where: Path) -> None:
    """Name the first tensor holding NaN or Inf (a broken conversion or download)."""
    names = [n for n, w in weights.items() if mx.issubdtype(w.dtype, mx.floating)]
    flags = [mx.isfinite(weights[n]).all() for n in names]
    mx.eval(flags)
    for name, ok in zip(names, flags, strict=True):
        if not ok.item():
            raise CheckpointError(f"{where}: tensor {name} contains NaN or Inf values")


def check_weights(model: nn.Module, weights: dict[str, mx.array], where: Path, quantized: bool = False) -> None:
    expected = dict(tree_flatten(model.parameters()))
    check_names(expected, weights, where, "; the config.json (layers or quantization) does not match the weights")
    hint = "; the quantization block (bits, group_size) disagrees with the tensors" if quantized else ""
    for name, value in weights.items():
        if value.shape != expected[name].shape:
            raise CheckpointError(
                f"{where}: tensor {name} has shape {list(value.shape)}, "
                f"the config expects {list(expected[name].shape)}{hint}"
            )


BUNDLED_MODEL = Path(__file__).parent / "bundled" / "openelm-tiny-kjv"
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def load(
    path_or_repo: str | Path | None = None,
    tokenizer: str | Path | None = None,
    adapter_path: str | Path | None = None,
) -> tuple[OpenELM, Tokenizer]:
    """(model, tokenizer) from a converted directory, an HF folder with safetensors, or anything
    ``convert`` reads (a Hub repo id, .bin folder, CoreNet file), converted once into a cache.
    Without a path: the bundled OpenELM-tiny-KJV (offline, 4.7M parameters).
    ``adapter_path``: a folder written by ``openelm-mlx lora``, applied on top (tuner/lora.py)."""
    from .convert.hub import looks_like_repo_id

    if path_or_repo is None:
        path_or_repo = BUNDLED_MODEL
    text = str(path_or_repo)
    path = Path(path_or_repo).expanduser()
    if path.is_file() and path.suffix not in CHECKPOINT_SUFFIXES:
        raise OpenELMError(
            f"{text}: not a model: pass a converted model directory, a Hub repo id, or a "
            ".safetensors/.bin/.pt checkpoint (with a config.json beside it)"
        )
    if not path.exists() and (not looks_like_repo_id(text) or looks_local_path(text)):
        raise OpenELMError(f"{text}: no such file or directory")
    convertible = path.is_file() or (
        path.is_dir() and (path / "config.json").is_file() and not any(path.glob("model*.safetensors"))
    )
    if convertible or not path.exists():
        path = _convert_into_cache(text)
    model = load_model(path)
    model.source_dir = path
    if adapter_path is not None:
        from .tuner.lora import attach_for_inference

        attach_for_inference(model, adapter_path)
    tok_file = find_tokenizer(tokenizer, path, model.config.vocab_size)
    tok = Tokenizer(tok_file)
    if tok.vocab_size != model.config.vocab_size:
        raise OpenELMError(
            f"{tok_file}: tokenizer has {tok.vocab_size} pieces but the model's vocabulary is {model.config.vocab_size}"
        )
    return model, tok


def find_tokenizer(option: str | Path | None, model_dir: Path, vocab_size: int) -> Path:
    """``--tokenizer`` (a tokenizer.model, a folder holding one, or a Hub repo id), else the
    model directory's, else, for a model with Llama 2's vocabulary, Llama 2's tokenizer.model
    fetched and checked by its SHA-256 (convert/llama2_tokenizer.py)."""
    import sys

    from .convert import hub, llama2_tokenizer

    if option is not None:
        return hub.tokenizer_option(option)
    if (model_dir / "tokenizer.model").is_file():
        return model_dir / "tokenizer.model"
    if vocab_size == llama2_tokenizer.VOCAB_SIZE:
        return llama2_tokenizer.fetch(lambda s: print(s, file=sys.stderr, flush=True))
    raise OpenELMError(
        f"{model_dir}: no tokenizer.model; pass --tokenizer with the model's tokenizer.model "
        "(or copy one into the model directory)"
    )


def _convert_into_cache(src: str) -> Path:
    from .conversion_cache import convert_into_cache

    return convert_into_cache(src)
