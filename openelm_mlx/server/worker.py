"""The engine thread: the one place the engines live.

``Engine`` is not thread-safe, so one thread owns every served model's engine and runs their
``step()`` in a loop; the event loop talks to it only through an inbox (submissions and
cancellations) and per-request ``asyncio.Queue``s it fills with each step's outputs.  New
requests join the running batch between steps (the engine interleaves their prefill), and a
cancellation takes effect at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

from .. import runtime
from ..engine import Engine, GenParams, Output
from ..errors import OpenELMError
from .metrics import Metrics
from .protocol import APIError

log = logging.getLogger("openelm_mlx.server")


@dataclass
class _Route:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    started: bool = False


class Worker:
    """Owns the engines (built by ``factories``, one per served model) in one thread."""

    def __init__(self, factories: dict[str, Callable[[], Engine]], metrics: Metrics):
        self.factories, self.metrics = factories, metrics
        self.engines = {name: make() for name, make in factories.items()}
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.wake = threading.Event()
        self.routes: dict[tuple[str, int], _Route] = {}
        self.thread = threading.Thread(target=self._run, name="openelm-engine", daemon=True)
        self.closing = False
        self.drain_deadline: float | None = None

    # --- called from the event loop ---------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    async def submit(self, model: str, prompt: list[int], params: GenParams, out: asyncio.Queue) -> int:
        """Queue a sequence; its outputs go to ``out``.  Raises ``OpenELMError`` if the engine refuses it."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self.inbox.put(("submit", model, prompt, params, loop, done, out))
        self.wake.set()
        return await done

    def cancel(self, model: str, seq_id: int) -> None:
        self.inbox.put(("cancel", model, seq_id))
        self.wake.set()

    def drain(self, grace: float) -> None:
        """Shutting down: sequences still running after ``grace`` seconds are cancelled (their
        streams end with finish_reason "length").  Safe to call from a signal handler."""
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + grace
        self.wake.set()

    def stop(self) -> None:
        self.closing = True
        self.wake.set()
        self.thread.join(timeout=30)

    # --- the engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            # MLX gives this thread streams of its own; left behind, they abort the process at exit.
            mx.synchronize()
            mx.clear_streams()

    def _loop(self) -> None:
        was_busy = False
        while True:
            self.wake.clear()
            self._take_inbox()
            if self.drain_deadline is not None and time.monotonic() >= self.drain_deadline:
                for model, seq_id in list(self.routes):
                    self.engines[model].cancel(seq_id)
            busy = [name for name, e in self.engines.items() if e.has_work()]
            if not busy:
                if self.closing:
                    return
                if was_busy:  # the first idle moment: hand MLX's cached buffers back
                    runtime.on_idle()
                was_busy = False
                self.wake.wait(0.25 if self.drain_deadline is not None else 5.0)
                continue
            was_busy = True
            for name in busy:
                self._step(name)
            self._gauges()

    def _take_inbox(self) -> None:
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return
            if item[0] == "cancel":
                _, model, seq_id = item
                if (model, seq_id) in self.routes:
                    self.engines[model].cancel(seq_id)
                continue
            _, model, prompt, params, loop, done, out = item
            try:
                seq_id = self.engines[model].submit(prompt, params)
            except OpenELMError as e:
                loop.call_soon_threadsafe(_settle, done, None, e, None)
                continue
            self.routes[(model, seq_id)] = _Route(loop, out)
            loop.call_soon_threadsafe(_settle, done, seq_id, None, lambda s=seq_id, m=model: self.cancel(m, s))

    def _step(self, name: str) -> None:
        try:
            outputs = self.engines[name].step()
        except Exception:  # a fault in the engine must not take the server down with it
            log.exception("engine step failed for model %s; its sequences are aborted", name)
            error = APIError(503, "the engine failed on this request; retry", kind="server_error", code="engine_error")
            for key in [k for k in self.routes if k[0] == name]:
                r = self.routes.pop(key)
                r.loop.call_soon_threadsafe(_put_all, [(r.queue, error)])
            self.engines[name] = self.factories[name]()
            return
        m = self.metrics
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        finished = False
        for o in outputs:
            r = self.routes.get((name, o.seq_id))
            if r is None:
                continue
            if not r.started and o.finish_reason != "cancelled":
                r.started = True
                m.add("prompt_tokens_total", o.prompt_tokens)
                m.add("cached_prompt_tokens_total", o.cached_tokens)
                if o.cached_tokens:
                    m.add("prefix_cache_hits_total")
            m.add("generation_tokens_total", len(o.tokens))
            if o.finish_reason:
                finished = True
                del self.routes[(name, o.seq_id)]
                m.add("sequences_cancelled_total" if o.finish_reason == "cancelled" else "sequences_finished_total")
            batches.setdefault(r.loop, []).append((r.queue, o))
        for loop, items in batches.items():  # one wake-up of the event loop per step, not per sequence
            loop.call_soon_threadsafe(_put_all, items)
        if finished:
            self.metrics.set("prefix_cache_bytes", sum(e.prefix_cache.nbytes for e in self.engines.values()))

    def _gauges(self) -> None:
        engines = list(self.engines.values())
        self.metrics.set("queue_depth", sum(len(e.waiting) for e in engines))
        self.metrics.set("running_sequences", sum(len(e.prefilling) + len(e.running) for e in engines))


def _put_all(items: list[tuple[asyncio.Queue, Output]]) -> None:
    for q, item in items:
        q.put_nowait(item)


def _settle(done: asyncio.Future, seq_id: int | None, error: Exception | None, undo: Callable | None) -> None:
    if done.cancelled():  # the request went away while its sequence was being admitted
        if undo is not None:
            undo()
        return
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(seq_id)
