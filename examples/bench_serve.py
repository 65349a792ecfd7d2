"""Aggregate decode tok/s and time to first token of `openelm-mlx serve` against `mlx_lm.server`
on the same converted weights, same prompts, same run, at several client concurrencies.

    python examples/bench_serve.py --model DIR [--concurrency 1 4 8 16] [--repeats 3]

Each client sends streamed /v1/completions requests one after another (greedy, `max_tokens`
each); aggregate decode tok/s is all generated tokens (from `usage`) over the wall time of the
run, time to first token is per request.  The two servers run one after the other, alternating
per repeat; the figures are medians over the repeats in which every request was answered (a
connection dropped before any answer is retried, as the ``openai`` client does; an error answer,
such as mlx_lm.server's 404 "generation thread died", or a stream cut short fails the run, and
the table counts those).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time

import httpx

from openelm_mlx.blas import fast_blas_env

RETRIES = 5
WORDS = "In the beginning God created the heaven and the earth And the earth was without form and void".split()


def prompts(n: int) -> list[str]:
    return [" ".join(WORDS[i % 5 : i % 5 + 4 + i % 9]) for i in range(n)]


def start(kind: str, model: str, port: int, concurrency: int) -> subprocess.Popen:
    if kind == "openelm-mlx":
        cmd = [sys.executable, "-m", "openelm_mlx.cli", "serve", "--model", model, "--port", str(port)]
        cmd += ["--max-concurrency", str(max(concurrency, 1)), "--log-level", "warning"]
    else:
        cmd = [sys.executable, "-m", "mlx_lm.server", "--model", model, "--port", str(port), "--log-level", "WARNING"]
    # The openelm-mlx CLI restarts itself on OpenBLAS when it is installed (blas.py): mlx_lm gets the same BLAS.
    env = fast_blas_env()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"{kind} did not start")


async def one(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> tuple[float, int, int]:
    """(time to first token, generated tokens or -1 for an error answer or a stream cut short
    before its finish_reason, connection retries) of one streamed request.

    A connection the server drops before answering is retried, as the official ``openai`` client
    does (mlx_lm.server, on http.server, resets some of 16 simultaneous connections); the time
    counts from the first attempt."""
    body = {  # no "model": each server answers with the one it was started with
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    for retries in range(RETRIES + 1):
        ttft, tokens, chunks, answered, finished = None, None, 0, False, False
        try:
            async with client.stream("POST", url, json=body) as r:
                if r.status_code != 200:  # mlx_lm.server answers 404 once its generation thread died
                    return time.perf_counter() - t0, -1, retries
                async for line in r.aiter_lines():
                    answered = True
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if event.get("choices") and event["choices"][0].get("finish_reason"):
                        finished = True
                    if event.get("choices") and event["choices"][0].get("text"):
                        chunks += 1
                        ttft = ttft or time.perf_counter() - t0
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
        except httpx.TransportError:
            if answered or retries == RETRIES:
                raise
            await asyncio.sleep(0.05)
            continue
        if not finished:  # a stream cut short (mlx_lm.server's generation thread died mid-answer)
            return time.perf_counter() - t0, -1, retries
        # Without a usage event (seen from mlx_lm.server after dropped connections), count the
        # streamed text chunks: one per token for both servers.
        return ttft or time.perf_counter() - t0, chunks if tokens is None else tokens, retries
    raise AssertionError("unreachable")


async def run(port: int, concurrency: int, per_client: int, max_tokens: int) -> dict:
    url = f"http://127.0.0.1:{port}/v1/completions"
    texts = prompts(concurrency * per_client)
    async with httpx.AsyncClient(timeout=600) as client:
        await one(client, url, texts[0], 4)  # warm-up

        async def worker(k: int) -> list[tuple[float, int, int]]:
            return [await one(client, url, texts[k * per_client + i], max_tokens) for i in range(per_client)]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(k) for k in range(concurrency))) for r in rs]
        wall = time.perf_counter() - t0
    ttfts = sorted(t for t, n, _ in results if n >= 0)
    answered = [n for _, n, _ in results if n >= 0]
    return {
        "tok_s": sum(answered) / wall,
        "tokens_per_request": sum(answered) / max(1, len(answered)),  # EOS can end one early
        "failed": len(results) - len(answered),
        "retries": sum(k for _, _, k in results),
        "ttft_median": statistics.median(ttfts),
        "ttft_p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a converted model directory (both servers load it)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--port", type=int, default=8391)
    args = p.parse_args()
    rows = []
    for c in args.concurrency:
        figures: dict[str, list[dict]] = {"openelm-mlx": [], "mlx_lm": []}
        for rep in range(args.repeats):
            for kind in ("openelm-mlx", "mlx_lm") if rep % 2 == 0 else ("mlx_lm", "openelm-mlx"):
                proc = start(kind, args.model, args.port, c)
                try:
                    figures[kind].append(asyncio.run(run(args.port, c, args.requests_per_client, args.max_tokens)))
                finally:
                    proc.terminate()
                    proc.wait(60)
                print(f"clients {c} repeat {rep + 1} {kind}: {figures[kind][-1]}", file=sys.stderr, flush=True)
        # Medians over the runs in which every request was answered (a run with error answers
        # is listed on stderr and counted in the last column, not averaged in).
        kept = {k: [r for r in v if not r["failed"]] or v for k, v in figures.items()}
        med = {k: {f: statistics.median(r[f] for r in v) for f in v[0]} for k, v in kept.items()}
        for k, v in figures.items():
            med[k]["failed_runs"] = sum(1 for r in v if r["failed"])
        rows.append((c, med))
    head = "| clients | openelm-mlx tok/s | mlx_lm tok/s | ratio | TTFT median, ours / mlx_lm (s) | TTFT p95 (s) |"
    print(head + " retries | runs with failed requests |")
    print("|---|---|---|---|---|---|---|---|")
    for c, med in rows:
        a, b = med["openelm-mlx"], med["mlx_lm"]
        print(
            f"| {c} | {a['tok_s']:.0f} | {b['tok_s']:.0f} | {a['tok_s'] / b['tok_s']:.2f}x | "
            f"{a['ttft_median']:.3f} / {b['ttft_median']:.3f} | {a['ttft_p95']:.3f} / {b['ttft_p95']:.3f} | "
            f"{a['retries']:.0f} / {b['retries']:.0f} | {a['failed_runs']} / {b['failed_runs']} |"
        )


if __name__ == "__main__":
    main()
