"""OpenELM's tokenizer when a checkpoint ships none: Llama 2's ``tokenizer.model``.

Apple's OpenELM repos carry no tokenizer; their instructions point at ``meta-llama/Llama-2-7b-hf``,
which is gated (a new user's first ``generate`` used to fail there).  The same file is published
byte-identical in ungated repos, so they are tried next, and a download is accepted only if its
SHA-256 is Llama 2's: an ungated copy cannot substitute another tokenizer.  The file is Meta's,
under the Llama 2 Community License.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import OpenELMError
from . import hub

SHA256 = "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"
SIZE = 499_723
VOCAB_SIZE = 32000
# Meta's (gated: used when the user accepted its licence and is logged in), then copies.
SOURCES = ("meta-llama/Llama-2-7b-hf", "NousResearch/Llama-2-7b-hf", "TinyLlama/TinyLlama-1.1B-Chat-v1.0")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(
    log: Callable[[str], None],
    sources: Sequence[str] = SOURCES,
    sha256: str = SHA256,
) -> Path:
    """The first of ``sources`` whose ``tokenizer.model`` downloads (or is cached) with SHA-256
    ``sha256``; one line says which.  All failing: one error listing why each was passed over."""
    passed_over = []
    for repo in sources:
        try:
            path = hub.download_file(repo, "tokenizer.model")
        except OpenELMError as e:
            passed_over.append(f"{repo}: {_short(str(e), repo)}")
            continue
        digest = sha256_of(path)
        if digest != sha256:
            passed_over.append(f"{repo}: its tokenizer.model has SHA-256 {digest[:16]}..., not Llama 2's; refused")
            continue
        log(
            f"tokenizer: none in the checkpoint; using Llama 2's tokenizer.model from {repo} "
            f"(SHA-256 {sha256[:16]}... verified; Meta's file, under the Llama 2 Community License)"
        )
        return path
    raise OpenELMError(
        "no tokenizer.model in the checkpoint, and Llama 2's could not be fetched ("
        + "; ".join(passed_over)
        + "); pass --tokenizer PATH or REPO"
    )


def _short(message: str, repo: str) -> str:
    if "gated" in message:
        return "gated (accept Meta's licence there and log in to use it)"
    return message.removeprefix(f"{repo}: ").split(";")[0][:160]
