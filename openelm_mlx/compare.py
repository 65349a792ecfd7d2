"""``openelm-mlx compare``: how far a (quantized) model's next-token distribution drifts from a reference's.

The measures of llama.cpp's ``llama-perplexity --kl-divergence``, computed in one pass over both
models: the text is cut into chunks of ``context`` tokens, each fed after BOS, and only the second
half of each chunk is scored so every scored token has at least ``context / 2`` tokens before it.
Per scored token: both models' log-probabilities of the true next token (for perplexity),
KL(reference || model) over the whole vocabulary, whether both rank the same token first, and how
the probability of the reference's top token changed.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from .errors import OpenELMError
from .model import OpenELM
from .perplexity import read_text

DEFAULT_CONTEXT = 512
ROWS_PER_PASS = 4


@dataclass
class Report:
    tokens: int  # scored tokens
    context: int
    ppl_model: float
    ppl_reference: float
    ppl_ratio: float  # model / reference
    kld_mean: float
    kld_p90: float
    kld_p99: float
    kld_p999: float
    kld_max: float
    top1_agreement: float  # fraction of positions where both models' most likely token is the same
    top_p_change_mean: float  # mean of p_model(t) - p_reference(t), t the reference's top token
    top_p_change_max: float  # largest |p_model(t) - p_reference(t)|

    def format(self) -> str:
        return "\n".join(
            [
                f"scored tokens: {self.tokens:,} (chunks of {self.context}, second halves)",
                f"perplexity: model {self.ppl_model:.4f}, reference {self.ppl_reference:.4f}, "
                f"ratio {self.ppl_ratio:.4f}",
                f"KL divergence (reference || model): mean {self.kld_mean:.6f}, 90% {self.kld_p90:.6f}, "
                f"99% {self.kld_p99:.6f}, 99.9% {self.kld_p999:.6f}, max {self.kld_max:.6f}",
                f"top-1 agreement: {self.top1_agreement:.2%}",
                f"reference's top-token probability change: mean {self.top_p_change_mean:+.5f}, "
                f"max |change| {self.top_p_change_max:.5f}",
            ]
        )


def _chunk_stats(model: OpenELM, reference: OpenELM, rows: mx.array, targets: mx.array, first: int) -> list:
    lq = model.infer(rows)[:, first:].astype(mx.float32)
    lf = reference.infer(rows)[:, first:].astype(mx.float32)
    lq = lq - mx.logsumexp(lq, axis=-1, keepdims=True)
    lf = lf - mx.logsumexp(lf, axis=-1, keepdims=True)
    t = targets[:, first:, None]
    nll_q = -mx.take_along_axis(lq, t, axis=-1)[..., 0]
    nll_f = -mx.take_along_axis(lf, t, axis=-1)[..., 0]
    pf = mx.exp(lf)
    kld = (pf * (lf - lq)).sum(axis=-1)
    top_f = mx.argmax(lf, axis=-1)
    same = top_f == mx.argmax(lq, axis=-1)
    p_change = mx.exp(mx.take_along_axis(lq, top_f[..., None], axis=-1)[..., 0]) - mx.max(pf, axis=-1)
    out = [nll_q, nll_f, kld, same, p_change]
    mx.eval(out)
    return [np.array(a).reshape(-1) for a in out]


def compare(
    model: OpenELM, reference: OpenELM, ids: list[int], bos: int, context: int | None = None, progress: bool = True
) -> Report:
    """``ids``: the text's tokens without BOS.  Both models must share the tokenizer."""
    if model.config.vocab_size != reference.config.vocab_size:
        raise OpenELMError(
            f"the models' vocabularies differ ({model.config.vocab_size} vs {reference.config.vocab_size} tokens)"
        )
    limit = min(model.config.max_context_length, reference.config.max_context_length)
    context = context or min(DEFAULT_CONTEXT, limit)
    if not 4 <= context <= limit:
        raise OpenELMError(f"--context {context}: must be between 4 and the models' context of {limit} tokens")
    n_chunks = len(ids) // context
    if n_chunks == 0:
        raise OpenELMError(f"the text holds {len(ids)} tokens; --context {context} needs at least that many")
    first = context // 2
    parts: list[list[np.ndarray]] = []
    starts = range(0, n_chunks, ROWS_PER_PASS)
    for s in tqdm(starts, desc="compare", unit="pass", disable=not progress, leave=False):
        chunks = [ids[c * context : (c + 1) * context] for c in range(s, min(s + ROWS_PER_PASS, n_chunks))]
        rows = mx.array([[bos] + c[:-1] for c in chunks], dtype=mx.uint32)  # row j predicts c[j]
        parts.append(_chunk_stats(model, reference, rows, mx.array(chunks, dtype=mx.uint32), first))
    nll_q, nll_f, kld, same, p_change = (np.concatenate([p[i] for p in parts]).astype(np.float64) for i in range(5))
    kld = np.maximum(kld, 0.0)  # float rounding can make a zero divergence -1e-9
    ppl_q, ppl_f = math.exp(nll_q.mean()), math.exp(nll_f.mean())
    return Report(
        tokens=int(nll_q.size),
        context=context,
        ppl_model=ppl_q,
        ppl_reference=ppl_f,
        ppl_ratio=ppl_q / ppl_f,
        kld_mean=float(kld.mean()),
        kld_p90=float(np.percentile(kld, 90)),
        kld_p99=float(np.percentile(kld, 99)),
        kld_p999=float(np.percentile(kld, 99.9)),
        kld_max=float(kld.max()),
        top1_agreement=float(same.mean()),
        top_p_change_mean=float(p_change.mean()),
        top_p_change_max=float(np.abs(p_change).max()),
    )


def compare_dirs(
    model: str, reference: str, text: str, context: int | None = None, tokenizer: str | None = None, progress=True
) -> Report:
    from .loading import load

    text = read_text(text)
    q, tok = load(model, tokenizer=tokenizer)
    f, ref_tok = load(reference, tokenizer=tokenizer)
    ids = tok.encode(text, add_bos=False)
    if ref_tok.encode(text, add_bos=False) != ids:
        raise OpenELMError("--model and --reference tokenize the text differently: they need the same tokenizer")
    return compare(q, f, ids, tok.bos_id, context, progress)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare", help="perplexity and KL divergence of a (quantized) model against a reference on a text"
    )
    p.add_argument("--model", required=True, help="the model to judge (say, a quantized conversion)")
    p.add_argument("--reference", required=True, help="the reference model (say, the float32 conversion)")
    p.add_argument("--text", required=True, help="a UTF-8 text file (held-out text)")
    p.add_argument("--context", type=int, default=None, help=f"tokens per chunk (default {DEFAULT_CONTEXT})")
    p.add_argument("--tokenizer", help="tokenizer.model for both, instead of the model directories'")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=run)


def calibration(model_dir: str) -> dict | None:
    """The recipe ``convert --calibrate`` recorded in the model's config.json, if any."""
    try:
        raw = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    meta = raw.get("openelm_mlx") if isinstance(raw, dict) else None
    recipe = meta.get("calibration") if isinstance(meta, dict) else None
    return recipe if isinstance(recipe, dict) else None


def describe_calibration(recipe: dict) -> str:
    methods = "+".join(map(str, recipe.get("methods", [])))
    line = (
        f"model: calibrated with {methods} on {recipe.get('data')} (sha256 {str(recipe.get('data_sha256'))[:12]}, "
        f"{recipe.get('sequences')} x {recipe.get('seq_len')} tokens, seed {recipe.get('seed')}); "
        f"KL on its held-out slice {recipe.get('held_out_kl')}, round-to-nearest "
        f"{recipe.get('held_out_kl_round_to_nearest')}"
    )
    if isinstance(recipe.get("dynamic"), dict):
        d = recipe["dynamic"]
        line += f"; {d.get('bpw')} bits per weight {d.get('modules_per_width')}"
    if isinstance(recipe.get("dwq"), dict):
        d = recipe["dwq"]
        line += f"; dwq {d.get('steps')} steps x {d.get('batch_size')} rows, lr {d.get('learning_rate')}"
    return line


def run(args: argparse.Namespace) -> int:
    report = compare_dirs(args.model, args.reference, args.text, args.context, args.tokenizer, progress=True)
    recipe = calibration(args.model)
    if args.json:
        print(json.dumps({**asdict(report), "calibration": recipe}, indent=2))
    else:
        print((describe_calibration(recipe) + "\n" if recipe else "") + report.format())
    return 0
