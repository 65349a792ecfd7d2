"""LoRA and DoRA adapters for OpenELM's projections and token embedding, and fusing them back.

Apple's PEFT recipe for OpenELM (CoreNet ``projects/openelm/peft_configs``) puts rank-32
adapters, alpha 32, dropout 0.1, on the token embeddings and on ``qkv_proj``, ``out_proj``,
``proj_1`` and ``proj_2`` of every block; the scaling is PEFT's ``alpha / rank``.

Shapes (weights are ``[out, in]`` as in every checkpoint):

- ``LoRALinear``: ``y = base(x) + s * (dropout(x) @ A) @ B`` with ``A [in, r]`` (uniform
  +-1/sqrt(in)) and ``B [r, out]`` (zeros), so training starts from the base model exactly.
  The fused weight is ``W + s * (A @ B)^T``.
- ``DoRALinear`` (Liu et al. 2024): the adapted weight ``V = W + s * (A @ B)^T`` is scaled per
  output row by a trained magnitude ``m`` (initialised to the row norms of ``W``):
  ``y = m / ||V||_row * (base(x) + s * (dropout(x) @ A) @ B)``.  As in the paper (section 4.3)
  and PEFT, ``||V||`` is treated as a constant in the backward pass, which saves memory.
- ``LoRAEmbedding``: ``E' = E + s * A @ B`` with ``A [vocab, r]`` (zeros) and ``B [r, dim]``
  (normal), PEFT's initialisation for embeddings, without dropout (as PEFT).  OpenELM ties its
  output head to the embedding, and the head reads the adapted ``E'`` too: that is what a
  fused checkpoint computes, so base + adapter and the fused model give the same logits.
  DoRA runs use this LoRA form for the embedding.

A quantized base (``QuantizedLinear``, ``QuantizedEmbedding``) stays quantized and frozen
under its adapter (QLoRA); adapters are float32.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import OpenELMError
from ..model import Embedding, Linear, QuantizedEmbedding, QuantizedLinear

FINE_TUNE_TYPES = ("lora", "dora", "full")
# Apple's targets, by the module name they end with; "token_embeddings" is outside the blocks.
TARGETS = ("token_embeddings", "qkv_proj", "out_proj", "proj_1", "proj_2")
BLOCK_TARGETS = {t: ("attn." if t.endswith("_proj") else "ffn.") + t for t in TARGETS[1:]}
CONFIG_FILE = "adapter_config.json"
ADAPTER_FILE = "adapters.safetensors"


def _quantized(module: nn.Module) -> bool:
    return "scales" in module


def base_weight(module: nn.Module) -> mx.array:
    """The base layer's ``[out, in]`` weight, dequantized if need be."""
    if _quantized(module):
        return mx.dequantize(
            module.weight,
            module.scales,
            module.get("biases"),
            group_size=module.group_size,
            bits=module.bits,
            mode=module.mode,
        )
    return module.weight


def _dims(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a Linear or Embedding, quantized or not (packed weights hide ``in``)."""
    out, packed = module.weight.shape
    return out, (packed * 32 // module.bits if _quantized(module) else packed)


class _Adapter(nn.Module):
    """Shared parts: the frozen ``base`` layer, the factors, and the base weight seen by others."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise OpenELMError(f"--rank {rank}: must be at least 1")
        self.base = base
        self.scale = alpha / rank
        self.rank = rank

    @property
    def weight(self) -> mx.array:
        # step.py and the engine look at the embedding's weight (its dtype and whether it is packed).
        return self.base.weight

    def delta(self) -> mx.array:
        """``s * (A @ B)^T``: the update to the ``[out, in]`` weight (``[vocab, dim]`` for embeddings)."""
        raise NotImplementedError

    def fused_weight(self) -> mx.array:
        w = base_weight(self.base)
        return (w.astype(mx.float32) + self.delta()).astype(w.dtype)


class LoRALinear(_Adapter):
    def __init__(self, base: nn.Module, rank: int = 32, alpha: float = 32.0, dropout: float = 0.0):
        super().__init__(base, rank, alpha)
        out_dims, in_dims = _dims(base)
        bound = 1 / math.sqrt(in_dims)
        self.dropout = nn.Dropout(p=dropout)
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))

    def _lora(self, x: mx.array) -> mx.array:
        return self.scale * ((self.dropout(x) @ self.lora_a) @ self.lora_b)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        return y + self._lora(x).astype(y.dtype)

    def delta(self) -> mx.array:
        return self.scale * (self.lora_a @ self.lora_b).T


class DoRALinear(LoRALinear):
    def __init__(self, base: nn.Module, rank: int = 32, alpha: float = 32.0, dropout: float = 0.0):
        super().__init__(base, rank, alpha, dropout)
        self.m = mx.linalg.norm(base_weight(base).astype(mx.float32), axis=1)

    def _magnitude(self) -> mx.array:
        adapted = base_weight(self.base).astype(mx.float32) + self.delta()
        return self.m / mx.stop_gradient(mx.linalg.norm(adapted, axis=1))

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        return (self._magnitude() * (y + self._lora(x))).astype(y.dtype)

    def fused_weight(self) -> mx.array:
        w = base_weight(self.base)
        adapted = w.astype(mx.float32) + self.delta()
        return (self._magnitude()[:, None] * adapted).astype(w.dtype)


class LoRAEmbedding(_Adapter):
    def __init__(self, base: nn.Module, rank: int = 32, alpha: float = 32.0):
        super().__init__(base, rank, alpha)
        vocab, dims = _dims(base)
        self.lora_a = mx.zeros((vocab, rank))
        self.lora_b = mx.random.normal((rank, dims))

    def __call__(self, ids: mx.array) -> mx.array:
        y = self.base(ids)
        return y + (self.scale * (self.lora_a[ids] @ self.lora_b)).astype(y.dtype)

    def as_linear(self, h: mx.array) -> mx.array:
        """The tied head over the adapted embedding: ``h @ (E + s A B)^T``."""
        y = self.base.as_linear(h)
        return y + (self.scale * ((h @ self.lora_b.T) @ self.lora_a.T)).astype(y.dtype)

    def delta(self) -> mx.array:
        return self.scale * (self.lora_a @ self.lora_b)


ADAPTER_LAYERS = (LoRALinear, DoRALinear, LoRAEmbedding)


def target_modules(model: nn.Module, targets: list[str], num_layers: int) -> list[str]:
    """Full module paths for ``targets`` (TARGETS names) in the last ``num_layers`` blocks (-1: all)."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise OpenELMError(f"--targets {unknown[0]}: unknown; choose from {', '.join(TARGETS)}")
    n = len(model.layers)
    if num_layers == 0 or num_layers < -1 or num_layers > n:
        raise OpenELMError(f"--num-layers {num_layers}: the model has {n} layers (-1 for all)")
    first = 0 if num_layers == -1 else n - num_layers
    paths = ["transformer.token_embeddings"] if "token_embeddings" in targets else []
    for i in range(first, n):
        paths += [f"transformer.layers.{i}.{BLOCK_TARGETS[t]}" for t in targets if t != "token_embeddings"]
    return paths


def _wrap(module: nn.Module, fine_tune_type: str, rank: int, alpha: float, dropout: float) -> nn.Module:
    if isinstance(module, (Embedding, QuantizedEmbedding)):
        return LoRAEmbedding(module, rank, alpha)
    if isinstance(module, (Linear, QuantizedLinear)):
        cls = DoRALinear if fine_tune_type == "dora" else LoRALinear
        return cls(module, rank, alpha, dropout)
    raise OpenELMError(f"cannot put an adapter on a {type(module).__name__}")


def apply_adapters(
    model: nn.Module,
    fine_tune_type: str = "lora",
    rank: int = 32,
    alpha: float = 32.0,
    dropout: float = 0.1,
    targets: list[str] | tuple[str, ...] = TARGETS,
    num_layers: int = -1,
) -> list[str]:
    """Freeze ``model`` and make trainable what ``fine_tune_type`` trains; returns the module paths.

    ``full`` trains every weight of the last ``num_layers`` blocks (and the embedding if
    targeted) and needs an unquantized model; ``lora``/``dora`` wrap the target modules."""
    if fine_tune_type not in FINE_TUNE_TYPES:
        raise OpenELMError(f"--fine-tune-type {fine_tune_type}: choose {', '.join(FINE_TUNE_TYPES)}")
    if not 0 <= dropout < 1:
        raise OpenELMError(f"--dropout {dropout}: must be in [0, 1)")
    paths = target_modules(model, list(targets), num_layers)
    model.freeze()
    modules = dict(model.named_modules())
    if fine_tune_type == "full":
        first = len(model.layers) - (len(model.layers) if num_layers == -1 else num_layers)
        chosen = [f"transformer.layers.{i}" for i in range(first, len(model.layers))]
        chosen += [p for p in paths if p.endswith("token_embeddings")]
        if any(_quantized(m) for p in chosen for _, m in modules[p].named_modules()):
            raise OpenELMError("--fine-tune-type full needs an unquantized model; use lora or dora (QLoRA) here")
        for p in chosen:
            modules[p].unfreeze()
        return chosen
    wrapped = [(p, _wrap(modules[p], fine_tune_type, rank, alpha, dropout)) for p in paths]
    for _, layer in wrapped:
        layer.freeze()
        layer.unfreeze(keys=["lora_a", "lora_b", "m"], recurse=False, strict=False)
    model.update_modules(tree_unflatten(wrapped))
    return paths


def trainable_weights(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a quantized weight counts as its unpacked size."""
    total = 0
    for _, module in model.named_modules():
        packed = _quantized(module)
        for key, v in module.items():
            if isinstance(v, mx.array) and not (packed and key in ("scales", "biases")):
                total += v.size * (32 // module.bits if packed and key == "weight" else 1)
    return sum(v.size for v in trainable_weights(model).values()), total


def model_hash(model_dir: str | Path) -> str:
    """SHA-256 over the base model's weight files, in name order (identifies the base an adapter needs)."""
    h = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("model*.safetensors")):
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def read_adapter_config(adapter_path: str | Path) -> dict:
    path = Path(adapter_path)
    cfg_file = path / CONFIG_FILE
    if not path.is_dir():
        raise OpenELMError(f"--adapter-path {path}: no such adapter directory")
    if not cfg_file.is_file():
        raise OpenELMError(f"--adapter-path {path}: no {CONFIG_FILE} (write one with `openelm-mlx lora`)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise OpenELMError(f"{cfg_file}: not valid JSON ({e.msg}, line {e.lineno})") from None
    for key in ("fine_tune_type", "rank", "alpha", "targets", "num_layers"):
        if key not in cfg:
            raise OpenELMError(f"{cfg_file}: missing field {key!r}")
    return cfg


def load_adapter_weights(model: nn.Module, file: str | Path) -> None:
    """Load trained weights (adapters, or full-fine-tuned blocks) into an adapted model, checking names and shapes."""
    from ..errors import check_names

    file = Path(file)
    if not file.is_file():
        raise OpenELMError(f"{file}: no such adapter file")
    try:
        weights = mx.load(str(file))
    except Exception as e:  # MLX raises ValueError/RuntimeError on bad files
        raise OpenELMError(f"{file}: cannot load safetensors ({e})") from None
    expected = trainable_weights(model)
    check_names(expected, weights, file, "; the adapter was trained with other --targets/--num-layers/--rank")
    for name, w in weights.items():
        if w.shape != expected[name].shape:
            raise OpenELMError(
                f"{file}: tensor {name} has shape {list(w.shape)}, the adapter config expects "
                f"{list(expected[name].shape)}"
            )
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())


def attach(model: nn.Module, adapter_path: str | Path) -> dict:
    """Apply the adapter described by ``adapter_path/adapter_config.json`` and load its weights; returns the config."""
    cfg = read_adapter_config(adapter_path)
    apply_adapters(
        model,
        cfg["fine_tune_type"],
        int(cfg["rank"]),
        float(cfg["alpha"]),
        0.0,
        cfg["targets"],
        int(cfg["num_layers"]),
    )
    load_adapter_weights(model, Path(adapter_path) / ADAPTER_FILE)
    model.eval()
    return cfg


def _swap(model: nn.Module, new_weight: Callable[[nn.Module], mx.array | None], requantize: bool) -> int:
    """Replace each module for which ``new_weight`` gives a weight by a plain Linear/Embedding
    holding it, quantized again like the module's base if ``requantize``; returns how many."""
    swapped = []
    for path, module in model.named_modules():
        w = new_weight(module)
        if w is None:
            continue
        base = module.base if isinstance(module, ADAPTER_LAYERS) else module
        embedding = isinstance(base, (Embedding, QuantizedEmbedding))
        plain = Embedding(*w.shape) if embedding else Linear(w.shape[1], w.shape[0], bias=False)
        plain.weight = w
        if requantize and _quantized(base):
            plain = plain.to_quantized(group_size=base.group_size, bits=base.bits, mode=base.mode)
        swapped.append((path, plain))
    model.update_modules(tree_unflatten(swapped))
    mx.eval(model.parameters())
    return len(swapped)


def fuse_in_place(model: nn.Module, requantize: bool = True) -> int:
    """Replace every adapter layer by a plain layer holding its fused weight; returns how many.

    A quantized base is quantized again with its own bits and group size unless
    ``requantize`` is False (then the fused layer is in the scales' float dtype)."""
    return _swap(model, lambda m: m.fused_weight() if isinstance(m, ADAPTER_LAYERS) else None, requantize)


def dequantize_in_place(model: nn.Module) -> int:
    """Replace every quantized Linear/Embedding by its float form (the scales' dtype)."""
    plain_quantized = lambda m: _quantized(m) and not isinstance(m, ADAPTER_LAYERS)  # noqa: E731
    return _swap(model, lambda m: base_weight(m) if plain_quantized(m) else None, False)


def attach_for_inference(model: nn.Module, adapter_path: str | Path) -> dict:
    """``attach``, then for an unquantized model fuse in memory (generation then runs at the base
    model's speed, on its fast routes); a quantized one keeps its adapter layers, so the quantized
    base weights stay exactly as trained against."""
    cfg = attach(model, adapter_path)
    if not any(_quantized(m) for _, m in model.named_modules()):
        fuse_in_place(model)
    return cfg
