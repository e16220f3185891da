"""Benchmark CLI: ``python -m mlmath_native.bench [--only NAME ...] [--threads N] [--quick]
[--json PATH] [--plot PATH.png] [--repeat K] [--list]``.

Measures the machine (copy bandwidth, sgemm GFLOP/s), then times every case of
:mod:`mlmath_native.bench.suite` against NumPy (the formula as written) and PyTorch (when
installed), interleaved in one run, and prints medians, ratios contender/ours (higher is better
for us) and the fraction of the machine limit that our kernel reaches.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import mlmath_native as mn

from . import machine, suite
from .suite import Case

CONTENDERS = ("ours", "numpy", "torch")


def log(msg: str, end: str = "\n") -> None:
    """Progress goes to stderr so that stdout holds only the results."""
    print(msg, end=end, file=sys.stderr, flush=True)


def optional_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


# --- threads ------------------------------------------------------------------------------


def set_threads(n: int) -> tuple[list[str], Any]:
    """Use `n` threads in mlmath_native, PyTorch and NumPy's BLAS.

    Returns notes for the report and the threadpoolctl limiter (keep it alive for the run).
    """
    notes = []
    mn.set_num_threads(n)
    torch = optional_torch()
    if torch is not None:
        torch.set_num_threads(n)
    limiter = None
    try:
        from threadpoolctl import threadpool_limits

        limiter = threadpool_limits(limits=n, user_api="blas")
    except ImportError:
        notes.append("threadpoolctl not installed: NumPy's BLAS threads left as they are")
    return notes, limiter


# --- timing -------------------------------------------------------------------------------


def time_interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each callable, interleaved: each repeat calls every contender once,
    starting from a rotating position so that none is always first or last.

    The result of a call is released after the clock stops, so freeing it is not timed.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            for i in range(len(names)):
                name = names[(r + i) % len(names)]
                fn = fns[name]
                t0 = time.perf_counter()
                result = fn()
                t1 = time.perf_counter()
                del result
                times[name].append(t1 - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def contenders(case: Case, inputs: dict, with_torch: bool) -> dict[str, Callable[[], Any]]:
    """The callables to time for one case, in the order ours, numpy, torch (those that exist)."""
    factories = {
        "ours": case.ours,
        "numpy": case.numpy,
        "torch": case.torch if with_torch else None,
    }
    fns = {}
    for name, factory in factories.items():
        fn = factory(inputs) if factory is not None else None
        if fn is not None:
            fns[name] = fn
    return fns


def uses_output_cache(fn: Callable[[], Any]) -> bool:
    """Whether a call takes its result from the output cache (Note [output cache]): results of
    1 MiB or more that are not written into ``out=``."""

    def lookups() -> int:
        info = mn.output_cache_info()
        return info["hits"] + info["misses"]

    before = lookups()
    fn()
    return lookups() > before


def time_without_cache(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Seconds per call with the output cache off, as NumPy and PyTorch allocate every result."""
    limit = mn.output_cache_info()["limit_bytes"]
    mn.set_output_cache(0)
    try:
        return time_interleaved({"ours": fn}, repeats)["ours"]
    finally:
        mn.set_output_cache(limit)


def run_case(case: Case, machine_info: dict, repeats: int, quick: bool, with_torch: bool) -> dict:
    """Time one case and return its row (a JSON-ready dict).  A case whose results come from
    the output cache is timed once more with the cache off (the ``ours_nocache_ms`` column)."""
    shape = case.shape_for(quick)
    inputs = case.setup(shape)
    fns = contenders(case, inputs, with_torch)
    times = time_interleaved(fns, repeats)
    cached = uses_output_cache(fns["ours"])
    nocache = time_without_cache(fns["ours"], repeats) if cached else None
    row = make_row(case, shape, quick, case.work(inputs), times, machine_info)
    row["output_cache"] = cached
    row["ours_nocache_ms"] = statistics.median(nocache) * 1e3 if nocache else None
    return row


def make_row(
    case: Case,
    shape: tuple[int, ...],
    quick: bool,
    work: float,
    times: dict[str, list[float]],
    machine_info: dict,
) -> dict:
    ms = {name: statistics.median(ts) * 1e3 if ts else None for name, ts in times.items()}
    ours = ms.get("ours")
    row = {
        "name": case.name,
        "shape": case.shape_label(quick),
        "dims": list(shape),
        "repeats": len(times.get("ours", [])),
        **{f"{name}_ms": ms.get(name) for name in CONTENDERS},
    }
    for name in CONTENDERS[1:]:
        other = ms.get(name)
        row[f"{name}_ratio"] = other / ours if other is not None and ours else None
    if case.unit == "bytes":
        rate, limit, unit, limit_name = work / 1e9, machine_info["copy_gbs"], "GB/s", "copy"
    else:
        rate, limit, unit, limit_name = work / 1e9, machine_info["gemm_gflops"], "GFLOP/s", "sgemm"
    achieved = rate / (ours / 1e3) if ours else None
    row.update(
        work=work,
        work_unit=case.unit,
        achieved=achieved,
        achieved_unit=unit,
        limit=limit,
        limit_name=limit_name,
        limit_fraction=achieved / limit if achieved is not None and limit else None,
        times_ms={name: [t * 1e3 for t in ts] for name, ts in times.items()},
    )
    return row


# --- report -------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_table(rows: list[dict]) -> str:
    """The results as an aligned text table."""
    header = [
        "case",
        "shape",
        "ours ms",
        "no-cache ms",
        "numpy ms",
        "torch ms",
        "numpy/ours",
        "torch/ours",
        "achieved",
        "% limit",
    ]
    body = [
        [
            r["name"],
            r["shape"],
            _fmt(r["ours_ms"], ".2f"),
            _fmt(r.get("ours_nocache_ms"), ".2f"),
            _fmt(r["numpy_ms"], ".2f"),
            _fmt(r["torch_ms"], ".2f"),
            _fmt(r["numpy_ratio"], ".2f", "x"),
            _fmt(r["torch_ratio"], ".2f", "x"),
            _fmt(r["achieved"], ".1f", " " + r["achieved_unit"]),
            _fmt(
                None if r["limit_fraction"] is None else 100 * r["limit_fraction"],
                ".0f",
                f"% {r['limit_name']}",
            ),
        ]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    left = {0, 1}  # text columns left-aligned, numbers right-aligned

    def render(line: list[str]) -> str:
        pairs = enumerate(zip(line, widths, strict=True))
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in pairs).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([render(header), rule, *map(render, body)])


TABLE_NOTE = (
    "ours ms: with the output cache on (the default; Note [output cache]); no-cache ms: the same "
    "call with the cache off, as NumPy and PyTorch allocate every result ('-': the results are "
    "written in place or are under 1 MiB, the cache plays no part).  Ratios use ours ms."
)


def format_machine(info: dict, threads: int, torch_version: str | None) -> str:
    best = info.get("calibration_repeats")
    best_of = f", best of {best} runs each" if best else ""
    return (
        f"threads {threads}; numpy {info['numpy']}; torch {torch_version or 'not installed'}\n"
        f"machine: copy {info['copy_gbs']:.1f} GB/s read+write "
        f"({info['copy_gbs_1thread']:.1f} GB/s 1 thread, {info['copy_bytes'] >> 20} MiB), "
        f"sgemm {info['gemm_n']}^3 {info['gemm_gflops']:.0f} GFLOP/s{best_of}"
    )


def write_json(path: str, report: dict) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2, default=str)
        f.write("\n")


# --- entry points -------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m mlmath_native.bench",
        description="Time mlmath_native kernels against NumPy and PyTorch, interleaved.",
    )
    p.add_argument(
        "--only",
        nargs="+",
        action="extend",
        metavar="NAME",
        help="run only the cases whose name contains one of these substrings",
    )
    p.add_argument("--threads", type=int, help="threads for every contender (default: ours)")
    p.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats")
    p.add_argument("--repeat", type=int, metavar="K", help="timed calls per contender")
    p.add_argument("--json", metavar="PATH", help="write machine info and rows as JSON")
    p.add_argument("--plot", metavar="PATH.png", help="bar chart of the ratios (matplotlib)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")
    if args.repeat is not None and args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


def run(argv: list[str] | None = None) -> int:
    """Run the benchmark CLI with `argv` (default: sys.argv[1:]); returns the exit code."""
    args = parse_args(argv)
    cases = suite.select(args.only)
    if args.list:
        for c in cases:
            print(f"{c.name:<20} {c.shape_label(args.quick)}")
        return 0
    if not cases:
        names = ", ".join(sorted({c.name for c in suite.CASES}))
        log(f"no case matches --only {' '.join(args.only)}; case names: {names}")
        return 2

    threads = args.threads if args.threads is not None else mn.get_num_threads()
    repeats = args.repeat or (3 if args.quick else 7)
    notes, _limiter = set_threads(threads)
    torch = optional_torch()
    if torch is None:
        notes.append("torch not installed: no PyTorch column")

    log("measuring the machine (copy bandwidth, sgemm) ...")
    info = machine.measure(threads, quick=args.quick)
    print(format_machine(info, threads, torch.__version__ if torch else None))
    for note in notes:
        print(f"note: {note}")
    print()

    rows = []
    for i, case in enumerate(cases, 1):
        log(f"[{i}/{len(cases)}] {case.name} {case.shape_label(args.quick)} ...", end=" ")
        row = run_case(case, info, repeats, args.quick, with_torch=torch is not None)
        log(f"{row['ours_ms']:.2f} ms")
        rows.append(row)
    print(format_table(rows))
    print(f"\nnote: {TABLE_NOTE}")
    speedup = suite.dask_threads_speedup(rows)
    if speedup is not None:
        notes.append(f"dask softmax: threaded scheduler {speedup:.2f}x the synchronous one")
        print(f"\nnote: {notes[-1]}")

    report = {
        "machine": info,
        "threads": threads,
        "build_info": mn.build_info(),
        "torch": torch.__version__ if torch else None,
        "quick": args.quick,
        "repeats": repeats,
        "notes": notes,
        "rows": rows,
    }
    if args.json:
        write_json(args.json, report)
        log(f"wrote {args.json}")
    if args.plot:
        from . import plot

        if plot.plot_ratios(rows, args.plot, title=plot_title(info, threads)):
            log(f"wrote {args.plot}")
    return 0


def plot_title(info: dict, threads: int) -> str:
    return f"mlmath_native vs contenders ({threads} threads, {info['machine']})"


def main() -> int:
    """Console entry point: ``raise SystemExit(main())``.

    Note [OpenBLAS spinning]: after every BLAS call, OpenBLAS's worker threads spin for about
    2^28 cycles (OPENBLAS_THREAD_TIMEOUT, read once when NumPy loads) before they sleep, which
    takes the cores away from the next contender in an interleaved run and made matmul and conv
    rows swing by 2x.  The benchmark therefore runs with the shortest timeout OpenBLAS accepts,
    re-executing itself once to set it before NumPy is imported.
    """
    if os.environ.get("OPENBLAS_THREAD_TIMEOUT") is None:
        env = {**os.environ, "OPENBLAS_THREAD_TIMEOUT": "4"}
        argv = [sys.executable, "-m", "mlmath_native.bench", *sys.argv[1:]]
        return subprocess.call(argv, env=env)
    return run(sys.argv[1:])
