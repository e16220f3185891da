"""Demos: small models trained end to end on mlmath_native's kernels.

``python -m mlmath_native.demo {digits,transformer,regression,optim_formats} [--quick]
[--seed N] [--out PATH] [--epochs N | --steps N] [--threads N] [--no-progress]``

- ``digits``: a CNN (conv2d, conv2d_backward, cross_entropy, Adam) on scikit-learn's 8x8
  handwritten digits; writes a PNG of the curves and of test digits with their predictions.
- ``transformer``: a character-level transformer (matmul, attention, attention_backward,
  cross_entropy, AdamW) on the Zen of Python; compares the loss with the unigram entropy and
  samples text.
- ``regression``: linear (gradient_descent vs np.linalg.lstsq) and logistic regression
  (cross_entropy vs scikit-learn's LogisticRegression) on the breast-cancer data.
- ``optim_formats``: the transformer and a PyTorch MLP trained with each AdamW state format
  (float32, bfloat16 state, bfloat16 params with and without stochastic rounding or master
  weights, int8 state when the build has it) against float32 AdamW; a table, the stall of
  round-to-nearest at a tiny learning rate, and a PNG of the curves.

Each is also a function returning a :class:`DemoResult` (``run_digits``, ``run_transformer``,
``run_regression``, ``run_optim_formats``; ``quick=True`` for a run of a few seconds).  They
need the ``demo`` extra (scikit-learn, matplotlib, tqdm; ``optim_formats`` also uses torch and
ml_dtypes when installed), imported only when a demo runs: ``import mlmath_native`` never
needs them.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from . import digits, optim_formats, regression, transformer
from ._common import DemoResult, KernelTimer, Progress

__all__ = [
    "DemoResult",
    "KernelTimer",
    "Progress",
    "digits",
    "main",
    "optim_formats",
    "regression",
    "run_digits",
    "run_optim_formats",
    "run_regression",
    "run_transformer",
    "transformer",
]


def _config(module: Any, quick: bool, **overrides: Any) -> Any:
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if quick:
        return module.quick_config(**overrides)
    cls = {
        digits: digits.DigitsConfig,
        transformer: transformer.TransformerConfig,
        regression: regression.RegressionConfig,
        optim_formats: optim_formats.FormatsConfig,
    }[module]
    return cls(**overrides)


def run_digits(
    *,
    quick: bool = False,
    out: str | None = "digits.png",
    progress: bool = True,
    verbose: bool = True,
    **config: Any,
) -> DemoResult:
    """The digits CNN; ``config`` overrides :class:`digits.DigitsConfig` fields."""
    return digits.run(_config(digits, quick, **config), out=out, progress=progress, verbose=verbose)


def run_transformer(
    *,
    quick: bool = False,
    out: str | None = None,
    progress: bool = True,
    verbose: bool = True,
    **config: Any,
) -> DemoResult:
    """The character transformer; ``config`` overrides :class:`transformer.TransformerConfig`
    fields."""
    return transformer.run(
        _config(transformer, quick, **config), out=out, progress=progress, verbose=verbose
    )


def run_regression(
    *,
    quick: bool = False,
    out: str | None = None,
    progress: bool = True,
    verbose: bool = True,
    **config: Any,
) -> DemoResult:
    """Linear and logistic regression; ``config`` overrides
    :class:`regression.RegressionConfig` fields."""
    return regression.run(
        _config(regression, quick, **config), out=out, progress=progress, verbose=verbose
    )


def run_optim_formats(
    *,
    quick: bool = False,
    out: str | None = "optim_formats.png",
    progress: bool = True,
    verbose: bool = True,
    **config: Any,
) -> DemoResult:
    """Each AdamW state format against float32 AdamW; ``config`` overrides
    :class:`optim_formats.FormatsConfig` fields."""
    return optim_formats.run(
        _config(optim_formats, quick, **config), out=out, progress=progress, verbose=verbose
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m mlmath_native.demo",
        description="Small models trained on mlmath_native's kernels (needs scikit-learn, "
        'matplotlib and tqdm: pip install "mlmath_native[demo]").',
    )
    sub = p.add_subparsers(
        dest="demo", required=True, metavar="{digits,transformer,regression,optim_formats}"
    )

    def common(sp: argparse.ArgumentParser, out_default: str | None, out_help: str) -> None:
        sp.add_argument("--quick", action="store_true", help="a run of a few seconds")
        sp.add_argument("--seed", type=int, help="initial weights and batch order (default 0)")
        sp.add_argument("--out", metavar="PATH", default=out_default, help=out_help)
        sp.add_argument("--threads", type=int, metavar="N", help="mlmath_native threads")
        sp.add_argument("--no-progress", action="store_true", help="no progress bar")

    d = sub.add_parser("digits", help="a CNN on the 8x8 handwritten digits")
    common(d, "digits.png", "the plot (default: digits.png); '' for none")
    d.add_argument("--epochs", type=int, help="default 30 (quick: 3)")
    d.add_argument("--batch-size", type=int, help="default 64")
    d.add_argument("--lr", type=float, help="Adam's learning rate (default 2e-3)")
    d.add_argument("--dtype", choices=("float32", "float64"), help="default float32")

    t = sub.add_parser("transformer", help="a character transformer on the Zen of Python")
    common(t, None, "also plot the loss curve to PATH")
    t.add_argument("--steps", type=int, help="default 1200 (quick: 300)")
    t.add_argument("--batch-size", type=int, help="default 16")
    t.add_argument("--layers", type=int, help="transformer blocks (default 2)")
    t.add_argument("--lr", type=float, help="AdamW's peak learning rate (default 3e-3)")
    t.add_argument("--temperature", type=float, help="for the samples (default 0.7)")
    t.add_argument("--dtype", choices=("float32", "float64"), help="default float32")

    r = sub.add_parser("regression", help="linear and logistic regression on breast cancer")
    common(r, None, "also plot the objective gaps per step to PATH")
    r.add_argument("--steps", type=int, help="at most this many steps (default 20000)")
    r.add_argument("--tol", type=float, help="stop at ||grad|| <= TOL (default 1e-12)")
    r.add_argument("--C", type=float, help="inverse L2 strength, as sklearn's (default 1)")
    r.add_argument(
        "--no-momentum", action="store_true", help="plain gradient descent (slow: see why)"
    )

    o = sub.add_parser("optim_formats", help="AdamW state formats against float32 AdamW")
    common(o, "optim_formats.png", "the plot (default: optim_formats.png); '' for none")
    o.add_argument("--steps", type=int, help="transformer steps (default 300; quick: 40)")
    o.add_argument("--seeds", type=int, metavar="N", help="initial weights per format (default 3)")
    o.add_argument(
        "--models", choices=("transformer", "mlp", "both"), help="default both (mlp: torch)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kw: dict[str, Any] = {"seed": args.seed, "threads": args.threads}
    if args.demo == "digits":
        kw.update(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, dtype=args.dtype)
        fn = run_digits
    elif args.demo == "transformer":
        kw.update(
            steps=args.steps,
            batch_size=args.batch_size,
            layers=args.layers,
            lr=args.lr,
            temperature=args.temperature,
            dtype=args.dtype,
        )
        fn = run_transformer
    elif args.demo == "optim_formats":
        kw = {"threads": args.threads, "steps": args.steps}
        if args.seed is not None or args.seeds is not None:
            first, n = args.seed or 0, args.seeds or (2 if args.quick else 3)
            kw["seeds"] = tuple(range(first, first + n))
        if args.models in ("transformer", "mlp"):
            kw["models"] = (args.models,)
        fn = run_optim_formats
    else:
        kw.update(steps=args.steps, tol=args.tol, C=args.C)
        if args.no_momentum:
            kw["momentum"] = False
        fn = run_regression
    try:
        fn(quick=args.quick, out=args.out or None, progress=not args.no_progress, **kw)
    except ImportError as exc:
        print(f"mlmath_native.demo {args.demo}: {exc}", file=sys.stderr)
        return 2
    return 0
