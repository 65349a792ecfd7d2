#!/usr/bin/env bash
# The whole product on what the repo ships, offline: install, convert the bundled
# OpenELM-tiny-KJV to a 4-bit MLX model with the real converter (verified against the
# float64 reference), then generate from it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
if [ "$(uname -s)" = Linux ]; then pip install -q -e ".[cpu]"; else pip install -q -e .; fi
openelm-mlx convert --hf-path openelm_mlx/bundled/openelm-tiny-kjv --mlx-path models/tiny-kjv-4bit -q --force
openelm-mlx generate --model models/tiny-kjv-4bit --prompt "And God said unto Moses," --max-tokens 80 \
    --repetition-penalty 1.2
