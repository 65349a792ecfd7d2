"""The server against hostile clients (issue #23, second part): slow clients holding
connections, a request head dribbled byte by byte, a 7 MB /tokenize body, bodies that used to
end in a 500 with a traceback, degenerate sampling limits, and a 512 MiB chunked upload.

Real servers on loopback ports: in this process (``running_server``) or, where the test needs
the server's own descriptor limit or RSS, the real CLI in a subprocess.  Raw sockets for what a
client library would not send."""

from __future__ import annotations

import logging
import re
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from helpers import openai_error, response_head
from helpers import running_server as running

from openelm_mlx.loading import load
from openelm_mlx.server.app import Settings
from openelm_mlx.server.body import MAX_BODY_BYTES
from openelm_mlx.server.protocol import Limits, ServedModel

BUNDLED = Path(__file__).resolve().parents[1] / "openelm_mlx" / "bundled" / "openelm-tiny-kjv"
NAME = "openelm-tiny-kjv"
JSON = {"Content-Type": "application/json"}
SLOW_CLIENTS = 300
FD_LIMIT = 256  # macOS's default soft limit, where the EMFILE was seen


@pytest.fixture(scope="module")
def models() -> dict[str, ServedModel]:
    model, tok = load(BUNDLED)
    return {NAME: ServedModel(NAME, model, tok)}


class _Tracebacks(logging.Handler):
    """Collects what uvicorn logs when an exception escapes the app (the 500 with a traceback)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def served(models):
    """A server (head deadline 1 s, so the dribble test is short) and the errors it logs."""
    catcher = _Tracebacks()
    logging.getLogger("uvicorn.error").addHandler(catcher)
    try:
        with running(models, Settings(limits=Limits(8, 8)), head_timeout=1.0) as url:
            yield url, catcher
    finally:
        logging.getLogger("uvicorn.error").removeHandler(catcher)


def _five_hundreds(url: str) -> int:
    text = httpx.get(f"{url}/metrics").text
    return sum(int(n) for n in re.findall(r'openelm_requests_total\{[^}]*status="5\d\d"\} (\d+)', text))


def _addr(url: str) -> tuple[str, int]:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    return host, int(port)


def test_bodies_that_were_500s_are_openai_shaped_4xx(served):
    url, tracebacks = served
    chat = {"model": NAME, "max_tokens": 2}
    user = [{"role": "user", "content": "hi"}]

    def post(raw: bytes, path: str = "/v1/chat/completions") -> httpx.Response:
        return httpx.post(f"{url}{path}", content=raw, headers=JSON, timeout=60)

    # A lone surrogate, which SentencePiece refuses: the field is named.
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800b"}]}' % NAME.encode()
    assert "lone surrogate" in openai_error(post(body), 400, "messages[0].content")
    openai_error(post(b'{"prompt": "x\\udfff"}', "/tokenize"), 400, "prompt")
    openai_error(
        post(b'{"model": "%s", "prompt": ["ok", "\\udc00"]}' % NAME.encode(), "/v1/completions"), 400, "prompt[1]"
    )
    # A surrogate pair is one valid character, not an error.
    ok = post(b'{"model": "%s", "max_tokens": 1, "prompt": "\\ud83d\\ude00"}' % NAME.encode(), "/v1/completions")
    assert ok.status_code == 200, ok.text
    # 400-digit integers where numbers go.
    huge = "9" * 400
    for field in ("max_tokens", "seed", "temperature", "top_p", "max_completion_tokens"):
        raw = f'{{"model": "{NAME}", "messages": [{{"role": "user", "content": "hi"}}], "{field}": {huge}}}'
        message = openai_error(post(raw.encode()), 400, field)
        assert len(message) < 200, message
    # Roles that are not strings (unhashable ones were a TypeError).
    for role in (["user"], {"a": 1}, 7, None):
        r = httpx.post(f"{url}/v1/chat/completions", json={**chat, "messages": [{"role": role, "content": "x"}]})
        openai_error(r, 400, "messages[0].role")
    # A client that leaves mid-body.
    with socket.create_connection(_addr(url)) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"model": "'
        )
        time.sleep(0.3)
    time.sleep(0.5)
    assert httpx.post(f"{url}/v1/chat/completions", json={**chat, "messages": user}).status_code == 200
    assert not tracebacks.records, [r.getMessage() for r in tracebacks.records]
    assert _five_hundreds(url) == 0


def test_degenerate_temperature_and_top_p_sample_greedily(served):
    url, _ = served
    base = {"model": NAME, "prompt": "And God said", "max_tokens": 8}
    greedy = httpx.post(f"{url}/v1/completions", json={**base, "temperature": 0}, timeout=60).json()
    assert greedy["choices"][0]["text"]
    for extra in ({"temperature": 1e-30}, {"temperature": 1e-300}, {"top_p": 1e-30, "temperature": 1.5}):
        for seed in (1, 2, 3):
            r = httpx.post(f"{url}/v1/completions", json={**base, **extra, "seed": seed}, timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == greedy["choices"][0]["text"], extra


def test_a_dribbled_request_head_is_cut_at_the_deadline(served):
    """One byte every 0.2 s resets uvicorn's idle timer forever; the head deadline (1 s here,
    10 s by default) closes the connection however often bytes arrive."""
    url, _ = served
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200
    t0 = time.monotonic()
    with socket.create_connection(_addr(url), timeout=5) as s:
        closed = False
        for byte in head:
            try:
                s.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.2)
            if time.monotonic() - t0 > 6:
                break
        if not closed:
            s.settimeout(0.1)
            try:
                closed = s.recv(1) == b""
            except ConnectionResetError:
                closed = True
            except TimeoutError:
                pass
    assert closed, "the server kept a connection whose head never ended"
    assert time.monotonic() - t0 < 4
    # After a finished request, a second head is held to the deadline too.
    with socket.create_connection(_addr(url), timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = b""
        while not answer.endswith(b'{"status":"ok"}'):
            answer += s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /health HTTP/1.1\r\n")
        time.sleep(1.5)
        s.settimeout(2)
        try:
            rest = s.recv(65536)
        except ConnectionResetError:
            rest = b""
        assert rest == b"", rest[:200]


def test_a_stalled_body_gets_408_and_the_connection_closed(served, monkeypatch):
    from openelm_mlx.server import body

    monkeypatch.setattr(body, "BODY_IDLE_S", 1.0)  # 30 s in service
    url, _ = served
    with socket.create_connection(_addr(url), timeout=10) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"model": '
        )
        t0 = time.monotonic()
        answer = b""
        while True:
            data = s.recv(65536)
            if not data:
                break
            answer += data
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"code":"timeout"' in answer and 0.9 < time.monotonic() - t0 < 5


def test_tokenize_of_7_mb_does_not_stall_other_requests(served):
    url, _ = served
    text = ("In the beginning God created the heaven and the earth. " * 130_000)[:7_000_000]
    result: list[httpx.Response] = []
    big = threading.Thread(
        target=lambda: result.append(httpx.post(f"{url}/tokenize", json={"prompt": text}, timeout=120))
    )
    big.start()
    worst, polls = 0.0, 0
    time.sleep(0.2)
    while big.is_alive():
        t0 = time.perf_counter()
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        worst, polls = max(worst, time.perf_counter() - t0), polls + 1
        time.sleep(0.05)
    big.join()
    assert result[0].status_code == 200 and result[0].json()["count"] > 1_000_000
    assert polls >= 5, "the tokenize request ended too fast to tell"
    assert worst < 1.0, f"a /health request waited {worst:.2f} s behind /tokenize"


# --- the real CLI in a subprocess: its own descriptor limit and its own RSS ---------------------


def _serve(fd_limit: int | None = None) -> tuple[subprocess.Popen, str]:
    def limit() -> None:
        if fd_limit is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))

    proc = subprocess.Popen(
        [sys.executable, "-m", "openelm_mlx_cli", "serve", "--model", str(BUNDLED), "--port", "0",
         "--log-level", "warning"],
        stderr=subprocess.PIPE, text=True, preexec_fn=limit,
    )  # fmt: skip
    line = proc.stderr.readline()
    assert " on http://" in line, line
    # Read what it logs meanwhile: a full pipe would block the server.
    err: list[str] = []
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
    proc.log = err  # type: ignore[attr-defined]
    return proc, line.split(" on ", 1)[1].strip().removesuffix("/v1")


def _stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    time.sleep(0.2)  # the reader thread takes the last lines
    return "".join(proc.log)  # type: ignore[attr-defined]


def _need_fds(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        if hard < n:
            pytest.skip(f"needs {n} descriptors in the test process (hard limit {hard})")
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))


def test_300_slow_clients_do_not_starve_a_normal_one():
    """300 connections sending one header byte every 2 s, against a server with 256 descriptors
    (macOS's default): before, accept() failed with EMFILE and nobody was served.  Now the
    connection cap (256 - 128) closes the oldest slow ones, and a normal request is answered
    within 2 s every time."""
    _need_fds(SLOW_CLIENTS + 64)
    proc, url = _serve(FD_LIMIT)
    slow: list[socket.socket] = []
    try:
        for _ in range(SLOW_CLIENTS):
            s = socket.create_connection(_addr(url), timeout=5)
            s.setblocking(False)
            slow.append(s)
        head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100
        latencies = []
        deadline = time.monotonic() + 8
        for k in range(len(head)):
            if time.monotonic() > deadline:
                break
            for s in slow:  # one more header byte each
                try:
                    s.send(head[k : k + 1])
                except OSError:
                    pass  # closed by the server: its slot went to someone else
            t0 = time.monotonic()
            r = httpx.get(f"{url}/health", timeout=10)
            latencies.append(time.monotonic() - t0)
            assert r.status_code == 200
            time.sleep(2)
        assert max(latencies) < 2.0, latencies
    finally:
        for s in slow:
            s.close()
        err = _stop(proc)
    assert "Too many open files" not in err and "Traceback" not in err, err[-2000:]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's RSS from /proc")
def test_512_mib_chunked_upload_is_stopped_at_the_limit_with_bounded_memory():
    proc, url = _serve()
    try:
        httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "And", "max_tokens": 1}, timeout=60)
        before = _rss_mb(proc.pid)
        chunk = b"x" * 2**20
        sent = 0
        with socket.create_connection(_addr(url), timeout=30) as s:
            s.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            try:
                while sent < 512 * 2**20:
                    s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                    sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            answer = response_head(s)
        after = _rss_mb(proc.pid)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert sent < 64 * 2**20, f"the server read {sent / 2**20:.0f} MiB past an {MAX_BODY_BYTES >> 20} MiB limit"
        assert after - before < 100, f"RSS {before:.0f} -> {after:.0f} MB"
        print(f"server RSS before {before:.0f} MB, after the 512 MiB upload {after:.0f} MB; sent {sent >> 20} MiB")
        assert httpx.get(f"{url}/health").status_code == 200
    finally:
        err = _stop(proc)
    assert "Traceback" not in err, err[-2000:]
