"""The server against web pages and hostile clients (issue #23, first part): foreign Host names
(DNS rebinding), cross-site Origins and "simple" text/plain POSTs, bodies bounded while reading
(chunked too), the page's security headers, and the key from a file or the environment.

A real uvicorn server on a loopback port; raw sockets for what ``httpx`` would not send."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from helpers import openai_error, response_head
from helpers import running_server as running

from openelm_mlx.loading import load
from openelm_mlx.server.app import Settings
from openelm_mlx.server.body import MAX_BODY_BYTES
from openelm_mlx.server.guard import Policy
from openelm_mlx.server.protocol import Limits, ServedModel

BUNDLED = Path(__file__).resolve().parents[1] / "openelm_mlx" / "bundled" / "openelm-tiny-kjv"
NAME = "openelm-tiny-kjv"
CHAT = {"model": NAME, "messages": [{"role": "user", "content": "In the beginning"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def models() -> dict[str, ServedModel]:
    model, tok = load(BUNDLED)
    return {NAME: ServedModel(NAME, model, tok)}


@pytest.fixture(scope="module")
def url(models):
    with running(models, Settings(limits=Limits(8, 8))) as u:
        yield u


@pytest.fixture(scope="module")
def cors_url(models):
    policy = Policy(allowed_hosts=("openelm.internal",), cors_origins=("https://app.example",))
    with running(models, Settings(limits=Limits(8, 8), policy=policy)) as u:
        yield u


def test_foreign_host_is_refused_loopback_names_are_not(url):
    port = url.rsplit(":", 1)[1]
    # DNS rebinding: the attacker's name resolved to 127.0.0.1 reaches the socket with its own Host.
    message = openai_error(httpx.get(f"{url}/v1/models", headers={"Host": f"evil.example:{port}"}), 421, "Host")
    assert "evil.example" in message and "--allowed-hosts" in message
    r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=60, headers={"Host": "evil.example"})
    openai_error(r, 421, "Host")
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
        assert httpx.get(f"{url}/v1/models", headers={"Host": host}).status_code == 200, host
    # Every answer carries nosniff and no-referrer, refusals included.
    r = httpx.get(f"{url}/v1/models", headers={"Host": "evil.example"})
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["referrer-policy"] == "no-referrer"


def test_cross_site_requests_are_refused_same_origin_ones_are_not(url):
    host = url.split("://", 1)[1]
    evil = {"Origin": "https://evil.example"}
    message = openai_error(httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=60, headers=evil), 403)
    assert "evil.example" in message
    # The "simple" request a page may send with no preflight: text/plain, cross-site.
    simple = httpx.post(
        f"{url}/v1/chat/completions",
        content=b'{"model": "openelm-tiny-kjv", "messages": [{"role": "user", "content": "hi"}]}',
        headers={"Content-Type": "text/plain", "Origin": "https://evil.example"},
    )
    openai_error(simple, 403, "Origin")
    # The same body, same-site but as text/plain: JSON endpoints want application/json.
    plain = httpx.post(f"{url}/v1/chat/completions", content=b"{}", headers={"Content-Type": "text/plain"})
    assert "application/json" in openai_error(plain, 415, "Content-Type")
    # The chat page's own requests (its Origin is the server itself) pass, without CORS headers.
    r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=60, headers={"Origin": f"http://{host}"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    # A preflight from a foreign site gets no CORS grant.
    pre = httpx.options(f"{url}/v1/chat/completions", headers={"Origin": "https://evil.example"})
    assert pre.status_code == 403 and "access-control-allow-origin" not in pre.headers


def test_named_hosts_and_origins_are_allowed_with_cors(cors_url):
    port = cors_url.rsplit(":", 1)[1]
    assert httpx.get(f"{cors_url}/v1/models", headers={"Host": f"openelm.internal:{port}"}).status_code == 200
    openai_error(httpx.get(f"{cors_url}/v1/models", headers={"Host": "other.internal"}), 421)
    origin = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    pre = httpx.options(f"{cors_url}/v1/chat/completions", headers=origin)
    assert pre.status_code == 204
    assert pre.headers["access-control-allow-origin"] == "https://app.example"
    assert "content-type" in pre.headers["access-control-allow-headers"]
    r = httpx.post(f"{cors_url}/v1/chat/completions", json=CHAT, timeout=60, headers={"Origin": "https://app.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    r = httpx.post(f"{cors_url}/v1/chat/completions", json=CHAT, timeout=60, headers={"Origin": "https://b.example"})
    openai_error(r, 403)


def test_chunked_body_is_refused_at_the_limit_while_reading(url):
    """No Content-Length to refuse up front: the server counts while reading and answers 413
    once past the limit, without waiting for (or keeping) the rest."""
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    chunk = b"x" * 2**20
    sent = 0
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        try:
            # Up to 4x the limit; the server answers and closes well before the end.
            while sent < 4 * MAX_BODY_BYTES:
                s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = response_head(s)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert httpx.get(f"{url}/health").status_code == 200  # and the server still answers


def test_chat_page_has_security_headers(url):
    r = httpx.get(f"{url}/")
    assert r.status_code == 200
    csp = r.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "'unsafe-inline'" not in csp and "'sha256-" in csp
    assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"


def test_api_key_from_file_or_environment(tmp_path):
    from openelm_mlx.cli import build_parser
    from openelm_mlx.errors import OpenELMError
    from openelm_mlx.server.cli import api_key

    parser = build_parser()
    key_file = tmp_path / "key"
    key_file.write_text("file-key\n")
    args = parser.parse_args(["serve", "--model", str(BUNDLED), "--api-key-file", str(key_file)])
    assert api_key(args) == "file-key"
    (tmp_path / "empty").write_text("  \n")
    args = parser.parse_args(["serve", "--model", str(BUNDLED), "--api-key-file", str(tmp_path / "empty")])
    with pytest.raises(OpenELMError, match="--api-key-file .*empty: the file holds no key"):
        api_key(args)
    args = parser.parse_args(["serve", "--model", str(BUNDLED), "--api-key-file", str(tmp_path / "missing")])
    with pytest.raises(OpenELMError, match="--api-key-file .*missing"):
        api_key(args)
    args = parser.parse_args(["serve", "--model", str(BUNDLED)])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENELM_MLX_API_KEY", "env-key")
        assert api_key(args) == "env-key"
        mp.delenv("OPENELM_MLX_API_KEY")
        assert api_key(args) is None


def test_serve_with_key_file_refuses_without_key(tmp_path):
    """The real CLI: the key from a file (nothing in ps), enforced on the API."""
    key_file = tmp_path / "key"
    key_file.write_text("s3cret")
    proc = subprocess.Popen(
        [sys.executable, "-m", "openelm_mlx_cli", "serve", "--model", str(BUNDLED), "--port", "0",
         "--api-key-file", str(key_file), "--log-level", "warning"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stderr.readline()
        assert " on http://" in line, line
        base = line.split(" on ", 1)[1].strip()
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key="wrong").models.list()
        assert openai.OpenAI(base_url=base, api_key="s3cret").models.list().data[0].id
    finally:
        proc.terminate()
        proc.wait(30)
