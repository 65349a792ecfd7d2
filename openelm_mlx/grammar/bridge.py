"""The tokenizer bridge: llguidance's view of the model's own SentencePiece vocabulary.

llguidance computes a token mask by walking a trie of every token's bytes, so it needs each
token id's exact bytes.  Read from the SentencePiece model itself:

* byte-fallback pieces ``<0xNN>`` are the single byte 0xNN;
* ``▁`` (U+2581) in a piece is the space it stands for;
* control and unknown pieces (``<unk>``, ``<s>``, ``</s>``) and unused ones are special: their
  bytes start with 0xFF (never valid UTF-8), so no grammar text can match them; EOS is allowed
  by the matcher itself where the grammar accepts;
* ids past the tokenizer's pieces (a checkpoint whose embedding is padded beyond the tokenizer)
  are special as well, so never allowed.

The encode function llguidance also wants (it tokenizes forced text such as ``{"name":``) must
return tokens whose bytes are exactly the text: SentencePiece's ``encode`` adds a dummy-prefix
``▁`` and may normalise whitespace, so the prefix is stripped, and anything that still does not
spell the text byte for byte is spelled with byte-fallback pieces (always exact).
"""

from __future__ import annotations

import threading
import weakref

import llguidance

from ..errors import OpenELMError
from ..tokenizer import Tokenizer

SPACE = "\u2581"

_lock = threading.Lock()
_bridges: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Tokenizer -> {vocab: LLTokenizer}


def token_bytes(tokenizer: Tokenizer, vocab_size: int) -> list[bytes]:
    """Every token id's bytes as generated text spells them (special tokens: 0xFF + name)."""
    sp = tokenizer.sp
    n = sp.get_piece_size()
    out: list[bytes] = []
    for i in range(vocab_size):
        if i >= n:
            out.append(b"\xff[pad %d]" % i)
            continue
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            out.append(bytes([int(piece[3:5], 16)]))
        elif sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            out.append(b"\xff" + piece.encode("utf-8"))
        else:
            out.append(piece.replace(SPACE, " ").encode("utf-8"))
    return out


class _Vocabulary:
    """What ``llguidance.TokenizerWrapper`` reads: ids, token bytes and an exact encode function."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_id: int):
        self.sp = tokenizer.sp
        self.tokens = token_bytes(tokenizer, vocab_size)
        self.eos_token_id = eos_id
        self.bos_token_id = tokenizer.bos_id if tokenizer.bos_id >= 0 else None
        self.special_token_ids = [i for i, t in enumerate(self.tokens) if t.startswith(b"\xff")]
        pieces = min(self.sp.get_piece_size(), vocab_size)
        self.byte_ids = {self.tokens[i][0]: i for i in range(pieces) if self.sp.is_byte(i)}

    def __call__(self, text: bytes | str) -> list[int]:
        data = text if isinstance(text, bytes) else text.encode("utf-8")
        try:
            s = data.decode("utf-8")
        except UnicodeDecodeError:
            return self._bytes(data)
        ids = self.sp.encode(s)
        if ids and not s.startswith(" "):  # drop the dummy-prefix space SentencePiece adds
            first = self.sp.id_to_piece(ids[0])
            if first == SPACE:
                ids = ids[1:]
            elif first.startswith(SPACE):
                rest = self.sp.piece_to_id(first[1:])
                ids = ([rest] if rest != self.sp.unk_id() else []) + ids[1:]
        if b"".join(self.tokens[i] for i in ids) != data:
            return self._bytes(data)
        return ids

    def _bytes(self, data: bytes) -> list[int]:
        if len(self.byte_ids) < 256:
            raise OpenELMError("the tokenizer has no byte-fallback pieces; constrained decoding needs them")
        return [self.byte_ids[b] for b in data]


def llg_tokenizer(tokenizer: Tokenizer, vocab_size: int, eos_id: int) -> llguidance.LLTokenizer:
    """The llguidance tokenizer for ``tokenizer`` and a model of ``vocab_size`` ids (built once, ~10-30 ms)."""
    with _lock:
        per = _bridges.setdefault(tokenizer, {})
        key = (vocab_size, eos_id)
        if key not in per:
            vocab = _Vocabulary(tokenizer, vocab_size, eos_id)
            per[key] = llguidance.LLTokenizer(llguidance.TokenizerWrapper(vocab), n_vocab=vocab_size)
        return per[key]
