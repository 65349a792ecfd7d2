"""Calibrated quantization against plain rounding and against mlx-lm's own methods, on the
bundled OpenELM-tiny-KJV, same calibration data (the bundled KJV training excerpt), same bits,
group size 64; every variant judged by `openelm-mlx compare` against the float32 model on held-out
text (openelm_mlx/bundled/kjv-valid.txt, never used for calibration).

    python examples/bench_calibrate.py [--bits 4 3 2] [--json FILE] [--out DIR]

mlx-lm's methods run through their Python functions (`mlx_lm.quant.gptq.gptq_quantize`,
`mlx_lm.quant.dwq.dwq_quantize`, `mlx_lm.quant.dynamic_quant.estimate_sensitivities` and
`estimate_threshold`) on mlx_lm's own OpenELM loaded from the same float32 directory, fed the
same token rows: their command-line tools download their calibration sets from the network.
A method that refuses is recorded with its exact error.  Prints Markdown rows as it goes.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
import traceback
from pathlib import Path

import mlx.core as mx
from openelm_mlx.convert.pipeline import convert

from openelm_mlx.compare import compare
from openelm_mlx.loading import load, load_model
from openelm_mlx.quant import data as calibration_data
from openelm_mlx.quant import dwq, recipe

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "openelm_mlx" / "bundled" / "openelm-tiny-kjv"
TEXT = ROOT / "openelm_mlx" / "bundled" / "kjv-valid.txt"
TOKENS = 6144  # 12 chunks of 512, 3,072 scored tokens: half kld_table.py's slice, for time
GROUP = 64


def size_mb(model_dir: Path) -> float:
    return sum(f.stat().st_size for f in model_dir.glob("model*.safetensors")) / 1e6


def ours(bits: int, methods: tuple[str, ...], target_bpw: float | None, d: dwq.Options) -> dict:
    opts = recipe.Options(methods=methods, target_bpw=target_bpw, progress=False, dwq=d) if methods else None
    return {"quantize_model": True, "q_bits": bits, "q_group_size": GROUP, "calibrate": opts}


def mlx_lm_variant(
    method: str, bits: int, target_bpw: float, dst: Path, rows: mx.array, lr: float, dwq_batch: int
) -> None:
    """Run one of mlx-lm's methods on mlx-lm's OpenELM and save the result at ``dst``."""
    import mlx.optimizers as optim
    import mlx_lm
    from mlx_lm.utils import quantize_model, save

    model, tok, config = mlx_lm.load(str(BUNDLED), return_config=True)
    if method == "gptq":
        from mlx_lm.quant.gptq import gptq_quantize

        # fallback (the embedding, not an nn.Linear) at the same width: the same bits for everything
        model, config["quantization"] = gptq_quantize(model, rows, bits, GROUP, bits, GROUP)
    elif method == "dwq":
        from mlx_lm.quant.dwq import dwq_quantize

        q_model = copy.deepcopy(model)
        _, config = quantize_model(q_model, config, group_size=GROUP, bits=bits)
        # the same rows, repeated so its one pass makes as many steps as ours (dwq.STEPS of dwq_batch)
        train = [(r, 0) for r in rows.tolist()]
        train = (train * (dwq.STEPS * dwq_batch // len(train) + 1))[: dwq.STEPS * dwq_batch]
        valid = train[: dwq_batch * 4]
        dwq_quantize(
            q_model,
            lambda batch, idx, split: model(batch),
            optim.Adam(learning_rate=lr, bias_correction=True),
            train,
            valid,
            batch_size=dwq_batch,
            max_seq_length=rows.shape[1],
            seed=0,
            dtype=mx.float32,
        )
        model = q_model
    elif method == "dynamic":
        import mlx.nn as nn
        from mlx_lm.quant.dynamic_quant import estimate_sensitivities, estimate_threshold

        high = {2: 3, 3: 4, 4: 5}[bits]
        sens = dict(estimate_sensitivities(model, rows[:16], bits, GROUP, high, GROUP))
        threshold = estimate_threshold(model, sens, target_bpw, bits, GROUP, high, GROUP)
        block = {"group_size": GROUP, "bits": bits, "mode": "affine"}
        for name, s in sens.items():
            if s > threshold:
                block[name] = {"group_size": GROUP, "bits": high, "mode": "affine"}

        def predicate(path, module):
            return block.get(path, True) if hasattr(module, "to_quantized") else False

        nn.quantize(model, group_size=GROUP, bits=bits, class_predicate=predicate)
        config["quantization"] = block
    save(str(dst), str(BUNDLED), model, tok, config)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--out", help="keep the models here (default: a temporary directory)")
    ap.add_argument("--skip-mlx-lm", action="store_true")
    ap.add_argument("--only", nargs="+", help="run only the variants whose names start with these (e.g. plain gptq)")
    ap.add_argument("--mlx-lm-dwq-lr", type=float, nargs="+", default=[1e-4], help="mlx-lm's default is 1e-6")
    ap.add_argument("--dwq-batch", type=int, default=dwq.BATCH, help="ours: rows a DWQ step")
    ap.add_argument(
        "--mlx-lm-dwq-batch", type=int, default=4, help="mlx-lm's rows a DWQ step (4: twice our default's tokens)"
    )
    ap.add_argument("--dwq-lr", type=float, default=dwq.LEARNING_RATE, help="ours: the relative rate")
    args = ap.parse_args()
    for flag, value in (("--dwq-batch", args.dwq_batch), ("--mlx-lm-dwq-batch", args.mlx_lm_dwq_batch)):
        if value < 1:
            ap.error(f"{flag} must be at least 1, not {value}")
    our_dwq = dwq.Options(batch=args.dwq_batch, learning_rate=args.dwq_lr)
    reference, tok = load(BUNDLED)
    ids = tok.encode(TEXT.read_text(), add_bos=False)[:TOKENS]
    rows = calibration_data.load(None, tok, recipe.SEQ_LEN, recipe.SAMPLES).train
    results = []
    print("| variant | bits | size MB | perplexity | mean KLD | KLD 99% | top-1 | time s |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        for bits in args.bits:
            target = bits + 0.5 + 2 * 32 / GROUP  # half a bit more than plain `bits` (float32 scales, biases)
            variants: dict[str, object] = {
                "plain": ours(bits, (), None, our_dwq),
                "gptq": ours(bits, ("gptq",), None, our_dwq),
                "dwq": ours(bits, ("dwq",), None, our_dwq),
                "gptq+dwq": ours(bits, ("gptq", "dwq"), None, our_dwq),
                f"dynamic {target:g} bpw": ours(bits, ("dynamic",), target, our_dwq),
                f"dynamic+gptq {target:g} bpw": ours(bits, ("dynamic", "gptq"), target, our_dwq),
            }
            if not args.skip_mlx_lm:
                variants["mlx-lm gptq"] = ("gptq", 0.0)
                for lr in args.mlx_lm_dwq_lr:
                    variants[f"mlx-lm dwq lr {lr:g}"] = ("dwq", lr)
                variants[f"mlx-lm dynamic_quant {target:g} bpw"] = ("dynamic", 0.0)
            if args.only:
                variants = {k: v for k, v in variants.items() if k.startswith(tuple(args.only))}
            for name, spec in variants.items():
                dst = root / f"q{bits}-{name.replace(' ', '_')}"
                t0 = time.perf_counter()
                try:
                    if isinstance(spec, tuple):
                        mlx_lm_variant(spec[0], bits, target, dst, rows, spec[1], args.mlx_lm_dwq_batch)
                    else:
                        convert(str(BUNDLED), dst, force=True, run_verify=False, log=lambda s: None, **spec)
                except Exception as e:  # a peer's refusal is a result: record it
                    error = f"{type(e).__name__}: {e}".splitlines()[0]
                    results.append({"variant": name, "bits": bits, "error": error, "trace": traceback.format_exc()})
                    print(f"| {name} | {bits} | - | - | - | - | - | failed: `{error}` |", flush=True)
                else:
                    seconds = time.perf_counter() - t0
                    model = load_model(dst)  # mlx-lm saves no tokenizer.model; compare needs only the model
                    r = compare(model, reference, ids, tok.bos_id, progress=False)
                    row = {"variant": name, "bits": bits, "size_mb": size_mb(dst), "seconds": seconds, **r.__dict__}
                    results.append(row)
                    print(
                        f"| {name} | {bits} | {row['size_mb']:.2f} | {r.ppl_model:.3f} | {r.kld_mean:.5f} | "
                        f"{r.kld_p99:.5f} | {r.top1_agreement:.2%} | {seconds:.0f} |",
                        flush=True,
                    )
                if args.json:  # after every variant, its failure included
                    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    scored = [row for row in results if "error" not in row]
    if scored:  # the reference's perplexity comes with every comparison
        print(f"\nfloat32 reference: {size_mb(BUNDLED):.2f} MB, perplexity {scored[-1]['ppl_reference']:.3f}")


if __name__ == "__main__":
    main()
