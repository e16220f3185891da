"""Fused linear + cross-entropy against the unfused paths: ``python -m
mlmath_native.bench.linear_ce [--sizes NxDxV,...] [--repeat R] [--threads T] [--rows NAME,...]
[--max-rss GIB] [--json PATH] [--quick-machine]``.

The loss of ``logits = hidden @ weight.T`` (float32, no bias, random targets, mean reduction)
and its gradients d_hidden and d_weight, for each row of ``ROWS``:

- ``ours fused``: ``mn.linear_cross_entropy(h, w, t, return_grad=True)``, which computes the
  logits a chunk of tokens at a time and never holds them whole;
- ``ours unfused``: ``mn.matmul`` for the logits, ``mn.cross_entropy(return_grad=True)``, then
  two ``mn.matmul`` for the gradients (the N x V logits and their gradient are materialised);
- ``torch eager``: ``F.linear`` + ``F.cross_entropy`` + ``backward()``;
- ``ours: the 3 GEMMs alone`` and ``torch: the 3 GEMMs alone``: the three products every path
  computes (the logits, d_hidden = dZ W, d_weight = dZ^T H; the logits stand in for dZ) with
  ``mn.matmul`` and with ``torch.mm``, and nothing else: the floor of the paths above at each
  library's GEMM rate (no loss: NaN in the JSON).

Prints a markdown table (progress goes to stderr): median and best seconds per call, the time
ratios to torch eager and to ours unfused at the same size, the child's peak RSS, the RSS above
its inputs and outputs (Note [extra RSS]) and the bytes of the logits a materialising path holds.

Note [one process per row], as in :mod:`mlmath_native.bench.optim_peers`: every (row, size)
runs in a child process of its own that imports only what the row needs, makes the inputs,
calls the row once to warm up (first-touch page faults of the outputs, thread pools, torch's
allocator), times one call and reports one JSON line.  ``--repeat`` rounds of children run
round-robin over the rows and sizes, so that the machine's noise hits every row alike; median
and best are over the rounds.  Before timing, each row is probed once at a tiny size: a peer
that is not installed or fails gets a row saying why instead of a crash.  A (row, size) whose
predicted peak (Note [predicted peak]) exceeds ``--max-rss`` is a row saying so.

Note [extra RSS]: the child reads ``VmRSS`` right after making its inputs, then resets its
peak RSS (writing "5" to ``/proc/self/clear_refs`` sets ``VmHWM`` to the current RSS; where the
kernel refuses, ``VmHWM`` since the start is taken and the note says so), runs, and reads
``VmHWM``.  extra = peak - RSS after the inputs - the outputs' bytes (d_hidden, d_weight): the
working memory of the call, the logits and their gradient for a materialising path.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import _children
from ._children import log, missing_module

MODULE = "mlmath_native.bench.linear_ce"  # what a child runs (__name__ is "__main__" under -m)
MIB = 1 << 20
GIB = 1 << 30
F32, I64 = 4, 8  # bytes of a float32 value and of an int64 target
DEFAULT_SIZES = "4096x1024x32000,8192x256x131072"  # a 32k-vocab model; a 128k vocab, small D
#: the default --max-rss, a fraction of MemTotal: the rest for the OS, the parent and slack
DEFAULT_MAX_RSS_FRACTION = 0.8
#: Note [predicted peak]: inputs + outputs + (k N V float32 for a path that materialises the
#: logits: k = 2 for ours unfused (the logits and their gradient), 3 for torch eager (also its
#: log-softmax; measured 12.4 GiB at 8192x256x131072)), times this margin for the allocator and
#: small temporaries
RSS_MARGIN = 1.1
PROBE_SHAPE = "16x8x32"  # a probe only checks that the row runs
#: one warm-up and one timed call at 8192x256x131072 take about a minute on 2 cores
CHILD_TIMEOUT_S = 1800
WEIGHT_SEED, HIDDEN_SEED = 0, 1


# -- shapes and rows ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    n: int  # tokens
    d: int  # hidden size
    v: int  # classes (vocabulary)

    @property
    def label(self) -> str:
        return f"{self.n}x{self.d}x{self.v}"

    @property
    def input_bytes(self) -> int:
        return (self.n * self.d + self.v * self.d) * F32 + self.n * I64

    @property
    def output_bytes(self) -> int:
        """d_hidden and d_weight (the loss is one scalar)."""
        return (self.n * self.d + self.v * self.d) * F32

    @property
    def logits_bytes(self) -> int:
        return self.n * self.v * F32


def parse_shape(text: str) -> Shape:
    """'4096x1024x32000' -> Shape(4096, 1024, 32000)."""
    parts = text.strip().lower().split("x")
    try:
        n, d, v = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"linear_ce: size {text!r} is invalid (expected NxDxV)") from None
    if min(n, d, v) <= 0:
        raise ValueError(f"linear_ce: size {text!r} must be positive in every dimension")
    return Shape(n, d, v)


@dataclass(frozen=True)
class Row:
    name: str  # the key on the command line and in the child
    label: str  # the table's first column
    logit_copies: int  # N x V float32 arrays it holds at its peak (Note [predicted peak])
    requires: tuple[str, ...] = ()  # modules that must be importable (else "not installed")


ROWS: tuple[Row, ...] = (
    Row("ours-fused", "ours fused", logit_copies=0),
    Row("ours-unfused", "ours unfused", logit_copies=2),
    Row("torch-eager", "torch eager", logit_copies=3, requires=("torch",)),
    Row("ours-gemms", "ours: the 3 GEMMs alone", logit_copies=1),
    Row("torch-gemms", "torch: the 3 GEMMs alone", logit_copies=1, requires=("torch",)),
)
TORCH, UNFUSED = "torch-eager", "ours-unfused"  # the rows the ratios compare with


def predicted_peak(row: Row, shape: Shape) -> float:
    """Note [predicted peak]: bytes the (row, shape) is expected to hold at its peak."""
    logits = row.logit_copies * shape.logits_bytes
    return RSS_MARGIN * (shape.input_bytes + shape.output_bytes + logits)


# -- the child: one (row, size) in a process of its own ------------------------------------------


def _numpy_inputs(shape: Shape) -> tuple[Any, Any, Any]:
    """hidden ~ N(0, 1), weight ~ N(0, 1/D) (logits ~ N(0, 1)), targets uniform in [0, V)."""
    import numpy as np

    rng = np.random.default_rng(HIDDEN_SEED)
    hidden = rng.standard_normal((shape.n, shape.d), dtype=np.float32)
    target = rng.integers(0, shape.v, shape.n, dtype=np.int64)
    weight = np.random.default_rng(WEIGHT_SEED).standard_normal(
        (shape.v, shape.d), dtype=np.float32
    )
    weight *= np.float32(shape.d**-0.5)  # in place: no float64 temporary
    return hidden, weight, target


#: a row's factory: (shape, threads) -> one call returning (loss, d_hidden, d_weight)
Factory = Callable[[Shape, int], Callable[[], tuple[Any, Any, Any]]]


def _ours_fused(shape: Shape, threads: int) -> Callable[[], tuple[Any, Any, Any]]:
    import mlmath_native as mn

    mn.set_num_threads(threads)
    h, w, t = _numpy_inputs(shape)

    def call() -> tuple[Any, Any, Any]:
        loss, (d_hidden, d_weight, _) = mn.linear_cross_entropy(h, w, t, return_grad=True)
        return loss, d_hidden, d_weight

    return call


def _ours_unfused(shape: Shape, threads: int) -> Callable[[], tuple[Any, Any, Any]]:
    import mlmath_native as mn

    mn.set_num_threads(threads)
    h, w, t = _numpy_inputs(shape)

    def call() -> tuple[Any, Any, Any]:
        logits = mn.matmul(h, w.T)
        loss, grad = mn.cross_entropy(logits, t, return_grad=True)
        return loss, mn.matmul(grad, w), mn.matmul(grad.T, h)

    return call


def _torch_eager(shape: Shape, threads: int) -> Callable[[], tuple[Any, Any, Any]]:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    h, w, t = (torch.from_numpy(a) for a in _numpy_inputs(shape))
    h.requires_grad_(True)
    w.requires_grad_(True)

    def call() -> tuple[Any, Any, Any]:
        h.grad = w.grad = None  # fresh gradients each call, not accumulated ones
        loss = F.cross_entropy(F.linear(h, w), t)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    return call


def _ours_gemms(shape: Shape, threads: int) -> Callable[[], tuple[Any, Any, Any]]:
    """The three products alone (logits, d_hidden, d_weight; the logits stand in for their
    gradient): the time any of the paths above needs at our GEMM's rate, a floor for them."""
    import mlmath_native as mn

    mn.set_num_threads(threads)
    h, w, _ = _numpy_inputs(shape)

    def call() -> tuple[Any, Any, Any]:
        logits = mn.matmul(h, w.T)
        return float("nan"), mn.matmul(logits, w), mn.matmul(logits.T, h)

    return call


def _torch_gemms(shape: Shape, threads: int) -> Callable[[], tuple[Any, Any, Any]]:
    """The same three products with torch.mm (PyTorch's BLAS): torch eager's floor."""
    import torch

    torch.set_num_threads(threads)
    h, w, _ = (torch.from_numpy(a) for a in _numpy_inputs(shape))

    def call() -> tuple[Any, Any, Any]:
        logits = torch.mm(h, w.T)
        return float("nan"), torch.mm(logits, w), torch.mm(logits.T, h)

    return call


FACTORIES: dict[str, Factory] = {
    "ours-fused": _ours_fused,
    "ours-unfused": _ours_unfused,
    "torch-eager": _torch_eager,
    "ours-gemms": _ours_gemms,
    "torch-gemms": _torch_gemms,
}


def _status_bytes(field: str) -> int | None:
    """A ``/proc/self/status`` field such as VmRSS or VmHWM in bytes (None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Set VmHWM to the current RSS (Note [extra RSS]); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(name: str, shape: Shape, threads: int) -> dict[str, Any]:
    """Make the row's inputs, note the RSS, warm up, time one call, read the peak RSS."""
    call = FACTORIES[name](shape, threads)
    rss_inputs = _status_bytes("VmRSS") or 0
    peak_reset = _reset_peak_rss()
    call()  # warm-up: Note [one process per row]
    t0 = time.perf_counter()
    loss, _, _ = call()
    seconds = time.perf_counter() - t0
    return {
        "time": seconds,
        "loss": float(loss),
        "rss_inputs": rss_inputs,
        "rss_peak": _status_bytes("VmHWM") or 0,
        "peak_reset": peak_reset,
    }


# -- the parent ----------------------------------------------------------------------------------


def run_child(row: Row, shape: Shape, threads: int) -> dict[str, Any]:
    """One child; {"error": reason} when it fails."""
    args = ["--child", row.name, "--sizes", shape.label, "--threads", str(threads)]
    return _children.run_child(MODULE, args, threads, CHILD_TIMEOUT_S)


def probe(row: Row, threads: int) -> str | None:
    """None if the row runs here, else why not (Note [one process per row])."""
    mod = missing_module(row.requires)
    if mod is not None:
        return f"not installed (no module {mod!r})"
    got = run_child(row, parse_shape(PROBE_SHAPE), threads)
    return None if "error" not in got else f"does not run: {got['error']}"


def too_big(row: Row, shape: Shape, max_rss: float) -> str | None:
    """Why (row, shape) is skipped, if its predicted peak exceeds max_rss bytes; else None."""
    need = predicted_peak(row, shape)
    if need <= max_rss:
        return None
    return f"skipped: predicted peak {need / GIB:.2f} GiB over --max-rss {max_rss / GIB:.2f} GiB"


def _progress(row: Row, shape: Shape, got: dict[str, Any]) -> str:
    if "error" in got:
        return f"  {row.name} {shape.label}: {got['error']}"
    return (
        f"  {row.name} {shape.label}: {got['time']:.4g} s, peak RSS {got['rss_peak'] / MIB:.0f} MiB"
    )


def measure(
    rows: Sequence[Row], shapes: Sequence[Shape], repeat: int, threads: int, max_rss: float
) -> list[dict[str, Any]]:
    """Probe every row, then run the runnable (row, size) pairs round-robin, `repeat` rounds.
    A pair that failed once is not run again (a failure is a property of the pair, and an
    out-of-memory kill is slow to repeat)."""
    unavailable: list[dict[str, Any]] = []  # listed after the measured rows
    runnable: list[Row] = []
    for row in rows:
        log(f"probe {row.name} ...")
        why = probe(row, threads)
        if why is None:
            runnable.append(row)
        else:
            log(f"  {row.name}: {why}")
            unavailable.append({"row": row, "shape": None, "why": why})
    runs: dict[tuple[str, Shape], list[dict[str, Any]]] = {}
    for row in runnable:
        for shape in shapes:
            skip = too_big(row, shape, max_rss)
            runs[(row.name, shape)] = [{"error": skip, "skip": True}] if skip else []
            if skip:
                log(f"  {row.name} {shape.label}: {skip}")
    for r in range(repeat):
        log(f"round {r + 1}/{repeat}")
        for shape in shapes:
            for row in runnable:
                done = runs[(row.name, shape)]
                if any("error" in g for g in done):
                    continue
                done.append(run_child(row, shape, threads))
                log(_progress(row, shape, done[-1]))
    results = [summarise(row, s, runs[(row.name, s)]) for s in shapes for row in runnable]
    return add_ratios(results) + unavailable


def summarise(row: Row, shape: Shape, runs: list[dict[str, Any]]) -> dict[str, Any]:
    failed = [g for g in runs if "error" in g]
    if failed:
        why = failed[0]["error"]
        return {
            "row": row,
            "shape": shape,
            "why": why if failed[0].get("skip") else f"failed: {why}",
        }
    times = [g["time"] for g in runs]
    worst = max(runs, key=lambda g: g["rss_peak"] - g["rss_inputs"])
    return {
        "row": row,
        "shape": shape,
        "median_s": statistics.median(times),
        "best_s": min(times),
        "times": times,
        "loss": runs[0]["loss"],
        "rss_peak": max(g["rss_peak"] for g in runs),
        "rss_inputs": worst["rss_inputs"],
        "extra_rss": worst["rss_peak"] - worst["rss_inputs"] - shape.output_bytes,
        "peak_reset": all(g["peak_reset"] for g in runs),
    }


def add_ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each timed row's median over torch eager's and ours unfused's at the same size (below
    1: faster than that path); None where that path has no time."""
    medians = {(r["row"].name, r["shape"]): r["median_s"] for r in results if "median_s" in r}
    for res in results:
        for key, other in (("vs_torch", TORCH), ("vs_unfused", UNFUSED)):
            base = medians.get((other, res["shape"]))
            res[key] = res["median_s"] / base if base and "median_s" in res else None
    return results


# -- the report --------------------------------------------------------------------------------

HEADER = (
    "| row | shape | median s | best s | ratio to torch eager | ratio to ours unfused "
    "| peak RSS MiB | extra RSS MiB | logits MiB | status |"
)
TABLE_NOTE = (
    "One warm-up and one timed call per child process, median and best over the rounds; "
    "ratio to torch eager / ours unfused: this row's median over that row's at the same "
    "shape (below 1: faster).  extra RSS: peak RSS - RSS after the inputs were made - the outputs' "
    "bytes (d_hidden, d_weight).  logits MiB: N x V float32, what a materialising path holds "
    "(and as much again for their gradient)."
)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _cells(res: dict[str, Any]) -> list[str]:
    shape: Shape | None = res["shape"]
    size = shape.label if shape else "-"
    logits = f"{shape.logits_bytes / MIB:.0f}" if shape else "-"
    if "why" in res:
        return [res["row"].label, size, *["-"] * 6, logits, res["why"]]
    status = "ok" if res["peak_reset"] else "ok; VmHWM not reset (clear_refs refused)"
    return [
        res["row"].label,
        size,
        f"{res['median_s']:.4g}",
        f"{res['best_s']:.4g}",
        _ratio(res["vs_torch"]),
        _ratio(res["vs_unfused"]),
        f"{res['rss_peak'] / MIB:.0f}",
        f"{res['extra_rss'] / MIB:.0f}",
        logits,
        status,
    ]


def format_table(results: Sequence[dict[str, Any]]) -> str:
    cols = HEADER.count("|") - 1
    lines = [HEADER, "|" + "---|" * cols]
    lines += ["| " + " | ".join(_cells(res)) + " |" for res in results]
    return "\n".join(lines)


def format_build(info: dict[str, Any]) -> str:
    """The ISA and build of the mlmath_native that the ours rows run."""
    return (
        f"mlmath_native {info.get('version')}: ISA {info.get('isa')} "
        f"(supported {', '.join(info.get('isa_supported', []))}; "
        f"compiled {', '.join(info.get('isa_compiled', []))}), "
        f"OpenMP {'on' if info.get('openmp') else 'off'}, {info.get('compiler')}"
    )


def torch_version() -> str | None:
    """torch's version without importing it (the parent stays small)."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def mem_total() -> int:
    """The machine's memory in bytes (MemTotal)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def json_row(res: dict[str, Any]) -> dict[str, Any]:
    shape: Shape | None = res["shape"]
    out = {k: v for k, v in res.items() if k not in ("row", "shape")}
    out["row"] = res["row"].name
    out["shape"] = shape.label if shape else None
    if shape:
        out.update(n=shape.n, d=shape.d, v=shape.v, logits_bytes=shape.logits_bytes)
    return out


# -- entry points --------------------------------------------------------------------------------


def select(names: str | None) -> list[Row]:
    if not names:
        return list(ROWS)
    known = {r.name: r for r in ROWS}
    wanted = [s.strip() for s in names.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in known]
    if unknown:
        raise ValueError(
            f"linear_ce: rows {unknown} are unknown (expected some of {sorted(known)})"
        )
    return [known[s] for s in wanted]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help="comma list of NxDxV shapes")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of children (default 3)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default=None, help=f"comma list of {[r.name for r in ROWS]}")
    ap.add_argument(
        "--max-rss",
        type=float,
        default=None,
        help="GiB: skip a row whose predicted peak exceeds it (default 80%% of MemTotal)",
    )
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument(
        "--quick-machine", action="store_true", help="calibrate the machine on small arrays"
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def write_json(path: str, args: argparse.Namespace, header: dict[str, Any], results: Any) -> None:
    report = {**header, "repeat": args.repeat, "rows": [json_row(r) for r in results]}
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")


def describe_machine(threads: int, quick: bool) -> tuple[dict[str, Any], str]:
    """The machine and build figures for the JSON, and their lines for the report."""
    import mlmath_native as mn

    from . import format_machine, machine

    log("measuring the machine (copy bandwidth, sgemm) ...")
    info = machine.measure(threads, quick=quick)
    build = mn.build_info()
    text = format_machine(info, threads, torch_version()) + "\n" + format_build(build)
    return {"machine": info, "build_info": build, "torch": torch_version()}, text


def main(argv: Sequence[str] | None = None, rows: Sequence[Row] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, parse_shape(args.sizes), args.threads)))
        return 0
    if args.repeat < 1 or args.threads < 1:
        raise ValueError("linear_ce: --repeat and --threads must be >= 1")
    shapes = [parse_shape(s) for s in args.sizes.split(",") if s.strip()]
    chosen = list(rows) if rows is not None else select(args.rows)
    max_rss = (
        args.max_rss * GIB if args.max_rss is not None else DEFAULT_MAX_RSS_FRACTION * mem_total()
    )
    header, text = describe_machine(args.threads, args.quick_machine)
    header.update(threads=args.threads, max_rss_bytes=int(max_rss))
    results = measure(chosen, shapes, args.repeat, args.threads, max_rss)
    print(text + f"\n--max-rss {max_rss / GIB:.1f} GiB\n")
    print(format_table(results))
    print(f"\nnote: {TABLE_NOTE}")
    if args.json:
        write_json(args.json, args, header, results)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
