"""``openelm-mlx``: one console script, one subcommand per job.

Each subcommand lives in a ``cmd_*`` function; errors that users can cause are
``OpenELMError`` and are printed on one line with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .config import OpenELMConfig
from .errors import OpenELMError


def _config_from_args(args: argparse.Namespace) -> OpenELMConfig:
    if args.preset:
        return OpenELMConfig.from_preset(args.preset)
    if args.config:
        return OpenELMConfig.from_json(args.config)
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
        max_kl=args.max_kl,
        force=args.force,
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .convert.sources import load_source
    from .convert.verify import verify

    source = load_source(args.source, preset=args.preset, config_file=args.config)
    tok = Path(args.tokenizer) if args.tokenizer else Path(args.model) / "tokenizer.model"
    tok = tok if tok.is_file() else source.tokenizer
    report = verify(source, Path(args.model), num_tokens=args.tokens, tokenizer=tok, max_kl=args.max_kl)
    print(report)
    return 0 if report.passed else 1


def _read_prompt(prompt: str) -> str:
    if prompt != "-":
        return prompt
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OpenELMError(f"standard input is not valid UTF-8 (byte {e.start}); pass text encoded as UTF-8") from None


BUNDLED_MODEL = Path(__file__).parent / "bundled" / "openelm-tiny-kjv"


def _model_path(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    print(
        f"no --model given: using the bundled OpenELM-tiny-KJV ({BUNDLED_MODEL}), a 4.7M-parameter OpenELM "
        "trained on the King James Bible; pass --model for a real OpenELM",
        file=sys.stderr,
    )
    return str(BUNDLED_MODEL)


def _load_for_generation(args: argparse.Namespace):
    from .loading import load

    model, tokenizer = load(_model_path(args), tokenizer=args.tokenizer)
    draft = None
    if getattr(args, "draft_model", None):
        draft, _ = load(args.draft_model, tokenizer=args.tokenizer)
    return model, tokenizer, draft


def _size(gb: float) -> str:
    # A small model's peak is a few MB: "0.00 GB" would say nothing.
    return f"{gb:.2f} GB" if gb >= 1 else f"{gb * 1000:.1f} MB"


def _figures(r, verbose: bool) -> str:
    from . import blas, cpu

    line = (
        f"prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tokens/s | "
        f"generation: {r.generation_tokens} tokens, {r.generation_tps:.1f} tokens/s | "
        f"peak memory: {_size(r.peak_memory_gb)}"
    )
    if verbose and r.draft_proposed:
        rate = r.draft_accepted / r.draft_proposed
        line += f" | drafts accepted: {r.draft_accepted}/{r.draft_proposed} ({rate:.0%})"
    if verbose:
        import mlx.core as mx

        line += f" | backend: {mx.default_device()}, BLAS: {blas.describe()}, routes: {cpu.describe()}"
    return line


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import stream_generate

    prompt = _read_prompt(args.prompt)
    model, tokenizer, draft = _load_for_generation(args)
    last = None
    interrupted = False
    try:
        for r in stream_generate(
            model,
            tokenizer,
            prompt,
            max_tokens=args.max_tokens,
            temp=args.temp,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
            system_prompt=args.system_prompt,
            chat_template=args.chat_template,
            draft_model=draft,
            num_draft_tokens=args.num_draft_tokens,
            prompt_lookup=args.prompt_lookup,
        ):
            sys.stdout.write(r.text)
            sys.stdout.flush()
            last = r
    except KeyboardInterrupt:
        interrupted = True
    sys.stdout.write("\n")
    sys.stdout.flush()
    if last is not None:
        print(_figures(last, args.verbose), file=sys.stderr)
    if interrupted:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import ChatSession

    model, tokenizer, _ = _load_for_generation(args)
    sampling = {
        "temp": args.temp,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
    }
    session = ChatSession(model, tokenizer, args.system_prompt, args.max_tokens, sampling=sampling, seed=args.seed)
    print("openelm-mlx chat: /reset starts over, /quit ends (or Ctrl-D)", file=sys.stderr)
    while True:
        try:
            print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 0
        if not line:
            return 0
        message = line.strip()
        if not message:
            continue
        if message == "/quit":
            return 0
        if message == "/reset":
            session.reset()
            print("(conversation reset)", file=sys.stderr)
            continue
        try:
            for piece in session.send(message):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            print("\n(interrupted)", file=sys.stderr)
        except OpenELMError as e:
            if "context" not in str(e):
                raise
            print(
                f"\nthe context is full ({model.config.max_context_length} tokens): /reset to start over",
                file=sys.stderr,
            )
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        print(
            f"[{session.last_prompt_tokens} new prompt tokens, {session.context_left()} tokens of context left]",
            file=sys.stderr,
        )


def cmd_eval(args: argparse.Namespace) -> int:
    import math

    from .loading import load
    from .perplexity import token_nll

    path = Path(args.text)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise OpenELMError(f"{path}: no such text file") from None
    except UnicodeDecodeError as e:
        raise OpenELMError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    model, tokenizer = load(_model_path(args), tokenizer=args.tokenizer)
    ids = tokenizer.encode(text)
    nll, n = token_nll(model, ids, window=args.window, stride=args.stride)
    print(f"perplexity: {math.exp(nll / n):.3f} over {n:,} tokens ({nll / n:.4f} nats/token) of {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench, format_report, write_json

    report = bench(
        args.model,
        args.prompt_tokens,
        args.generation_tokens,
        args.num_runs,
        None if args.compare == "none" else args.compare,
        log=lambda m: print(m, file=sys.stderr),
        batch=args.batch,
    )
    print(format_report(report))
    if args.json:
        write_json(report, args.json)
    return 0


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a converted model directory (or anything convert reads); default: the bundled one")
    p.add_argument("--tokenizer", help="tokenizer.model to use instead of the model directory's")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability")
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="Hugging Face semantics, over the whole context; Apple recommends 1.2 for OpenELM",
    )
    p.add_argument("--seed", type=int, default=None, help="seed for sampling: the same seed reproduces a run")
    p.add_argument("--system-prompt", default=None, help="system prompt for Instruct models")


def _positive_int(flag: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes a whole number, not {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be at least 1, not {value}")
        return value

    return parse


def _non_negative_float(flag: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes a number, not {text!r}") from None
        if not 0 <= value < float("inf"):
            raise argparse.ArgumentTypeError(f"{flag} must be a finite number >= 0, not {text}")
        return value

    return parse


def _add_max_kl(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-kl",
        type=_non_negative_float("--max-kl"),
        default=None,
        help="fail when the mean KL divergence from the original weights exceeds this (default: only report it)",
    )


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
    _add_max_kl(p)
    p.add_argument(
        "--force",
        action="count",
        default=0,
        help="replace an earlier conversion at --mlx-path; twice (--force --force) to replace anything else there",
    )
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("verify", help="compare a converted model with the float64 reference on its source weights")
    p.add_argument("--source", required=True, help="what was converted: Hub repo id, HF folder or checkpoint file")
    p.add_argument("--model", required=True, help="the converted MLX directory")
    p.add_argument(
        "--tokens", type=_positive_int("--tokens"), default=32, help="sequence length to compare (default 32)"
    )
    p.add_argument("--tokenizer", help="tokenizer.model for the text (default: the model directory's or the source's)")
    p.add_argument("--preset", help="shapes for a bare checkpoint source")
    p.add_argument("--config", help="config.json or CoreNet YAML for a bare checkpoint source")
    _add_max_kl(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("generate", help="generate text, streamed to stdout; figures go to stderr")
    _add_sampling_flags(p)
    p.add_argument("--prompt", required=True, help="the prompt, or - to read it from standard input")
    p.add_argument(
        "--chat-template",
        default="auto",
        choices=["auto", "instruct", "none"],
        help="auto: the Instruct template for Instruct models, plain text otherwise",
    )
    p.add_argument("--draft-model", help="a smaller OpenELM for speculative decoding")
    p.add_argument("--num-draft-tokens", type=int, default=3, help="tokens the draft model proposes per step")
    p.add_argument(
        "--prompt-lookup",
        type=int,
        default=0,
        metavar="N",
        help="prompt-lookup decoding: propose N tokens copied from the context (Apple uses 10)",
    )
    p.add_argument("--verbose", action="store_true", help="also report the draft acceptance rate")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="multi-turn chat with an Instruct model; the KV cache is kept across turns")
    _add_sampling_flags(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("eval", help="perplexity of a model over a UTF-8 text file (sliding over the context)")
    p.add_argument("--model", help="model directory; default: the bundled one")
    p.add_argument("--text", required=True, help="a UTF-8 text file")
    p.add_argument("--tokenizer", help="tokenizer.model to use instead of the model directory's")
    p.add_argument("--window", type=int, default=None, help="tokens per window (default: the model's context)")
    p.add_argument("--stride", type=int, default=None, help="new tokens scored per window (default: window/2)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="prompt/decode speed against mlx_lm on the same converted weights")
    p.add_argument("--model", required=True, help="a converted model directory")
    p.add_argument("-p", "--prompt-tokens", type=int, default=128)
    p.add_argument("-g", "--generation-tokens", type=int, default=128)
    p.add_argument("-n", "--num-runs", type=int, default=5)
    p.add_argument("--compare", default="mlx-lm", choices=["mlx-lm", "none"])
    p.add_argument(
        "--batch",
        type=_positive_int("--batch"),
        default=1,
        help="B sequences decoding together: aggregate tok/s against mlx_lm's batch_generate (default 1)",
    )
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_bench)

    from .conversion_cache import add_parser as add_cache_parser

    add_cache_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None:  # a real command line: restart once on a fast BLAS if one is installed
        from .blas import use_fast_blas

        use_fast_blas()
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
