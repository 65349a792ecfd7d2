"""Rebuild openelm_mlx/bundled/kjv-calibration.txt, the default calibration text of
`openelm-mlx convert -q --calibrate ...`: every 24th chapter of the bundled model's TRAINING
split of examples/data/kjv.txt.xz (the split of examples/train_tiny.py), so it never overlaps
openelm_mlx/bundled/kjv-valid.txt, the held-out text `compare` and the benchmarks score on.

    python examples/prepare_calibration.py
"""

from __future__ import annotations

from pathlib import Path

from train_tiny import split_corpus

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "openelm_mlx" / "bundled" / "kjv-calibration.txt"
EVERY = 24  # 49 chapters, 157 KB: about 46,000 tokens of the bundled model's tokenizer


def main() -> None:
    train, valid = split_corpus()
    chosen = train[::EVERY]
    assert not set(chosen) & set(valid)
    OUT.write_text("\n\n".join(chosen) + "\n")
    print(f"wrote {OUT}: {len(chosen)} chapters, {OUT.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
