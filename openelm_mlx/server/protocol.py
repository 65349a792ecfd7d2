"""OpenAI request bodies in, engine requests out; engine outputs in, OpenAI response bodies out.

Every rejection is an ``APIError`` naming the field at fault, answered as OpenAI's error body
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status.  Unknown fields are
ignored (clients send many), known fields of the wrong type or range are refused.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..engine import MAX_LOGPROBS, GenParams, Output
from ..errors import OpenELMError
from ..grammar import GrammarError, OutputSpec, parse_response_format, parse_tools
from ..model import OpenELM
from ..sampling import SamplingOptions
from ..template import format_messages
from ..tokenizer import Tokenizer

MAX_STOPS = 16
BASE_CHAT_STOP = "\nUser:"  # a base model's transcript: the next "User:" line ends the reply


class APIError(Exception):
    """A request the server refuses: the HTTP status and OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ServedModel:
    name: str
    model: OpenELM
    tokenizer: Tokenizer

    @property
    def instruct(self) -> bool:
        return bool(getattr(self.model, "is_instruct", False))

    @property
    def context(self) -> int:
        return self.model.config.max_context_length


@dataclass(frozen=True)
class Limits:
    default_max_tokens: int = 512  # when a request names none (capped by the context left)
    max_tokens_limit: int | None = None  # a request asking for more gets a 400
    num_draft_tokens: int = 3  # with a draft model: tokens it proposes per round


@dataclass
class Request:
    """One parsed completion request: a prompt per choice, all with the same parameters."""

    kind: str  # "chat" or "completion"
    served: ServedModel
    prompts: list[list[int]]
    params: GenParams
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    echo_only: bool = False  # max_tokens 0 with echo: score the prompt, generate nothing
    logprobs: int | None = None
    tool_call: bool = False  # the output is one tool call: answered as message.tool_calls
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


# --- typed access to the body ---------------------------------------------------------------


def _bad(name: str, message: str) -> APIError:
    return APIError(400, f"{name}: {message}", param=name)


def _number(body: dict, name: str, default: float, lo: float | None = None, hi: float | None = None) -> float:
    v = body.get(name)
    if v is None:
        return default
    # abs(v) < inf, not math.isfinite: a 400-digit integer overflows a float conversion.
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not abs(v) < math.inf:
        raise _bad(name, f"expected a finite number, got {v!r:.60}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise _bad(name, f"{_shown(v)} is out of range [{lo}, {hi}]")
    return float(v)


def _shown(v: float) -> str:
    text = str(v)
    return text if len(text) <= 40 else f"a number of {len(text)} digits"


def _integer(body: dict, name: str, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(name, f"expected an integer, got {v!r:.60}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise _bad(name, f"{_shown(v)} is out of range [{lo}, {hi}]")
    return v


def _flag(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, f"expected true or false, got {v!r:.60}")
    return v


def select_model(body: dict, models: dict[str, ServedModel]) -> ServedModel:
    name = body.get("model")
    if name is None and len(models) == 1:
        return next(iter(models.values()))
    if not isinstance(name, str):
        raise _bad("model", f"expected one of the served models ({', '.join(models)})")
    if name not in models:
        # Never a path: the server serves what it was started with and nothing else.
        raise APIError(
            404,
            f"model {name[:100]!r} is not served here; served: {', '.join(models)}",
            param="model",
            code="model_not_found",
        )
    return models[name]


def _stops(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise _bad("stop", "expected a string or a list of strings")
    if len(v) > MAX_STOPS:
        raise _bad("stop", f"at most {MAX_STOPS} stop strings")
    return tuple(s for s in v if s)


def _logit_bias(body: dict, vocab: int) -> dict[int, float] | None:
    v = body.get("logit_bias")
    if v is None:
        return None
    if not isinstance(v, dict):
        raise _bad("logit_bias", "expected an object mapping token ids to biases")
    out = {}
    for k, b in v.items():
        try:
            tok = int(k)
        except (TypeError, ValueError):
            raise _bad("logit_bias", f"key {k!r:.40} is not a token id") from None
        if not 0 <= tok < vocab:
            raise _bad("logit_bias", f"token id {tok} is outside the vocabulary (0..{vocab - 1})")
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
            raise _bad("logit_bias", f"bias for {tok} must be a number in [-100, 100]")
        out[tok] = float(b)
    return out or None


def _stream(body: dict) -> tuple[bool, bool]:
    stream = _flag(body, "stream")
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not isinstance(opts, dict):
        raise _bad("stream_options", "expected an object")
    return stream, _flag(opts, "include_usage") if stream else False


def _common(body: dict, served: ServedModel, longest_prompt: int, limits: Limits, allow_zero: bool) -> dict:
    """The engine parameters every endpoint shares (sampling, penalties, stop, max tokens)."""
    if _integer(body, "n", 1) != 1:
        raise _bad("n", "only n=1 is supported")
    if _integer(body, "best_of", 1) != 1:
        raise _bad("best_of", "only best_of=1 is supported")
    top_k = _integer(body, "top_k", 0, lo=-1)
    sampling = SamplingOptions(
        temp=_number(body, "temperature", 1.0, 0, 2),
        top_p=_number(body, "top_p", 1.0, 0, 1) or 1.0,  # 0 is read as "off", as some clients send it
        top_k=max(top_k, 0),  # -1 is vLLM's "off"
        min_p=_number(body, "min_p", 0.0, 0, 0.999),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.01, 10),
    )
    max_tokens = _integer(body, "max_completion_tokens", None, lo=0, hi=2**31 - 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", None, lo=0, hi=2**31 - 1)
    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    left = served.context - longest_prompt
    if left < (0 if allow_zero else 1):
        raise APIError(
            400,
            f"the prompt has {longest_prompt} tokens and the model's context is {served.context}; shorten the prompt",
            param="messages" if "messages" in body else "prompt",
            code="context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = min(limits.default_max_tokens, limits.max_tokens_limit or left, left)
    elif max_tokens == 0 and not allow_zero:
        raise _bad(param, "must be at least 1 (0 only with echo)")
    elif limits.max_tokens_limit is not None and max_tokens > limits.max_tokens_limit:
        raise APIError(
            400, f"{param}: {max_tokens} is over this server's limit of {limits.max_tokens_limit}", param=param
        )
    elif max_tokens > left:
        raise APIError(
            400,
            f"the prompt ({longest_prompt} tokens) plus {param} {max_tokens} exceeds the model's context of "
            f"{served.context} tokens",
            param=param,
            code="context_length_exceeded",
        )
    seed = _integer(body, "seed", None, lo=-(2**63), hi=2**64 - 1)
    return {
        "max_tokens": max_tokens,
        "sampling": sampling,
        "seed": None if seed is None else seed % 2**63,
        "stop": _stops(body),
        "logit_bias": _logit_bias(body, served.model.config.vocab_size),
        "presence_penalty": _number(body, "presence_penalty", 0.0, -2, 2),
        "frequency_penalty": _number(body, "frequency_penalty", 0.0, -2, 2),
        "num_draft_tokens": limits.num_draft_tokens,
    }


def _output_spec(body: dict, chat: bool) -> OutputSpec | None:
    """``response_format`` and (chat) ``tools``/``tool_choice`` as the schema the output must satisfy."""
    try:
        spec = parse_response_format(body.get("response_format"))
        if not chat:
            return spec
        call, _ = parse_tools(body.get("tools"), body.get("tool_choice"))
    except GrammarError as e:
        raise APIError(400, str(e), param=e.param) from None
    if spec is not None and call is not None:
        raise _bad("response_format", 'cannot be combined with tool_choice "required" or a named function')
    return spec or call


def _params(options: dict) -> GenParams:
    try:
        return GenParams(**options)
    except OpenELMError as e:  # whatever the checks above missed is still the request's fault
        raise APIError(400, str(e)) from None


# --- the two completion endpoints -----------------------------------------------------------


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"messages[{i}].content", "only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(f"messages[{i}].content", "expected a string or a list of text parts")


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "user"}


def _turn_text(m: dict, i: int) -> str:
    """A message's text for the template.  OpenELM has no tool format: an assistant's tool calls
    are written as the JSON they were generated as, a tool's result as a user turn naming it."""
    text = _content(m, i)
    if m.get("role") == "tool":
        if not text:
            raise _bad(f"messages[{i}].content", "a tool message needs the tool's result")
        return f"Tool result: {text}"
    calls = m.get("tool_calls")
    if m.get("role") == "assistant" and calls is not None:
        if not isinstance(calls, list) or not all(
            isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls
        ):
            raise _bad(f"messages[{i}].tool_calls", "expected a list of function calls")
        parts = []
        for c in calls:
            fn = c["function"]
            parts.append(f'{{"name":{json.dumps(fn.get("name"))},"arguments":{fn.get("arguments") or "{}"}}}')
        text = (text + "\n" if text else "") + "\n".join(parts)
    return text


def parse_chat(body: dict, models: dict[str, ServedModel], limits: Limits) -> Request:
    served = select_model(body, models)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "expected a non-empty list of messages")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", "expected an object with role and content")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise _bad(f"messages[{i}].role", f"expected one of {', '.join(ROLES)}, got {role!r:.40}")
        turns.append((ROLES[role], _turn_text(m, i)))
    spec = _output_spec(body, chat=True)
    ids = served.tokenizer.encode(format_messages(turns, served.instruct))
    stream, include_usage = _stream(body)
    options = _common(body, served, len(ids), limits, allow_zero=False)
    options["constraint"] = spec
    if not served.instruct and spec is None:  # (JSON ends itself; a stop string could only cut it)
        options["stop"] = (*options["stop"], BASE_CHAT_STOP)
    top = None
    if _flag(body, "logprobs"):
        top = _integer(body, "top_logprobs", 0, 0, MAX_LOGPROBS)
    options["logprobs"] = top
    tool_call = spec is not None and bool(spec.tools)
    return Request("chat", served, [ids], _params(options), stream, include_usage, logprobs=top, tool_call=tool_call)


def _prompts(body: dict, served: ServedModel) -> list[list[int]]:
    p = body.get("prompt")
    vocab = served.model.config.vocab_size

    def ids_of(x: Any) -> list[int] | None:
        if isinstance(x, str):
            return served.tokenizer.encode(x)
        if isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x):
            if not all(0 <= t < vocab for t in x):
                raise _bad("prompt", f"token ids must be in 0..{vocab - 1}")
            return list(x)
        return None

    single = ids_of(p)
    if single is not None:
        return [single]
    if isinstance(p, list) and p:
        many = [ids_of(x) for x in p]
        if all(m is not None for m in many):
            return many
    raise _bad("prompt", "expected a string, a list of token ids, or a non-empty list of either")


def parse_completion(body: dict, models: dict[str, ServedModel], limits: Limits, max_prompts: int) -> Request:
    served = select_model(body, models)
    if body.get("suffix") is not None:
        raise _bad("suffix", "not supported")
    prompts = _prompts(body, served)
    if len(prompts) > max_prompts:
        raise _bad("prompt", f"at most {max_prompts} prompts per request")
    echo = _flag(body, "echo")
    stream, include_usage = _stream(body)
    options = _common(body, served, max(map(len, prompts)), limits, allow_zero=echo)
    options["constraint"] = _output_spec(body, chat=False)
    echo_only = options["max_tokens"] == 0
    if echo_only and options["constraint"] is not None:
        raise _bad("response_format", "cannot be combined with max_tokens 0 (nothing is generated)")
    if echo_only:  # score the prompt: run one step and drop its token
        options["max_tokens"] = 1
    logprobs = _integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    options["logprobs"] = logprobs
    options["prompt_logprobs"] = echo and logprobs is not None
    return Request("completion", served, prompts, _params(options), stream, include_usage, echo, echo_only, logprobs)


# --- responses --------------------------------------------------------------------------------

_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")


def token_text(tokenizer: Tokenizer, token: int) -> str:
    """A token as text: its SentencePiece piece with the word marker as a space (pieces are
    unique, so top-logprob dicts keyed by this never collide)."""
    piece = tokenizer.sp.id_to_piece(int(token))
    m = _BYTE_PIECE.fullmatch(piece)
    if m and int(m.group(1), 16) < 0x80:
        return chr(int(m.group(1), 16))
    return piece.replace("\u2581", " ")


@dataclass
class Choice:
    """What one choice accumulated (non-streamed responses, and usage for streamed ones)."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: list[float | None] | None = None
    prompt_top: list | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0

    def add(self, o: Output, echo_only: bool = False) -> None:
        self.prompt_tokens, self.cached_tokens = o.prompt_tokens, o.cached_tokens
        if o.prompt_logprobs is not None:
            self.prompt_logprobs, self.prompt_top = o.prompt_logprobs, o.prompt_top_logprobs
        if o.finish_reason:
            # "cancelled" reaches a client only when the server shuts down under it: output cut short.
            self.finish_reason = "length" if echo_only or o.finish_reason == "cancelled" else o.finish_reason
        if echo_only:
            return
        self.text += o.text
        self.tokens += o.tokens
        if o.logprobs is not None:
            self.logprobs += o.logprobs
            self.top += o.top_logprobs or [[] for _ in o.tokens]


def usage(choices: list[Choice]) -> dict[str, Any]:
    prompt = sum(c.prompt_tokens for c in choices)
    completion = sum(len(c.tokens) for c in choices)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(c.cached_tokens for c in choices)},
    }


def chat_logprobs(tok: Tokenizer, tokens: list[int], lps: list[float], tops: list) -> dict[str, Any]:
    def entry(t: int, lp: float) -> dict[str, Any]:
        text = token_text(tok, t)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]}
            for t, lp, top in zip(tokens, lps, tops, strict=True)
        ]
    }


def completion_logprobs(tok: Tokenizer, req: Request, prompt: list[int], c: Choice) -> dict[str, Any]:
    """OpenAI's legacy shape, which lm-eval's local-completions reads: with echo, the prompt's
    tokens come first (the first has no log-probability), then the generated ones."""
    tokens, lps, tops = list(c.tokens), list(c.logprobs), list(c.top)
    if req.echo and c.prompt_logprobs is not None:
        tokens = prompt + tokens
        lps = list(c.prompt_logprobs) + lps
        tops = list(c.prompt_top or [None] * len(prompt)) + tops
    texts = [token_text(tok, t) for t in tokens]
    offsets, at = [], 0
    for t in texts:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": texts,
        "token_logprobs": lps,
        "top_logprobs": [None if top is None else {token_text(tok, i): v for i, v in top} for top in tops],
        "text_offset": offsets,
    }


TOOL_CALL_HEAD = re.compile(r'\{"name":"([A-Za-z0-9_-]{1,64})","arguments":')


def split_tool_call(text: str) -> tuple[str, str] | None:
    """(name, arguments JSON text) of a whole generated call ``{"name": ..., "arguments": ...}``
    (compact: the grammar allows no whitespace between tokens); None if it is cut short."""
    m = TOOL_CALL_HEAD.match(text)
    if m is None or not text.endswith("}"):
        return None
    return m.group(1), text[m.end() : -1]


def tool_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def chat_response(req: Request, c: Choice) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": c.text}
    finish = c.finish_reason
    call = split_tool_call(c.text) if req.tool_call and finish == "stop" else None
    if call is not None:
        function = {"name": call[0], "arguments": call[1]}
        message = {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": tool_call_id(), "type": "function", "function": function}],
        }
        finish = "tool_calls"
    choice: dict[str, Any] = {
        "index": 0,
        "message": message,
        "logprobs": None,
        "finish_reason": finish,
    }
    if req.logprobs is not None:
        choice["logprobs"] = chat_logprobs(req.served.tokenizer, c.tokens, c.logprobs, c.top)
    return {
        "id": f"chatcmpl-{req.id}",
        "object": "chat.completion",
        "created": req.created,
        "model": req.served.name,
        "choices": [choice],
        "usage": usage([c]),
    }


def chat_chunk(req: Request, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": f"chatcmpl-{req.id}",
        "object": "chat.completion.chunk",
        "created": req.created,
        "model": req.served.name,
        "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
    }
    if req.include_usage:
        body["usage"] = None
    return body


def completion_response(req: Request, choices: list[Choice]) -> dict[str, Any]:
    tok = req.served.tokenizer
    out = []
    for i, (prompt, c) in enumerate(zip(req.prompts, choices, strict=True)):
        text = (tok.decode(prompt) if req.echo else "") + c.text
        lp = completion_logprobs(tok, req, prompt, c) if req.logprobs is not None else None
        out.append({"index": i, "text": text, "logprobs": lp, "finish_reason": c.finish_reason})
    return {
        "id": f"cmpl-{req.id}",
        "object": "text_completion",
        "created": req.created,
        "model": req.served.name,
        "choices": out,
        "usage": usage(choices),
    }


def completion_chunk(req: Request, index: int, text: str, finish: str | None, logprobs: dict | None) -> dict:
    body: dict[str, Any] = {
        "id": f"cmpl-{req.id}",
        "object": "text_completion",
        "created": req.created,
        "model": req.served.name,
        "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}],
    }
    if req.include_usage:
        body["usage"] = None
    return body


def usage_chunk(req: Request, choices: list[Choice]) -> dict[str, Any]:
    kind = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    prefix = "chatcmpl" if req.kind == "chat" else "cmpl"
    return {
        "id": f"{prefix}-{req.id}",
        "object": kind,
        "created": req.created,
        "model": req.served.name,
        "choices": [],
        "usage": usage(choices),
    }
