"""Optimizer step against its peers: ``python -m mlmath_native.bench.optim_peers
[--sizes 16M,256M] [--repeat N] [--threads 2] [--tensors K] [--rows NAME,...] [--max-rss GIB]
[--json PATH]``.

One AdamW step (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0.01) over ``n`` float32
(or bfloat16) parameters, for each row of ``ROWS``: ours in every state format, and the CPU
optimizers people use instead (``torch.optim.AdamW(fused=True)``, DeepSpeed's
``DeepSpeedCPUAdam``, bitsandbytes' ``AdamW8bit``).  Prints a markdown table (progress goes to
stderr): median and best step time, the bytes the format moves per parameter per step
(Note [bytes per parameter]), the effective bandwidth (bytes / median time) and its fraction
of this machine's copy bandwidth (measured in the same run, with the same thread count), the
optimizer state's size and the process' peak RSS.

Note [one process per row]: peak RSS (``VmHWM``) is a property of a process, so every
(row, size) runs in a child process of its own that imports only what the row needs,
allocates, warms up, times the steps and reports its step times and RSS as one JSON line.
The children run one at a time (256M fp32 AdamW holds 4 GiB) and round-robin over the repeats,
so that the machine's noise (other processes on the shared cores) hits every row alike; the
copy bandwidth is measured before every child and its best run is the machine's limit.
Before timing, each row is probed once at a tiny size: a peer that is not installed, fails to
build its kernel (DeepSpeed compiles its CPU Adam at first use) or fails to step gets a row
saying why instead of a crash.  A size whose peak RSS, extrapolated from a smaller size of
the same row, would exceed ``--max-rss`` (8 GiB: the machine is shared) is a row saying so.
Sizes: ``16M`` is 16 * 2**20 parameters.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import _children
from ._children import log, missing_module

MODULE = "mlmath_native.bench.optim_peers"  # what a child runs (__name__ is "__main__" under -m)
MIB = 1 << 20
GIB = 1 << 30
DEFAULT_MAX_RSS_GIB = 8.0  # the machine is shared: no child may hold more than this
LR, BETAS, EPS, WEIGHT_DECAY = 1e-3, (0.9, 0.999), 1e-8, 0.01
WARMUP_STEPS = 2  # torch, DeepSpeed and bitsandbytes allocate their state in the first step
PROBE_SIZE = 4096
#: the step count of a child: about this many bytes moved in total, within the bounds below
TARGET_BYTES = 4 * 10**9
MIN_STEPS, MAX_STEPS = 3, 50
CHILD_TIMEOUT_S = 1800  # DeepSpeed's first build of its CPU Adam takes minutes on 2 cores


# -- bytes a format moves per parameter per step -----------------------------------------------

#: Note [bytes per parameter]: what one fused AdamW step must read and write per parameter:
#: the param (read + write), its gradient (read) and the two moments (read + write each).
#: Blockwise 8-bit moments also read and write one float32 scale per block of 256 values.
INT8_BLOCK = 256


def adamw_bytes(param: int, grad: int, state: float) -> float:
    return 2 * param + grad + 2 * 2 * state


def int8_state_bytes(block: int = INT8_BLOCK) -> float:
    """Bytes per value of a blockwise int8 moment: the code plus its share of the scale."""
    return 1 + 4 / block


# -- the rows ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    name: str  # the key on the command line and in the child
    label: str  # the table's first column
    bytes_per_param: float  # Note [bytes per parameter]
    requires: tuple[str, ...] = ()  # modules that must be importable (else "not installed")
    optional: bool = False  # a format ours may not have yet: unlisted when its probe refuses it


ROWS: tuple[Row, ...] = (
    Row("ours-fp32", "ours AdamW fp32 params, fp32 state", adamw_bytes(4, 4, 4)),
    Row(
        "ours-bf16-sr",
        "ours AdamW bf16 params, bf16 state, stochastic rounding",
        adamw_bytes(2, 2, 2),
        requires=("ml_dtypes",),
    ),
    Row(
        "ours-int8",
        "ours AdamW fp32 params, int8 state",
        adamw_bytes(4, 4, int8_state_bytes()),
        optional=True,
    ),
    Row(
        "torch-fused",
        "torch.optim.AdamW(fused=True) fp32",
        adamw_bytes(4, 4, 4),
        requires=("torch",),
    ),
    Row(
        "deepspeed",
        "DeepSpeedCPUAdam (adamw_mode) fp32",
        adamw_bytes(4, 4, 4),
        requires=("torch", "deepspeed"),
    ),
    Row(
        "bnb-8bit",
        "bitsandbytes AdamW8bit fp32 params, 8-bit state",
        adamw_bytes(4, 4, int8_state_bytes()),
        requires=("torch", "bitsandbytes"),
    ),
)


# -- the child: one (row, size) in a process of its own ------------------------------------------


def _split(n: int, tensors: int) -> list[int]:
    """Sizes of `tensors` parts of n, as equal as possible."""
    bounds = [n * i // tensors for i in range(tensors + 1)]
    return [bounds[i + 1] - bounds[i] for i in range(tensors)]


def _uniform(rng: Any, size: int, scale: float) -> Any:
    """float32 values in [-scale/2, scale/2), made in place (no float64 temporary)."""
    import numpy as np

    a = rng.random(size, dtype=np.float32)
    a -= 0.5
    a *= scale
    return a


def _numpy_arrays(sizes: Sequence[int], dtype: Any) -> tuple[list[Any], list[Any]]:
    import numpy as np

    rng = np.random.default_rng(0)
    params, grads = [], []
    for k in sizes:
        params.append(_uniform(rng, k, 0.2).astype(dtype, copy=dtype != np.float32))
        grads.append(_uniform(rng, k, 2e-3).astype(dtype, copy=dtype != np.float32))
    return params, grads


#: a row's factory: (tensor sizes, threads) -> (one step, the optimizer state's bytes)
Factory = Callable[[Sequence[int], int], tuple[Callable[[], Any], Callable[[], int]]]


def _ours(state_dtype: str | None, bf16: bool) -> Factory:
    def make(sizes: Sequence[int], threads: int) -> tuple[Callable[[], Any], Callable[[], int]]:
        import numpy as np

        import mlmath_native as mn

        mn.set_num_threads(threads)
        dtype = np.dtype(np.float32)
        if bf16:
            import ml_dtypes

            dtype = np.dtype(ml_dtypes.bfloat16)
        params, grads = _numpy_arrays(sizes, dtype)
        opt = mn.optim.AdamW(
            params,
            lr=LR,
            betas=BETAS,
            eps=EPS,
            weight_decay=WEIGHT_DECAY,
            state_dtype=state_dtype,
            stochastic_rounding=bf16,
        )

        def state_bytes() -> int:
            return sum(
                a.nbytes for bufs in opt.state.values() for a in bufs if hasattr(a, "nbytes")
            )

        return (lambda: opt.step(grads)), state_bytes

    return make


def _torch_params(sizes: Sequence[int], threads: int) -> list[Any]:
    import torch

    torch.set_num_threads(threads)
    params, grads = _numpy_arrays(sizes, "float32")
    out = []
    for p, g in zip(params, grads, strict=True):
        t = torch.nn.Parameter(torch.from_numpy(p))
        t.grad = torch.from_numpy(g)
        out.append(t)
    return out


def _torch_state_bytes(opt: Any) -> Callable[[], int]:
    import torch

    def state_bytes() -> int:
        return sum(
            v.numel() * v.element_size()
            for s in opt.state.values()
            for v in s.values()
            if isinstance(v, torch.Tensor)
        )

    return state_bytes


#: {"note": ...} when a child's row ran another variant than its label says (shown in the table)
VARIANT: dict[str, str] = {}


def _torch_fused(sizes: Sequence[int], threads: int) -> Any:
    import torch

    params = _torch_params(sizes, threads)
    hyper = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    try:
        opt = torch.optim.AdamW(params, **hyper, fused=True)
        opt.step()  # a torch without the fused CPU kernel refuses here at the latest
    except (RuntimeError, TypeError, ValueError) as e:
        # older torch: no fused AdamW on CPU; its default (foreach) is the row, and says so
        log(f"torch fused AdamW refused ({e}); timing torch's default (foreach) instead")
        VARIANT["note"] = "foreach: fused refused on CPU"
        opt = torch.optim.AdamW(params, **hyper, foreach=True)
    return opt.step, _torch_state_bytes(opt)


def _deepspeed(sizes: Sequence[int], threads: int) -> Any:
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    params = _torch_params(sizes, threads)
    opt = DeepSpeedCPUAdam(
        params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, adamw_mode=True
    )
    return opt.step, _torch_state_bytes(opt)


def _bnb_8bit(sizes: Sequence[int], threads: int) -> Any:
    import bitsandbytes as bnb

    params = _torch_params(sizes, threads)
    opt = bnb.optim.AdamW8bit(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    return opt.step, _torch_state_bytes(opt)


FACTORIES: dict[str, Factory] = {
    "ours-fp32": _ours(None, bf16=False),
    "ours-bf16-sr": _ours("bfloat16", bf16=True),
    "ours-int8": _ours("int8", bf16=False),
    "torch-fused": _torch_fused,
    "deepspeed": _deepspeed,
    "bnb-8bit": _bnb_8bit,
}


def _max_rss_bytes() -> int:
    """This process' peak resident set size in bytes.

    On Linux the high-water mark of this process' memory map (``VmHWM``), which starts afresh
    at exec: ``ru_maxrss`` does not, and a child would report at least the parent's RSS at the
    fork."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def child(name: str, n: int, tensors: int, steps: int, threads: int) -> dict[str, Any]:
    """Make the row's optimizer over n parameters, warm up, time `steps` steps."""
    make = FACTORIES[name]
    if name.startswith("ours"):
        import mlmath_native  # noqa: F401  (its import is part of the baseline RSS)
    else:
        import torch  # noqa: F401
    rss_imports = _max_rss_bytes()
    step, state_bytes = make(_split(n, tensors), threads)
    for _ in range(WARMUP_STEPS):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {
        "times": times,
        "variant": VARIANT.get("note"),
        "state_bytes": state_bytes(),
        "rss_imports": rss_imports,
        "rss_peak": _max_rss_bytes(),
    }


# -- the parent ----------------------------------------------------------------------------------


def run_child(row: Row, n: int, tensors: int, steps: int, threads: int) -> dict[str, Any]:
    """One child; {"error": reason} when it fails (the last line of its stderr)."""
    args = ["--child", row.name, "--n", str(n), "--tensors", str(tensors)]
    args += ["--steps", str(steps), "--threads", str(threads)]
    return _children.run_child(MODULE, args, threads, CHILD_TIMEOUT_S)


def probe(row: Row, threads: int) -> str | None:
    """None if the row runs here, else why not (Note [one process per row])."""
    mod = missing_module(row.requires)
    if mod is not None:
        return f"not installed (no module {mod!r})"
    got = run_child(row, PROBE_SIZE, 1, 1, threads)
    return None if "error" not in got else f"does not run: {got['error']}"


def parse_size(text: str) -> int:
    """'16M' -> 16 * 2**20, '4K' -> 4096, '1000' -> 1000."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    digits = text[:-1] if scale > 1 else text
    try:
        value = int(digits) * scale
    except ValueError:
        raise ValueError(f"optim_peers: size {text!r} is invalid (expected e.g. 16M)") from None
    if value <= 0:
        raise ValueError(f"optim_peers: size {text!r} must be positive")
    return value


def size_label(n: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def steps_for(row: Row, n: int) -> int:
    return max(MIN_STEPS, min(MAX_STEPS, int(TARGET_BYTES / (row.bytes_per_param * n))))


def measure(
    rows: Sequence[Row],
    sizes: Sequence[int],
    repeat: int,
    threads: int,
    tensors: int = 1,
    copy_nbytes: int = 256 * MIB,
    max_rss: float = DEFAULT_MAX_RSS_GIB * GIB,
) -> tuple[list[dict[str, Any]], float]:
    """Probe every row, then time the runnable ones round-robin; the result rows and the
    best copy bandwidth in GB/s."""
    from . import machine

    unavailable: list[dict[str, Any]] = []  # listed after the measured rows
    runnable: list[Row] = []
    for row in rows:
        log(f"probe {row.name} ...")
        why = probe(row, threads)
        if why is None:
            runnable.append(row)
        elif row.optional:
            log(f"  {row.name} left out: {why}")
        else:
            log(f"  {row.name}: {why}")
            unavailable.append({"row": row, "n": None, "why": why})
    copy_gbs = 0.0
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in range(repeat):
        log(f"round {r + 1}/{repeat}: copy {copy_gbs:.1f} GB/s (best so far)")
        for n in sorted(sizes):
            for row in runnable:
                done = runs.setdefault((row.name, n), [])
                too_big = done[0].get("skip") if done else too_much_memory(row, n, runs, max_rss)
                if too_big:
                    done.append({"skip": too_big, "error": too_big})
                    log(f"  {row.name} {size_label(n)}: {too_big}")
                    continue
                # the machine's limit is sampled next to every child (a quiet moment is rare
                # on a shared machine; its best sample is the limit the rows are compared with)
                copy_gbs = max(copy_gbs, machine.copy_bandwidth(copy_nbytes, threads=threads))
                got = run_child(row, n, tensors, steps_for(row, n), threads)
                done.append(got)
                shown = got.get("error") or f"{1e3 * statistics.median(got['times']):.2f} ms"
                log(f"  {row.name} {size_label(n)}: {shown}")
    results = [summarise(row, n, runs[(row.name, n)]) for n in sizes for row in runnable]
    return results + unavailable, copy_gbs


def too_much_memory(
    row: Row, n: int, runs: dict[tuple[str, int], list[dict[str, Any]]], max_rss: float
) -> str | None:
    """Why (row, n) is not run, if its peak RSS extrapolated linearly from the row's largest
    smaller size that ran exceeds max_rss bytes (the machine is shared: Note [one process
    per row]); else None."""
    smaller = [
        (m, g)
        for (name, m), got in runs.items()
        if name == row.name and m < n
        for g in got
        if "rss_peak" in g
    ]
    if not smaller:
        return None
    m, g = max(smaller, key=lambda mg: mg[0])
    need = g["rss_imports"] + (g["rss_peak"] - g["rss_imports"]) * n / m
    if need <= max_rss:
        return None
    return (
        f"skipped: peak RSS would be ~{need / GIB:.1f} GiB (from {size_label(m)}), "
        f"over --max-rss {max_rss / GIB:g} GiB"
    )


def summarise(row: Row, n: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [g for g in runs if "error" not in g]
    if not ok:
        last = runs[-1]
        return {"row": row, "n": n, "why": last.get("skip") or f"failed: {last['error']}"}
    times = [t for g in ok for t in g["times"]]
    return {
        "row": row,
        "n": n,
        "median_s": statistics.median(times),
        "best_s": min(times),
        "steps": len(times),
        "variant": ok[0].get("variant"),
        "state_bytes": max(g["state_bytes"] for g in ok),
        "rss_peak": max(g["rss_peak"] for g in ok),
        "rss_imports": min(g["rss_imports"] for g in ok),
    }


HEADER = (
    "| optimizer | params | B/param/step | median ms | best ms | GB/s | % of copy | state MiB "
    "| peak RSS MiB (imports) |"
)


def format_table(
    results: Sequence[dict[str, Any]], copy_gbs: float, threads: int, tensors: int = 1
) -> str:
    cols = HEADER.count("|") - 1
    lines = [HEADER, "|" + "---|" * cols]
    for res in results:
        row = res["row"]
        size = size_label(res["n"]) if res["n"] else "-"
        if "why" in res:
            cells = [row.label, size, f"{row.bytes_per_param:g}", res["why"]] + [""] * 5
        else:
            gbs = row.bytes_per_param * res["n"] / res["median_s"] / 1e9
            cells = [
                row.label + (f" ({res['variant']})" if res.get("variant") else ""),
                size,
                f"{row.bytes_per_param:g}",
                f"{1e3 * res['median_s']:.2f}",
                f"{1e3 * res['best_s']:.2f}",
                f"{gbs:.1f}",
                f"{100 * gbs / copy_gbs:.0f} %" if copy_gbs > 0 else "",
                f"{res['state_bytes'] / MIB:.0f}",
                f"{res['rss_peak'] / MIB:.0f} ({res['rss_imports'] / MIB:.0f})",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"{threads} thread(s), the params in {tensors} tensor(s); copy bandwidth (np.copyto, "
        f"read + write, best run): {copy_gbs:.1f} GB/s; GB/s = B/param/step x params / median "
        "step time (best: the fastest single step, the machine's noise least)."
    )
    return "\n".join(lines)


def select(names: str | None) -> list[Row]:
    if not names:
        return list(ROWS)
    known = {r.name: r for r in ROWS}
    wanted = [s.strip() for s in names.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in known]
    if unknown:
        raise ValueError(
            f"optim_peers: rows {unknown} are unknown (expected some of {sorted(known)})"
        )
    return [known[s] for s in wanted]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m mlmath_native.bench.optim_peers")
    ap.add_argument("--sizes", default="16M,256M", help="parameter counts, e.g. 16M,256M")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of children (default 3)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tensors", type=int, default=1, help="split the params into K tensors")
    ap.add_argument("--rows", default=None, help=f"comma list of {[r.name for r in ROWS]}")
    ap.add_argument(
        "--max-rss",
        type=float,
        default=DEFAULT_MAX_RSS_GIB,
        help="GiB: skip a size whose peak RSS, extrapolated from a smaller one, exceeds it",
    )
    ap.add_argument("--copy-mib", type=int, default=256, help="the copy bandwidth's array size")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=1, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None, rows: Sequence[Row] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        got = child(args.child, args.n, args.tensors, args.steps, args.threads)
        print(json.dumps(got))
        return 0
    if args.repeat < 1 or args.threads < 1 or args.tensors < 1:
        raise ValueError("optim_peers: --repeat, --threads and --tensors must be >= 1")
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    chosen = list(rows) if rows is not None else select(args.rows)
    results, copy_gbs = measure(
        chosen,
        sizes,
        args.repeat,
        args.threads,
        args.tensors,
        copy_nbytes=args.copy_mib * MIB,
        max_rss=args.max_rss * GIB,
    )
    print(format_table(results, copy_gbs, args.threads, args.tensors))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "threads": args.threads,
                    "tensors": args.tensors,
                    "copy_gbs": copy_gbs,
                    "rows": [
                        {**{k: v for k, v in r.items() if k != "row"}, "row": r["row"].name}
                        for r in results
                    ],
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
