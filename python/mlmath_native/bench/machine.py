"""Measure the machine limits that the benchmark rows are compared with.

Two figures, both taken in the same process and with the same thread count as the suite, each
the best of several runs (a limit is what the machine can do: a run that another process
disturbed is slower, never faster, so the best run is the robust estimate; a median of a
disturbed calibration once put matmul at "201 % of sgemm"):

- memory bandwidth: a STREAM-like copy (``np.copyto`` of a large float32 array into an
  existing, already touched buffer), reported as read + write bytes per second. With more than
  one thread the array is split into contiguous chunks copied by Python threads (``np.copyto``
  releases the GIL), so the figure is comparable with a multi-threaded kernel.
- arithmetic peak: a NumPy float32 matmul (sgemm), reported as 2 n^3 / t.
"""

from __future__ import annotations

import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

MIB = 1 << 20


def _chunks(n: int, parts: int) -> list[slice]:
    """Split range(n) into `parts` contiguous slices of nearly equal length."""
    parts = max(1, min(parts, n))
    bounds = [n * i // parts for i in range(parts + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]


CALIBRATION_REPEATS = 7


def copy_bandwidth(
    nbytes: int = 256 * MIB, threads: int = 1, repeats: int = CALIBRATION_REPEATS
) -> float:
    """Best read + write bandwidth in GB/s (1e9 bytes/s) of copying `nbytes` of float32."""
    n = nbytes // 4
    src = np.ones(n, dtype=np.float32)
    dst = np.zeros(n, dtype=np.float32)  # np.zeros may map lazily: the warm-up touches it
    slices = _chunks(n, threads)

    if len(slices) == 1:

        def copy() -> None:
            np.copyto(dst, src)

        pool = None
    else:
        pool = ThreadPoolExecutor(max_workers=len(slices))

        def copy() -> None:
            list(pool.map(lambda s: np.copyto(dst[s], src[s]), slices))

    try:
        copy()  # warm-up: first touch of dst, thread start-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            copy()
            times.append(time.perf_counter() - t0)
    finally:
        if pool is not None:
            pool.shutdown()
    return 2 * n * 4 / min(times) / 1e9


def gemm_gflops(n: int = 2048, repeats: int = CALIBRATION_REPEATS) -> float:
    """Best GFLOP/s of a float32 n x n x n matmul through NumPy's BLAS."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), dtype=np.float32)
    np.matmul(a, b, out=c)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e9


def measure(threads: int, quick: bool = False) -> dict:
    """Measure both machine limits and describe the machine; returns a JSON-ready dict."""
    copy_bytes = (64 if quick else 256) * MIB
    n = 1024 if quick else 2048
    bw_1 = copy_bandwidth(copy_bytes, threads=1)
    bw_n = copy_bandwidth(copy_bytes, threads=threads) if threads > 1 else bw_1
    return {
        "copy_bytes": copy_bytes,
        "copy_gbs": bw_n,
        "copy_gbs_1thread": bw_1,
        "gemm_n": n,
        "gemm_gflops": gemm_gflops(n),
        "calibration_repeats": CALIBRATION_REPEATS,
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
