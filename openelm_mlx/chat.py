"""A multi-turn chat that keeps its KV cache (the template itself is in template.py)."""

from __future__ import annotations

from collections.abc import Iterator

from .errors import OpenELMError
from .template import turn_text


class ChatSession:
    """Keeps the conversation's tokens and KV cache; each turn feeds only what is new."""

    def __init__(self, model, tokenizer, system_prompt: str | None = None, max_tokens: int = 512, **options):
        self.model, self.tokenizer = model, tokenizer
        self.system_prompt, self.max_tokens, self.options = system_prompt, max_tokens, options
        self.reset()

    def reset(self) -> None:
        self.cache = self.model.make_cache()
        self.history: list[int] = []
        self.last_prompt_tokens = 0
        self.reply_start = 0  # index in history where the last reply begins

    def send(self, message: str) -> Iterator[str]:
        """Stream the reply's text; the reply and its EOS stay in the cache for the next turn."""
        from .generate import DecodeStats, generate_tokens
        from .sampling import SamplingOptions

        if not message.strip():
            raise OpenELMError("the message is empty")
        first = not self.history
        if self.options.get("template", "instruct") == "none":  # a base model: plain text, one turn a line
            text = message if first else "\n" + message
        else:
            text = turn_text(message, self.system_prompt if first else None)
            if not first:
                # Close the previous reply as the template does: EOS (unless it stopped on one), then "\n".
                closed = self.history[-1] == self.tokenizer.eos_id
                text = ("" if closed else "</s>") + "\n" + text
        ids = self.tokenizer.encode(text, add_bos=first)
        self.reply_start = len(self.history) + len(ids)
        stats = DecodeStats()
        sampling = SamplingOptions(**self.options.get("sampling", {}))
        detok = self.tokenizer.detokenizer()
        steps = generate_tokens(
            self.model,
            ids,
            max_tokens=self.max_tokens,
            sampling=sampling,
            seed=self.options.get("seed"),
            cache=self.cache,
            history=self.history,
            stats=stats,
            constraint=self.options.get("constraint"),
            tokenizer=self.tokenizer if self.options.get("constraint") else None,  # the grammar needs it
        )
        try:
            for tok in steps:
                if tok == self.model.config.eos_token_id:
                    break
                piece = detok.add(tok)
                if piece:
                    yield piece
            rest = detok.finalize()
            if rest:
                yield rest
        finally:
            self.last_prompt_tokens = stats.prompt_tokens
            # Keep the cache in step with the history (an interrupted turn may have queued one more).
            for c in self.cache:
                c.trim(c.offset - len(self.history))

    def context_left(self) -> int:
        return self.model.config.max_context_length - len(self.history)
