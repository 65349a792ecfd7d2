"""Llama 2's tokenizer for checkpoints that ship none (issue #23): the gated repo, then ungated
copies, a download accepted only with Llama 2's SHA-256, one line naming the source used, and
``--tokenizer PATH|REPO`` still first.

Offline: a local HTTP server stands in for the Hub (``HF_ENDPOINT``), and huggingface_hub's real
download code talks to it, in subprocesses (it reads HF_ENDPOINT when imported).  It answers
like the Hub: ``X-Repo-Commit`` and ``ETag`` on a file, 401/403 with ``X-Error-Code: GatedRepo``
for a gated repo, 404 with ``X-Error-Code: RepoNotFound`` for an unknown one."""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from helpers import random_weights, small_config, write_hf_folder
from openelm_mlx.convert import llama2_tokenizer

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "openelm_mlx" / "bundled" / "openelm-tiny-kjv"
TOKENIZER = (BUNDLED / "tokenizer.model").read_bytes()  # a real SentencePiece model, not Llama 2's
GATED, NOUS, TINY = llama2_tokenizer.SOURCES


class _Hub(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, bytes]] = {}  # repo -> (status, tokenizer.model bytes)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        repo, _, rest = self.path.lstrip("/").partition("/resolve/")
        status, data = self.routes.get(repo, (404, b""))
        if rest.split("?")[0] != "main/tokenizer.model":
            status = 404
        self.send_response(status)
        if status == 200:
            self.send_header("X-Repo-Commit", hashlib.sha1(repo.encode()).hexdigest())
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data)))
        else:
            code = "GatedRepo" if status in (401, 403) else "RepoNotFound"
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", f"Access to model {repo} is restricted.")
            self.send_header("Content-Length", "0")
        self.end_headers()
        if body and status == 200:
            self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def env(hub: str, home: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and "PROXY" not in k.upper()}
    return {**e, "HF_ENDPOINT": hub, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1"}


def run(argv: list[str], hub: str, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, env=env(hub, home), timeout=300)


def cli(*argv: str, hub: str, home: Path) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "openelm_mlx.cli", *argv], hub, home)


def fetch_with(hub: str, home: Path, sha256: str) -> subprocess.CompletedProcess:
    """``llama2_tokenizer.fetch`` in a fresh process, accepting ``sha256`` (no file with Llama 2's
    real hash can be made here; the same code path checks it)."""
    script = textwrap.dedent(f"""
        import sys
        from openelm_mlx.convert import llama2_tokenizer
        path = llama2_tokenizer.fetch(lambda s: print(s, file=sys.stderr), sha256={sha256!r})
        print(path)
    """)
    return run([sys.executable, "-c", script], hub, home)


@pytest.mark.parametrize("gated_status", [401, 403])
def test_gated_repo_then_a_wrong_copy_then_the_right_one(tmp_path, hub, gated_status):
    wrong = TOKENIZER + b"\0"  # a copy whose bytes differ: refused by its hash
    _Hub.routes = {GATED: (gated_status, b""), NOUS: (200, wrong), TINY: (200, TOKENIZER)}
    out = fetch_with(hub, tmp_path / "hf", hashlib.sha256(TOKENIZER).hexdigest())
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).read_bytes() == TOKENIZER  # the file the server sent, from HF's cache
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("tokenizer:")]
    assert len(lines) == 1 and f"from {TINY}" in lines[0] and "verified" in lines[0], out.stderr
    assert "Llama 2 Community License" in lines[0]


def test_only_llama_2s_hash_is_accepted_and_the_failure_lists_every_source(tmp_path, hub):
    """With the real hash nothing served here matches: every copy is refused, gated Meta is
    reported as gated, and the error says how to pass one."""
    _Hub.routes = {GATED: (403, b""), NOUS: (200, TOKENIZER), TINY: (200, TOKENIZER + b"x")}
    out = fetch_with(hub, tmp_path / "hf", llama2_tokenizer.SHA256)
    assert out.returncode == 1  # a bare script: the OpenELMError ends it
    message = out.stderr.strip().splitlines()[-1]
    assert f"{GATED}: gated" in message
    assert f"{NOUS}: its tokenizer.model has SHA-256 {hashlib.sha256(TOKENIZER).hexdigest()[:16]}" in message
    assert f"{TINY}: its tokenizer.model has SHA-256" in message and "refused" in message
    assert "--tokenizer PATH or REPO" in message


def test_convert_and_generate_of_a_checkpoint_without_tokenizer(tmp_path, hub):
    """The real CLI: convert warns (and still writes the model), generate refuses in one line;
    ``--tokenizer REPO`` overrides the fallback and downloads what the user named."""
    _Hub.routes = {GATED: (401, b""), NOUS: (200, TOKENIZER), TINY: (404, b""), "acme/tok": (200, TOKENIZER)}
    home = tmp_path / "hf"
    config = small_config("tied")
    config.vocab_size = llama2_tokenizer.VOCAB_SIZE  # Apple's vocabulary: the fallback applies
    src = write_hf_folder(tmp_path / "src", config, random_weights(config), tokenizer=False)
    out = cli("convert", "--hf-path", str(src), "--mlx-path", str(tmp_path / "m"), "--no-verify", hub=hub, home=home)
    assert out.returncode == 0, out.stderr
    assert (
        f"{NOUS}: its tokenizer.model has SHA-256" in out.stderr and not (tmp_path / "m" / "tokenizer.model").exists()
    )
    gen = cli("generate", "--model", str(tmp_path / "m"), "--prompt", "In", "--max-tokens", "1", hub=hub, home=home)
    assert gen.returncode == 1 and "Traceback" not in gen.stderr
    errors = [ln for ln in gen.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and f"{GATED}: gated" in errors[0] and "refused" in errors[0], gen.stderr
    # --tokenizer REPO: used as named (the user's choice, no hash to check), no fallback tried.
    model = tmp_path / "bundled-without-tokenizer"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(BUNDLED / name, model / name)
    args = ("generate", "--model", str(model), "--prompt", "In the beginning", "--max-tokens", "3")
    gen = cli(*args, "--tokenizer", "acme/tok", hub=hub, home=home)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.strip() and "tokenizer:" not in gen.stderr
    expected = cli(*args, "--tokenizer", str(BUNDLED / "tokenizer.model"), hub=hub, home=home)
    assert gen.stdout == expected.stdout
    # Its vocabulary is not Llama 2's: no download is attempted, the old one-line error stands.
    plain = cli(*args, hub=hub, home=home)
    assert plain.returncode == 1 and "no tokenizer.model; pass --tokenizer" in plain.stderr
