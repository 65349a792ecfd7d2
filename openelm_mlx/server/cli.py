"""``openelm-mlx serve``: the command line, model loading, and the uvicorn server around the app."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from ..errors import OpenELMError
from .connections import ACCEPT_BACKLOG, DEFAULT_MAX_CONNECTIONS, HEAD_TIMEOUT_S, connection_cap, guarded_protocol

if TYPE_CHECKING:  # the server's modules load only when it runs, not for every CLI command
    from .app import Settings
    from .protocol import ServedModel
    from .worker import Worker


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (chat, completions with echo/logprobs, metrics)",
        description="Serve the models named here, and only those, over OpenAI's HTTP API.",
    )
    p.add_argument(
        "--model",
        action="extend",
        nargs="+",
        help="model directory to serve (repeat, or name several); requests pick one by its folder name; "
        "default: the bundled model",
    )
    p.add_argument("--tokenizer", help="tokenizer.model to use instead of each model directory's")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument(
        "--api-key-file",
        help="require 'Authorization: Bearer KEY' on every endpoint but /health, KEY read from this file "
        "(or set OPENELM_MLX_API_KEY; --api-key KEY works too but shows the key to every local user in ps)",
    )
    p.add_argument("--api-key", help="the key itself (prefer --api-key-file or OPENELM_MLX_API_KEY)")
    p.add_argument(
        "--allowed-hosts",
        default="",
        help="comma-separated Host names answered besides loopback ones and the --host address ('*': any)",
    )
    p.add_argument(
        "--cors-origins",
        default="",
        help="comma-separated browser origins (https://app.example) allowed to call the API cross-site",
    )
    p.add_argument("--draft-model", help="a smaller OpenELM for speculative decoding of lone requests")
    p.add_argument("--num-draft-tokens", type=int, default=3, help="tokens the draft model proposes per round")
    p.add_argument("--adapter-path", help="LoRA adapters to apply to the model")
    p.add_argument("--max-concurrency", type=int, default=8, help="sequences decoding together (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="sequences waiting beyond those; more get 429")
    p.add_argument(
        "--max-connections",
        type=int,
        default=1024,
        help="open connections at most (default 1024, lowered to stay 128 below the descriptor limit); "
        "past it a new one closes the oldest still sending its request head",
    )
    p.add_argument("--max-tokens", type=int, default=512, help="tokens to generate when a request names none")
    p.add_argument("--max-tokens-limit", type=int, default=None, help="refuse (400) requests asking for more")
    p.add_argument(
        "--prompt-cache-bytes",
        type=int,
        default=512 * 2**20,
        help="bytes of KV state kept for prompt-prefix reuse (default 512 MiB; 0 turns it off)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        help="on SIGINT/SIGTERM, seconds running requests get to finish before they are cut (default 10)",
    )
    p.add_argument("--no-ui", action="store_true", help="do not serve the chat page at /")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    for flag in ("max_concurrency", "max_tokens", "max_connections"):
        if getattr(args, flag) < 1:
            raise OpenELMError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    for flag in ("max_queue", "prompt_cache_bytes"):
        if getattr(args, flag) < 0:
            raise OpenELMError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 0")
    if args.max_tokens_limit is not None and args.max_tokens_limit < 1:
        raise OpenELMError(f"--max-tokens-limit {args.max_tokens_limit}: must be at least 1")
    if not 0 <= args.port <= 65535:
        raise OpenELMError(f"--port {args.port}: must be in 0..65535")
    args.api_key = api_key(args)


def api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key-file, --api-key or OPENELM_MLX_API_KEY, in that order."""
    if args.api_key_file is not None:
        try:
            key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise OpenELMError(f"--api-key-file {args.api_key_file}: {getattr(e, 'strerror', None) or e}") from None
        if not key:
            raise OpenELMError(f"--api-key-file {args.api_key_file}: the file holds no key")
        return key
    if args.api_key is not None:
        if not args.api_key.strip():
            raise OpenELMError("--api-key: the key is empty")
        return args.api_key
    env = os.environ.get("OPENELM_MLX_API_KEY")
    if env is not None and not env.strip():
        raise OpenELMError("OPENELM_MLX_API_KEY: the key is empty")
    return env.strip() if env else None


def load_models(args: argparse.Namespace) -> tuple[dict[str, ServedModel], Any]:
    """The served models by name (their folder names) and the draft model, if any."""
    from ..loading import BUNDLED_MODEL, load
    from .protocol import ServedModel

    kwargs: dict[str, Any] = {"tokenizer": args.tokenizer}
    if args.adapter_path:
        kwargs["adapter_path"] = args.adapter_path
    models: dict[str, ServedModel] = {}
    for path in args.model or [str(BUNDLED_MODEL)]:
        name = Path(path).expanduser().name or str(path)
        if name in models:
            raise OpenELMError(f"--model {path}: two served models would both be called {name!r}")
        model, tokenizer = load(path, **kwargs)
        models[name] = ServedModel(name, model, tokenizer)
    draft = load(args.draft_model, tokenizer=args.tokenizer)[0] if args.draft_model else None
    return models, draft


class GracefulServer:
    """uvicorn's server, with a shutdown that lets running requests finish (for a bounded time)
    and then returns, so the process exits 0 instead of re-raising the signal."""

    def __init__(
        self,
        app: Any,
        worker: Worker,
        sock: socket.socket,
        log_level: str,
        grace: float,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        head_timeout: float = HEAD_TIMEOUT_S,
    ):
        import uvicorn

        class _Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: FrameType | None) -> None:
                # uvicorn stops accepting and waits for open requests; the worker cuts those
                # still running after the grace period.  Not recording the signal keeps uvicorn
                # from raising it again after a clean shutdown.
                worker.drain(grace)
                if self.should_exit and sig == signal.SIGINT:
                    self.force_exit = True
                self.should_exit = True

        self.max_connections = connection_cap(max_connections)
        config = uvicorn.Config(
            app,
            log_level=log_level,
            access_log=False,
            lifespan="on",
            http=guarded_protocol(self.max_connections, head_timeout),
            timeout_keep_alive=5,  # idle between requests (uvicorn's default, stated)
            backlog=ACCEPT_BACKLOG,
        )
        self.server, self.sock = _Server(config), sock

    def run(self) -> None:
        self.server.run(sockets=[self.sock])

    def stop(self) -> None:
        self.server.handle_exit(signal.SIGTERM, None)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OpenELMError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    sock.listen(ACCEPT_BACKLOG)
    sock.set_inheritable(True)
    return sock


def build_server(
    models: dict[str, ServedModel],
    *,
    draft_model: Any = None,
    host: str = "127.0.0.1",
    port: int = 0,
    settings: Settings | None = None,
    prompt_cache_bytes: int = 512 * 2**20,
    log_level: str = "info",
    grace: float = 10.0,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    head_timeout: float = HEAD_TIMEOUT_S,
) -> GracefulServer:
    from ..engine import Engine
    from .app import Settings, create_app
    from .metrics import Metrics
    from .worker import Worker

    settings = settings or Settings()
    metrics = Metrics()

    def factory(served: ServedModel):
        return lambda: Engine(
            served.model,
            served.tokenizer,
            max_batch=settings.max_concurrency,
            prompt_cache_bytes=prompt_cache_bytes,
            draft_model=draft_model,
        )

    worker = Worker({name: factory(m) for name, m in models.items()}, metrics)
    app = create_app(models, worker, metrics, settings)
    return GracefulServer(app, worker, bind(host, port), log_level, grace, max_connections, head_timeout)


def run(args: argparse.Namespace) -> int:
    from .app import Settings
    from .guard import Policy
    from .protocol import Limits

    _check(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    if args.num_draft_tokens < 1:
        raise OpenELMError(f"--num-draft-tokens {args.num_draft_tokens}: must be at least 1")
    models, draft = load_models(args)
    settings = Settings(
        api_key=args.api_key,
        limits=Limits(args.max_tokens, args.max_tokens_limit, args.num_draft_tokens),
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        ui=not args.no_ui,
        policy=Policy(_names(args.allowed_hosts), _names(args.cors_origins), bound=args.host),
    )
    server = build_server(
        models,
        draft_model=draft,
        host=args.host,
        port=args.port,
        settings=settings,
        prompt_cache_bytes=args.prompt_cache_bytes,
        log_level=args.log_level,
        grace=args.shutdown_timeout,
        max_connections=args.max_connections,
    )
    host, port = server.sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"openelm-mlx serve: {', '.join(models)} on http://{shown}:{port}/v1", file=sys.stderr, flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print("openelm-mlx serve: warning: listening beyond this machine without --api-key", file=sys.stderr)
    server.run()
    return 0


def _names(flag: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in flag.split(",") if n.strip())
