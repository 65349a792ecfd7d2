"""Validation perplexity of the bundled OpenELM-tiny-KJV: float32, 8-bit, 4-bit, a mixed recipe,
and the unigram baseline.  Prints the table that README.md quotes; with --write it also
records the figures in examples/data/tiny-kjv-perplexity.json (tracked: the tests check against it).

    python examples/eval_tiny.py [--write]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import numpy as np
from openelm_mlx.convert.pipeline import convert
from train_tiny import OUT, split_corpus

from openelm_mlx.loading import load
from openelm_mlx.perplexity import perplexity

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "examples" / "data" / "tiny-kjv-perplexity.json"
VALID = OUT.parent / "kjv-valid.txt"
VARIANTS = {
    "float32": {},
    "8-bit": {"quantize_model": True, "q_bits": 8},
    "4-bit": {"quantize_model": True, "q_bits": 4},
    "mixed_3_6": {"quant_recipe": "mixed_3_6"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"record the figures in {RESULT.relative_to(ROOT)}")
    args = parser.parse_args()
    results: dict[str, float] = {}
    text = VALID.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in VARIANTS.items():
            out = Path(tmp) / name
            convert(str(OUT), out, log=lambda s: None, **options)
            model, tok = load(out)
            results[name] = perplexity(model, tok.encode(text))
            print(f"{name:10s} perplexity {results[name]:.3f}", flush=True)
    _, tok = load(OUT)
    train_text, _ = split_corpus()
    counts = np.ones(tok.vocab_size)
    for chapter in train_text:
        np.add.at(counts, tok.encode(chapter), 1)
    ids = tok.encode(text)
    unigram = math.exp(-np.log(counts / counts.sum())[ids[1:]].mean())
    results["unigram baseline"] = unigram
    payload = {
        "text": str(VALID.relative_to(ROOT)),
        "tokens": len(ids) - 1,
        "window": 512,
        "stride": 256,
        "perplexity": results,
        # 4-bit may cost at most this much perplexity over float32 (measured increase, rounded up)
        "q4_margin": math.ceil((results["4-bit"] / results["float32"] - 1) * 100 + 2) / 100,
    }
    print("| model | validation perplexity |\n|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value:.2f} |")
    if args.write:
        tmp = RESULT.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        tmp.replace(RESULT)  # atomic
        print(f"wrote {RESULT}")
    else:
        print(f"(not recorded: pass --write to update {RESULT.relative_to(ROOT)})")


if __name__ == "__main__":
    main()
