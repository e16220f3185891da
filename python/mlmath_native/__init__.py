"""mlmath_native: fast CPU kernels for the core math of machine learning, on NumPy arrays.

Kernels are C++ with OpenMP threads and SIMD code compiled for several instruction sets; the
best one this CPU supports is picked at import (``MLMATH_NATIVE_ISA=scalar|avx2|avx512`` on
x86-64, ``scalar|neon`` on arm64, forces one).  ``mlmath_native.reference`` holds the readable
float64 NumPy versions that the tests use as the oracle.
"""

from __future__ import annotations

from typing import Any

from . import _core, optim
from ._attention import attention, attention_backward
from ._conv import (
    conv1d,
    conv1d_backward,
    conv2d,
    conv2d_backward,
    convolve2d,
    correlate2d,
)
from ._cross_entropy import cross_entropy
from ._linear_ce import linear_cross_entropy
from ._matmul import matmul
from ._softmax import (
    log_softmax,
    log_softmax_backward,
    logsumexp,
    softmax,
    softmax_backward,
)
from .optim import SGD, Adam, AdamW, adam_step, gradient_descent, sgd_step

__version__ = _core.__version__

__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "__version__",
    "adam_step",
    "attention",
    "attention_backward",
    "gradient_descent",
    "optim",
    "sgd_step",
    "build_info",
    "conv1d",
    "conv1d_backward",
    "conv2d",
    "conv2d_backward",
    "convolve2d",
    "correlate2d",
    "cross_entropy",
    "linear_cross_entropy",
    "get_cmake_dir",
    "get_include",
    "get_num_threads",
    "log_softmax",
    "log_softmax_backward",
    "logsumexp",
    "matmul",
    "output_cache_info",
    "set_num_threads",
    "set_output_cache",
    "softmax",
    "softmax_backward",
]


def build_info() -> dict[str, Any]:
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


def get_include() -> str:
    """The directory of the C++ headers (``mlmath/mlmath.h``): inside the installed package, or
    ``src/cpp/include`` when running from a source checkout."""
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    installed = os.path.join(here, "include")
    if os.path.isdir(installed):
        return installed
    source = os.path.normpath(os.path.join(here, "..", "..", "src", "cpp", "include"))
    if os.path.isdir(source):
        return source
    raise FileNotFoundError(f"get_include: no C++ headers in {installed}")


def get_cmake_dir() -> str:
    """The directory of the CMake package config of the installed package, for
    ``find_package(mlmath_native CONFIG)`` (pass it as ``mlmath_native_DIR``, or its
    ``share/cmake`` parent's prefix in ``CMAKE_PREFIX_PATH``); it gives the target
    ``mlmath::mlmath``.  FileNotFoundError when the package was not installed by pip (a source
    checkout has no installed library)."""
    import os

    path = os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "share", "cmake", "mlmath_native"
    )
    if not os.path.isfile(os.path.join(path, "mlmath_nativeConfig.cmake")):
        raise FileNotFoundError(
            f"get_cmake_dir: no CMake package in {path} (install the package with pip)"
        )
    return path


def get_num_threads() -> int:
    """Threads a kernel call may use: the last ``set_num_threads`` value, else OpenMP's default
    (``OMP_NUM_THREADS``, else the core count); inside ``threadpoolctl.threadpool_limits``, its
    limit.  Small calls run on one thread regardless.  In a child forked (``os.fork``, the
    ``"fork"`` start method) after a multi-threaded kernel call it is 1: GNU OpenMP's thread
    pool does not survive fork (use ``"spawn"`` or ``"forkserver"`` to keep threads)."""
    return int(_core.get_num_threads())


#: The most threads set_num_threads accepts (many more than any CPU here has cores).
_MAX_THREADS = 1024


def set_num_threads(n: int) -> None:
    """Use at most ``n`` threads (n >= 1) in every later kernel call, from any Python thread."""
    import operator

    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"set_num_threads: n must be an integer (got {n!r})") from None
    if n < 1:
        raise ValueError(f"set_num_threads: n must be >= 1 (got {n})")
    if n > _MAX_THREADS:  # a team that large would fail to start, not run faster
        raise ValueError(f"set_num_threads: n must be <= {_MAX_THREADS} (got {n})")
    _core.set_num_threads(n)


def set_output_cache(max_bytes: int) -> None:
    """Keep at most ``max_bytes`` of idle output blocks for reuse (0 frees them all and turns
    the cache off).

    New result arrays of 1 MiB or more are taken from blocks that earlier results of the same
    byte size gave back when their last reference died, so a loop that calls a kernel and drops
    the result does not pay for fresh pages each time (the OS zeroes every new page: about 3 ms
    per 64 MB here).  The default limit is 256 MiB, or ``MLMATH_NATIVE_OUTPUT_CACHE_MB``.  When
    a released block takes the total past the limit, the least recently released blocks are
    freed first (LRU by bytes), so sizes no longer in use age out.  Arrays from the cache are
    ordinary writeable NumPy arrays whose memory is owned by a capsule (``arr.base``), so
    ``arr.flags.owndata`` is False.
    """
    import operator

    try:
        max_bytes = operator.index(max_bytes)
    except TypeError:
        raise TypeError(
            f"set_output_cache: max_bytes must be an integer (got {max_bytes!r})"
        ) from None
    if not 0 <= max_bytes < 2**63:
        raise ValueError(f"set_output_cache: max_bytes must be >= 0 and < 2**63 (got {max_bytes})")
    _core.set_output_cache_limit(max_bytes)


def output_cache_info() -> dict[str, int]:
    """The output cache's state: ``limit_bytes``, ``cached_bytes``, ``cached_blocks``, ``hits``,
    ``misses``, ``evictions`` (see :func:`set_output_cache`)."""
    return dict(_core.output_cache_info())
