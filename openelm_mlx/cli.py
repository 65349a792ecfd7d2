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


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert.pipeline import convert

    convert(
        args.hf_path,
        args.mlx_path,
        dtype=args.dtype,
        quantize_model=args.quantize,
        q_bits=args.q_bits,
        q_group_size=args.q_group_size,
        q_mode=args.q_mode,
        quant_recipe=args.quant_recipe,
        tokenizer=args.tokenizer,
        preset=args.preset,
        config=args.config,
        run_verify=not args.no_verify,
        force=args.force,
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .convert.sources import load_source
    from .convert.verify import verify

    source = load_source(args.source, preset=args.preset, config_file=args.config)
    report = verify(source, Path(args.model), num_tokens=args.tokens)
    print(report)
    return 0 if report.passed else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openelm-mlx", description="Apple's OpenELM models in MLX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="per-layer table of a model's shapes, parameters and KV-cache size")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="270M, 450M, 1_1B or 3B (an 'OpenELM-' prefix is fine)")
    src.add_argument("--config", help="an HF config.json")
    src.add_argument("--model", help="a model directory holding config.json")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="convert Apple's PyTorch weights (HF or CoreNet) to an MLX model directory")
    p.add_argument("--hf-path", required=True, help="Hub repo id, HF folder, or a .safetensors/.bin/.pt file")
    p.add_argument("--mlx-path", required=True, help="output directory (must not exist unless --force)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="auto: the fastest safe dtype for this backend (float32 on CPU, bfloat16 on GPU)",
    )
    p.add_argument("-q", "--quantize", action="store_true", help="quantize every Linear and the embedding")
    p.add_argument("--q-bits", type=int, default=4, help="bits per weight: 2, 3, 4, 5, 6, 8 (affine)")
    p.add_argument("--q-group-size", type=int, default=None, help="32, 64 (default for affine) or 128")
    p.add_argument("--q-mode", default="affine", choices=["affine", "mxfp4", "mxfp8", "nvfp4"])
    p.add_argument(
        "--quant-recipe",
        default=None,
        help="mixed precision in OpenELM's names: mixed_2_6, mixed_3_4, mixed_3_6, mixed_4_6, mixed_4_8",
    )
    p.add_argument("--tokenizer", help="tokenizer.model file, a folder holding one, or a Hub repo id")
    p.add_argument("--preset", help="shapes for a bare checkpoint: 270M, 450M, 1_1B, 3B")
    p.add_argument("--config", help="shapes for a bare checkpoint: an HF config.json or a CoreNet YAML")
    p.add_argument("--no-verify", action="store_true", help="skip the check against the float64 reference")
    p.add_argument("--force", action="store_true", help="replace an existing --mlx-path")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("verify", help="compare a converted model with the float64 reference on its source weights")
    p.add_argument("--source", required=True, help="what was converted: Hub repo id, HF folder or checkpoint file")
    p.add_argument("--model", required=True, help="the converted MLX directory")
    p.add_argument("--tokens", type=int, default=32, help="sequence length to compare (default 32)")
    p.add_argument("--preset", help="shapes for a bare checkpoint source")
    p.add_argument("--config", help="config.json or CoreNet YAML for a bare checkpoint source")
    p.set_defaults(func=cmd_verify)
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
