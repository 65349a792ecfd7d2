"""Reading a JSON request body: size counted while reading (chunked bodies have no length to
refuse up front), an idle deadline between chunks, a client leaving mid-body, the parse off the
event loop, and text that is not Unicode (lone surrogates from ``\\ud800`` escapes, which
SentencePiece and UTF-8 encoders refuse) answered 400 naming the field."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.requests import Request as HTTPRequest

from .protocol import APIError

MAX_BODY_BYTES = 8 * 2**20
# Seconds a body may stall between two chunks: a client uploading at any real speed sends
# 64 KiB far more often; one stalled this long is holding a connection, not sending.
BODY_IDLE_S = 30.0
# Bodies up to this size are parsed on the event loop (json.loads of 64 KiB: ~0.2 ms); larger
# ones in a thread, so an 8 MiB body (~40 ms to parse and check) never stalls other requests.
INLINE_PARSE_BYTES = 64 * 2**10
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def too_big() -> APIError:
    return APIError(413, f"the request body is over {MAX_BODY_BYTES // 2**20} MiB")


async def read_json(request: HTTPRequest) -> dict:
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
        raise too_big()
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        # text/plain is what a cross-site page may POST without a preflight
        raise APIError(415, f"Content-Type {kind or '(none)'}: expected application/json", param="Content-Type")
    chunks, total = [], 0
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), BODY_IDLE_S)
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise APIError(408, f"the request body stalled for {BODY_IDLE_S:.0f} s", code="timeout") from None
        except ClientDisconnect:
            # Nobody will read this answer; it ends the request without a traceback.
            raise APIError(400, "the client closed the connection before the body ended") from None
        total += len(chunk)
        if total > MAX_BODY_BYTES:
            raise too_big()
        chunks.append(chunk)
    raw = b"".join(chunks)
    if len(raw) <= INLINE_PARSE_BYTES:
        return parse(raw)
    return await asyncio.to_thread(parse, raw)


def parse(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, over 4300 digits
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    # Only a \uD800-\uDFFF escape can put a surrogate in the text (raw surrogate bytes are
    # invalid UTF-8 and fail above), so the walk runs only on bodies that hold one.
    where = _not_unicode(body) if _SURROGATE_ESCAPE.search(raw) else None
    if where is not None:
        raise APIError(400, f"{where}: a lone surrogate (\\ud800-\\udfff) is not valid Unicode text", param=where)
    return body


def _not_unicode(body: Any) -> str | None:
    """The path of the first string (key or value) holding a lone surrogate, or None.
    Iterative: JSON nesting is bounded by json.loads's recursion limit, not by this walk."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if not value.isascii() and _has_surrogate(value):
                return path or "body"
        elif isinstance(value, dict):
            for k, v in value.items():
                if not k.isascii() and _has_surrogate(k):
                    return f"{path}.{k!r:.40}".lstrip(".")
                stack.append((f"{path}.{k}".lstrip(".") if len(path) < 200 else path, v))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]" if len(path) < 200 else path, v) for i, v in enumerate(value))
    return None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
