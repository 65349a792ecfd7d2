"""The Starlette application: routes, authentication, admission limits, streaming, logging.

Requests are parsed (protocol.py), admitted if the server has room (``max_concurrency``
running plus ``max_queue`` waiting, else 429), handed to the engine thread (worker.py), and
answered from its outputs, whole or as server-sent events.  Whatever happens to a request, an
outer ASGI layer logs one line for it, counts it, and cancels its sequences if the client left.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import OpenELMError
from ..grammar import GrammarError, compile_spec
from ..grammar.bridge import llg_tokenizer
from .body import read_json
from .guard import COMMON_HEADERS, Policy, header, page_headers
from .metrics import Metrics
from .protocol import (
    TOOL_CALL_HEAD,
    APIError,
    Choice,
    Limits,
    Request,
    ServedModel,
    chat_chunk,
    chat_logprobs,
    chat_response,
    completion_chunk,
    completion_logprobs,
    completion_response,
    parse_chat,
    parse_completion,
    select_model,
    split_tool_call,
    tool_call_id,
    usage,
    usage_chunk,
)
from .worker import Worker

log = logging.getLogger("openelm_mlx.server")

# A schema's grammar compiles in ~1-60 ms (BENCHMARKS.md, "Structured output"); llguidance's fuel
# limits (grammar/constraint.py) stop a hostile one, and this bounds the wait whatever happens.
COMPILE_TIMEOUT_S = 10.0
STATIC = Path(__file__).parent / "static"
OPEN_PATHS = ("/health", "/", "/favicon.ico")  # no key needed: the page asks for it itself


@dataclass
class Settings:
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    max_concurrency: int = 8
    max_queue: int = 64
    ui: bool = True
    policy: Policy = field(default_factory=Policy)


@dataclass
class _Record:
    """What the log line and the cleanup of one HTTP request need."""

    usage: dict | None = None
    cleanups: list[Callable[[], None]] = field(default_factory=list)


class Server:
    """The state behind the routes: served models, the engine thread, limits, metrics."""

    def __init__(self, models: dict[str, ServedModel], worker: Worker, metrics: Metrics, settings: Settings):
        self.models, self.worker, self.metrics, self.settings = models, worker, metrics, settings
        self.inflight = 0  # sequences admitted and not yet answered (touched only on the event loop)

    # --- admission --------------------------------------------------------------------------

    def admit(self, n: int, record: _Record) -> None:
        s = self.settings
        if self.inflight + n > s.max_concurrency + s.max_queue:
            self.metrics.add("rejected_overloaded_total")
            raise APIError(
                429,
                f"the server is busy ({self.inflight} sequences running or queued, limit "
                f"{s.max_concurrency} running + {s.max_queue} queued); retry later",
                kind="server_overloaded",
                code="queue_full",
            )
        self.inflight += n

        def release() -> None:
            self.inflight -= n

        record.cleanups.append(release)

    async def start(self, req: Request, record: _Record) -> tuple[asyncio.Queue, dict[int, int], set[int]]:
        """Admit and submit every prompt of ``req``: the shared output queue, seq id -> prompt
        index, and the set of unfinished seq ids (emptied as they finish)."""
        self.admit(len(req.prompts), record)
        out: asyncio.Queue = asyncio.Queue()
        index: dict[int, int] = {}
        running: set[int] = set()

        def cancel_unfinished() -> None:
            for seq_id in running:
                self.worker.cancel(req.served.name, seq_id)

        record.cleanups.append(cancel_unfinished)
        for i, prompt in enumerate(req.prompts):
            try:
                seq_id = await self.worker.submit(req.served.name, prompt, req.params, out)
            except OpenELMError as e:
                raise APIError(400, str(e), code=_code(str(e))) from None
            index[seq_id] = i
            running.add(seq_id)
        return out, index, running

    # --- routes -----------------------------------------------------------------------------

    async def chat(self, request: HTTPRequest) -> Response:
        # Parsing tokenizes the prompt: in a thread, so a long one does not stall other requests.
        req = await asyncio.to_thread(parse_chat, await read_json(request), self.models, self.settings.limits)
        return await self._answer(request, req)

    async def completions(self, request: HTTPRequest) -> Response:
        body = await read_json(request)
        s = self.settings
        req = await asyncio.to_thread(parse_completion, body, self.models, s.limits, s.max_concurrency)
        return await self._answer(request, req)

    async def _compile(self, req: Request) -> None:
        """Compile the request's grammar in a thread, off the event loop, into the grammar cache
        the engine thread then reads (a schema seen before is a cache hit: microseconds)."""
        spec = req.params.constraint
        if spec is None:
            return
        config = req.served.model.config
        job = asyncio.to_thread(compile_spec, spec, req.served.tokenizer, config.vocab_size, config.eos_token_id)
        try:
            await asyncio.wait_for(job, COMPILE_TIMEOUT_S)
        except GrammarError as e:
            raise APIError(400, str(e), param=e.param) from None
        except asyncio.TimeoutError:
            raise APIError(
                400, f"{spec.param}: the schema did not compile in {COMPILE_TIMEOUT_S:.0f} s", param=spec.param
            ) from None

    async def _answer(self, request: HTTPRequest, req: Request) -> Response:
        record: _Record = request.scope["openelm.record"]
        await self._compile(req)
        out, index, running = await self.start(req, record)
        choices = [Choice() for _ in req.prompts]
        if req.stream:
            events = self._chat_events if req.kind == "chat" else self._completion_events
            return StreamingResponse(
                _sse(events(req, out, index, choices, running, record)),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        getter: asyncio.Task | None = None
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while running:
                # One get() waits until an output or the client's disconnect, whichever is first.
                getter = getter or asyncio.ensure_future(out.get())
                await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    return Response(status_code=499)  # nobody reads it; the cleanup cancels the rest
                o, getter = getter.result(), None
                if isinstance(o, APIError):
                    raise o
                choices[index[o.seq_id]].add(o, req.echo_only)
                if o.finish_reason:
                    running.discard(o.seq_id)
        finally:
            gone.cancel()
            if getter is not None:
                getter.cancel()
        record.usage = usage(choices)
        body = chat_response(req, choices[0]) if req.kind == "chat" else completion_response(req, choices)
        return JSONResponse(body)

    async def _outputs(self, out: asyncio.Queue, running: set[int]) -> AsyncIterator[Any]:
        while running:
            o = await out.get()
            if isinstance(o, APIError):
                yield o
                return
            if o.finish_reason:
                running.discard(o.seq_id)
            yield o

    async def _chat_events(self, req, out, index, choices, running, record) -> AsyncIterator[dict]:
        if req.tool_call:
            async for event in self._tool_call_events(req, out, choices, running, record):
                yield event
            return
        c = choices[0]
        yield chat_chunk(req, {"role": "assistant", "content": ""})
        since = 0  # tokens whose log-probabilities are not yet sent
        async for o in self._outputs(out, running):
            if isinstance(o, APIError):
                yield o.body()
                return
            c.add(o)
            if o.text or c.finish_reason:
                lp = None
                if req.logprobs is not None:
                    tok = req.served.tokenizer
                    lp = chat_logprobs(tok, c.tokens[since:], c.logprobs[since:], c.top[since:])
                    since = len(c.tokens)
                yield chat_chunk(req, {"content": o.text} if o.text else {}, c.finish_reason, lp)
        record.usage = usage(choices)
        if req.include_usage:
            yield usage_chunk(req, choices)

    async def _tool_call_events(self, req, out, choices, running, record) -> AsyncIterator[dict]:
        """A tool call streamed as OpenAI streams one: a first delta with the call's id, type and
        name, then the arguments' JSON text in pieces, then finish_reason "tool_calls".  The
        generated text is ``{"name":"f","arguments":ARGS}``: held back until the name is complete,
        then ARGS is sent as it comes, all but the wrapper's closing brace."""
        c = choices[0]
        yield chat_chunk(req, {"role": "assistant", "content": None})
        sent = None  # characters of c.text already sent as arguments (None: the head is not sent yet)
        async for o in self._outputs(out, running):
            if isinstance(o, APIError):
                yield o.body()
                return
            c.add(o)
            if sent is None:
                m = TOOL_CALL_HEAD.match(c.text)
                if m is not None:
                    call = {"index": 0, "id": tool_call_id(), "type": "function"}
                    call["function"] = {"name": m.group(1), "arguments": ""}
                    yield chat_chunk(req, {"tool_calls": [call]})
                    sent = m.end()
            if sent is not None:
                whole = c.finish_reason == "stop" and split_tool_call(c.text) is not None
                end = len(c.text) - 1 if whole or c.finish_reason is None else len(c.text)
                if end > sent:
                    piece = {"index": 0, "function": {"arguments": c.text[sent:end]}}
                    yield chat_chunk(req, {"tool_calls": [piece]})
                    sent = end
            if c.finish_reason:
                if sent is None and c.text:  # cut before the name was complete: the raw text
                    yield chat_chunk(req, {"content": c.text})
                finish = "tool_calls" if c.finish_reason == "stop" else c.finish_reason
                yield chat_chunk(req, {}, finish)
        record.usage = usage(choices)
        if req.include_usage:
            yield usage_chunk(req, choices)

    async def _completion_events(self, req, out, index, choices, running, record) -> AsyncIterator[dict]:
        tok = req.served.tokenizer
        sent = [0] * len(choices)  # tokens (prompt included, with echo) already sent per choice
        if req.echo:  # the prompt first, as OpenAI does
            for i, prompt in enumerate(req.prompts):
                if req.logprobs is None:
                    yield completion_chunk(req, i, tok.decode(prompt), None, None)
        async for o in self._outputs(out, running):
            if isinstance(o, APIError):
                yield o.body()
                return
            i = index[o.seq_id]
            c = choices[i]
            first = c.prompt_tokens == 0
            c.add(o, req.echo_only)
            text = o.text if not req.echo_only else ""
            if req.echo and req.logprobs is not None and first:
                text = tok.decode(req.prompts[i]) + text
            if text or c.finish_reason:
                lp = None
                if req.logprobs is not None:
                    full = completion_logprobs(tok, req, req.prompts[i], c)
                    lp = {k: v[sent[i] :] for k, v in full.items()}
                    sent[i] = len(full["tokens"])
                yield completion_chunk(req, i, text, c.finish_reason, lp)
        record.usage = usage(choices)
        if req.include_usage:
            yield usage_chunk(req, choices)

    async def models_list(self, request: HTTPRequest) -> Response:
        created = int(time.time())
        data = [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "openelm-mlx",
                "context_length": m.context,
                "instruct": m.instruct,
            }
            for name, m in self.models.items()
        ]
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: HTTPRequest) -> Response:
        return JSONResponse({"status": "ok"})

    async def metrics_text(self, request: HTTPRequest) -> Response:
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

    # vLLM's tokenizer endpoints, which lm-eval's local-completions uses when it finds them
    # (then it needs no Hugging Face tokenizer of its own).
    def _model_of(self, body: dict) -> ServedModel:
        if body.get("model") is None:  # lm-eval names none; OpenELM models share one tokenizer
            return next(iter(self.models.values()))
        return select_model(body, self.models)

    async def tokenizer_info(self, request: HTTPRequest) -> Response:
        served = self._model_of(dict(request.query_params))
        tok = served.tokenizer
        return JSONResponse(
            {
                "eos_token": tok.sp.id_to_piece(tok.eos_id),
                "bos_token": tok.sp.id_to_piece(tok.bos_id),
                "pad_token": None,
                "model_max_length": served.context,
            }
        )

    async def tokenize(self, request: HTTPRequest) -> Response:
        body = await read_json(request)
        served = self._model_of(body)
        # Off the event loop: 7 MB of text takes SentencePiece seconds, and the answer's JSON
        # (a million ids) is built there too.
        return await asyncio.to_thread(self._tokenize, body, served)

    def _tokenize(self, body: dict, served: ServedModel) -> Response:
        text = body.get("prompt")
        if not isinstance(text, str):
            raise APIError(400, "prompt: expected a string", param="prompt")
        special = body.get("add_special_tokens", True)
        if not isinstance(special, bool):
            raise APIError(400, "add_special_tokens: expected true or false", param="add_special_tokens")
        tok = served.tokenizer
        if text in (tok.sp.id_to_piece(tok.bos_id), tok.sp.id_to_piece(tok.eos_id)):
            # lm-eval finds the special ids as encode(bos_token)[0] and encode(eos_token)[0].
            tokens = [tok.sp.piece_to_id(text)]
        else:
            tokens = tok.encode(text, add_bos=special)
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": served.context})

    async def detokenize(self, request: HTTPRequest) -> Response:
        body = await read_json(request)
        return await asyncio.to_thread(self._detokenize, body, self._model_of(body))

    def _detokenize(self, body: dict, served: ServedModel) -> Response:
        tokens = body.get("tokens")
        vocab = served.model.config.vocab_size
        if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in tokens
        ):
            raise APIError(400, f"tokens: expected a list of token ids in 0..{vocab - 1}", param="tokens")
        return JSONResponse({"prompt": served.tokenizer.decode(tokens)})

    async def page(self, request: HTTPRequest) -> Response:
        index = STATIC / "index.html"
        if not self.settings.ui or not index.is_file():
            raise APIError(404, "no chat page here (the server runs with --no-ui)", code="not_found")
        return FileResponse(index, media_type="text/html; charset=utf-8", headers=page_headers(index))


def _warm_grammar(models: list[ServedModel]) -> None:
    for m in models:
        try:
            llg_tokenizer(m.tokenizer, m.model.config.vocab_size, m.model.config.eos_token_id)
        except Exception as e:  # a request with a response format will report it; serving goes on
            log.warning("model %s: no structured output (%s)", m.name, e)


def _code(message: str) -> str | None:
    return "context_length_exceeded" if "context" in message else None


async def _disconnected(request: HTTPRequest) -> None:
    """Returns when the client has gone (the body is read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _sse(events: AsyncIterator[dict]) -> AsyncIterator[str]:
    async for event in events:
        yield f"data: {json.dumps(event, separators=(',', ':'))}\n\n"
    yield "data: [DONE]\n\n"


def _error_response(e: APIError) -> JSONResponse:
    # After a 413 or 408 the rest of the body is unread: close rather than read it to the end.
    headers = {"Connection": "close"} if e.status in (408, 413) else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _on_api_error(request: HTTPRequest, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return _error_response(exc)


async def _on_http_error(request: HTTPRequest, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return _error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code))


async def _on_engine_error(request: HTTPRequest, exc: Exception) -> Response:
    return _error_response(APIError(400, str(exc), code=_code(str(exc))))


class _Outer:
    """ASGI layer around the app: API key check, one log line and one count per request, and
    the request's cleanups (free its admission, cancel its sequences) however it ended."""

    def __init__(self, app: Any, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = _Record()
        scope["openelm.record"] = record
        status = [0]
        t0 = time.perf_counter()

        policy = self.server.settings.policy
        host, origin = header(scope, b"host"), header(scope, b"origin")
        extra = COMMON_HEADERS + (policy.cors_headers(origin) if origin else [])

        async def watch(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            key = self.server.settings.api_key
            if not policy.host_allowed(host):
                error = APIError(421, f"Host {host!r}: not this server (--allowed-hosts NAME allows it)", param="Host")
                await _error_response(error)(scope, receive, watch)
            elif origin is not None and not policy.origin_allowed(origin, host):
                error = APIError(403, f"Origin {origin!r}: not allowed (--cors-origins allows it)", param="Origin")
                await _error_response(error)(scope, receive, watch)
            elif origin is not None and scope["method"] == "OPTIONS":  # an allowed origin's preflight
                await Response(status_code=204)(scope, receive, watch)
            elif key is not None and scope["path"] not in OPEN_PATHS and not _authorized(scope, key):
                error = APIError(401, "a valid API key is needed: Authorization: Bearer KEY", code="invalid_api_key")
                await _error_response(error)(scope, receive, watch)
            else:
                await self.app(scope, receive, watch)
        finally:
            for cleanup in record.cleanups:
                cleanup()
            self._log(scope, status[0] or 499, record, time.perf_counter() - t0)

    def _log(self, scope: dict, status: int, record: _Record, seconds: float) -> None:
        method, path = scope["method"], scope["path"]
        self.server.metrics.request(method, path, status)
        u = record.usage
        tokens = ""
        if u is not None:
            cached = u["prompt_tokens_details"]["cached_tokens"]
            tokens = f" prompt={u['prompt_tokens']} cached={cached} completion={u['completion_tokens']}"
        log.info("%s %s %d%s %.3fs", method, path[:200], status, tokens, seconds)


def _authorized(scope: dict, key: str) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
    return False


def create_app(models: dict[str, ServedModel], worker: Worker, metrics: Metrics, settings: Settings) -> Any:
    server = Server(models, worker, metrics, settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        worker.start()
        # The grammar's view of each tokenizer (0.2-1.6 s at 32000 pieces), built in the
        # background now rather than by the first request with a response format.
        asyncio.get_running_loop().run_in_executor(None, _warm_grammar, list(models.values()))
        try:
            yield
        finally:
            worker.stop()

    routes = [
        Route("/v1/chat/completions", server.chat, methods=["POST"]),
        Route("/chat/completions", server.chat, methods=["POST"]),  # mlx_lm.server's alias
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/models", server.models_list, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.metrics_text, methods=["GET"]),
        Route("/tokenizer_info", server.tokenizer_info, methods=["GET"]),
        Route("/tokenize", server.tokenize, methods=["POST"]),
        Route("/detokenize", server.detokenize, methods=["POST"]),
        Route("/", server.page, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={APIError: _on_api_error, HTTPException: _on_http_error, OpenELMError: _on_engine_error},
    )
    outer = _Outer(app, server)
    outer.server_state = server  # for tests and the CLI
    return outer
