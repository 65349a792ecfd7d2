"""The ``openelm-mlx`` console script's entry point, outside the package on purpose.

Importing ``openelm_mlx`` imports MLX and the model (about a second); a Ctrl-C in that
second must end the command with one line, not a traceback, so the import happens here,
inside a handler.
"""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from openelm_mlx.cli import main as cli_main
    except KeyboardInterrupt:
        print("openelm-mlx: interrupted", file=sys.stderr)
        return 130
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
