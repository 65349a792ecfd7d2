"""Requests per second a normal client gets from `openelm-mlx serve` while slow clients hold
connections (one request-head byte each every 2 s), against the same with none; and the
server's RSS before and after a 512 MiB chunked upload (refused at the 8 MiB body limit).

    python examples/bench_slow_clients.py [--slow 300] [--seconds 10] [--fd-limit 256]

The server runs with ``--fd-limit`` descriptors (256 is macOS's default soft limit, where a few
hundred slow clients used to exhaust them).  The normal client sends one greedy 4-token
/v1/completions request after another on the bundled model; a request not answered in 10 s
counts as a failure.
"""

from __future__ import annotations

import argparse
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

BUNDLED = Path(__file__).resolve().parents[1] / "openelm_mlx" / "bundled" / "openelm-tiny-kjv"
HEAD = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200


def serve(fd_limit: int) -> tuple[subprocess.Popen, str]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))

    cmd = [sys.executable, "-m", "openelm_mlx_cli", "serve", "--model", str(BUNDLED), "--port", "0"]
    proc = subprocess.Popen([*cmd, "--log-level", "warning"], stderr=subprocess.PIPE, text=True, preexec_fn=limit)
    line = proc.stderr.readline()
    if " on http://" not in line:
        raise SystemExit(f"the server did not start: {line}")
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # a full pipe would block the server
    return proc, line.split(" on ", 1)[1].strip().removesuffix("/v1")


def run(url: str, n_slow: int, seconds: float) -> tuple[float, int, float]:
    """(answered requests/s, failures, slowest answer in s) over ``seconds``."""
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    slow = []
    for _ in range(n_slow):
        s = socket.create_connection((host, int(port)), timeout=5)
        s.setblocking(False)
        slow.append(s)
    body = {"prompt": "And God said", "max_tokens": 4, "temperature": 0}
    answered = failed = 0
    worst = 0.0
    t0 = next_drip = time.monotonic()
    k = 0
    with httpx.Client(timeout=10) as client:
        while time.monotonic() - t0 < seconds:
            if time.monotonic() >= next_drip:  # every slow client sends its next head byte
                for s in slow:
                    try:
                        s.send(HEAD[k % len(HEAD) : k % len(HEAD) + 1])
                    except OSError:
                        pass
                k, next_drip = k + 1, next_drip + 2.0
            t = time.monotonic()
            try:
                ok = client.post(f"{url}/v1/completions", json=body).status_code == 200
            except httpx.HTTPError:
                ok = False
            worst = max(worst, time.monotonic() - t)
            answered, failed = answered + ok, failed + (not ok)
    elapsed = time.monotonic() - t0
    for s in slow:
        s.close()
    return answered / elapsed, failed, worst


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def chunked_upload(url: str, total: int) -> int:
    """Sends up to ``total`` bytes as a chunked body; returns how many the server took."""
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    chunk, sent = b"x" * 2**20, 0
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        try:
            while sent < total:
                s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += len(chunk)
        except OSError:
            pass
    return sent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slow", type=int, default=300)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--fd-limit", type=int, default=256)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, args.slow + 256), hard), hard))
    proc, url = serve(args.fd_limit)
    try:
        httpx.post(f"{url}/v1/completions", json={"prompt": "And", "max_tokens": 1}, timeout=60)  # warm-up
        for n in (0, args.slow, 0):
            rate, failed, worst = run(url, n, args.seconds)
            print(f"{n:4d} slow clients: {rate:6.1f} requests/s answered, {failed} failed, slowest {worst:.2f} s")
        if Path(f"/proc/{proc.pid}/status").exists():
            before = rss_mb(proc.pid)
            sent = chunked_upload(url, 512 * 2**20)
            print(
                f"512 MiB chunked upload: the server took {sent / 2**20:.0f} MiB before refusing; "
                f"RSS {before:.0f} -> {rss_mb(proc.pid):.0f} MB"
            )
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
