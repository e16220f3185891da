"""16-bit accuracy table: ``python -m mlmath_native.bench.accuracy [--seed S]``.

For every kernel in bfloat16 and float16 (Note [16-bit storage]): the largest error of our
result and of PyTorch's (the same op in the same dtype on the CPU) against the float64 golden
(the reference formula on the same 16-bit inputs), in units of u * scale, where u is the
storage dtype's unit roundoff (2**-8 bfloat16, 2**-11 float16) and scale the largest |golden|
of the output: one rounding of a result of the size of ``scale`` is at most 1.0 in these units.
The "elementwise" columns give the largest relative error max |err_i| / (u |golden_i|) over the
elements with |golden_i| >= scale / 1024: at most 1.0 for a result rounded once from exact
values.  Needs ml_dtypes and torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

import mlmath_native as mn
from mlmath_native.reference import cross_entropy as ref_ce
from mlmath_native.reference import softmax as ref_softmax

#: one row: (kernel, shape label, function(rng, dtype, torch) -> (ours, golden, torch result))
Row = tuple[str, str, Callable[[Any, np.dtype, Any], tuple[Any, Any, Any]]]

UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11}


def _dtypes() -> list[np.dtype]:
    import ml_dtypes

    return [np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)]


def _torch(a: np.ndarray, torch: Any) -> Any:
    a = np.ascontiguousarray(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def _random(rng: Any, shape: tuple[int, ...], dtype: np.dtype, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32).astype(dtype)


def _wide(a: Any) -> np.ndarray:
    if type(a).__module__.startswith("torch"):
        import torch

        return a.detach().to(torch.float64).numpy()
    return np.asarray(a).astype(np.float64)


def _softmax_row(name: str) -> Row:
    def run(rng: Any, dtype: np.dtype, torch: Any) -> tuple[Any, Any, Any]:
        x = _random(rng, (256, 4096), dtype, 3.0)
        golden = getattr(ref_softmax, name)(_wide(x), axis=-1)
        theirs = (
            getattr(torch, name)(_torch(x, torch), -1)
            if name != "logsumexp"
            else (torch.logsumexp(_torch(x, torch), -1))
        )
        return getattr(mn, name)(x), golden, theirs

    return (name, "256x4096", run)


def _softmax_backward_row() -> Row:
    def run(rng: Any, dtype: np.dtype, torch: Any) -> tuple[Any, Any, Any]:
        y = mn.softmax(_random(rng, (256, 4096), dtype, 3.0))
        dy = _random(rng, (256, 4096), dtype)
        golden = ref_softmax.softmax_backward(_wide(y), _wide(dy), axis=-1)
        theirs = torch.ops.aten._softmax_backward_data(
            _torch(dy, torch), _torch(y, torch), 1, _torch(y, torch).dtype
        )
        return mn.softmax_backward(y, dy), golden, theirs

    return ("softmax_backward", "256x4096", run)


def _cross_entropy_row() -> Row:
    def run(rng: Any, dtype: np.dtype, torch: Any) -> tuple[Any, Any, Any]:
        x = _random(rng, (64, 32000), dtype, 2.0)
        t = rng.integers(0, 32000, 64)
        golden = ref_ce.cross_entropy_grad(_wide(x), t)
        xt = _torch(x, torch).requires_grad_()
        torch.nn.functional.cross_entropy(xt, torch.from_numpy(t)).backward()
        return mn.cross_entropy(x, t, return_grad=True)[1], golden, xt.grad

    return ("cross_entropy grad", "64x32000", run)


def _matmul_row() -> Row:
    def run(rng: Any, dtype: np.dtype, torch: Any) -> tuple[Any, Any, Any]:
        a, b = _random(rng, (256, 2048), dtype), _random(rng, (2048, 256), dtype)
        return (
            mn.matmul(a, b),
            _wide(a) @ _wide(b),
            torch.matmul(_torch(a, torch), _torch(b, torch)),
        )

    return ("matmul", "256x2048x256", run)


def _conv2d_row() -> Row:
    def run(rng: Any, dtype: np.dtype, torch: Any) -> tuple[Any, Any, Any]:
        from mlmath_native.reference import convolution as ref_conv

        x, w = _random(rng, (2, 32, 20, 20), dtype), _random(rng, (32, 32, 3, 3), dtype, 0.2)
        golden = ref_conv.conv2d(_wide(x), _wide(w), padding=1)
        theirs = torch.nn.functional.conv2d(_torch(x, torch), _torch(w, torch), padding=1)
        return mn.conv2d(x, w, padding=1), golden, theirs

    return ("conv2d", "N2 C32 20x20", run)


def _attention_rows() -> list[Row]:
    from mlmath_native.reference import transformer_attention as ref_attn

    def inputs(rng: Any, dtype: np.dtype) -> tuple[np.ndarray, ...]:
        return tuple(_random(rng, (1, 4, 256, 64), dtype) for _ in range(4))

    def forward(rng: Any, dtype: np.dtype, torch: Any) -> tuple[Any, Any, Any]:
        q, k, v, _ = inputs(rng, dtype)
        golden = ref_attn.attention(_wide(q), _wide(k), _wide(v))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        return mn.attention(q, k, v), golden, sdpa(*(_torch(a, torch) for a in (q, k, v)))

    def backward_dq(rng: Any, dtype: np.dtype, torch: Any) -> tuple[Any, Any, Any]:
        q, k, v, g = inputs(rng, dtype)
        out, lse = mn.attention(q, k, v, return_lse=True)
        dq = mn.attention_backward(q, k, v, out, lse, g)[0]
        wq, wk, wv = _wide(q), _wide(k), _wide(v)
        golden_out, golden_lse = ref_attn.attention(wq, wk, wv, return_lse=True)
        golden = ref_attn.attention_backward(wq, wk, wv, golden_out, golden_lse, _wide(g))[0]
        qt, kt, vt = (_torch(a, torch).requires_grad_() for a in (q, k, v))
        torch.nn.functional.scaled_dot_product_attention(qt, kt, vt).backward(_torch(g, torch))
        return dq, golden, qt.grad

    return [
        ("attention", "1x4x256x64", forward),
        ("attention dq", "1x4x256x64", backward_dq),
    ]


ROWS: list[Row] = [
    _softmax_row("softmax"),
    _softmax_row("log_softmax"),
    _softmax_row("logsumexp"),
    _softmax_backward_row(),
    _cross_entropy_row(),
    _matmul_row(),
    _conv2d_row(),
    *_attention_rows(),
]


def measure(seed: int = 0) -> list[dict[str, Any]]:
    """Every row in every 16-bit dtype: our and PyTorch's largest error in units of u * scale."""
    import torch

    results = []
    for name, label, run in ROWS:
        for dtype in _dtypes():
            rng = np.random.default_rng(seed)
            ours, golden, theirs = run(rng, dtype, torch)
            golden = np.asarray(golden, dtype=np.float64)
            finite = np.isfinite(golden)
            unit = UNIT_ROUNDOFF[dtype.name] * float(np.max(np.abs(golden[finite]), initial=1.0))
            u = UNIT_ROUNDOFF[dtype.name]
            big = finite & (np.abs(golden) >= unit / u / 1024)
            row = {"kernel": name, "shape": label, "dtype": dtype.name}
            for who, got in (("ours", _wide(ours)), ("torch", _wide(theirs))):
                err = np.abs(got - golden)
                row[who] = float(np.max(err[finite], initial=0.0)) / unit
                rel = err[big] / (u * np.abs(golden[big]))
                row[who + " elementwise"] = float(np.max(rel, initial=0.0))
            results.append(row)
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    head = (
        f"{'kernel':<20} {'shape':<12} {'dtype':<9} {'ours':>6} {'torch':>6} "
        f"{'ours elementwise':>17} {'torch elementwise':>18}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r['kernel']:<20} {r['shape']:<12} {r['dtype']:<9} {r['ours']:>6.3f} "
            f"{r['torch']:>6.3f} {r['ours elementwise']:>17.3f} {r['torch elementwise']:>18.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlmath_native.bench.accuracy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(
        "largest error against the float64 golden, in units of u * max|golden| and elementwise "
        "in units of u * |golden| (u = 2**-8 bfloat16, 2**-11 float16)"
    )
    print(format_table(measure(args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
