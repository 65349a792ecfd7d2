"""Training data: the jsonl formats mlx-lm users have, or a plain text file, as token sequences.

``--data`` is either

- a folder with ``train.jsonl``, ``valid.jsonl`` (and ``test.jsonl`` for ``--test``), one JSON
  object a line in one of mlx-lm's formats: ``{"text": ...}``, ``{"prompt": ..., "completion":
  ...}`` or ``{"messages": [{"role": ..., "content": ...}, ...]}`` (rendered with the OpenELM
  Instruct template of template.py); or
- a UTF-8 text file (``.txt``, or ``.xz``-compressed), tokenized whole and cut into sequences of
  ``--max-seq-length`` tokens, each starting with BOS.  Of every ten sequences the tenth goes to
  validation and the ninth to test, the rest to training.

Every sequence starts with BOS and, except the cut text, ends with EOS.  ``Example.offset`` is
the first position whose token is trained on: 1 (everything after BOS), or with
``--mask-prompt`` the first token of the completion (the last assistant message for chats).
"""

from __future__ import annotations

import json
import lzma
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import OpenELMError
from ..template import turn_text
from ..tokenizer import Tokenizer

SPLITS = ("train", "valid", "test")
TEXT_SPLIT_EVERY = 10  # of each 10 cut sequences: #10 validation, #9 test
PAD_TO = 32  # batch widths are multiples of this, so few distinct shapes are compiled


@dataclass
class Example:
    tokens: list[int]
    offset: int  # first trained position (>= 1)


@dataclass
class Dataset:
    examples: list[Example]
    source: str

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def num_tokens(self) -> int:
        return sum(len(e.tokens) for e in self.examples)


def _render_messages(messages: object, where: str) -> tuple[str, str]:
    """(context, last assistant reply + EOS) in the Instruct template."""
    if not isinstance(messages, list) or not messages:
        raise OpenELMError(f"{where}: 'messages' must be a non-empty list")
    system, text = None, ""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise OpenELMError(f"{where}: messages[{i}] needs string 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise OpenELMError(f"{where}: messages[{i}] has role {m['role']!r}; expected system, user or assistant")
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    if not messages or messages[-1]["role"] != "assistant":
        raise OpenELMError(f"{where}: the last message must be the assistant's (what is trained on)")
    expected = "user"
    for m in messages:
        if m["role"] != expected:
            raise OpenELMError(f"{where}: messages must alternate user and assistant after an optional system one")
        if m is messages[-1]:
            break
        # One turn as chat.py renders it: template, reply, EOS, newline.
        text += turn_text(m["content"], system if not text else None) if expected == "user" else m["content"] + "</s>\n"
        expected = "assistant" if expected == "user" else "user"
    return text, messages[-1]["content"] + "</s>"


def _example(obj: object, where: str, tok: Tokenizer, mask_prompt: bool) -> Example:
    if not isinstance(obj, dict):
        raise OpenELMError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        prompt, completion = _render_messages(obj["messages"], where)
    elif "prompt" in obj or "completion" in obj:
        prompt, completion = obj.get("prompt"), obj.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise OpenELMError(f"{where}: 'prompt' and 'completion' must both be strings")
        completion += "</s>"
    elif "text" in obj:
        if not isinstance(obj["text"], str):
            raise OpenELMError(f"{where}: 'text' must be a string")
        prompt, completion = "", obj["text"] + "</s>"
        if mask_prompt:
            raise OpenELMError(f"{where}: --mask-prompt needs prompt/completion or messages lines, not text")
    else:
        raise OpenELMError(f"{where}: no 'text', 'prompt'/'completion' or 'messages' field (keys: {', '.join(obj)})")
    tokens = tok.encode(prompt + completion)
    offset = len(tok.encode(prompt)) if mask_prompt else 1
    if len(tokens) < 2 or offset >= len(tokens):
        raise OpenELMError(f"{where}: nothing to train on (empty text or completion)")
    return Example(tokens, max(1, offset))


def read_jsonl(path: Path, tok: Tokenizer, mask_prompt: bool = False) -> Dataset:
    examples = []
    try:
        data = path.read_bytes()
    except OSError as e:
        raise OpenELMError(f"{path}: cannot read ({e.strerror})") from None
    for n, raw in enumerate(data.split(b"\n"), 1):
        where = f"{path}:{n}"
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise OpenELMError(f"{where}: not valid UTF-8 (byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise OpenELMError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
        examples.append(_example(obj, where, tok, mask_prompt))
    if not examples:
        raise OpenELMError(f"{path}: no examples")
    return Dataset(examples, str(path))


def read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
        if path.suffix == ".xz":
            data = lzma.decompress(data)
    except lzma.LZMAError as e:
        raise OpenELMError(f"{path}: not a valid .xz file ({e})") from None
    except OSError as e:
        raise OpenELMError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OpenELMError(f"{path}: not valid UTF-8 (byte {e.start})") from None


def cut_text(path: Path, tok: Tokenizer, seq_len: int) -> dict[str, Dataset]:
    """A text file as train/valid/test sequences of ``seq_len`` tokens (the module docstring's rule)."""
    ids = tok.encode(read_text(path), add_bos=False)
    body = seq_len - 1  # each sequence starts with BOS
    chunks = [[tok.bos_id] + ids[i : i + body] for i in range(0, len(ids), body)]
    chunks = [c for c in chunks if len(c) > 1]
    n = TEXT_SPLIT_EVERY
    split = {
        "train": [c for i, c in enumerate(chunks) if i % n < n - 2],
        "test": [c for i, c in enumerate(chunks) if i % n == n - 2],
        "valid": [c for i, c in enumerate(chunks) if i % n == n - 1],
    }
    if not split["valid"] or not split["train"]:
        raise OpenELMError(
            f"{path}: {len(ids)} tokens make {len(chunks)} sequences of {seq_len}; need at least {n} "
            "(a longer text or a smaller --max-seq-length)"
        )
    return {k: Dataset([Example(c, 1) for c in v], f"{path} ({k})") for k, v in split.items()}


def load(
    data: str | Path, tok: Tokenizer, max_seq_length: int, mask_prompt: bool = False, need_test: bool = False
) -> dict[str, Dataset]:
    """``{"train", "valid"[, "test"]}`` from a folder of jsonl files or a text file."""
    path = Path(data)
    if path.is_file():
        if mask_prompt:
            raise OpenELMError(f"--mask-prompt needs prompt/completion or messages data; {path} is plain text")
        return cut_text(path, tok, max_seq_length)
    if not path.is_dir():
        raise OpenELMError(f"--data {path}: no such folder or text file")
    out = {}
    for split in SPLITS:
        f = path / f"{split}.jsonl"
        if f.is_file():
            out[split] = read_jsonl(f, tok, mask_prompt)
        elif split != "test" or need_test:
            raise OpenELMError(f"--data {path}: no {split}.jsonl")
    long = sum(len(e.tokens) > max_seq_length for d in out.values() for e in d.examples)
    if long:
        print(f"warning: {long} sequences are longer than --max-seq-length {max_seq_length}: cut", file=sys.stderr)
    return out


# --- batches ------------------------------------------------------------------------------------


def length_batches(ds: Dataset, batch_size: int) -> list[list[int]]:
    """Example indices sorted by length, in consecutive groups of ``batch_size`` (a last partial one is dropped)."""
    if len(ds) < batch_size:
        raise OpenELMError(f"{ds.source}: {len(ds)} examples, fewer than --batch-size {batch_size}")
    order = sorted(range(len(ds)), key=lambda i: len(ds.examples[i].tokens))
    return [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]


def batch_order(num_batches: int, seed: int, index: int) -> int:
    """Which batch the ``index``-th draw takes: a fresh seeded permutation each pass (epoch).

    A function of the draw index alone, so a resumed run draws exactly what an uninterrupted one would."""
    epoch, k = divmod(index, num_batches)
    return int(np.random.default_rng([seed, epoch]).permutation(num_batches)[k])


def make_batch(
    ds: Dataset, rows: list[int], max_seq_length: int, rank: int = 0, world: int = 1
) -> tuple[mx.array, mx.array]:
    """(tokens [b, width], spans [b, 2]) for this rank's share (``rows[rank::world]``) of a batch.

    ``spans`` holds each row's (offset, length); ``target_mask`` turns them into the loss mask.
    Right padding: with causal attention, a padded row computes exactly what it would alone."""
    mine = [ds.examples[i] for i in rows[rank::world]]
    lengths = [min(len(e.tokens), max_seq_length) for e in mine]
    width = min(1 + -(-(max(lengths) - 1) // PAD_TO) * PAD_TO, max_seq_length)  # inputs: a multiple of PAD_TO
    tokens = np.zeros((len(mine), width), np.int32)
    for j, (e, n) in enumerate(zip(mine, lengths, strict=True)):
        tokens[j, :n] = e.tokens[:n]
    return mx.array(tokens), mx.array([[e.offset, n] for e, n in zip(mine, lengths, strict=True)], dtype=mx.int32)


def target_mask(spans: mx.array, width: int) -> mx.array:
    """[b, width] booleans: target position t (which predicts token t + 1) is trained on iff
    offset <= t + 1 < length."""
    nxt = mx.arange(1, width + 1)
    return mx.logical_and(nxt >= spans[:, 0:1], nxt < spans[:, 1:])


def iterate(ds: Dataset, group_size: int, seed: int, start: int = 0) -> Iterator[list[int]]:
    """Endless shuffled groups of ``group_size`` similar-length example indices, from draw
    ``start`` on (draws, not epochs, so resuming is exact).  A group is one optimizer step's
    global batch; ``make_batch`` cuts it into micro-batches and process shares."""
    groups = length_batches(ds, group_size)
    index = start
    while True:
        yield groups[batch_order(len(groups), seed, index)]
        index += 1
