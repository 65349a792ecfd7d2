"""The server's counters, written in Prometheus' text exposition format (no client library:
a handful of numbers does not need one)."""

from __future__ import annotations

import threading
from collections import Counter

from ..step import TRACES

# Label values for requests_total: known routes by name, everything else as "other",
# so a scanner probing random paths cannot grow the series without bound.
ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/health",
    "/metrics",
    "/tokenize",
    "/detokenize",
    "/tokenizer_info",
    "/",
)


class Metrics:
    """Updated from the event loop (requests) and the engine thread (tokens, gauges)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: Counter[tuple[str, str, int]] = Counter()
        self.counters: Counter[str] = Counter()
        self.gauges: dict[str, float] = {"queue_depth": 0, "running_sequences": 0, "prefix_cache_bytes": 0}

    def request(self, method: str, path: str, status: int) -> None:
        with self.lock:
            self.requests[(method, path if path in ROUTES else "other", status)] += 1

    def add(self, name: str, value: float = 1) -> None:
        with self.lock:
            self.counters[name] += value

    def set(self, name: str, value: float) -> None:
        self.gauges[name] = value

    def render(self) -> str:
        with self.lock:
            requests = dict(self.requests)
            counters = dict(self.counters)
        out = [
            "# HELP openelm_requests_total HTTP requests answered, by method, route and status.",
            "# TYPE openelm_requests_total counter",
        ]
        for (method, path, status), n in sorted(requests.items()):
            out.append(f'openelm_requests_total{{method="{method}",path="{path}",status="{status}"}} {n}')
        for name, help_text in COUNTERS.items():
            out += [
                f"# HELP openelm_{name} {help_text}",
                f"# TYPE openelm_{name} counter",
                f"openelm_{name} {_number(counters.get(name, 0))}",
            ]
        out += [
            "# HELP openelm_compiled_traces_total Traces of the compiled decode step (one per batch-shape bucket met).",
            "# TYPE openelm_compiled_traces_total counter",
            f"openelm_compiled_traces_total {TRACES.traces}",
        ]
        for name, help_text in GAUGES.items():
            out += [
                f"# HELP openelm_{name} {help_text}",
                f"# TYPE openelm_{name} gauge",
                f"openelm_{name} {_number(self.gauges.get(name, 0))}",
            ]
        return "\n".join(out) + "\n"


COUNTERS = {
    "prompt_tokens_total": "Prompt tokens of admitted sequences.",
    "cached_prompt_tokens_total": "Prompt tokens found in the prefix cache (not prefilled again).",
    "generation_tokens_total": "Tokens generated.",
    "prefix_cache_hits_total": "Sequences that reused a cached prompt prefix.",
    "sequences_finished_total": "Sequences that ran to the end (EOS, stop string or max tokens).",
    "sequences_cancelled_total": "Sequences cancelled (client gone, or shutdown).",
    "rejected_overloaded_total": "Requests refused with 429 because the queue was full.",
}

GAUGES = {
    "queue_depth": "Sequences waiting for a slot in the running batch.",
    "running_sequences": "Sequences in the running batch (prefilling or decoding).",
    "prefix_cache_bytes": "Bytes of KV state held by the prefix cache.",
}


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))
