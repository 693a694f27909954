"""Small matrix products off BLAS's threads.

A BLAS call this small spins up OpenBLAS threads, which on busy cores costs 50× the arithmetic (measured),
so einsum (this thread only) is used, unless BLAS was limited to one thread: then ``@`` is about 6× faster
than einsum. The server's monitor process runs that way (``slipstream.monitor.process.proxy`` sets the
variable).
"""

from __future__ import annotations

import os

import numpy as np

ONE_BLAS_THREAD = os.environ.get("OPENBLAS_NUM_THREADS") == "1"


def cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b.T``, on this thread only."""
    return np.asarray(a @ b.T) if ONE_BLAS_THREAD else np.einsum("ij,kj->ik", a, b)
