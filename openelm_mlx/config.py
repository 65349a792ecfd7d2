"""OpenELM configuration and the layer-wise scaling rule.

OpenELM widens its transformer layer by layer: the number of query heads and the
FFN width grow linearly from the first layer to the last.  ``layerwise_scaling``
is the single place where that rule (Apple's ``make_divisible`` + ``linspace``)
is written down; presets, custom shapes and short HF configs all go through it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from numbers import Number
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, OpenELMError

# Shapes of Apple's four released sizes; everything else is shared (see _PRESET_COMMON).
PRESETS: dict[str, dict[str, int]] = {
    "270M": {"num_transformer_layers": 16, "model_dim": 1280, "head_dim": 64},
    "450M": {"num_transformer_layers": 20, "model_dim": 1536, "head_dim": 64},
    "1_1B": {"num_transformer_layers": 28, "model_dim": 2048, "head_dim": 64},
    "3B": {"num_transformer_layers": 36, "model_dim": 3072, "head_dim": 128},
}
_PRESET_COMMON: dict[str, Any] = {
    "qkv_multipliers": (0.5, 1.0),
    "ffn_multipliers": (0.5, 4.0),
    "num_gqa_groups": 4,
}

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

# Upper bounds checked before any list is expanded or any tensor built: a config.json asking for
# 1e9 layers or a 1e12 vocabulary is refused in one line instead of exhausting memory.  Each is
# far above every OpenELM (3B: 36 layers, model_dim 3072, head_dim 128, vocabulary 32000) and
# above today's large open models (Llama 3 405B: 126 layers, dim 16384, vocabulary 128256).
LIMITS: dict[str, int] = {
    "num_transformer_layers": 1024,
    "model_dim": 65536,
    "head_dim": 1024,
    "vocab_size": 2**21,
    "max_context_length": 2**22,
    "rope_max_length": 2**22,
    "ffn_dim_divisor": 65536,
    "num_gqa_groups": 1024,
    "heads": 4096,  # per layer, query or KV
}
MAX_FFN_MULTIPLIER = 64.0
MAX_JSON_DEPTH = 32  # a config.json nests 2 levels; a safetensors header 3


def json_depth(value: Any) -> int:
    """How deeply ``value`` nests lists and dicts (iterative: a hostile document cannot make
    this recurse)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (list, dict)):
            deepest = max(deepest, d)
            if d <= MAX_JSON_DEPTH:  # deeper is already too deep: no need to walk on
                stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def parse_json(text: str | bytes, where: object) -> Any:
    """``json.loads`` with nesting bounded: one ``ConfigError`` line naming ``where`` for invalid
    JSON, JSON nested past the parser's recursion limit, or past MAX_JSON_DEPTH."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
        why = "it nests too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0][:120]
        raise ConfigError(f"{where}: not valid JSON ({why})") from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise ConfigError(f"{where}: nests lists/objects more than {MAX_JSON_DEPTH} levels deep")
    return value


def make_divisible(v: float, divisor: int) -> int:
    """Round ``v`` to a multiple of ``divisor`` without losing more than 10%."""
    n = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if n < 0.9 * v:
        n += divisor
    return n


def _per_layer(name: str, value: Any, num_layers: int) -> list[float]:
    """Expand a multiplier given as a number, an (start, end) pair or a full list."""
    if isinstance(value, Number) and not isinstance(value, bool):
        return [float(value)] * num_layers
    if isinstance(value, (list, tuple)):
        if len(value) == 2:
            # linspace over the layers, rounded to 2 decimals exactly as Apple does.
            lo, hi = _as_float(value[0], name), _as_float(value[1], name)
            return [round(float(v), 2) for v in np.linspace(lo, hi, num=num_layers, dtype=float)]
        if len(value) == num_layers:
            return [_as_float(v, name) for v in value]
    raise ConfigError(
        f"{name}={value!r}: expected a number, a [start, end] pair or one value per layer ({num_layers} layers)"
    )


def layerwise_scaling(
    num_transformer_layers: int,
    model_dim: int,
    head_dim: int,
    qkv_multipliers: Any = (0.5, 1.0),
    ffn_multipliers: Any = (0.5, 4.0),
    num_gqa_groups: int = 4,
) -> tuple[list[int], list[int], list[float]]:
    """Return per-layer (query heads, KV heads, FFN multipliers): OpenELM's scaling rule."""
    for name, v in (
        ("num_transformer_layers", num_transformer_layers),
        ("model_dim", model_dim),
        ("head_dim", head_dim),
        ("num_gqa_groups", num_gqa_groups),
    ):
        _check_positive_int(name, v)
    qkv = _per_layer("qkv_multipliers", qkv_multipliers, num_transformer_layers)
    ffn = _per_layer("ffn_multipliers", ffn_multipliers, num_transformer_layers)
    for name, values in (("qkv_multipliers", qkv), ("ffn_multipliers", ffn)):
        if not all(0 < m <= MAX_FFN_MULTIPLIER for m in values):
            raise ConfigError(f"{name}={values[:4]}...: each must be in (0, {MAX_FFN_MULTIPLIER:g}]")
    q_dims = [make_divisible(model_dim * m, head_dim * num_gqa_groups) for m in qkv]
    q_heads = [int(q) // head_dim for q in q_dims]
    kv_heads = [h // num_gqa_groups for h in q_heads]
    return q_heads, kv_heads, ffn


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}: {value!r} is not an integer")
    return value


def _as_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) < math.inf:
        raise ConfigError(f"{name}: {value!r:.60} is not a finite number")
    return float(value)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name}={value!r:.60}: must be a positive integer")
    if name in LIMITS and value > LIMITS[name]:
        raise ConfigError(f"{name}={value}: over the limit of {LIMITS[name]} (a corrupt or hostile config?)")


def preset_name(name: str) -> str:
    """Canonical preset key for '270M', 'OpenELM-270M', 'apple/OpenELM-270M-Instruct', '1.1B'..."""
    key = name.rsplit("/", 1)[-1]
    if key.lower().startswith("openelm-"):
        key = key[len("openelm-") :]
    if key.lower().endswith("-instruct"):
        key = key[: -len("-instruct")]
    key = key.upper().replace(".", "_")
    if key not in PRESETS:
        raise ConfigError(f"preset={name!r}: unknown preset; choose one of {', '.join(PRESETS)}")
    return key


@dataclass
class OpenELMConfig:
    """All shapes of one OpenELM model; per-layer lists are always expanded."""

    num_transformer_layers: int
    model_dim: int
    head_dim: int
    num_query_heads: list[int]
    num_kv_heads: list[int]
    ffn_multipliers: list[float]
    vocab_size: int = 32000
    max_context_length: int = 2048
    num_gqa_groups: int = 4
    qkv_multipliers: Any = field(default_factory=lambda: [0.5, 1.0])
    ffn_dim_divisor: int = 256
    ffn_with_glu: bool = True
    normalize_qk_projections: bool = True
    share_input_output_layers: bool = True
    rope_freq_constant: float = 10000.0
    rope_max_length: int = 4096
    rms_norm_eps: float = 1e-6
    bos_token_id: int = 1
    eos_token_id: int = 2
    activation_fn_name: str = "swish"
    normalization_layer_name: str = "rms_norm"
    model_type: str = "openelm"

    def __post_init__(self) -> None:
        L = self.num_transformer_layers
        for name in (
            "num_transformer_layers",
            "model_dim",
            "head_dim",
            "vocab_size",
            "max_context_length",
            "ffn_dim_divisor",
            "num_gqa_groups",
        ):
            _check_positive_int(name, getattr(self, name))
        for name in ("num_query_heads", "num_kv_heads", "ffn_multipliers"):
            values = getattr(self, name)
            if not isinstance(values, (list, tuple)) or len(values) != L:
                n = len(values) if isinstance(values, (list, tuple)) else values
                raise ConfigError(f"{name}: has {n!r} entries but num_transformer_layers={L}")
        self.num_query_heads = [_as_int(h, "num_query_heads") for h in self.num_query_heads]
        self.num_kv_heads = [_as_int(h, "num_kv_heads") for h in self.num_kv_heads]
        self.ffn_multipliers = [_as_float(m, "ffn_multipliers") for m in self.ffn_multipliers]
        for name in ("rms_norm_eps", "rope_freq_constant"):
            setattr(self, name, _as_float(getattr(self, name), name))
        for name in ("bos_token_id", "eos_token_id", "rope_max_length"):
            setattr(self, name, _as_int(getattr(self, name), name))
        _check_positive_int("rope_max_length", self.rope_max_length)
        for name in ("bos_token_id", "eos_token_id"):
            if not -1 <= getattr(self, name) < self.vocab_size:
                raise ConfigError(f"{name}={getattr(self, name)}: outside the vocabulary (0..{self.vocab_size - 1})")
        for name in ("ffn_with_glu", "normalize_qk_projections", "share_input_output_layers"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be true or false")
        for i, (q, kv, m) in enumerate(zip(self.num_query_heads, self.num_kv_heads, self.ffn_multipliers, strict=True)):
            if q <= 0 or kv <= 0:
                raise ConfigError(f"layer {i}: num_query_heads={q}, num_kv_heads={kv}: head counts must be positive")
            if max(q, kv) > LIMITS["heads"]:
                raise ConfigError(f"layer {i}: num_query_heads={q}, num_kv_heads={kv}: over {LIMITS['heads']} heads")
            if q % kv:
                raise ConfigError(f"layer {i}: num_query_heads={q} is not divisible by num_kv_heads={kv}")
            if not 0 < m <= MAX_FFN_MULTIPLIER:
                raise ConfigError(f"layer {i}: ffn_multipliers={m}: must be in (0, {MAX_FFN_MULTIPLIER:g}]")
        if not 0 < self.rms_norm_eps < 1 or not 0 < self.rope_freq_constant < 1e12:
            raise ConfigError(
                f"rms_norm_eps={self.rms_norm_eps}, rope_freq_constant={self.rope_freq_constant}: "
                "must be in (0, 1) and (0, 1e12)"
            )
        if self.activation_fn_name not in ("swish", "silu"):
            raise ConfigError(f"activation_fn_name={self.activation_fn_name!r}: only 'swish' is supported")
        if self.normalization_layer_name != "rms_norm":
            raise ConfigError(
                f"normalization_layer_name={self.normalization_layer_name!r}: only 'rms_norm' is supported"
            )

    # --- constructors -----------------------------------------------------------------
    @classmethod
    def scaled(
        cls,
        num_transformer_layers: int,
        model_dim: int,
        head_dim: int,
        qkv_multipliers: Any = (0.5, 1.0),
        ffn_multipliers: Any = (0.5, 4.0),
        num_gqa_groups: int = 4,
        **overrides: Any,
    ) -> OpenELMConfig:
        """A custom shape, derived with the same layer-wise scaling as Apple's presets."""
        q, kv, ffn = layerwise_scaling(
            num_transformer_layers, model_dim, head_dim, qkv_multipliers, ffn_multipliers, num_gqa_groups
        )
        return cls(
            num_transformer_layers=num_transformer_layers,
            model_dim=model_dim,
            head_dim=head_dim,
            num_query_heads=q,
            num_kv_heads=kv,
            ffn_multipliers=ffn,
            num_gqa_groups=num_gqa_groups,
            qkv_multipliers=list(qkv_multipliers) if isinstance(qkv_multipliers, (list, tuple)) else qkv_multipliers,
            **overrides,
        )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> OpenELMConfig:
        """One of Apple's sizes: '270M', '450M', '1_1B', '3B' (an 'OpenELM-' prefix is fine)."""
        return cls.scaled(**PRESETS[preset_name(name)], **_PRESET_COMMON, **overrides)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OpenELMConfig:
        """From an HF ``config.json`` dict (expanded per-layer lists or just multipliers)."""
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        if d.get("model_type", "openelm") != "openelm":
            raise ConfigError(f"model_type={d.get('model_type')!r}: this is not an OpenELM config")
        missing = [k for k in ("num_transformer_layers", "model_dim", "head_dim") if k not in d]
        if missing:
            raise ConfigError(f"config is missing required field(s): {', '.join(missing)}")
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in d.items() if k in known}
        L = kwargs["num_transformer_layers"]
        _check_positive_int("num_transformer_layers", L)
        groups = kwargs.get("num_gqa_groups")
        groups = 1 if groups is None else groups
        _check_positive_int("num_gqa_groups", groups)
        kwargs["num_gqa_groups"] = groups
        if kwargs.get("num_query_heads") is None:
            # Short form: derive the lists like HF's OpenELMConfig.__post_init__ does.
            q, kv, ffn = layerwise_scaling(
                L,
                kwargs["model_dim"],
                kwargs["head_dim"],
                kwargs.get("qkv_multipliers", (0.5, 1.0)),
                kwargs.get("ffn_multipliers", (0.5, 4.0)),
                groups,
            )
            kwargs.update(num_query_heads=q, num_kv_heads=kv, ffn_multipliers=ffn)
        else:
            heads = kwargs["num_query_heads"]
            if not isinstance(heads, list):
                raise ConfigError(f"num_query_heads={heads!r}: must be a list with one entry per layer")
            if kwargs.get("num_kv_heads") is None:
                kwargs["num_kv_heads"] = [_as_int(h, "num_query_heads") // groups for h in heads]
            kwargs["ffn_multipliers"] = _per_layer("ffn_multipliers", kwargs.get("ffn_multipliers", (0.5, 4.0)), L)
        try:
            return cls(**kwargs)
        except TypeError as e:  # wrong JSON types for a field
            raise ConfigError(f"invalid config: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> OpenELMConfig:
        path = Path(path)
        try:
            d = parse_json(path.read_bytes(), path)
        except FileNotFoundError:
            raise OpenELMError(f"{path}: no such config file") from None
        except OSError as e:
            raise OpenELMError(f"{path}: cannot read ({e.strerror})") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # --- derived shapes ------------------------------------------------------------------
    @property
    def ffn_dims(self) -> list[int]:
        return [int(make_divisible(m * self.model_dim, self.ffn_dim_divisor)) for m in self.ffn_multipliers]

    def layer_parameters(self, i: int) -> int:
        d, hd = self.model_dim, self.head_dim
        q, kv, f = self.num_query_heads[i], self.num_kv_heads[i], self.ffn_dims[i]
        attn = (q + 2 * kv) * hd * d + d * q * hd + (2 * hd if self.normalize_qk_projections else 0)
        ffn = (2 if self.ffn_with_glu else 1) * f * d + f * d
        return attn + ffn + 2 * d  # + attn_norm and ffn_norm

    def num_parameters(self) -> int:
        head = 0 if self.share_input_output_layers else self.vocab_size * self.model_dim
        layers = sum(self.layer_parameters(i) for i in range(self.num_transformer_layers))
        return self.vocab_size * self.model_dim + layers + self.model_dim + head

    def kv_cache_bytes_per_token(self, dtype: str = "float16") -> int:
        return sum(2 * kv * self.head_dim * _DTYPE_BYTES[dtype] for kv in self.num_kv_heads)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the HF checkpoint, by name (the converter's checklist)."""
        d, hd = self.model_dim, self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"transformer.token_embeddings.weight": (self.vocab_size, d)}
        for i, (q, kv, f) in enumerate(zip(self.num_query_heads, self.num_kv_heads, self.ffn_dims, strict=True)):
            p = f"transformer.layers.{i}."
            shapes[p + "attn_norm.weight"] = (d,)
            shapes[p + "attn.qkv_proj.weight"] = ((q + 2 * kv) * hd, d)
            if self.normalize_qk_projections:
                shapes[p + "attn.q_norm.weight"] = (hd,)
                shapes[p + "attn.k_norm.weight"] = (hd,)
            shapes[p + "attn.out_proj.weight"] = (d, q * hd)
            shapes[p + "ffn_norm.weight"] = (d,)
            shapes[p + "ffn.proj_1.weight"] = ((2 if self.ffn_with_glu else 1) * f, d)
            shapes[p + "ffn.proj_2.weight"] = (d, f)
        shapes["transformer.norm.weight"] = (d,)
        if not self.share_input_output_layers:
            shapes["lm_head.weight"] = (self.vocab_size, d)
        return shapes
