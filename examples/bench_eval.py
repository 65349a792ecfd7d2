"""Loglikelihood requests per second on a multiple-choice task: openelm-mlx's lm-eval backend
against mlx_lm.evaluate's ``MLXLM`` on the same converted weights and the same requests.

    python examples/bench_eval.py --workdir /tmp/openelm-bench-eval [--docs 48 --docs-270m 12 -n 3]

The task is 4-way multiple choice over held-out KJV verses (the first half of a verse is the
question, its true second half one choice, three other verses' second halves the others): the
requests lm-eval builds for a zero-shot multiple-choice task, ``(question, " " + choice)``.
Models: the bundled OpenELM-tiny-KJV and the 270M shape with random weights (vocabulary cut to
the bundled 4096-piece tokenizer so both backends tokenize alike), both converted to float32.
The two backends run alternately, ``-n`` times each, in one process; medians are reported.

``MLXLM`` is mlx_lm.evaluate's class itself, with its model loaded by ``mlx_lm.utils.load_model``
from the same directory; only its tokenizer is an adapter over the same SentencePiece model
(mlx_lm needs a Hugging Face tokenizer, which the converted directory does not hold).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from convert_memory_check import write_checkpoint
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from openelm_mlx.convert.pipeline import convert

from openelm_mlx import OpenELMConfig
from openelm_mlx.blas import use_fast_blas
from openelm_mlx.evaluate import OpenELMLM
from openelm_mlx.loading import load

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "openelm_mlx" / "bundled" / "openelm-tiny-kjv"
VALID = ROOT / "openelm_mlx" / "bundled" / "kjv-valid.txt"


def requests(n_docs: int) -> list[Instance]:
    verses = [v for v in VALID.read_text().splitlines() if len(v.split()) >= 10]
    out = []
    for d in range(n_docs):
        group = verses[4 * d : 4 * d + 4]
        words = [v.split() for v in group]
        question = " ".join(words[0][: len(words[0]) // 2])
        choices = [" ".join(w[len(w) // 2 :]) for w in words]
        for c in choices:
            out.append(Instance("loglikelihood", {"question": question}, (question, " " + c), d))
    return out


class _HFTokenizerAdapter:
    """The two members MLXLM's loglikelihood uses, over the same SentencePiece model."""

    def __init__(self, tok):
        self.tok = tok
        self.name_or_path = str(tok.path)
        self.chat_template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_bos=add_special_tokens)


def mlx_lm_backend(model_dir: Path, tok, batch_size: int):
    from mlx_lm.evaluate import MLXLM
    from mlx_lm.utils import load_model

    lm = MLXLM.__new__(MLXLM)
    LM.__init__(lm)
    lm._model = load_model(model_dir)[0]
    lm.tokenizer = _HFTokenizerAdapter(tok)
    lm._max_tokens, lm._batch_size, lm.use_chat_template, lm._sampler = None, batch_size, False, None
    return lm


def prepare(work: Path) -> dict[str, Path]:
    dirs = {"tiny-kjv": work / "tiny-kjv-f32", "270M": work / "270M-f32"}
    if not dirs["tiny-kjv"].exists():
        convert(str(BUNDLED), dirs["tiny-kjv"], dtype="float32", run_verify=False, log=lambda s: None)
    src = work / "270M-src"
    if not dirs["270M"].exists():
        write_checkpoint(src, OpenELMConfig.from_preset("270M", vocab_size=4096))
        convert(
            str(src), dirs["270M"], dtype="float32", tokenizer=str(BUNDLED / "tokenizer.model"), run_verify=False,
            log=lambda s: None,
        )  # fmt: skip
    return dirs


def measure(lm, reqs: list[Instance]) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    out = lm.loglikelihood(reqs)
    return len(reqs) / (time.perf_counter() - t0), [s for s, _ in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/openelm-bench-eval")
    ap.add_argument("--docs", type=int, default=48, help="questions for the bundled model (4 requests each)")
    ap.add_argument("--docs-270m", type=int, default=12, help="questions for the 270M shape")
    ap.add_argument("--batch-size", type=int, default=8, help="both backends' batch size (mlx_lm's default is 8)")
    ap.add_argument("-n", "--runs", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    use_fast_blas()  # both scorers on the BLAS the CLI runs on (this process restarts once)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    report = {}
    for name, model_dir in prepare(work).items():
        model, tok = load(model_dir)
        ours = OpenELMLM(model, tok, batch_size=args.batch_size, progress=False)
        theirs = mlx_lm_backend(model_dir, tok, args.batch_size)
        reqs = requests(args.docs if name == "tiny-kjv" else args.docs_270m)
        for lm in (ours, theirs):  # warm-up: graph building, BLAS threads
            lm.loglikelihood(reqs[:8])
        rates = {"openelm-mlx": [], "mlx-lm": []}
        diffs = []
        for _ in range(args.runs):
            r_ours, s_ours = measure(ours, reqs)
            r_theirs, s_theirs = measure(theirs, reqs)
            rates["openelm-mlx"].append(r_ours)
            rates["mlx-lm"].append(r_theirs)
            diffs.append(max(abs(a - b) for a, b in zip(s_ours, s_theirs, strict=True)))
        med = {k: statistics.median(v) for k, v in rates.items()}
        report[name] = {
            "requests": len(reqs),
            "runs": rates,
            "median": med,
            "ratio": med["openelm-mlx"] / med["mlx-lm"],
            "max_abs_loglik_difference": max(diffs),
        }
        print(
            f"{name}: {len(reqs)} requests, openelm-mlx {med['openelm-mlx']:.1f} req/s, mlx-lm {med['mlx-lm']:.1f} "
            f"req/s, ratio {report[name]['ratio']:.2f}x (max |loglik difference| {max(diffs):.2e})",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2), file=sys.stderr)


if __name__ == "__main__":
    main()
