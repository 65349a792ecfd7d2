"""An lm-evaluation-harness backend for openelm-mlx models (``pip install 'openelm-mlx[eval]'``).

``OpenELMLM`` is registered with lm-eval as ``openelm-mlx``; ``harness.py`` drives it for the
``openelm-mlx evaluate`` command, and any lm-eval entry point can use it once this module is
imported (``lm_eval.simple_evaluate(model=OpenELMLM("DIR"), tasks=[...])``).

Tokenization follows how Apple scored OpenELM (lm-eval's ``hf`` backend with ``add_bos_token=True``,
model card): every context starts with BOS, and a context/continuation pair is split the way
lm-eval's ``TemplateLM`` does (trailing spaces of the context move to the continuation; the
continuation is what the whole string has beyond the context's tokens).  Documents scored by
``loglikelihood_rolling`` start from BOS as the prefix token and are not given a second BOS.
The Instruct template is applied only when the harness asks for a chat template
(``--apply-chat-template``).

Scoring is in ``scoring.py``; generation runs on the engine (``engine.stream_batch_generate``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from . import scoring
from .engine import stream_batch_generate
from .errors import OpenELMError
from .model import OpenELM
from .template import format_messages, turn_text
from .tokenizer import Tokenizer

DEFAULT_MAX_GEN_TOKS = 256


@register_model("openelm-mlx")
class OpenELMLM(TemplateLM):
    """``model``: a model directory (anything ``openelm_mlx.load`` takes) or a loaded ``OpenELM``
    (then ``tokenizer`` is a ``Tokenizer``); ``batch_size``: requests per forward pass."""

    def __init__(
        self,
        model: str | Path | OpenELM,
        tokenizer: str | Path | Tokenizer | None = None,
        batch_size: int | str = 8,
        max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS,
        seed: int | str | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(model, OpenELM):
            if not isinstance(tokenizer, Tokenizer):
                raise OpenELMError("a loaded model needs its Tokenizer passed as tokenizer=")
            self.model, self.tok = model, tokenizer
        else:
            from .loading import load

            self.model, self.tok = load(model, tokenizer=tokenizer)
        self.batch_size = _whole(batch_size, "batch_size")
        self.max_gen_toks = _whole(max_gen_toks, "max_gen_toks")
        self.seed = None if seed is None else int(seed)
        self.progress = progress

    # --- what TemplateLM needs ---------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id  # an empty context is BOS alone, as with add_bos_token=True

    @property
    def max_length(self) -> int:
        return self.model.config.max_context_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        # None is lm-eval's "the model's default": Apple's add_bos_token=True.
        return self.tok.encode(string, add_bos=add_special_tokens is not False)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens)

    def _loglikelihood_tokens(
        self, requests: list, disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        out = scoring.loglikelihoods(self.model, pairs, self.batch_size, progress=self.progress and not disable_tqdm)
        for (key, _, _), result in zip(requests, out, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        docs = [self.tok_encode(req.args[0], add_special_tokens=False) for req in requests]
        out = scoring.rolling_loglikelihoods(
            self.model, docs, self.prefix_token_id, self.batch_size, progress=self.progress and not disable_tqdm
        )
        for req, total in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        # Requests with the same generation options decode together on one engine.
        by_options: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            by_options.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        texts = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or not self.progress, leave=False)
        for indices in by_options.values():
            options = self._generation_options(requests[indices[0]].args[1])
            keep = self.max_length - options["max_tokens"]
            prompts = [self.tok_encode(requests[i].args[0])[-keep:] for i in indices]
            for j, o in stream_batch_generate(self.model, self.tok, prompts, max_batch=self.batch_size, **options):
                texts[indices[j]] += o.text
                if o.finish_reason is not None:
                    bar.update(1)
        bar.close()
        for req, text in zip(requests, texts, strict=True):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return texts

    def _generation_options(self, gen_kwargs: dict) -> dict:
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_tokens = _whole(kwargs.pop("max_gen_toks", self.max_gen_toks), "max_gen_toks")
        if max_tokens >= self.max_length:
            raise OpenELMError(f"max_gen_toks {max_tokens}: must be below the model's context of {self.max_length}")
        sample = bool(kwargs.pop("do_sample", False))
        temp = float(kwargs.pop("temperature", 1.0 if sample else 0.0))
        options = {"max_tokens": max_tokens, "stop": tuple(s for s in until if s), "seed": self.seed}
        if sample and temp > 0:
            options.update(temp=temp, top_p=float(kwargs.pop("top_p", 1.0)), top_k=int(kwargs.pop("top_k", 0) or 0))
        return options

    # --- chat template -------------------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return "openelm-mlx__" + str(Path(self.tok.path).resolve()).strip("/").replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return turn_text("{user}", "{system}") if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        turns = []
        for i, m in enumerate(chat_history):
            if not isinstance(m.get("content"), str):
                raise OpenELMError(f"chat message {i}: needs text content")
            turns.append((m.get("role"), m["content"]))
        # The Instruct template whatever the model's name says: lm-eval asked for a chat template.
        return format_messages(turns, instruct=True, add_generation_prompt=add_generation_prompt)


def _whole(value: int | str, name: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise OpenELMError(f"{name} {value!r}: must be a whole number") from None
    if n < 1:
        raise OpenELMError(f"{name} {n}: must be at least 1")
    return n
