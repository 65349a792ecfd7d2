"""``openelm-mlx``: one console script, one subcommand per job.

Each subcommand lives in a ``cmd_*`` function; errors that users can cause are
``OpenELMError`` and are printed on one line with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .config import OpenELMConfig
from .errors import OpenELMError


def _config_from_args(args: argparse.Namespace) -> OpenELMConfig:
    if args.preset:
        return OpenELMConfig.from_preset(args.preset)
    if args.config:
        return OpenELMConfig.from_json(args.config)
    from pathlib import Path

    path = Path(args.model)
    return OpenELMConfig.from_json(path / "config.json" if path.is_dir() else path)


def format_info(config: OpenELMConfig) -> str:
    rows = [f"{'layer':>5} {'q_heads':>7} {'kv_heads':>8} {'ffn_dim':>7} {'parameters':>14}"]
    for i in range(config.num_transformer_layers):
        rows.append(
            f"{i:>5} {config.num_query_heads[i]:>7} {config.num_kv_heads[i]:>8} "
            f"{config.ffn_dims[i]:>7} {config.layer_parameters(i):>14,}"
        )
    emb = config.vocab_size * config.model_dim
    head = "tied to the embedding" if config.share_input_output_layers else f"{emb:,}"
    kv16, kv32 = config.kv_cache_bytes_per_token("float16"), config.kv_cache_bytes_per_token("float32")
    full_mib = kv16 * config.max_context_length / 2**20
    rows += [
        "",
        f"model_dim {config.model_dim}, head_dim {config.head_dim}, "
        f"{config.num_transformer_layers} layers, vocab {config.vocab_size}, "
        f"context {config.max_context_length}",
        f"embedding parameters: {emb:,}; output head: {head}",
        f"total parameters: {config.num_parameters():,}",
        f"KV cache per token: {kv16:,} bytes (16-bit), {kv32:,} bytes (float32); "
        f"full {config.max_context_length}-token context: {full_mib:.1f} MiB (16-bit)",
    ]
    return "\n".join(rows)


def cmd_info(args: argparse.Namespace) -> int:
    print(format_info(_config_from_args(args)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openelm-mlx", description="Apple's OpenELM models in MLX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="per-layer table of a model's shapes, parameters and KV-cache size")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="270M, 450M, 1_1B or 3B (an 'OpenELM-' prefix is fine)")
    src.add_argument("--config", help="an HF config.json")
    src.add_argument("--model", help="a model directory holding config.json")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except OpenELMError as e:
        print(f"openelm-mlx {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"openelm-mlx {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
