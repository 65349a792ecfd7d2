"""Which BLAS MLX's CPU backend runs on, and switching Linux to an optimised one.

MLX's Linux CPU wheel links the reference BLAS; with OpenBLAS preloaded the same float32
prompt runs about 40x faster.  ``use_fast_blas`` re-executes the CLI once with
``LD_PRELOAD`` set when an OpenBLAS exporting the standard CBLAS symbols is installed
(Debian: libopenblas0-pthread).  Opt out with ``OPENELM_MLX_BLAS=reference``; name another
library with ``OPENELM_MLX_BLAS=/path/to/libblas.so``.  macOS uses Accelerate and is left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

ENV = "OPENELM_MLX_BLAS"
_MARK = "OPENELM_MLX_BLAS_REEXEC"
_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
)


def _has_cblas(path: str) -> bool:
    try:
        return hasattr(ctypes.CDLL(path), "cblas_sgemm")
    except OSError:
        return False


def find_fast_blas() -> str | None:
    choice = os.environ.get(ENV, "")
    if choice == "reference":
        return None
    if choice:
        return choice if _has_cblas(choice) else None
    return next((c for c in _CANDIDATES if Path(c).exists() and _has_cblas(c)), None)


def fast_blas_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with the fast BLAS preloaded, when there is one: what the
    CLI runs on, for a process started beside it (the benchmarks give mlx_lm the same BLAS)."""
    env = dict(os.environ if env is None else env)
    lib = find_fast_blas() if sys.platform.startswith("linux") else None
    if lib is not None and lib not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = (lib + " " + env.get("LD_PRELOAD", "")).strip()
    return env


def use_fast_blas() -> None:
    """On Linux, restart this process once with a fast BLAS preloaded (before MLX loads)."""
    if not sys.platform.startswith("linux") or os.environ.get(_MARK):
        return
    env = fast_blas_env()
    if env.get("LD_PRELOAD") == os.environ.get("LD_PRELOAD"):
        return  # none installed, or already preloaded
    env[_MARK] = "1"
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:
        return  # keep running on the reference BLAS


def _mapped() -> set[str]:
    """Paths of the files mapped into this process (Linux)."""
    try:
        return {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "/" in line}
    except OSError:
        return set()


def _preloaded() -> str | None:
    """The preloaded library serving MLX's BLAS calls, if any (Linux).

    A preloaded library wins symbol resolution over the reference BLAS that MLX's Linux
    wheel bundles; other BLAS copies in the process (NumPy's own OpenBLAS) do not serve MLX.
    """
    mapped = _mapped()
    for lib in os.environ.get("LD_PRELOAD", "").split():
        if os.path.realpath(lib) in mapped or lib in mapped:
            return lib
    return None


def mlx_blas_is_reference() -> bool:
    """Whether MLX's matmuls run on the slow reference BLAS its Linux wheel bundles."""
    return sys.platform.startswith("linux") and _preloaded() is None


def describe() -> str:
    """Which BLAS serves MLX's matmuls in this process, for ``--verbose`` and ``bench``."""
    if sys.platform == "darwin":
        return "Accelerate"
    lib = _preloaded()
    if lib is not None:
        return f"{Path(lib).name} (preloaded: {lib})"
    bundled = sorted(p for p in _mapped() if "mlx" in p and "blas" in Path(p).name.lower())
    return f"reference BLAS bundled with MLX ({Path(bundled[0]).name})" if bundled else "reference BLAS"
