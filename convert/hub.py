"""Fetching from the Hugging Face Hub, with errors a user can act on.

huggingface_hub does the work (its cache, HF_TOKEN, HF_HOME, HF_HUB_OFFLINE and
progress bars); this module only chooses the files and translates failures.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import OpenELMError

WEIGHT_PATTERNS = ["*.safetensors", "model.safetensors.index.json"]
BIN_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
SIDE_FILES = ["config.json", "generation_config.json", "tokenizer.model"]


def looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~")) and not Path(text).exists()


def _explain(repo_id: str, e: Exception) -> OpenELMError:
    from huggingface_hub import errors

    home = os.environ.get("HF_HOME", "~/.cache/huggingface")
    if isinstance(e, errors.GatedRepoError):
        return OpenELMError(
            f"{repo_id} is gated: accept its licence at https://huggingface.co/{repo_id}, then log in "
            "(`hf auth login`) or set HF_TOKEN; or pass a local file or folder instead"
        )
    if isinstance(e, errors.RepositoryNotFoundError):
        return OpenELMError(
            f"{repo_id}: no such repository on the Hugging Face Hub, or it is private and HF_TOKEN is not set"
        )
    if isinstance(e, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)) or "connect" in str(e).lower():
        return OpenELMError(
            f"cannot reach the Hugging Face Hub and {repo_id} is not in the local cache ({home}); "
            "connect to the internet, or download the repo elsewhere and pass its local folder"
        )
    return OpenELMError(f"{repo_id}: download failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")


def snapshot(repo_id: str, patterns: list[str], revision: str | None = None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, revision=revision))
    except Exception as e:  # every failure becomes one actionable line
        raise _explain(repo_id, e) from None


def download_checkpoint(repo_id: str, revision: str | None = None) -> Path:
    """Download only what conversion needs; .bin weights only when a repo has no safetensors."""
    folder = snapshot(repo_id, SIDE_FILES + WEIGHT_PATTERNS, revision)
    if not any(folder.glob("*.safetensors")):
        folder = snapshot(repo_id, SIDE_FILES + BIN_PATTERNS, revision)
    return folder


def download_file(repo_id: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception as e:
        raise _explain(repo_id, e) from None
