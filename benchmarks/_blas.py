"""Environment lines shared by the benchmark scripts: scipy's OpenBLAS, the load average, whether lme4 is there.

Not a benchmark: the scripts import it as ``_blas`` (running ``python benchmarks/<script>.py`` puts this folder
first on ``sys.path``).
"""

from __future__ import annotations

import ctypes
import glob
import os


def openblas():
    """scipy's OpenBLAS (jaxlib's LAPACK/BLAS custom calls -- potrf, trsm -- run on it), or None."""
    try:
        import scipy
        import scipy.linalg  # noqa: F401  (loads the library)

        libdir = os.path.join(os.path.dirname(scipy.__file__), os.pardir, "scipy.libs")
        paths = sorted(glob.glob(os.path.join(libdir, "libscipy_openblas*.so*")))
        if not paths:
            return None
        lib = ctypes.CDLL(paths[0])
        lib.scipy_openblas_get_config.restype = ctypes.c_char_p
        return lib
    except (ImportError, OSError, AttributeError):
        return None


def blas_report(blas_threads: int | None) -> str:
    """Set OpenBLAS's thread count to ``blas_threads`` (None: leave it) and say which OpenBLAS runs, on how many."""
    lib = openblas()
    if lib is None:
        return "BLAS/LAPACK for jaxlib's custom calls: could not locate scipy's OpenBLAS"
    if blas_threads is not None:
        lib.scipy_openblas_set_num_threads(int(blas_threads))
    env = os.environ.get("OPENBLAS_NUM_THREADS", "(unset)")
    return (
        f"BLAS/LAPACK for jaxlib's custom calls: {lib.scipy_openblas_get_config().decode()}, "
        f"{lib.scipy_openblas_get_num_threads()} threads (OPENBLAS_NUM_THREADS = {env})"
    )


def load_average() -> str:
    return f"load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}"


def have_lme4() -> bool:
    """Rscript on PATH with the R package lme4 installed (the peer of the benchmarks)."""
    import shutil
    import subprocess

    if shutil.which("Rscript") is None:
        return False
    out = subprocess.run(
        ["Rscript", "-e", "cat(requireNamespace('lme4', quietly=TRUE))"], capture_output=True, text=True
    )
    return out.stdout.strip().endswith("TRUE")
