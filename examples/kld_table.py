"""The quantization table of BENCHMARKS.md: every bit width, group size and mixed recipe of the
converter on the bundled OpenELM-tiny-KJV, judged by `openelm-mlx compare` against the float32
model on held-out text (openelm_mlx/bundled/kjv-valid.txt, chapters the model never trained on).

    python examples/kld_table.py [--out DIR] [--json FILE]

Prints the Markdown rows, then every recipe that a plain width of equal or smaller size beats
on mean KLD.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from openelm_mlx.convert.pipeline import convert
from openelm_mlx.convert.quantize import MODES, RECIPES

from openelm_mlx.compare import compare
from openelm_mlx.loading import load

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "openelm_mlx" / "bundled" / "openelm-tiny-kjv"
TEXT = ROOT / "openelm_mlx" / "bundled" / "kjv-valid.txt"
TOKENS = 12288  # the first 24 chunks of 512 (6,144 scored tokens): minutes per variant on two shared cores


def variants() -> dict[str, dict]:
    out: dict[str, dict] = {}
    for bits in MODES["affine"][0]:  # 2, 3, 4, 5, 6, 8: the widths MLX's affine quantization has
        out[f"{bits}-bit g64"] = {"quantize_model": True, "q_bits": bits, "q_group_size": 64}
    for group in (32, 128):
        out[f"4-bit g{group}"] = {"quantize_model": True, "q_bits": 4, "q_group_size": group}
    for recipe in RECIPES:
        out[f"{recipe} g64"] = {"quant_recipe": recipe}
    return out


def size_mb(model_dir: Path) -> float:
    return sum(f.stat().st_size for f in model_dir.glob("model*.safetensors")) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="keep the converted models here (default: a temporary directory)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    reference, tok = load(BUNDLED)
    ids = tok.encode(TEXT.read_text(), add_bos=False)[:TOKENS]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        for name, options in variants().items():
            dst = root / name.replace(" ", "-")
            convert(str(BUNDLED), dst, force=True, run_verify=False, log=lambda s: None, **options)
            model, _ = load(dst)
            r = compare(model, reference, ids, tok.bos_id, progress=False)
            rows.append({"variant": name, "size_mb": size_mb(dst), **r.__dict__})
            print(f"{name}: {rows[-1]['size_mb']:.2f} MB, ppl {r.ppl_model:.3f}, KLD {r.kld_mean:.5f}", flush=True)
    print(f"\nfloat32 reference: {size_mb(BUNDLED):.2f} MB, ppl {rows[0]['ppl_reference']:.3f}\n")
    print("| variant | size MB | perplexity | ppl ratio | mean KLD | KLD 99% | top-1 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['size_mb']:.2f} | {r['ppl_model']:.3f} | {r['ppl_ratio']:.4f} | "
            f"{r['kld_mean']:.5f} | {r['kld_p99']:.5f} | {r['top1_agreement']:.2%} |"
        )
    plain = [r for r in rows if not r["variant"].startswith("mixed")]
    print()
    for r in rows:
        if not r["variant"].startswith("mixed"):
            continue
        better = [p for p in plain if p["size_mb"] <= r["size_mb"] and p["kld_mean"] <= r["kld_mean"]]
        if better:
            names = ", ".join(f"{p['variant']} ({p['size_mb']:.2f} MB, KLD {p['kld_mean']:.5f})" for p in better)
            print(f"- {r['variant']} ({r['size_mb']:.2f} MB, KLD {r['kld_mean']:.5f}) loses to {names}")
        else:
            print(f"- {r['variant']}: no plain width of equal or smaller size does better")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
