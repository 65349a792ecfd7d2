"""Every kind of input, turned into one ``Source``: a config plus lazily-read tensors in HF names.

- a Hub repo id (``apple/OpenELM-270M-Instruct``), downloaded through huggingface_hub;
- a local HF folder: ``config.json`` with ``model.safetensors``, sharded safetensors with their
  index, or ``pytorch_model.bin`` (single or sharded);
- a single weight file, e.g. a CoreNet ``checkpoint_*.pt``, with ``--preset`` or ``--config``
  (an HF config.json or a CoreNet YAML) for the shapes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..config import OpenELMConfig, parse_json, preset_name
from ..errors import CheckpointError, ConfigError, OpenELMError, check_names
from . import hub
from .hub import looks_local_path
from .safetensors_reader import read_safetensors
from .tensors import FLOAT_DTYPES, LazyTensor
from .torch_reader import read_torch_checkpoint, state_dict_tensors

# Non-persistent buffers some exports still carry; they hold no learned weights.
_IGNORED_SUFFIXES = ("inv_freq", "_cached_cos", "_cached_sin")
CORENET_PADDED_VOCAB = 32128
_SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254}")


@dataclass
class Source:
    name: str  # what the user passed, for messages and the model card
    config: OpenELMConfig
    tensors: dict[str, LazyTensor]  # HF names, shapes checked against config
    tokenizer: Path | None
    generation_config: dict | None
    files: list[Path]
    notes: list[str] = field(default_factory=list)  # how the layout was read, for the log

    @property
    def is_instruct(self) -> bool:
        return "instruct" in self.name.lower()

    @property
    def source_dtype(self) -> str:
        return self.tensors["transformer.token_embeddings.weight"].dtype


def load_source(src: str, preset: str | None = None, config_file: str | None = None) -> Source:
    path = Path(src).expanduser()
    if not path.exists():
        if hub.looks_like_repo_id(src) and not looks_local_path(src):
            path = hub.download_checkpoint(src)
        else:
            raise OpenELMError(f"{src}: no such file or directory (and not a Hub repo id like apple/OpenELM-270M)")
    if path.is_dir():
        files = _weight_files(path)
        config, tie = _explicit_config(preset, config_file) or _folder_config(path)
    else:
        files = [path]
        explicit = _explicit_config(preset, config_file)
        if explicit is None:
            beside = path.parent / "config.json"
            if not beside.is_file():
                raise OpenELMError(
                    f"{path}: a single checkpoint file carries no shapes; pass --preset "
                    "(270M, 450M, 1_1B, 3B) or --config (config.json or CoreNet YAML)"
                )
            explicit = read_hf_config(beside)
        config, tie = explicit
    raw: dict[str, LazyTensor] = {}
    for f in files:
        for name, t in _read_any(f).items():
            if name in raw:
                raise CheckpointError(f"{f}: tensor {name} appears in more than one shard")
            raw[name] = t
    notes: list[str] = []
    config, tensors = to_hf_names(raw, config, files[0], tie, notes)
    folder = path if path.is_dir() else path.parent
    tok = folder / "tokenizer.model"
    gen = folder / "generation_config.json"
    generation_config = None
    if gen.is_file():
        try:
            generation_config = parse_json(gen.read_bytes(), gen)
        except ConfigError:  # optional: a broken one is left out, as if absent
            generation_config = None
    return Source(src, config, tensors, tok if tok.is_file() else None, generation_config, files, notes)


# (config, tie_word_embeddings as the config.json says: True, False, or None when unset)
_Shapes = tuple[OpenELMConfig, bool | None]


def _explicit_config(preset: str | None, config_file: str | None) -> _Shapes | None:
    if preset and config_file:
        raise OpenELMError("--preset and --config are alternatives: pass one of them")
    if preset:
        return OpenELMConfig.from_preset(preset), None
    if config_file:
        p = Path(config_file)
        if p.suffix in (".yaml", ".yml"):
            return config_from_corenet_yaml(p), None
        return read_hf_config(p)
    return None


def _folder_config(folder: Path) -> _Shapes:
    if not (folder / "config.json").is_file():
        raise OpenELMError(f"{folder}: no config.json; pass --preset or --config to give the model's shapes")
    return read_hf_config(folder / "config.json")


def read_hf_config(path: Path) -> _Shapes:
    """An HF config.json and its ``tie_word_embeddings``, which OpenELMConfig does not keep:
    Apple's configuration class never sets it, so Hugging Face's default (true) applies."""
    config = OpenELMConfig.from_json(path)
    tie = json.loads(path.read_text()).get("tie_word_embeddings")
    if tie is not None and not isinstance(tie, bool):
        raise ConfigError(f"{path}: tie_word_embeddings={tie!r}: must be true or false")
    return config, tie


def config_from_corenet_yaml(path: Path) -> OpenELMConfig:
    """CoreNet names the preset in model.language_modeling.general_gpt.model_name."""
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
        gpt = doc["model"]["language_modeling"]["general_gpt"]
        name = gpt["model_name"]
    except FileNotFoundError:
        raise OpenELMError(f"{path}: no such config file") from None
    except (yaml.YAMLError, KeyError, TypeError, UnicodeDecodeError):
        raise ConfigError(
            f"{path}: not a CoreNet OpenELM config (model.language_modeling.general_gpt.model_name not found)"
        ) from None
    overrides = {}
    if isinstance(gpt.get("max_context_length"), int):
        overrides["max_context_length"] = gpt["max_context_length"]
    # vocab_size there is the padded 32128; the model's vocabulary stays 32000.
    return OpenELMConfig.from_preset(preset_name(str(name)), **overrides)


def _weight_files(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                names = list(parse_json(index.read_bytes(), index)["weight_map"].values())
            except (KeyError, TypeError, AttributeError):
                raise CheckpointError(f"{index}: not a valid shard index (no weight_map)") from None
            files = []
            for n in sorted(set(map(str, names))):
                if not _SHARD_NAME.fullmatch(n) or n in (".", "..") or n not in names:
                    # /etc/passwd, ../x, sub/dir: a shard is a file beside the index, nothing else
                    raise CheckpointError(
                        f"{index}: weight_map names shard {str(n)[:80]!r}, not a file name in {folder}; refused"
                    )
                f = folder / n
                if not f.is_file():
                    raise CheckpointError(f"{index}: lists shard {n}, which is missing")
                files.append(f)
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    found = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.pt")) or sorted(folder.glob("*.bin"))
    if len(found) == 1:
        return found
    raise OpenELMError(
        f"{folder}: found no weights (model.safetensors, sharded safetensors with their index, or pytorch_model.bin)"
        if not found
        else f"{folder}: several weight files and no index: pass one file"
    )


def _read_any(path: Path) -> dict[str, LazyTensor]:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"PK":
        return state_dict_tensors(read_torch_checkpoint(path), path)
    if path.suffix == ".safetensors" or magic[:1] not in (b"\x80",):
        return read_safetensors(path)
    raise CheckpointError(
        f"{path}: a bare pickle (not a zip-format torch.save file); refusing to read it. "
        "Re-save it with a current torch.save, or convert it to safetensors"
    )


def to_hf_names(
    raw: dict[str, LazyTensor],
    config: OpenELMConfig,
    where: Path,
    tie_word_embeddings: bool | None = None,
    notes: list[str] | None = None,
) -> tuple[OpenELMConfig, dict[str, LazyTensor]]:
    """Map HF or CoreNet names to HF names, settle which head Apple's code would use, and check
    the tensors against the config's checklist. Returns the config as it runs (head tied or not)."""
    notes = [] if notes is None else notes
    corenet = "transformer.token_embeddings.weight" not in raw and "token_embeddings.weight" in raw
    if not corenet and not config.share_input_output_layers and tie_word_embeddings is not False:
        # Apple's OpenELMForCausalLM has an lm_head here, but transformers' tie_weights() points it
        # at the embedding unless tie_word_embeddings is false (its default is true, and Apple's
        # config never sets it); save_pretrained then writes no lm_head.weight.
        config = replace(config, share_input_output_layers=True)
        notes.append(
            "head: tied to the embedding, as Apple's code runs it (share_input_output_layers is false but "
            "tie_word_embeddings is not; both must be false for an untied head)"
        )
    tensors: dict[str, LazyTensor] = {}
    for name, t in raw.items():
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if not corenet and name == "transformer.classifier.weight":
            # OpenELMModel builds this when share_input_output_layers is false; no forward uses it.
            notes.append("dropped transformer.classifier.weight: Apple's OpenELMModel saves it but never uses it")
            continue
        if corenet:
            name = "lm_head.weight" if name == "classifier.weight" else f"transformer.{name}"
            if name in ("transformer.token_embeddings.weight", "lm_head.weight") and t.shape[:1] == (
                CORENET_PADDED_VOCAB,
            ):
                t = t.first_rows(config.vocab_size)  # CoreNet pads the vocabulary for speed
        tensors[name] = t.renamed(name)
    if config.share_input_output_layers and "lm_head.weight" in tensors:
        # Some exports store the tied head explicitly; it must then equal the embedding.
        del tensors["lm_head.weight"]
    expected = config.weight_shapes()
    check_names(expected, tensors, where, "; the config has fewer layers or other shapes than these weights")
    for name, shape in expected.items():
        t = tensors[name]
        if t.shape != shape:
            raise CheckpointError(
                f"{t.file}: tensor {name} has shape {list(t.shape)}, the config expects {list(shape)}"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{t.file}: tensor {name} has dtype {t.dtype}; expected a float type")
    return config, {n: tensors[n] for n in expected}
