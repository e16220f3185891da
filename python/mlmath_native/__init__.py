"""mlmath_native: fast CPU kernels for the core math of machine learning, on NumPy arrays.

Kernels are C++ with OpenMP threads and SIMD code compiled for several instruction sets; the
best one this CPU supports is picked at import (``MLMATH_NATIVE_ISA=scalar|avx2|avx512``
forces one).  ``mlmath_native.reference`` holds the readable float64 NumPy versions that the
tests use as the oracle.
"""

from __future__ import annotations

from . import _core
from ._softmax import (
    log_softmax,
    log_softmax_backward,
    logsumexp,
    softmax,
    softmax_backward,
)

__version__ = _core.__version__

__all__ = [
    "__version__",
    "build_info",
    "get_num_threads",
    "log_softmax",
    "log_softmax_backward",
    "logsumexp",
    "set_num_threads",
    "softmax",
    "softmax_backward",
]


def build_info() -> dict:
    """Facts about this build and this machine.

    Returns
    -------
    dict
        ``version``; ``isa`` (the instruction set in use); ``isa_supported`` (compiled and
        runnable here, worst to best); ``isa_compiled``; ``openmp`` (bool);
        ``openmp_version`` (the ``_OPENMP`` date, 0 without OpenMP); ``num_threads``;
        ``compiler``.

    Examples
    --------
    >>> import mlmath_native as mn
    >>> mn.build_info()["isa"] in mn.build_info()["isa_supported"]
    True
    """
    return dict(_core.build_info())


def get_num_threads() -> int:
    """Threads a kernel call may use: the last ``set_num_threads`` value, else OpenMP's default
    (``OMP_NUM_THREADS``, else the core count).  Small calls run on one thread regardless."""
    return int(_core.get_num_threads())


def set_num_threads(n: int) -> None:
    """Use at most ``n`` threads (n >= 1) in every later kernel call, from any Python thread."""
    import operator

    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"set_num_threads: n must be an integer (got {n!r})") from None
    if n < 1:
        raise ValueError(f"set_num_threads: n must be >= 1 (got {n})")
    _core.set_num_threads(n)
