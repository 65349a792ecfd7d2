"""The Llama-2 SentencePiece tokenizer OpenELM uses, and streaming detokenization.

BOS is added, EOS is not.  In chat prompts the text ``</s>`` stands for the EOS
token (as in the HF chat template Apple tuned the Instruct models with), so
``encode`` splits on it and inserts the EOS id instead of spelling it out.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import OpenELMError

EOS_TEXT = "</s>"


class Tokenizer:
    def __init__(self, model_file: str | Path):
        import sentencepiece as spm

        path = Path(model_file)
        if not path.is_file():
            raise OpenELMError(f"{path}: no such tokenizer file")
        if path.stat().st_size == 0:
            raise OpenELMError(f"{path}: the tokenizer file is empty")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:  # sentencepiece raises RuntimeError/OSError on garbage
            raise OpenELMError(f"{path}: not a SentencePiece model ({str(e).splitlines()[0][:120]})") from None
        self.path = path
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [self.bos_id] if add_bos and self.bos_id >= 0 else []
        for i, part in enumerate(text.split(EOS_TEXT)):
            if i:
                ids.append(self.eos_id)
            if part:
                ids += self.sp.encode(part)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self)


class StreamingDetokenizer:
    """Turns tokens into text pieces whose concatenation is exactly ``decode(all tokens)``.

    Decoding the whole sequence each step keeps SentencePiece's word spaces right; a
    trailing U+FFFD means an unfinished UTF-8 sequence from byte-fallback pieces, so that
    text is held back until the next token completes it (or ``finalize`` flushes it).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.emitted = ""

    def add(self, token: int) -> str:
        self.tokens.append(int(token))
        text = self.tokenizer.decode(self.tokens)
        stable = text.rstrip("\ufffd")
        if not stable.startswith(self.emitted):  # cannot happen with SentencePiece; stay correct anyway
            stable = self.emitted
        new, self.emitted = stable[len(self.emitted) :], stable
        return new

    def finalize(self) -> str:
        text = self.tokenizer.decode(self.tokens)
        new = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted = text
        return new

    @property
    def text(self) -> str:
        return self.emitted


def train_sentencepiece(sentences: Iterable[str], vocab_size: int, path: str | Path, **options: Any) -> None:
    """Train a SentencePiece model laid out like Llama-2's: BPE with byte fallback, unk/bos/eos = 0/1/2."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
        **options,
    )
    Path(path).write_bytes(buf.getvalue())
