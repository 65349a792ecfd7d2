"""Calibration text: reading it, checking it, cutting it into sequences, and its hash.

A calibration file is UTF-8 text, or JSON Lines (``.jsonl``) whose records carry a ``text``
field (mlx-lm's format).  The token stream is cut into rows of ``seq_len`` tokens, each
starting with BOS as generation does; the last tenth of the rows (at least one) is held out
and only scored, so the recipe in config.json reports a KL the methods did not fit to.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from ..errors import OpenELMError
from ..tokenizer import Tokenizer

BUNDLED = Path(__file__).resolve().parent.parent / "bundled" / "kjv-calibration.txt"
HELD_OUT_FRACTION = 0.1
MAX_HELD_OUT = 32  # rows: enough for a stable mean KL, few enough to score in seconds


@dataclass
class CalibrationData:
    path: str  # as the user gave it, or "bundled:kjv-calibration.txt"
    sha256: str  # of the file's bytes
    train: mx.array  # [N, seq_len] uint32, each row BOS + seq_len - 1 tokens
    held_out: mx.array  # [M, seq_len]

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]

    def describe(self) -> str:
        n, m = self.train.shape[0], self.held_out.shape[0]
        return f"{self.path} ({n} + {m} held-out sequences of {self.seq_len} tokens, sha256 {self.sha256[:12]})"


def read_documents(path: Path, flag: str = "--calibration-data") -> tuple[list[str], str]:
    """(documents, sha256) of a text or JSONL file; a one-line OpenELMError for anything else."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise OpenELMError(f"{flag} {path}: no such file") from None
    except IsADirectoryError:
        raise OpenELMError(f"{flag} {path}: is a directory, expected a text or JSONL file") from None
    except OSError as e:
        raise OpenELMError(f"{flag} {path}: cannot read ({e.strerror})") from None
    digest = hashlib.sha256(raw).hexdigest()
    if b"\0" in raw:
        raise OpenELMError(f"{flag} {path}: binary data (NUL bytes), expected UTF-8 text or JSONL")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OpenELMError(f"{flag} {path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    if not text.strip():
        raise OpenELMError(f"{flag} {path}: the file is empty")
    if path.suffix.lower() != ".jsonl":
        return [text], digest
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise OpenELMError(f"{flag} {path} line {n}: not JSON (JSONL needs one object per line)") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise OpenELMError(f'{flag} {path} line {n}: expected an object with a "text" string')
        docs.append(record["text"])
    if not any(d.strip() for d in docs):
        raise OpenELMError(f"{flag} {path}: no text in any record")
    return docs, digest


def load(
    path: str | Path | None, tokenizer: Tokenizer, seq_len: int, max_sequences: int, flag: str = "--calibration-data"
) -> CalibrationData:
    """Tokenize ``path`` (default: the bundled KJV training excerpt) into train and held-out rows."""
    if seq_len < 2:
        raise OpenELMError(f"--calibration-seq-len {seq_len}: must be at least 2")
    file = Path(path).expanduser() if path is not None else BUNDLED
    docs, digest = read_documents(file, flag)
    ids: list[int] = []
    for d in docs:
        ids += tokenizer.encode(d, add_bos=False)
    body = seq_len - 1
    rows = len(ids) // body
    if rows < 2:
        raise OpenELMError(
            f"{flag} {file}: {len(ids)} tokens, shorter than two sequences of --calibration-seq-len {seq_len} "
            "(one to calibrate on, one held out); give more text or a shorter --calibration-seq-len"
        )
    # a tenth of the rows calibration uses (at least 2, at most MAX_HELD_OUT), from the end of the text
    held = min(rows - 1, MAX_HELD_OUT, max(2, round(min(rows, max_sequences) * HELD_OUT_FRACTION)))
    train_rows = min(rows - held, max_sequences)
    bos = tokenizer.bos_id
    table = [[bos] + ids[r * body : (r + 1) * body] for r in range(rows)]
    name = "bundled:kjv-calibration.txt" if path is None else str(path)
    return CalibrationData(
        name, digest, mx.array(table[:train_rows], dtype=mx.uint32), mx.array(table[rows - held :], dtype=mx.uint32)
    )
