"""Time and peak memory of `convert -q --calibrate` on the OpenELM-270M shape (random N(0, 0.02)
weights: for time and memory only, their KL figures mean nothing).

    python examples/bench_calibrate_270m.py [--samples 16] [--dwq-steps 5] [--methods gptq dwq dynamic]

Each method runs on its own through `openelm_mlx.quant.recipe.calibrate`, by default with a reduced
budget (`--samples` rows of 256 tokens, `--dwq-steps` steps; give the defaults, 128 and
`dwq.STEPS`, for a full run).  It prints each phase's seconds (GPTQ's forward passes and solves,
DWQ's training, the held-out scorings), from which the per-unit times (per calibration row for the
Hessians, per DWQ step) scale to the defaults.  Token ids come from the bundled tokenizer (4,096
pieces, all valid ids of the 32,000-token vocabulary).
"""

from __future__ import annotations

import argparse
import resource
import time

import mlx.core as mx
import numpy as np
from openelm_mlx.convert.quantize import QuantSpec, plan

from openelm_mlx.config import OpenELMConfig
from openelm_mlx.loading import load
from openelm_mlx.model import OpenELM
from openelm_mlx.quant import dwq, recipe


def random_270m() -> OpenELM:
    config = OpenELMConfig.from_preset("270M")
    model = OpenELM(config)
    rng = np.random.default_rng(0)
    from mlx.utils import tree_flatten

    weights = []
    for name, p in tree_flatten(model.parameters()):
        if name.endswith("norm.weight"):
            weights.append((name, mx.ones(p.shape)))
        else:
            weights.append((name, mx.array(rng.normal(0, 0.02, p.shape).astype(np.float32))))
    model.load_weights(weights)
    mx.eval(model.parameters())
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--dwq-steps", type=int, default=5)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--methods", nargs="+", default=["gptq", "dwq", "dynamic"])
    args = ap.parse_args()
    _, tok = load()
    model = random_270m()
    modules = plan(model.config, QuantSpec(args.bits, 64))
    base = mx.get_peak_memory()
    print(f"270M float32 model: {base / 1e9:.2f} GB in MLX")
    for method in args.methods:
        mx.reset_peak_memory()
        opts = recipe.Options(
            methods=(method,),
            samples=args.samples,
            target_bpw=args.bits + 1.5 if method == "dynamic" else None,
            dwq=dwq.Options(steps=args.dwq_steps),
        )
        t0 = time.perf_counter()
        r = recipe.calibrate(model, tok, modules, opts, log=lambda s: print("  " + s, flush=True)).recipe
        seconds = time.perf_counter() - t0
        peak = mx.get_peak_memory() / 1e9
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        if method == "gptq":
            scaled = f"Hessians scale with rows: x{recipe.SAMPLES / args.samples:g} of the forward part at 128 rows"
        elif method == "dwq":
            scaled = f"steps scale linearly: x{dwq.STEPS / args.dwq_steps:g} of the training part at {dwq.STEPS} steps"
        else:
            scaled = "sensitivity work does not depend on --samples"
        print(f"{method}: {seconds:.0f} s, MLX peak {peak:.2f} GB, process max RSS {rss:.2f} GB ({scaled})", flush=True)
        phases = {k: r[m][k] for m in ("dynamic", "gptq", "dwq") if m in r for k in r[m] if "seconds" in k}
        print(f"  phases: {phases}, held-out scorings {r['scoring_seconds']} s", flush=True)


if __name__ == "__main__":
    main()
