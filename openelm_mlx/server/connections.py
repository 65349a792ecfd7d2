"""Connections that cannot starve the server: a deadline for each request head, and a cap on
open connections below the process's descriptor limit.

uvicorn's h11 protocol times out only idle keep-alive connections, and any byte received resets
that timer; a client sending one header byte every few seconds holds its connection (and a file
descriptor) forever.  A few hundred such clients exhaust the descriptors (EMFILE on accept:
256 by default on macOS) and then nobody is served.  Here every connection must deliver a
complete request head within ``head_timeout`` seconds of connecting or of its previous response,
and when ``cap`` connections are open a new one evicts the oldest that is still waiting for its
head (one that is running a request is never cut); with none to evict, it is answered 503 and
closed.  Request bodies have their own idle deadline (``body.BODY_IDLE_S``).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

log = logging.getLogger("openelm_mlx.server")

# A browser or curl sends its whole request head in one packet, well under a millisecond; 10 s
# leaves room for a slow link while bounding what a slow client can hold.
HEAD_TIMEOUT_S = 10.0
# Descriptors kept for everything but client sockets: the listening socket, model files, logs,
# the engine's threads (a served bundled model holds ~30).
RESERVED_FDS = 64
# asyncio accepts up to the listen backlog in one go before any connection is seen here (and so
# before the cap can close one): that many more descriptors are reserved.  uvicorn's default
# backlog, 2048, would let one burst of slow clients hit EMFILE past any cap.
ACCEPT_BACKLOG = 64
DEFAULT_MAX_CONNECTIONS = 1024
BUSY = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


def connection_cap(requested: int = DEFAULT_MAX_CONNECTIONS) -> int:
    """``requested``, lowered to leave RESERVED_FDS + ACCEPT_BACKLOG of the soft descriptor
    limit free (raised first towards the hard limit, as far as ``requested`` needs)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = requested + RESERVED_FDS + ACCEPT_BACKLOG
    if soft != resource.RLIM_INFINITY and soft < want:
        try:  # macOS starts processes at 256 with a far higher hard limit
            soft = want if hard == resource.RLIM_INFINITY else min(want, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        except (ValueError, OSError):
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return requested
    return max(1, min(requested, soft - RESERVED_FDS - ACCEPT_BACKLOG))


def guarded_protocol(cap: int, head_timeout: float = HEAD_TIMEOUT_S) -> type:
    """An ``H11Protocol`` subclass enforcing the head deadline and the connection cap (one class
    per server: the waiting connections are shared by its instances)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    # Connections waiting for a request head, oldest first (dicts keep insertion order).
    waiting: dict[Any, None] = {}
    evicted = [0, 0.0]  # connections evicted so far, when the next warning may be logged

    class GuardedH11(H11Protocol):
        _timer: asyncio.TimerHandle | None = None
        _head_of: Any = None  # the request cycle current when the deadline was armed

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > cap:
                oldest = next(iter(waiting), None)
                if oldest is None:  # every connection is running a request: refuse this one
                    transport.write(BUSY)
                    transport.close()
                    return
                evicted[0] += 1
                if time.monotonic() >= evicted[1]:  # one line a minute, not one per connection
                    log.warning("%d connections open (the cap); %d closed so far mid-head", cap, evicted[0])
                    evicted[1] = time.monotonic() + 60
                oldest._cut()
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._head_of = self.cycle
            waiting[self] = None
            self._timer = self.loop.call_later(head_timeout, self._head_expired)

        def _disarm(self) -> None:
            waiting.pop(self, None)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _head_expired(self) -> None:
            self._timer = None
            if self.cycle is self._head_of:  # no new request began since the deadline was armed
                self._cut()

        def _cut(self) -> None:
            self._disarm()
            if not self.transport.is_closing():
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if self._timer is not None and self.cycle is not self._head_of:  # a request head arrived
                self._disarm()

        def on_response_complete(self) -> None:
            finished = self.cycle
            super().on_response_complete()
            # A pipelined request already parsed by the call above needs no deadline.
            if not self.transport.is_closing() and self.cycle is finished:
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11
