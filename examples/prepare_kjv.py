"""Rebuild examples/data/kjv.txt.xz from Debian's bible-kjv-text package (public domain text).

    apt-get download bible-kjv bible-kjv-text && dpkg -x bible-kjv_*.deb x && dpkg -x bible-kjv-text_*.deb x
    x/usr/bin/bible -p x/usr/lib "gen1:1-rev22:21" > kjv_raw.txt
    python examples/prepare_kjv.py kjv_raw.txt

The dump has a "Book N" heading per chapter and numbered, wrapped verses; the output keeps
the headings and puts each verse on one line without its number.
"""

from __future__ import annotations

import argparse
import lzma
import re
from pathlib import Path

VERSE = re.compile(r"^\s+\d+ (.*)$")


def clean(raw: str) -> str:
    chapters: list[list[str]] = []
    for line in raw.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" ") and re.match(r"^[1-3]?\s?[A-Z][A-Za-z ]+ \d+$", line.strip()):
            chapters.append([line.strip()])
        elif m := VERSE.match(line):
            chapters[-1].append(m.group(1).strip())
        else:  # a wrapped continuation of the previous verse
            chapters[-1][-1] += " " + line.strip()
    return "\n\n".join("\n".join(ch) for ch in chapters) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", type=Path, help="the dump written by Debian's `bible` program")
    args = parser.parse_args()
    try:
        text = clean(args.raw.read_text())
    except (OSError, UnicodeDecodeError) as e:
        parser.error(f"{args.raw}: cannot read it ({e})")
    out = Path(__file__).parent / "data" / "kjv.txt.xz"
    out.write_bytes(lzma.compress(text.encode(), preset=9 | lzma.PRESET_EXTREME))
    chapters = text.count("\n\n") + 1
    print(f"{len(text):,} characters, {chapters} chapters -> {out} ({out.stat().st_size:,} bytes)")
