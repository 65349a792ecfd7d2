"""Which folders openelm-mlx may replace: only those it wrote, or empty ones.

Every folder a command writes (``convert``, ``fuse``, the conversion cache, ``lora``'s adapter
folder) gets a marker file, ``.openelm-mlx-output``.  Before a command replaces or clears a
folder, ``refusal`` checks that the folder is empty, or holds the marker and nothing but files
openelm-mlx writes; anything else (a home folder, a source checkout, a model of the user's with
notes added) is refused with one line naming the folder and what is in it.  ``--force`` says
"replace my earlier output", never "delete whatever is there".
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .errors import OpenELMError

MARKER = ".openelm-mlx-output"
SHOWN = 4  # names listed in a refusal

# What the commands write.  A converted or fused model folder (and a conversion-cache entry):
MODEL_FILES = re.compile(
    r"(config\.json|generation_config\.json|tokenizer\.model|tokenizer_config\.json|README\.md"
    r"|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|openelm-mlx-source\.json"
    rf"|{re.escape(MARKER)})"
)
# A LoRA adapter folder: the adapters, numbered checkpoints, their optimizer states, the config.
ADAPTER_FILES = re.compile(rf"((\d{{7}}_)?adapters(_state)?\.safetensors|adapter_config\.json|{re.escape(MARKER)})")


def write_marker(folder: Path, command: str) -> None:
    from . import __version__

    (folder / MARKER).write_text(json.dumps({"written_by": f"openelm-mlx {command}", "version": __version__}) + "\n")


def has_marker(folder: Path) -> bool:
    m = folder / MARKER
    return m.is_file() and not m.is_symlink()


def refusal(dst: Path, allowed: re.Pattern, legacy: bool = False) -> str | None:
    """Why ``dst`` may not be replaced, or None when it may: it does not exist, is an empty
    folder, or is a folder holding openelm-mlx's marker (or, with ``legacy``, written before
    markers existed: the caller vouched for it) and only names ``allowed`` matches."""
    if not (dst.exists() or dst.is_symlink()):
        return None
    if dst.is_symlink():
        return "it is a symbolic link"
    if not dst.is_dir():
        return "it is a file, not a folder"
    try:
        names = sorted(p.name for p in dst.iterdir())
    except OSError as e:
        return f"it cannot be listed ({e.strerror})"
    if not names:
        return None
    foreign = [n for n in names if not allowed.fullmatch(n)]
    if foreign:
        return f"it holds files openelm-mlx did not write ({_list(foreign)})"
    if not (has_marker(dst) or legacy):
        return f"openelm-mlx did not write it (no {MARKER} marker); it holds {_list(names)}"
    return None


def check_replaceable(dst: Path, flag: str, allowed: re.Pattern, legacy: bool = False) -> None:
    why = refusal(dst, allowed, legacy)
    if why is not None:
        raise OpenELMError(
            f"{flag} {dst}: not replaced: {why}; openelm-mlx replaces only folders it wrote, or empty ones "
            "(choose another folder)"
        )


def _list(names: list[str]) -> str:
    more = len(names) - SHOWN
    return ", ".join(names[:SHOWN]) + (f" and {more} more" if more > 0 else "")


def same_or_inside(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or inside it (both resolved)."""
    a, b = Path(os.path.realpath(a.expanduser())), Path(os.path.realpath(b.expanduser()))
    return a == b or b in a.parents
