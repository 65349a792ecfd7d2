"""Which modules get how many bits, and quantizing one weight.

Every Linear and the token embedding are quantized; the tied output head then
reads the quantized embedding.  Mixed recipes are written in OpenELM's names
(``qkv_proj`` holds V, ``proj_2`` is the down projection): mlx_lm's recipes look
for Llama names such as ``down_proj`` and do not apply to OpenELM.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ..config import OpenELMConfig
from ..errors import OpenELMError

# mode -> (allowed bits, allowed group sizes, default group size)
MODES: dict[str, tuple[tuple[int, ...], tuple[int, ...], int]] = {
    "affine": ((2, 3, 4, 5, 6, 8), (32, 64, 128), 64),
    "mxfp4": ((4,), (32,), 32),
    "mxfp8": ((8,), (32,), 32),
    "nvfp4": ((4,), (16,), 16),
}

# recipe -> (bits for most modules, bits for the sensitive ones)
RECIPES: dict[str, tuple[int, int]] = {
    "mixed_2_6": (2, 6),
    "mixed_3_4": (3, 4),
    "mixed_3_6": (3, 6),
    "mixed_4_6": (4, 6),
    "mixed_4_8": (4, 8),
}


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int
    mode: str = "affine"

    def as_dict(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}


def check_spec(bits: int, group_size: int | None, mode: str, recipe: str | None = None) -> QuantSpec:
    """The validated default spec; with a mixed recipe its bits are the recipe's low width."""
    if recipe is not None:
        if recipe not in RECIPES:
            raise OpenELMError(f"--quant-recipe {recipe}: unknown; choose one of {', '.join(RECIPES)}")
        if mode != "affine":
            raise OpenELMError(f"--quant-recipe {recipe} needs --q-mode affine")
        bits = RECIPES[recipe][0]
    if mode not in MODES:
        raise OpenELMError(f"--q-mode {mode}: unknown; choose one of {', '.join(MODES)}")
    allowed_bits, allowed_groups, default_group = MODES[mode]
    group_size = group_size or default_group
    if bits not in allowed_bits:
        raise OpenELMError(f"--q-bits {bits}: mode {mode} supports {', '.join(map(str, allowed_bits))}")
    if group_size not in allowed_groups:
        raise OpenELMError(f"--q-group-size {group_size}: mode {mode} supports {', '.join(map(str, allowed_groups))}")
    return QuantSpec(bits, group_size, mode)


def quantizable_modules(config: OpenELMConfig) -> list[str]:
    names = ["transformer.token_embeddings"]
    for i in range(config.num_transformer_layers):
        p = f"transformer.layers.{i}."
        names += [p + "attn.qkv_proj", p + "attn.out_proj", p + "ffn.proj_1", p + "ffn.proj_2"]
    if not config.share_input_output_layers:
        names.append("lm_head")
    return names


def _sensitive(module: str, num_layers: int) -> bool:
    """Embedding/head, and V (in qkv_proj) and the down projection in the first and last
    eighth of the layers and every third layer: where low bits hurt perplexity most."""
    if module in ("transformer.token_embeddings", "lm_head"):
        return True
    layer = int(module.split(".")[2])
    edge = max(1, num_layers // 8)
    in_edge = layer < edge or layer >= num_layers - edge
    return module.endswith(("attn.qkv_proj", "ffn.proj_2")) and (in_edge or layer % 3 == 2)


def plan(config: OpenELMConfig, spec: QuantSpec, recipe: str | None = None) -> dict[str, QuantSpec | None]:
    """Per quantizable module: its QuantSpec, or None where the shape does not allow quantizing.

    ``spec`` comes from ``check_spec``, which has validated ``recipe``."""
    shapes = config.weight_shapes()
    result: dict[str, QuantSpec | None] = {}
    for module in quantizable_modules(config):
        bits = spec.bits
        if recipe is not None:
            low, high = RECIPES[recipe]
            bits = high if _sensitive(module, config.num_transformer_layers) else low
        in_dim = shapes[module + ".weight"][1]
        result[module] = QuantSpec(bits, spec.group_size, spec.mode) if in_dim % spec.group_size == 0 else None
    return result


def config_block(base: QuantSpec, modules: dict[str, QuantSpec | None]) -> dict:
    """config.json's ``quantization``: defaults plus an override for each module that differs."""
    block: dict = base.as_dict()
    for module, spec in modules.items():
        if spec is None:
            block[module] = False
        elif spec != base:
            block[module] = spec.as_dict()
    return block


def quantize_weight(name: str, w: mx.array, spec: QuantSpec) -> dict[str, mx.array]:
    """``{name.weight, name.scales[, name.biases]}`` for module ``name``."""
    parts = mx.quantize(w, group_size=spec.group_size, bits=spec.bits, mode=spec.mode)
    out = {f"{name}.weight": parts[0], f"{name}.scales": parts[1]}
    if len(parts) > 2 and parts[2] is not None:
        out[f"{name}.biases"] = parts[2]
    return out
