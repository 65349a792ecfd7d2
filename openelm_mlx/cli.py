"""``openelm-mlx``: one console script, one subcommand per job.

Each subcommand lives in a ``cmd_*`` function; errors that users can cause are
``OpenELMError`` and are printed on one line with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .errors import OpenELMError

if TYPE_CHECKING:
    from .config import OpenELMConfig


def _config_from_args(args: argparse.Namespace) -> OpenELMConfig:
    from .config import OpenELMConfig

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

    given = [f for f, v in (("--q-bits", args.q_bits), ("--q-group-size", args.q_group_size),
                            ("--q-mode", args.q_mode)) if v is not None]  # fmt: skip
    if given and not (args.quantize or args.quant_recipe):
        raise OpenELMError(f"{given[0]} quantizes: add -q (or --quant-recipe); without it the output is not quantized")
    if args.quant_recipe and args.q_bits is not None:
        print(
            f"note: --quant-recipe {args.quant_recipe} sets the bits per module; --q-bits {args.q_bits} is ignored",
            file=sys.stderr,
        )
    calibrate = _calibrate_options(args)
    convert(
        args.hf_path,
        args.mlx_path,
        dtype=args.dtype,
        quantize_model=args.quantize,
        q_bits=4 if args.q_bits is None else args.q_bits,
        q_group_size=args.q_group_size,
        q_mode=args.q_mode or "affine",
        quant_recipe=args.quant_recipe,
        tokenizer=args.tokenizer,
        preset=args.preset,
        config=args.config,
        run_verify=not args.no_verify,
        max_kl=args.max_kl,
        force=args.force,
        calibrate=calibrate,
    )
    return 0


def _calibrate_options(args: argparse.Namespace):
    """``convert --calibrate``'s options; every calibration flag defaults to None so a stray one is named."""
    from .quant import recipe

    dwq_flags = {"--dwq-steps": args.dwq_steps, "--dwq-batch-size": args.dwq_batch_size, "--dwq-lr": args.dwq_lr}
    flags = {
        "--calibration-data": args.calibration_data,
        "--calibration-seq-len": args.calibration_seq_len,
        "--calibration-samples": args.calibration_samples,
        "--target-bpw": args.target_bpw,
        "--seed": args.seed,
        **dwq_flags,
    }
    if args.calibrate is None:
        given = [f for f, v in flags.items() if v is not None]
        if given:
            raise OpenELMError(f"{given[0]} is for --calibrate; add --calibrate gptq, dwq or dynamic")
        return None
    methods = recipe.parse_methods(args.calibrate)
    given = [f for f, v in dwq_flags.items() if v is not None]
    if given and "dwq" not in methods:
        raise OpenELMError(f"{given[0]} is for --calibrate dwq")
    d = recipe.dwq
    seed = args.seed or 0
    return recipe.Options(
        methods=methods,
        data=args.calibration_data,
        seq_len=args.calibration_seq_len or recipe.SEQ_LEN,
        samples=args.calibration_samples or recipe.SAMPLES,
        target_bpw=args.target_bpw,
        dwq=d.Options(args.dwq_steps or d.STEPS, args.dwq_batch_size or d.BATCH, args.dwq_lr or d.LEARNING_RATE, seed),
        seed=seed,
    )


def _add_calibration_flags(p: argparse.ArgumentParser) -> None:
    from .quant import dwq, recipe

    g = p.add_argument_group("calibrated quantization (with -q)")
    g.add_argument(
        "--calibrate",
        metavar="METHOD[,METHOD]",
        help="gptq, dwq, dynamic, or a combination (run in the order dynamic, gptq, dwq), e.g. dynamic,gptq",
    )
    g.add_argument(
        "--calibration-data",
        metavar="FILE",
        help='UTF-8 text or JSONL with a "text" field (default: a bundled excerpt of the KJV training text)',
    )
    n = _positive_int
    g.add_argument("--calibration-seq-len", type=n("--calibration-seq-len"), help=f"tokens per row ({recipe.SEQ_LEN})")
    g.add_argument(
        "--calibration-samples",
        type=n("--calibration-samples"),
        help=f"most rows to calibrate on (default {recipe.SAMPLES}); a tenth more are held out",
    )
    g.add_argument(
        "--target-bpw",
        type=float,
        help="dynamic: bits per weight to reach, scales and biases counted (4-bit g64 in float32 is 5.0)",
    )
    g.add_argument("--dwq-steps", type=n("--dwq-steps"), help=f"dwq: training steps (default {dwq.STEPS})")
    g.add_argument("--dwq-batch-size", type=n("--dwq-batch-size"), help=f"dwq: rows per step (default {dwq.BATCH})")
    g.add_argument("--dwq-lr", type=float, help=f"dwq: Adam learning rate (default {dwq.LEARNING_RATE:g})")
    g.add_argument("--seed", type=int, help="seed for the row order (default 0): the same seed, the same output")


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
        try:
            prompt.encode("utf-8")  # argv that is not UTF-8 arrives with surrogate escapes
        except UnicodeEncodeError:
            raise OpenELMError("--prompt is not valid UTF-8; pass text encoded as UTF-8 (or use --prompt -)") from None
        return prompt
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OpenELMError(f"standard input is not valid UTF-8 (byte {e.start}); pass text encoded as UTF-8") from None


def _model_path(args: argparse.Namespace) -> str:
    from .loading import BUNDLED_MODEL

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

    model, tokenizer = load(_model_path(args), tokenizer=args.tokenizer, adapter_path=args.adapter_path)
    draft = None
    if getattr(args, "draft_model", None):
        draft, _ = load(args.draft_model, tokenizer=args.tokenizer)
    return model, tokenizer, draft


def _size(gb: float) -> str:
    # A small model's peak is a few MB: "0.00 GB" would say nothing.
    return f"{gb:.2f} GB" if gb >= 1 else f"{gb * 1000:.1f} MB"


def _figures(r, verbose: bool) -> str:
    from . import blas

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

        from . import runtime

        line += f" | backend: {mx.default_device()}, BLAS: {blas.describe()}, runtime: {runtime.select().describe()}"
    return line


def _sampling(args: argparse.Namespace) -> dict:
    """The sampling flags, by the keyword names generate, chat and the engine take."""
    return {k: getattr(args, k) for k in ("temp", "top_p", "top_k", "min_p", "repetition_penalty")}


def _response_format(args: argparse.Namespace) -> dict | None:
    """--json / --json-schema FILE as a response format (grammar/formats.py), checked before the model loads."""
    import json

    from .grammar import parse_response_format

    if args.json_schema is None:
        return {"type": "json_object"} if args.json else None
    path = Path(args.json_schema)
    try:
        schema = json.loads(path.read_bytes().decode("utf-8"))
    except (FileNotFoundError, IsADirectoryError):
        raise OpenELMError(f"--json-schema {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise OpenELMError(f"--json-schema {path}: not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise OpenELMError(f"--json-schema {path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    try:
        parse_response_format(schema, bare_schema=True)
    except OpenELMError as e:
        raise OpenELMError(f"--json-schema {path}: {e}") from None
    return schema


def _compile_format(args: argparse.Namespace, model, tokenizer, response_format: dict | None) -> None:
    """Compile the format's grammar now (cached for the run), so an unenforceable schema fails
    before any generation, naming the flag."""
    from .grammar import GrammarError, compile_spec, parse_response_format

    spec = parse_response_format(response_format, bare_schema=True)
    if spec is None:
        return
    try:
        compile_spec(spec, tokenizer, model.config.vocab_size, model.config.eos_token_id)
    except GrammarError as e:
        raise OpenELMError(f"--json-schema {args.json_schema}: {e.detail}") from None


def _generate_prompts_file(args: argparse.Namespace) -> int:
    import json

    from .batch import read_prompts, run_jobs

    jobs = read_prompts(args.prompts_file)  # a bad file fails before the model loads
    model, tokenizer, draft = _load_for_generation(args)
    _compile_format(args, model, tokenizer, _response_format(args))
    defaults = {
        "max_tokens": args.max_tokens,
        **_sampling(args),
        "seed": args.seed,
        "stop": tuple(args.stop),
        "system_prompt": args.system_prompt,
        "response_format": _response_format(args),
    }

    def write(result: dict) -> None:
        sys.stdout.write(json.dumps(result, ensure_ascii=False) + "\n")
        sys.stdout.flush()

    totals = run_jobs(
        model,
        tokenizer,
        jobs,
        defaults,
        write,
        source=args.prompts_file,
        max_batch=args.max_batch,
        chat_template=args.chat_template,
        draft_model=draft,
        progress=sys.stderr.isatty(),
    )
    secs = totals["seconds"]
    print(
        f"{totals['prompts']} prompts: {totals['prompt_tokens']} prompt and {totals['generation_tokens']} generated "
        f"tokens in {secs:.1f} s ({totals['generation_tokens'] / secs if secs > 0 else 0:.1f} generated tokens/s, "
        f"batches of up to {args.max_batch})",
        file=sys.stderr,
    )
    return 0


def _check_decoding_flags(args: argparse.Namespace) -> None:
    if args.num_draft_tokens is not None and not args.draft_model:
        raise OpenELMError("--num-draft-tokens needs --draft-model (prompt-lookup proposes --prompt-lookup N tokens)")
    if args.draft_model and args.prompt_lookup:
        raise OpenELMError("--draft-model and --prompt-lookup are alternatives: pass one of them")


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import stream_generate

    _check_decoding_flags(args)
    if args.prompts_file:
        return _generate_prompts_file(args)
    prompt = _read_prompt(args.prompt)
    response_format = _response_format(args)
    if response_format is not None and (args.draft_model or args.prompt_lookup):
        raise OpenELMError("--json/--json-schema decode without speculation: drop --draft-model/--prompt-lookup")
    model, tokenizer, draft = _load_for_generation(args)
    _compile_format(args, model, tokenizer, response_format)
    last = None
    interrupted = False
    try:
        for r in stream_generate(
            model,
            tokenizer,
            prompt,
            max_tokens=args.max_tokens,
            **_sampling(args),
            seed=args.seed,
            system_prompt=args.system_prompt,
            chat_template=args.chat_template,
            draft_model=draft,
            num_draft_tokens=3 if args.num_draft_tokens is None else args.num_draft_tokens,
            prompt_lookup=args.prompt_lookup,
            stop=args.stop,
            response_format=response_format,
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


CHAT_HELP = "/reset starts over, /help lists these, /quit ends (or Ctrl-D)"


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import ChatSession
    from .grammar import parse_response_format

    response_format = _response_format(args)
    model, tokenizer, _ = _load_for_generation(args)
    _compile_format(args, model, tokenizer, response_format)
    context = model.config.max_context_length
    if args.max_tokens >= context:
        raise OpenELMError(
            f"--max-tokens {args.max_tokens} is larger than the model's context ({context} tokens); "
            f"pass at most {context - 64} to leave room for the messages"
        )
    template = args.chat_template
    if template == "auto":
        template = "instruct" if model.is_instruct else "none"
        if not model.is_instruct:
            print(
                "warning: this is a base model, not an Instruct one: it continues text rather than answering; "
                "chatting with plain text turns (--chat-template instruct to use Apple's Instruct template)",
                file=sys.stderr,
            )
    sampling = _sampling(args)
    session = ChatSession(
        model,
        tokenizer,
        args.system_prompt,
        args.max_tokens,
        sampling=sampling,
        seed=args.seed,
        template=template,
        constraint=parse_response_format(response_format, bare_schema=True),
    )
    print(f"openelm-mlx chat: {CHAT_HELP}", file=sys.stderr)
    line_no = 0
    while True:
        try:
            print("> ", end="", file=sys.stderr, flush=True)
            raw = sys.stdin.buffer.readline()
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 0
        if not raw:
            return 0
        line_no += 1
        try:
            message = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise OpenELMError(f"standard input line {line_no} is not valid UTF-8 (byte {e.start})") from None
        if not message:
            continue
        if message.startswith("/") and " " not in message:
            if message == "/quit":
                return 0
            if message == "/reset":
                session.reset()
                print("(conversation reset)", file=sys.stderr)
            elif message == "/help":
                print(CHAT_HELP, file=sys.stderr)
            else:
                print(f"unknown command {message}: {CHAT_HELP}", file=sys.stderr)
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
            print(f"\nthe context is full ({context} tokens): /reset to start over", file=sys.stderr)
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
    from .perplexity import read_text, token_nll

    path = Path(args.text)
    text = read_text(path)
    model, tokenizer = load(_model_path(args), tokenizer=args.tokenizer)
    ids = tokenizer.encode(text)
    nll, n = token_nll(model, ids, window=args.window, stride=args.stride)
    print(f"perplexity: {math.exp(nll / n):.3f} over {n:,} tokens ({nll / n:.4f} nats/token) of {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench, format_report, write_json
    from .loading import read_config

    model = _model_path(args)
    context = read_config(model)[0].max_context_length
    if args.prompt_tokens + args.generation_tokens > context:
        raise OpenELMError(
            f"-p {args.prompt_tokens} + -g {args.generation_tokens} tokens exceed the model's context ({context})"
        )
    if args.json:
        _check_writable(Path(args.json), "--json")
    report = bench(
        model,
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


def _check_writable(path: Path, flag: str) -> None:
    """Fail before a long run, not after it, when its output cannot be written."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OpenELMError(f"{flag} {path}: is a directory")
    if not parent.is_dir():
        raise OpenELMError(f"{flag} {path}: no such directory {parent}")
    if not os.access(path if path.exists() else parent, os.W_OK):
        raise OpenELMError(f"{flag} {path}: not writable")


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
    p.add_argument("--seed", type=_seed, default=None, help="seed for sampling: the same seed reproduces a run")
    p.add_argument("--system-prompt", default=None, help="system prompt for Instruct models")
    p.add_argument("--adapter-path", help="a folder written by `openelm-mlx lora`: generate with that adapter")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="answer with a JSON object (constrained decoding)")
    fmt.add_argument(
        "--json-schema", metavar="FILE", help="answer with JSON valid against this JSON Schema (constrained decoding)"
    )
    p.add_argument(
        "--chat-template",
        default="auto",
        choices=["auto", "instruct", "none"],
        help="auto: the Instruct template for Instruct models, plain text otherwise",
    )


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


def _non_negative_int(flag: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes a whole number, not {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"{flag} must be 0 or more, not {value}")
        return value

    return parse


def _seed(text: str) -> int:
    from .sampling import SEED_LIMIT

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed takes a whole number, not {text!r}") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"--seed must be from 0 to 2**64 - 1, not {value}")
    return value


def _non_negative_float(flag: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes a number, not {text!r}") from None
        if not 0 <= value < math.inf:
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


class _Parser(argparse.ArgumentParser):
    """A malformed flag is one line too (``--help`` still shows the usage); subcommands inherit it."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="openelm-mlx", description="Apple's OpenELM models in MLX.")
    parser.add_argument("--version", action="version", version=f"openelm-mlx {__version__}")
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
    p.add_argument("--q-bits", type=int, default=None, help="bits per weight with -q: 2, 3, 4 (default), 5, 6, 8")
    p.add_argument("--q-group-size", type=int, default=None, help="32, 64 (default for affine) or 128")
    p.add_argument("--q-mode", default=None, choices=["affine", "mxfp4", "mxfp8", "nvfp4"], help="default affine")
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
        help="replace an earlier output of openelm-mlx (or an empty folder) at --mlx-path; nothing else is replaced",
    )
    _add_calibration_flags(p)
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
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the prompt, or - to read it from standard input")
    what.add_argument(
        "--prompts-file",
        metavar="FILE",
        help='many prompts decoded together: one per line, or JSONL with "prompt" and per-prompt options; '
        "results go to stdout as JSONL",
    )
    p.add_argument(
        "--max-batch",
        type=_positive_int("--max-batch"),
        default=8,
        help="with --prompts-file: sequences decoding together (default 8)",
    )
    p.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop at this text (not output); repeatable"
    )
    p.add_argument("--draft-model", help="a smaller OpenELM for speculative decoding")
    p.add_argument(
        "--num-draft-tokens",
        type=_positive_int("--num-draft-tokens"),
        default=None,
        help="tokens the draft model proposes per step (default 3)",
    )
    p.add_argument(
        "--prompt-lookup",
        type=_non_negative_int("--prompt-lookup"),
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
    p.add_argument("--model", help="a converted model directory (default: the bundled one)")
    p.add_argument("-p", "--prompt-tokens", type=_positive_int("-p"), default=128, help="prompt length (default 128)")
    p.add_argument(
        "-g", "--generation-tokens", type=_positive_int("-g"), default=128, help="tokens to generate (default 128)"
    )
    p.add_argument("-n", "--num-runs", type=_positive_int("-n"), default=5, help="timed runs (default 5)")
    p.add_argument("--compare", default="mlx-lm", choices=["mlx-lm", "none"], help="also time mlx_lm (default mlx-lm)")
    p.add_argument(
        "--batch",
        type=_positive_int("--batch"),
        default=1,
        help="B sequences decoding together: aggregate tok/s against mlx_lm's batch_generate (default 1)",
    )
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_bench)

    from .compare import add_parser as add_compare_parser
    from .conversion_cache import add_parser as add_cache_parser
    from .harness import add_parser as add_evaluate_parser
    from .server.cli import add_parser as add_serve_parser
    from .tuner.cli import add_parsers as add_tuner_parsers

    add_cache_parser(sub)
    add_serve_parser(sub)
    add_tuner_parsers(sub)
    add_evaluate_parser(sub)
    add_compare_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    command = "openelm-mlx"
    try:  # Ctrl-C while MLX and the model load is an interruption, not a traceback
        args = build_parser().parse_args(argv)
        command = f"openelm-mlx {args.command}"
        if argv is None:  # a real command line: restart once on a fast BLAS if one is installed
            from .blas import use_fast_blas

            use_fast_blas()
        if os.environ.get("OPENELM_MLX_MATMUL"):
            from . import cpu

            cpu._choice()  # refuse a bogus value now, not once generation has started
        if os.environ.get("OPENELM_MLX_RUNTIME"):
            from . import runtime

            runtime.choice()
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except OpenELMError as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
