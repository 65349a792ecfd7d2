"""Make examples/data/devil.txt.xz, the fine-tuning example text, from Debian's ``dict-devil`` package.

    apt-get download dict-devil && dpkg-deb -x dict-devil_*.deb deb
    python examples/prepare_devil.py deb/usr/share/dictd/devil.dict.dz

Ambrose Bierce's *The Devil's Dictionary* (1911; public domain, copyright expired), as the
Internet Wiretap edition of 1993 that Debian packages for dictd.  The package's dictd preamble
(database name and URL lines) and its trailing alphabet line are dropped; the book's text, from
the Wiretap title page through ZOOLOGY, is kept unchanged.
"""

from __future__ import annotations

import gzip
import lzma
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "data" / "devil.txt.xz"


def extract(dict_dz: Path) -> str:
    lines = gzip.decompress(dict_dz.read_bytes()).decode("latin-1").splitlines()
    start = next(i for i, line in enumerate(lines) if "The Internet Wiretap 1st Online Edition" in line)
    end = max(i for i, line in enumerate(lines) if line.startswith("ZOOLOGY, n."))
    while end + 1 < len(lines) and lines[end + 1].strip():  # the last entry's paragraph
        end += 1
    return "\n".join(line.rstrip() for line in lines[start : end + 1]) + "\n"


def main() -> None:
    text = extract(Path(sys.argv[1]))
    OUT.write_bytes(lzma.compress(text.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME))
    print(f"wrote {OUT}: {len(text):,} characters, {OUT.stat().st_size:,} bytes compressed")


if __name__ == "__main__":
    main()
