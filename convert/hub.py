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


def reachable(timeout: float = 1.0) -> bool:
    """Whether the Hub's endpoint accepts a TCP connection within ``timeout`` seconds.

    huggingface_hub retries an unreachable endpoint for about 20 s before giving up; this
    answers in a second. Behind a proxy the endpoint is not dialled directly: assume yes."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout).close()
    except OSError:
        return False
    return True


def download_file(repo_id: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or not reachable()
    try:  # unreachable: the local cache still answers, at once
        return Path(hf_hub_download(repo_id, filename, local_files_only=offline))
    except Exception as e:
        if offline:
            home = os.environ.get("HF_HOME", "~/.cache/huggingface")
            raise OpenELMError(
                f"cannot reach the Hugging Face Hub and {repo_id}/{filename} is not in the local cache ({home}); "
                "connect to the internet, or pass a local file instead"
            ) from None
        raise _explain(repo_id, e) from None


def looks_local_path(text: str) -> bool:
    """'models/typo' when ./models exists: a mistyped path, not a Hub repo."""
    return Path(text).expanduser().parent.is_dir() and Path(text).parent != Path(".")


def tokenizer_option(option: str | Path) -> Path:
    """``--tokenizer``: a tokenizer.model, a folder holding one, or a Hub repo id (the user's
    choice, so no hash is checked; the hash check is for the fallback, llama2_tokenizer.py)."""
    p = Path(option).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        if (p / "tokenizer.model").is_file():
            return p / "tokenizer.model"
        raise OpenELMError(f"--tokenizer {option}: the folder holds no tokenizer.model")
    if looks_like_repo_id(str(option)) and not looks_local_path(str(option)):
        return download_file(str(option), "tokenizer.model")
    raise OpenELMError(f"--tokenizer {option}: no such file, folder or Hub repo id")
