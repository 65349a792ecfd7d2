"""``openelm-mlx serve`` end to end: a real uvicorn server on a free loopback port, driven by the
official ``openai`` client (and raw HTTP where a client would hide the status).  Outputs are
checked against the in-process engine (``generate``) and the float64 reference forward."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import mlx.core as mx
import numpy as np
import openai
import pytest
from helpers import running_server as running
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openelm_mlx import reference
from openelm_mlx.cli import main
from openelm_mlx.generate import generate
from openelm_mlx.loading import load
from openelm_mlx.server.app import Settings
from openelm_mlx.server.protocol import Limits, ServedModel

BUNDLED = Path(__file__).resolve().parents[1] / "openelm_mlx" / "bundled" / "openelm-tiny-kjv"
BASE, INSTRUCT = "openelm-tiny-kjv", "openelm-tiny-kjv-instruct"
KEY = "test-key-123"
PROMPT_CACHE_BYTES = 24 * 2**20  # small, so the soak test fills it during its warm-up
LOGPROB_TOL = 1e-4  # float32 engine vs float64 reference, log-probabilities in nats


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, ServedModel]:
    # The Instruct copy: the same weights under a name that marks an Instruct model, so the
    # server applies the template (its output still comes from the bundled weights).
    instruct_dir = tmp_path_factory.mktemp("models") / INSTRUCT
    shutil.copytree(BUNDLED, instruct_dir)
    out = {}
    for name, path in ((BASE, BUNDLED), (INSTRUCT, instruct_dir)):
        model, tok = load(path)
        out[name] = ServedModel(name, model, tok)
    assert out[INSTRUCT].instruct and not out[BASE].instruct
    return out


@pytest.fixture(scope="module")
def url(models):
    settings = Settings(limits=Limits(default_max_tokens=64, max_tokens_limit=300), max_concurrency=8, max_queue=32)
    with running(models, settings, prompt_cache_bytes=PROMPT_CACHE_BYTES) as u:
        yield u


@pytest.fixture(scope="module")
def limited_url(models):
    """One slot, no queue, an API key, and at most 8 tokens per request."""
    settings = Settings(api_key=KEY, limits=Limits(8, 8), max_concurrency=1, max_queue=0)
    with running({BASE: models[BASE]}, settings) as u:
        yield u


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def greedy(models, name: str, prompt, max_tokens: int, **kw) -> str:
    m = models[name]
    return generate(m.model, m.tokenizer, prompt, max_tokens=max_tokens, **kw)


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(v) for v in re.findall(rf"^openelm_{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


# --- endpoints, against the engine --------------------------------------------------------------


def test_models_and_health(url):
    ids = [m.id for m in client(url).models.list().data]
    assert ids == [BASE, INSTRUCT]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def test_chat_instruct_template_greedy_equals_generate(url, models):
    c = client(url)
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who made the light?"}]
    r = c.chat.completions.create(model=INSTRUCT, messages=messages, temperature=0, max_tokens=24)
    # The template written out by hand: role markers, each turn closed by EOS (</s>).
    prompt = "<|system|>\nAnswer briefly.</s>\n<|user|>\nWho made the light?</s>\n<|assistant|>\n"
    ids = models[INSTRUCT].tokenizer.encode(prompt)
    expected = greedy(models, INSTRUCT, ids, 24)
    assert r.choices[0].message.content == expected
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens <= 24 and r.choices[0].finish_reason in ("stop", "length")
    stream = c.chat.completions.create(
        model=INSTRUCT,
        messages=messages,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == expected
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) >= 2  # it streamed
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason


def test_chat_base_model_gets_a_plain_transcript(url, models):
    messages = [
        {"role": "user", "content": "And God said"},
        {"role": "assistant", "content": "Let there be light"},
        {"role": "user", "content": [{"type": "text", "text": "And the evening"}]},
    ]
    r = client(url).chat.completions.create(model=BASE, messages=messages, temperature=0, max_tokens=30)
    prompt = "User: And God said\nAssistant: Let there be light\nUser: And the evening\nAssistant:"
    assert r.choices[0].message.content == greedy(models, BASE, prompt, 30, stop=["\nUser:"])


def test_completions_streamed_and_not_equal_generate(url, models):
    c = client(url)
    expected = greedy(models, BASE, "In the beginning", 40)
    r = c.completions.create(model=BASE, prompt="In the beginning", temperature=0, max_tokens=40)
    assert r.choices[0].text == expected and r.usage.completion_tokens == 40
    assert r.choices[0].finish_reason == "length"
    chunks = list(
        c.completions.create(
            model=BASE,
            prompt="In the beginning",
            temperature=0,
            max_tokens=40,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == expected
    assert chunks[-1].usage.completion_tokens == 40 and chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens
    # Token ids in, several prompts in one request: one choice each, in order.
    ids = models[BASE].tokenizer.encode("And the earth")
    r = c.completions.create(model=BASE, prompt=[ids, "In the beginning"], temperature=0, max_tokens=12)
    assert [ch.index for ch in r.choices] == [0, 1]
    assert r.choices[0].text == greedy(models, BASE, ids, 12)
    assert r.choices[1].text == expected[: len(r.choices[1].text)] and r.usage.completion_tokens == 24


def test_echo_logprobs_equal_the_float64_reference(url, models):
    """What lm-eval's local-completions sends for loglikelihood (token ids, echo, logprobs=1,
    max_tokens=1) and how it reads the answer (token_logprobs[ctxlen:-1], top_logprobs)."""
    m = models[BASE]
    ids = m.tokenizer.encode("In the beginning God created the heaven and the earth.")
    weights = {k: np.array(v, dtype=np.float64) for k, v in mx.load(str(BUNDLED / "model.safetensors")).items()}
    logits = reference.forward(m.model.config, weights, np.array([ids]))[0]
    top = logits.max(-1, keepdims=True)
    ref = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))  # float64 log-softmax
    want = [ref[i - 1, ids[i]] for i in range(1, len(ids))]
    body = {"model": BASE, "prompt": [ids], "temperature": 0, "max_tokens": 1, "logprobs": 1, "echo": True}
    out = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
    lp = out["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
    np.testing.assert_allclose(lp["token_logprobs"][1 : len(ids)], want, atol=LOGPROB_TOL, rtol=0)
    for i, top in enumerate(lp["top_logprobs"][1 : len(ids)], start=1):  # top-1 is the reference argmax
        ((_, value),) = top.items()
        assert abs(value - ref[i - 1].max()) < LOGPROB_TOL
    ctxlen = 4  # lm-eval's sum over the continuation
    assert abs(sum(lp["token_logprobs"][ctxlen:-1]) - sum(want[ctxlen - 1 :])) < LOGPROB_TOL * len(ids)
    assert out["choices"][0]["text"].startswith(m.tokenizer.decode(ids))
    # max_tokens 0 with echo scores the prompt alone; through the official client too.
    r = client(url).completions.create(model=BASE, prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert r.usage.completion_tokens == 0 and len(r.choices[0].logprobs.token_logprobs) == len(ids)
    np.testing.assert_allclose(r.choices[0].logprobs.token_logprobs[1:], want, atol=LOGPROB_TOL, rtol=0)


def test_tokenizer_endpoints_lm_eval_uses(url, models):
    """lm-eval's remote tokenizer: /tokenizer_info with an eos_token, /tokenize, /detokenize."""
    tok = models[BASE].tokenizer
    info = httpx.get(f"{url}/tokenizer_info").json()
    assert info["eos_token"] == "</s>"
    for special, id_ in ((info["bos_token"], tok.bos_id), (info["eos_token"], tok.eos_id)):
        r = httpx.post(f"{url}/tokenize", json={"prompt": special, "add_special_tokens": False})
        assert r.json()["tokens"] == [id_]  # how lm-eval finds the special ids
    r = httpx.post(f"{url}/tokenize", json={"prompt": "And God said</s>", "add_special_tokens": False}).json()
    assert r["tokens"] == tok.encode("And God said", add_bos=False) + [tok.eos_id]
    assert httpx.post(f"{url}/detokenize", json={"tokens": r["tokens"][:-1]}).json() == {"prompt": "And God said"}
    assert_error(httpx.post(f"{url}/detokenize", json={"tokens": [-1]}), 400, "tokens")


def test_chat_logprobs(url):
    r = client(url).chat.completions.create(
        model=INSTRUCT,
        messages=[{"role": "user", "content": "Hello"}],
        temperature=0,
        max_tokens=8,
        logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert abs(entry.logprob - tops[0]) < 1e-6  # greedy: the chosen token is the most likely


def test_stop_strings_end_the_text_and_are_never_split(url, models):
    full = greedy(models, BASE, "And God said", 40)
    stop = full[12:18]
    assert len(stop) == 6 and stop not in full[:17]
    expected = full[: full.index(stop)]
    c = client(url)
    r = c.completions.create(model=BASE, prompt="And God said", temperature=0, max_tokens=40, stop=[stop, "zzzz"])
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    pieces = [
        ch.choices[0].text
        for ch in c.completions.create(
            model=BASE, prompt="And God said", temperature=0, max_tokens=40, stop=stop, stream=True
        )
    ]
    assert "".join(pieces) == expected
    assert not any(stop[:k] and p.endswith(stop[:k]) for p in pieces[-1:] for k in range(1, len(stop)))


def test_sampling_parameters(url, models):
    c = client(url)
    kw = {"model": BASE, "prompt": "And God said", "max_tokens": 16}
    seeded = dict(kw, temperature=0.9, top_p=0.9, seed=7, presence_penalty=0.5, frequency_penalty=0.5)
    seeded["extra_body"] = {"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.2}
    a, b = c.completions.create(**seeded), c.completions.create(**seeded)
    assert a.choices[0].text == b.choices[0].text  # the seed reproduces
    # A large logit bias on one token makes it the only choice.
    tok = models[BASE].tokenizer
    amen = tok.encode(" Amen", add_bos=False)[-1]
    r = c.completions.create(**kw, temperature=0, logit_bias={str(amen): 100})
    assert set(r.choices[0].text.split()) == {"Amen"}


def test_concurrent_clients_each_get_their_solo_output(url, models):
    tok = models[BASE].tokenizer
    words = "In the beginning God created the heaven and the earth And the earth was without form".split()
    jobs = [(" ".join(words[: 1 + i % 13]), 6 + (i * 7) % 30) for i in range(16)]
    solo = [greedy(models, BASE, p, n) for p, n in jobs]

    def ask(job):
        p, n = job
        r = client(url).completions.create(model=BASE, prompt=p, temperature=0, max_tokens=n)
        return r.choices[0].text

    before = metric(url, "prompt_tokens_total")
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, jobs))
    assert got == solo
    assert metric(url, "prompt_tokens_total") - before == sum(len(tok.encode(p)) for p, _ in jobs)


def test_resent_conversation_reuses_the_prefix_and_equals_a_cold_run(url, models):
    c = client(url)
    first = [{"role": "user", "content": "Tell me of Noah and the ark he built."}]
    r1 = c.chat.completions.create(model=INSTRUCT, messages=first, temperature=0, max_tokens=20)
    second = first + [
        {"role": "assistant", "content": r1.choices[0].message.content},
        {"role": "user", "content": "And then?"},
    ]
    r2 = c.chat.completions.create(model=INSTRUCT, messages=second, temperature=0, max_tokens=20)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached >= len(models[INSTRUCT].tokenizer.encode("<|user|>\nTell me of Noah and the ark he built."))
    prompt = (
        f"<|user|>\nTell me of Noah and the ark he built.</s>\n<|assistant|>\n{r1.choices[0].message.content}</s>\n"
        "<|user|>\nAnd then?</s>\n<|assistant|>\n"
    )
    ids = models[INSTRUCT].tokenizer.encode(prompt)
    assert r2.usage.prompt_tokens == len(ids)
    assert r2.choices[0].message.content == greedy(models, INSTRUCT, ids, 20)  # cold: no cache at all


# --- bad input, limits, faults ------------------------------------------------------------------


def post(url: str, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = {"Content-Type": "application/json", **kw.pop("headers", {})}
    return httpx.post(f"{url}{path}", content=content, headers=headers, timeout=30, **kw)


def assert_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code


def test_bad_requests_get_openai_shaped_4xx(url, models):
    chat = {"model": BASE, "messages": [{"role": "user", "content": "hi"}]}
    assert_error(post(url, "/v1/chat/completions", b"{not json"), 400)
    assert_error(post(url, "/v1/chat/completions", b"[1, 2]"), 400)
    assert_error(post(url, "/v1/chat/completions", {**chat, "max_tokens": "ten"}), 400, "max_tokens")
    assert_error(post(url, "/v1/chat/completions", {**chat, "temperature": "hot"}), 400, "temperature")
    assert_error(post(url, "/v1/chat/completions", {**chat, "messages": "hi"}), 400, "messages")
    assert_error(post(url, "/v1/chat/completions", {**chat, "messages": [{"role": "tool"}]}), 400)
    assert_error(post(url, "/v1/chat/completions", {**chat, "n": 2}), 400, "n")
    assert_error(post(url, "/v1/chat/completions", {**chat, "stop": [1]}), 400, "stop")
    assert_error(post(url, "/v1/completions", {"model": BASE, "prompt": [[1, 99999]]}), 400, "prompt")
    assert_error(post(url, "/v1/completions", {"model": BASE, "prompt": "x", "max_tokens": 0}), 400)
    assert_error(post(url, "/v1/chat/completions", {**chat, "max_tokens": 301}), 400, "max_tokens")
    long_prompt = " ".join(["and"] * 600)
    body = {"model": BASE, "prompt": long_prompt, "max_tokens": 4}
    assert_error(post(url, "/v1/completions", body), 400, code="context_length_exceeded")
    body = {"model": BASE, "prompt": "In the beginning", "max_tokens": 300, "extra": 1}
    body["prompt"] = " ".join(["and"] * 250)
    assert_error(post(url, "/v1/completions", body), 400, "max_tokens", "context_length_exceeded")
    assert_error(post(url, "/v1/chat/completions", {**chat, "model": "/etc/passwd"}), 404, "model", "model_not_found")
    assert_error(httpx.get(f"{url}/v1/nothing"), 404)
    assert_error(httpx.get(f"{url}/v1/chat/completions"), 405)
    c = client(url)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="../openelm-tiny-kjv", messages=chat["messages"])
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=BASE, prompt=long_prompt, max_tokens=4)
    assert httpx.get(f"{url}/health").status_code == 200


def test_api_key(limited_url):
    assert httpx.get(f"{limited_url}/health").status_code == 200
    for path in ("/v1/models", "/metrics"):
        assert_error(httpx.get(f"{limited_url}{path}"), 401, code="invalid_api_key")
        bad = httpx.get(f"{limited_url}{path}", headers={"Authorization": "Bearer wrong"})
        assert_error(bad, 401)
        assert httpx.get(f"{limited_url}{path}", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        client(limited_url, "wrong").models.list()
    r = client(limited_url, KEY).completions.create(model=BASE, prompt="And", max_tokens=2)
    assert r.usage.completion_tokens == 2


def test_full_queue_gets_429_and_the_server_recovers(limited_url):
    c = client(limited_url, KEY)
    hold = httpx.Client(timeout=30, headers={"Authorization": f"Bearer {KEY}"})
    body = {"model": BASE, "prompt": "And God said", "max_tokens": 8, "temperature": 0, "stream": True}
    with hold.stream("POST", f"{limited_url}/v1/completions", json=body) as r:  # takes the one slot
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model=BASE, prompt="And", max_tokens=2)
        assert e.value.body["code"] == "queue_full"
        rest = list(lines)
    assert [line for line in rest if line][-1] == "data: [DONE]"  # the held stream still ended well
    assert c.completions.create(model=BASE, prompt="And", max_tokens=2).usage.completion_tokens == 2


def test_client_disconnect_frees_the_slot(url):
    cancelled = metric(url, "sequences_cancelled_total")
    body = {"model": BASE, "prompt": "And God said", "max_tokens": 300, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as h, h.stream("POST", f"{url}/v1/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    deadline = time.monotonic() + 10
    while metric(url, "sequences_cancelled_total") == cancelled or metric(url, "running_sequences"):
        assert time.monotonic() < deadline, "the sequence kept running after its client left"
        time.sleep(0.05)
    # Not streamed: the server notices the closed connection while it waits (checked each second).
    cancelled = metric(url, "sequences_cancelled_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, timeout=0.5)
    deadline = time.monotonic() + 10
    while metric(url, "sequences_cancelled_total") == cancelled or metric(url, "running_sequences"):
        assert time.monotonic() < deadline, "the sequence kept running after its client left"
        time.sleep(0.05)


def test_metrics_count_requests_and_tokens(url):
    text = httpx.get(f"{url}/metrics").text
    assert "# TYPE openelm_requests_total counter" in text and "# TYPE openelm_queue_depth gauge" in text
    before = (metric(url, "generation_tokens_total"), metric(url, "requests_total"))
    client(url).completions.create(model=BASE, prompt="And", max_tokens=3, temperature=0)
    after = (metric(url, "generation_tokens_total"), metric(url, "requests_total"))
    assert after[0] - before[0] == 3 and after[1] - before[1] >= 2  # the completion and a /metrics
    # Sequences decoding together go through the compiled step: its traces are counted.
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda p: client(url).completions.create(model=BASE, prompt=p, max_tokens=8), ["A", "B", "C"]))
    assert "# TYPE openelm_compiled_traces_total counter" in httpx.get(f"{url}/metrics").text
    assert metric(url, "compiled_traces_total") >= 1


def test_a_quantized_model_used_in_this_thread_then_served():
    # MLX streams belong to their thread: the CPU's second stream for quantized matmuls is made
    # per thread, so the server's engine thread works after the main thread has used the model.
    import mlx.nn as nn

    model, tok = load(BUNDLED)
    nn.quantize(model, group_size=32, bits=4)
    alone = generate(model, tok, "In the beginning", max_tokens=8)
    with running({BASE: ServedModel(BASE, model, tok)}, Settings()) as u:
        r = client(u).completions.create(model=BASE, prompt="In the beginning", max_tokens=8, temperature=0)
    assert r.choices[0].text == alone


def _nested(inner):
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)


# Besides the usual: 400-digit integers, lone surrogates (as JSON's \\ud800 escapes), tiny
# positive numbers (temperature or top_p 1e-30), each once a 500 with a traceback (issue #23).
_hostile = st.sampled_from([10**400, -(10**400), 1e-30, 5e-324, "\ud800", "a\udfffb", "\ud83d\ude00"]) | st.text(
    alphabet=st.characters(codec=None, categories=["Cs", "Ll"]), max_size=4
)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20) | _hostile,
    _nested,
    max_leaves=12,
)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant"]) | _json, "content": st.text(max_size=8) | _json}
)
_fields = st.sampled_from(
    "model messages prompt max_tokens max_completion_tokens temperature top_p top_k min_p repetition_penalty "
    "presence_penalty frequency_penalty logit_bias seed stop n stream stream_options logprobs top_logprobs echo "
    "best_of suffix".split()
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=st.dictionaries(_fields, _json, max_size=8),
    messages=st.none() | st.lists(_message, min_size=1, max_size=3),
    path=st.sampled_from(["chat/completions", "completions"]),
)
def test_fuzzed_bodies_get_4xx_or_an_answer(limited_url, body, messages, path):
    if messages is not None:
        body = {**body, "messages": messages}
    r = post(limited_url, f"/v1/{path}", body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{limited_url}/health").status_code == 200


def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc")
def test_soak_nothing_lost_and_memory_flat(url):
    """8 clients, 320 requests (chat and completions, streamed and not): every one gets a complete
    answer, and after a warm-up (which fills the prefix cache to its bound) the server's process
    grows by less than RSS_MARGIN_MB."""
    words = "In the beginning God created the heaven and the earth And the earth was without form".split()
    clients = [client(url) for _ in range(8)]

    def one(i: int) -> bool:
        c, prompt = clients[i % 8], " ".join(words[i % 7 : i % 7 + 2 + i % 5])
        kind, stream = i % 2, (i // 2) % 2 == 1
        if kind == 0:
            args = {"model": BASE, "prompt": prompt, "max_tokens": 4, "temperature": 0}
            if not stream:
                return c.completions.create(**args).choices[0].finish_reason == "length"
            return [ch.choices[0].finish_reason for ch in c.completions.create(**args, stream=True)][-1] == "length"
        args = {"model": INSTRUCT, "messages": [{"role": "user", "content": prompt}], "max_tokens": 4}
        if not stream:
            return c.chat.completions.create(**args).choices[0].finish_reason in ("length", "stop")
        finishes = [ch.choices[0].finish_reason for ch in c.chat.completions.create(**args, stream=True)]
        return finishes[-1] in ("length", "stop")

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(one, range(80)))
        rss = _rss_mb()
        assert all(pool.map(one, range(80, 320)))
    grown = _rss_mb() - rss
    assert grown < RSS_MARGIN_MB, f"RSS grew {grown:.1f} MiB over 240 requests"
    assert metric(url, "running_sequences") == 0 and metric(url, "queue_depth") == 0


RSS_MARGIN_MB = 24


# --- the command line ---------------------------------------------------------------------------


def test_bad_flags_are_one_line_errors(capsys, tmp_path):
    for argv, words in (
        (["--adapter-path", str(tmp_path / "adapters")], "no such adapter directory"),
        (["--model", str(tmp_path / "nothing")], "nothing: no such file or directory"),
        (["--port", "70000"], "--port 70000"),
        (["--max-concurrency", "0"], "--max-concurrency 0"),
        (["--model", str(BUNDLED), "--model", str(BUNDLED)], "both be called"),
    ):
        assert main(["serve", *argv]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("openelm-mlx serve: error: ") and words in err and "\n" not in err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_streams_and_exits_0(sig):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "openelm_mlx.cli", "serve", "--port", "0", "--shutdown-timeout", "0.5"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        while "http://" not in line:
            assert line, "the server exited before it listened"
            line = proc.stderr.readline()
        base = re.search(r"http://\S+?/v1", line).group(0)
        c = openai.OpenAI(base_url=base, api_key="x", max_retries=0)
        stream = c.completions.create(model=BASE, prompt="And God said", max_tokens=400, temperature=0, stream=True)
        first = next(iter(stream))
        assert first.choices[0].text is not None
        proc.send_signal(sig)
        rest = list(stream)  # the stream ends cleanly: a finish reason, then [DONE]
        assert rest and rest[-1].choices[0].finish_reason in ("length", "stop")
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
