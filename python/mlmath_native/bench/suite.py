"""The benchmark cases.

A case is one row of the results table: a kernel on one shape. Each contender is given as a
*factory*: a function that receives the inputs made by ``setup`` and returns a zero-argument
callable to time. Anything that should not be timed (output buffers, torch tensors, bound
arguments) is prepared in the factory. A factory may return ``None`` when the contender cannot
run this case (for example a PyTorch op that is missing in the installed version).

To add a case, append a ``Case`` to ``CASES`` (or write a helper like ``softmax_cases`` that
returns several), e.g.::

    CASES.append(Case(
        name="sgd",
        shape=(16 << 20,),
        label="{0} params",
        setup=lambda shape: {"p": randn(shape), "g": randn(shape)},
        ours=lambda d: lambda: mn.sgd_step(d["p"], d["g"], lr=0.1),
        numpy=lambda d: lambda: np.subtract(d["p"], 0.1 * d["g"], out=d["p"]),
        torch=_torch_sgd,
        work=lambda d: 3 * d["p"].nbytes,   # read p, read g, write p
        unit="bytes",
    ))

``work`` is the number of bytes moved (``unit="bytes"``, compared with the copy bandwidth) or
floating-point operations (``unit="flops"``, compared with the sgemm figure) per call.
PyTorch factories import torch themselves; the runner only calls them when torch imports.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

import mlmath_native as mn

Inputs = dict[str, Any]
Factory = Callable[[Inputs], "Callable[[], Any] | None"]


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]
    setup: Callable[[tuple[int, ...]], Inputs]
    ours: Factory
    numpy: Factory | None
    torch: Factory | None
    work: Callable[[Inputs], float]
    unit: Literal["bytes", "flops"] = "bytes"
    label: str | None = None  # format string for the shape, e.g. "N{0} C{1} {2}x{3} K{4}"
    quick_shape: tuple[int, ...] | None = None  # default: first dimension divided by 4

    def shape_for(self, quick: bool) -> tuple[int, ...]:
        if not quick:
            return self.shape
        if self.quick_shape is not None:
            return self.quick_shape
        return (max(1, self.shape[0] // 4),) + self.shape[1:]

    def shape_label(self, quick: bool = False) -> str:
        shape = self.shape_for(quick)
        if self.label is not None:
            return self.label.format(*shape)
        return "x".join(str(d) for d in shape)


def randn(shape: tuple[int, ...], seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=dtype)


def tensor(a: np.ndarray):
    """``torch.from_numpy(a)``, also for ml_dtypes.bfloat16 arrays (as torch.bfloat16 with the
    same bits; NumPy has no bfloat16 of its own).  Shares memory either way."""
    import torch

    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _logits(shape: tuple[int, ...]) -> Inputs:
    return {"x": randn(shape) * np.float32(3.0)}


def _torch_x(d: Inputs):
    import torch

    return torch, tensor(d["x"])


# --- softmax family: NumPy formulas as written --------------------------------------------


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_softmax_out(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    np.subtract(x, x.max(axis=-1, keepdims=True), out=out)
    np.exp(out, out=out)
    return np.divide(out, out.sum(axis=-1, keepdims=True), out=out)


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    s = x - x.max(axis=-1, keepdims=True)
    return s - np.log(np.exp(s).sum(axis=-1, keepdims=True))


def np_log_softmax_out(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    np.subtract(x, x.max(axis=-1, keepdims=True), out=out)
    return np.subtract(out, np.log(np.exp(out).sum(axis=-1, keepdims=True)), out=out)


def np_logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return np.log(np.exp(x - m).sum(axis=-1)) + m[..., 0]


def _torch_aten_out(op_name: str) -> Factory:
    """Factory for ``torch.ops.aten.<op_name>.out(x, -1, False, out=y)``, or None if missing."""

    def factory(d: Inputs):
        torch, xt = _torch_x(d)
        try:
            op = getattr(torch.ops.aten, op_name).out
        except (AttributeError, RuntimeError):
            return None
        yt = torch.empty_like(xt)
        return lambda: op(xt, -1, False, out=yt)

    return factory


def softmax_cases(
    name: str, np_alloc: Callable, np_out: Callable, shapes: list[tuple[int, ...]]
) -> list[Case]:
    """Two rows per shape for ``mn.<name>``: the allocating call and the ``out=buf`` call.

    PyTorch contenders: ``torch.<name>(x, -1)`` and ``torch.ops.aten._<name>.out``.
    """

    def ours_alloc(d):
        fn = getattr(mn, name)
        return lambda: fn(d["x"])

    def ours_out(d):
        fn, buf = getattr(mn, name), np.empty_like(d["x"])
        return lambda: fn(d["x"], out=buf)

    def numpy_alloc(d):
        return lambda: np_alloc(d["x"])

    def numpy_out(d):
        buf = np.empty_like(d["x"])
        return lambda: np_out(d["x"], buf)

    def torch_alloc(d):
        torch, xt = _torch_x(d)
        fn = getattr(torch, name)
        return lambda: fn(xt, -1)

    torch_out = _torch_aten_out(f"_{name}")
    cases = []
    for shape in shapes:
        common = dict(shape=shape, setup=_logits, work=lambda d: 2 * d["x"].nbytes)
        cases.append(
            Case(name=name, ours=ours_alloc, numpy=numpy_alloc, torch=torch_alloc, **common)
        )
        cases.append(
            Case(name=f"{name} out=", ours=ours_out, numpy=numpy_out, torch=torch_out, **common)
        )
    return cases


def _logsumexp_torch(d: Inputs):
    torch, xt = _torch_x(d)
    return lambda: torch.logsumexp(xt, -1)


CASES: list[Case] = [
    *softmax_cases(
        "softmax", np_softmax, np_softmax_out, [(4096, 4096), (65536, 128), (256, 32000)]
    ),
    *softmax_cases("log_softmax", np_log_softmax, np_log_softmax_out, [(4096, 4096)]),
    Case(
        name="logsumexp",
        shape=(4096, 4096),
        setup=_logits,
        ours=lambda d: lambda: mn.logsumexp(d["x"]),
        numpy=lambda d: lambda: np_logsumexp(d["x"]),
        torch=_logsumexp_torch,
        work=lambda d: d["x"].nbytes + d["x"].nbytes // d["x"].shape[-1],  # read x, write rows
    ),
]


# --- cross-entropy: int labels, mean reduction ------------------------------------------------


def _ce_inputs(shape: tuple[int, ...]) -> Inputs:
    n, c = shape
    return {"x": randn(shape) * np.float32(3.0), "t": np.random.default_rng(1).integers(0, c, n)}


def np_cross_entropy(x: np.ndarray, t: np.ndarray) -> np.floating:
    m = x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(axis=-1)) + m[:, 0]
    return np.mean(lse - x[np.arange(len(t)), t])


def np_cross_entropy_grad(x: np.ndarray, t: np.ndarray):
    """Loss and dloss/dx as a NumPy user writes them: softmax, then subtract the one-hot."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    p = e / e.sum(axis=-1, keepdims=True)
    rows = np.arange(len(t))
    loss = -np.mean(np.log(p[rows, t]))
    p[rows, t] -= 1
    p /= len(t)
    return loss, p


def _torch_ce(d: Inputs):
    import torch

    xt, tt = tensor(d["x"]), torch.from_numpy(d["t"])
    return lambda: torch.nn.functional.cross_entropy(xt, tt)


def _torch_ce_grad(d: Inputs):
    """PyTorch forward + autograd backward, the way a training step computes it."""
    import torch

    x, tt = tensor(d["x"]), torch.from_numpy(d["t"])

    def step():
        xg = x.detach().requires_grad_()
        torch.nn.functional.cross_entropy(xg, tt).backward()
        return xg.grad

    return step


def cross_entropy_cases() -> list[Case]:
    loss = Case(
        name="cross_entropy",
        shape=(4096, 32000),
        setup=_ce_inputs,
        ours=lambda d: lambda: mn.cross_entropy(d["x"], d["t"]),
        numpy=lambda d: lambda: np_cross_entropy(d["x"], d["t"]),
        torch=_torch_ce,
        work=lambda d: d["x"].nbytes,  # read the logits once
    )
    grad = [
        Case(
            name="cross_entropy+grad",
            shape=shape,
            setup=_ce_inputs,
            ours=lambda d: lambda: mn.cross_entropy(d["x"], d["t"], return_grad=True),
            numpy=lambda d: lambda: np_cross_entropy_grad(d["x"], d["t"]),
            torch=_torch_ce_grad,
            work=lambda d: 2 * d["x"].nbytes,  # read the logits, write the gradient
        )
        for shape in [(4096, 32000), (65536, 10)]
    ]
    return [loss, *grad]


CASES.extend(cross_entropy_cases())


# --- fused linear + cross-entropy: loss and d_hidden, d_weight (no bias) -----------------------


def _lce_inputs(shape: tuple[int, ...]) -> Inputs:
    n, d, v = shape
    w = randn((v, d), seed=2) * np.float32(d**-0.5)
    return {"h": randn((n, d)), "w": w, "t": np.random.default_rng(1).integers(0, v, n)}


def np_linear_cross_entropy_grad(h: np.ndarray, w: np.ndarray, t: np.ndarray):
    """The NumPy way: the logits, the cross-entropy's gradient, two products."""
    loss, g = np_cross_entropy_grad(h @ w.T, t)
    return loss, g @ w, g.T @ h


def _torch_lce_grad(d: Inputs):
    """F.linear + F.cross_entropy + backward (PyTorch eager; it holds the logits)."""
    import torch

    h, w, t = tensor(d["h"]), tensor(d["w"]), torch.from_numpy(d["t"])

    def step():
        hg, wg = h.detach().requires_grad_(), w.detach().requires_grad_()
        torch.nn.functional.cross_entropy(torch.nn.functional.linear(hg, wg), t).backward()
        return hg.grad, wg.grad

    return step


CASES.append(
    Case(
        name="linear_cross_entropy+grad",
        shape=(1024, 1024, 32000),
        setup=_lce_inputs,
        ours=lambda d: lambda: mn.linear_cross_entropy(d["h"], d["w"], d["t"], return_grad=True),
        numpy=lambda d: lambda: np_linear_cross_entropy_grad(d["h"], d["w"], d["t"]),
        torch=_torch_lce_grad,
        work=lambda d: 6.0 * d["h"].shape[0] * d["w"].size,  # three N x V x D products
        unit="flops",
        label="N{0} D{1} V{2}",
        quick_shape=(256, 256, 8000),
    )
)


# --- optimizers: 16M float32 params, one step -------------------------------------------------


def _optim_inputs(shape: tuple[int, ...]) -> Inputs:
    """shape = (total params, tensors): the params split into equal tensors, with grads."""
    total, tensors = shape
    sizes = [total // tensors] * tensors
    rng = np.random.default_rng(2)
    params = [rng.standard_normal(n, dtype=np.float32) for n in sizes]
    grads = [rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3) for n in sizes]
    return {"params": params, "grads": grads, "n": sum(sizes)}


def _ours_optim(cls, **opts) -> Factory:
    def factory(d: Inputs):
        opt = cls(d["params"], **opts)
        return lambda: opt.step(d["grads"])

    return factory


def _torch_optim(name: str, **opts) -> Factory:
    def factory(d: Inputs):
        import torch

        params = [tensor(p.copy()) for p in d["params"]]
        for p, g in zip(params, d["grads"], strict=True):
            p.grad = tensor(g)
        opt = getattr(torch.optim, name)(params, **opts)
        return opt.step

    return factory


def _numpy_sgd(momentum: float) -> Factory:
    def factory(d: Inputs):
        params = [p.copy() for p in d["params"]]
        bufs = [np.zeros_like(p) for p in params]

        def step():
            for p, g, b in zip(params, d["grads"], bufs, strict=True):
                if momentum:
                    b *= momentum
                    b += g
                    p -= 0.01 * b
                else:
                    p -= 0.01 * g

        return step

    return factory


def _numpy_adam(decoupled: bool) -> Factory:
    """Adam as a NumPy user writes it: whole-array expressions, state updated in place."""

    def factory(d: Inputs):
        params = [p.copy() for p in d["params"]]
        ms = [np.zeros_like(p) for p in params]
        vs = [np.zeros_like(p) for p in params]
        t = [0]
        b1, b2, lr, eps, wd = 0.9, 0.999, 1e-3, 1e-8, 1e-2

        def step():
            t[0] += 1
            for p, g, m, v in zip(params, d["grads"], ms, vs, strict=True):
                if decoupled:
                    p *= 1 - lr * wd
                m *= b1
                m += (1 - b1) * g
                v *= b2
                v += (1 - b2) * g * g
                p -= lr / (1 - b1 ** t[0]) * m / (np.sqrt(v / (1 - b2 ** t[0])) + eps)

        return step

    return factory


def optimizer_cases() -> list[Case]:
    total = 16 << 20
    quick = (4 << 20, 1)
    label = "16M params, {1} tensor(s)"
    cases = [
        Case(
            name="sgd",
            shape=(total, 1),
            quick_shape=quick,
            label=label,
            setup=_optim_inputs,
            ours=_ours_optim(mn.SGD, lr=0.01),
            numpy=_numpy_sgd(0.0),
            torch=_torch_optim("SGD", lr=0.01),
            work=lambda d: 3 * 4 * d["n"],  # read p, g; write p
        ),
        Case(
            name="sgd momentum",
            shape=(total, 1),
            quick_shape=quick,
            label=label,
            setup=_optim_inputs,
            ours=_ours_optim(mn.SGD, lr=0.01, momentum=0.9),
            numpy=_numpy_sgd(0.9),
            torch=_torch_optim("SGD", lr=0.01, momentum=0.9),
            work=lambda d: 5 * 4 * d["n"],  # read p, g, b; write p, b
        ),
    ]
    for name, cls, decoupled in [("adam", mn.Adam, False), ("adamw", mn.AdamW, True)]:
        torch_name = "AdamW" if decoupled else "Adam"
        for tensors in (1, 100):
            cases.append(
                Case(
                    name=f"{name} (torch fused)",
                    shape=(total, tensors),
                    quick_shape=(quick[0], tensors),
                    label=label,
                    setup=_optim_inputs,
                    ours=_ours_optim(cls, lr=1e-3),
                    numpy=_numpy_adam(decoupled),
                    torch=_torch_optim(torch_name, lr=1e-3, fused=True),
                    work=lambda d: 7 * 4 * d["n"],  # read p, g, m, v; write p, m, v
                )
            )
    # int8 state (Note [8-bit optimizer state]) against torch's fused float32 AdamW
    cases.append(
        Case(
            name="adamw int8 state",
            shape=(total, 1),
            quick_shape=(quick[0], 1),
            label=label,
            setup=_optim_inputs,
            ours=_ours_optim(mn.AdamW, lr=1e-3, state_dtype="int8"),
            numpy=None,
            torch=_torch_optim("AdamW", lr=1e-3, fused=True),
            # read p, g; write p (4 bytes each); read and write m, v (1 byte each) and their
            # float32 block scales (4 bytes per 256 values)
            work=lambda d: (3 * 4 + 4 * 1 + 4 * 4 / mn.optim.QUANT_BLOCK) * d["n"],
        )
    )
    return cases


CASES.extend(optimizer_cases())


# --- matmul and convolution forward -----------------------------------------------------------


def _matmul_inputs(shape: tuple[int, ...]) -> Inputs:
    m, k, n = shape
    return {"a": randn((m, k), seed=3), "b": randn((k, n), seed=4)}


def _torch_matmul(d: Inputs):
    import torch

    a, b = tensor(d["a"]), tensor(d["b"])
    return lambda: torch.matmul(a, b)


def np_conv2d(x: np.ndarray, w: np.ndarray, stride: int, padding: int, groups: int):
    """conv2d as a NumPy user writes it: a sliding-window view and one einsum per group."""
    xp = np.pad(x, [(0, 0), (0, 0), (padding, padding), (padding, padding)])
    r, s = w.shape[2:]
    win = np.lib.stride_tricks.sliding_window_view(xp, (r, s), axis=(2, 3))[
        :, :, ::stride, ::stride
    ]
    cg, kg = x.shape[1] // groups, w.shape[0] // groups
    outs = [
        np.einsum(
            "nchwrs,kcrs->nkhw",
            win[:, g * cg : (g + 1) * cg],
            w[g * kg : (g + 1) * kg],
            optimize=True,
        )
        for g in range(groups)
    ]
    return np.concatenate(outs, axis=1)


def _conv_case(n, c, hw, k, r, stride, padding, groups=1, name="conv2d"):
    def setup(shape):
        n_, c_, hw_, k_, r_ = shape
        return {
            "x": randn((n_, c_, hw_, hw_), seed=5),
            "w": randn((k_, c_ // groups, r_, r_), seed=6) * np.float32(0.1),
        }

    def ours(d):
        return lambda: mn.conv2d(d["x"], d["w"], stride=stride, padding=padding, groups=groups)

    def numpy(d):
        return lambda: np_conv2d(d["x"], d["w"], stride, padding, groups)

    def torch_(d):
        import torch

        x, w = tensor(d["x"]), tensor(d["w"])
        f = torch.nn.functional.conv2d
        return lambda: f(x, w, stride=stride, padding=padding, groups=groups)

    def flops(d):
        n_, c_, h_, w_ = d["x"].shape
        k_, cg, r_, s_ = d["w"].shape
        ho = (h_ + 2 * padding - r_) // stride + 1
        wo = (w_ + 2 * padding - s_) // stride + 1
        return 2.0 * n_ * k_ * cg * r_ * s_ * ho * wo

    return Case(
        name=name,
        shape=(n, c, hw, k, r),
        quick_shape=(max(1, n // 4), c, hw, k, r),
        label="N{0} C{1} {2}x{2} K{3} " + f"{r}x{r} s{stride}" + ("" if groups == 1 else " dw"),
        setup=setup,
        ours=ours,
        numpy=numpy,
        torch=torch_,
        work=flops,
        unit="flops",
    )


def _conv_train_case(n, c, hw, k, r, stride, padding):
    """Forward + backward (input, weight and bias gradients) of one layer: a training step."""

    def setup(shape):
        n_, c_, hw_, k_, r_ = shape
        x = randn((n_, c_, hw_, hw_), seed=5)
        w = randn((k_, c_, r_, r_), seed=6) * np.float32(0.1)
        ho = (hw_ + 2 * padding - r_) // stride + 1
        return {"x": x, "w": w, "g": randn((n_, k_, ho, ho), seed=7)}

    def ours(d):
        def step():
            y = mn.conv2d(d["x"], d["w"], stride=stride, padding=padding)
            grads = mn.conv2d_backward(d["x"], d["w"], d["g"], stride=stride, padding=padding)
            return y, grads

        return step

    def torch_(d):
        import torch

        x, w, g = (tensor(d[key]) for key in ("x", "w", "g"))
        b = torch.zeros(w.shape[0])

        def step():
            xg, wg, bg = (t.detach().requires_grad_() for t in (x, w, b))
            y = torch.nn.functional.conv2d(xg, wg, bg, stride=stride, padding=padding)
            y.backward(g)
            return xg.grad, wg.grad, bg.grad

        return step

    def flops(d):
        n_, c_, h_, w_ = d["x"].shape
        k_, _, r_, s_ = d["w"].shape
        ho = (h_ + 2 * padding - r_) // stride + 1
        return 3 * 2.0 * n_ * k_ * c_ * r_ * s_ * ho * ho  # forward, input and weight gradients

    return Case(
        name="conv2d fwd+bwd",
        shape=(n, c, hw, k, r),
        quick_shape=(max(1, n // 4), c, hw, k, r),
        label="N{0} C{1} {2}x{2} K{3} " + f"{r}x{r} s{stride}",
        setup=setup,
        ours=ours,
        numpy=None,
        torch=torch_,
        work=flops,
        unit="flops",
    )


CASES.extend(
    [
        Case(
            name="matmul",
            shape=(2048, 2048, 2048),
            quick_shape=(1024, 1024, 1024),
            label="{0}x{1}x{2}",
            setup=_matmul_inputs,
            ours=lambda d: lambda: mn.matmul(d["a"], d["b"]),
            numpy=lambda d: lambda: np.matmul(d["a"], d["b"]),
            torch=_torch_matmul,
            work=lambda d: 2.0 * d["a"].shape[0] * d["a"].shape[1] * d["b"].shape[1],
            unit="flops",
        ),
        Case(  # a long inner product: memory-bound (Note [dot-like shapes] in gemm.cpp)
            name="matmul dot-like",
            shape=(1, 10_000_000, 1),
            quick_shape=(1, 1_000_000, 1),
            label="{0}x{1}x{2}",
            setup=_matmul_inputs,
            ours=lambda d: lambda: mn.matmul(d["a"], d["b"]),
            numpy=lambda d: lambda: np.matmul(d["a"], d["b"]),
            torch=_torch_matmul,
            work=lambda d: float(d["a"].nbytes + d["b"].nbytes),
        ),
        _conv_case(8, 64, 56, 64, 3, 1, 1),
        _conv_case(8, 256, 14, 256, 3, 1, 1),
        _conv_case(4, 3, 224, 64, 7, 2, 3),
        _conv_case(32, 32, 32, 32, 3, 1, 1),
        _conv_case(8, 256, 56, 256, 3, 1, 1, groups=256, name="conv2d depthwise"),
        _conv_train_case(8, 64, 56, 64, 3, 1, 1),
        _conv_train_case(8, 256, 14, 256, 3, 1, 1),
        _conv_train_case(4, 3, 224, 64, 7, 2, 3),
        _conv_train_case(32, 32, 32, 32, 3, 1, 1),
    ]
)


# --- attention ------------------------------------------------------------------------------


def np_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool) -> np.ndarray:
    """The formula as written: softmax(q kᵀ / √D [+ causal mask]) v, materialising L x L."""
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * np.float32(1.0 / np.sqrt(q.shape[-1]))
    if causal:
        lq, lk = s.shape[-2:]
        s = np.where(np.tri(lq, lk, dtype=bool), s, np.float32(-np.inf))
    return np.matmul(np_softmax(s), v)


def _attention_inputs(shape: tuple[int, ...]) -> Inputs:
    b, h, length, d = shape
    return {key: randn((b, h, length, d), seed=i) for i, key in enumerate(("q", "k", "v", "g"))}


def _attention_flops(d: Inputs, causal: bool, passes: float) -> float:
    b, h, length, dim = d["q"].shape
    full = 4.0 * b * h * length * length * dim  # two GEMMs of 2 L^2 D flops
    return passes * (full / 2 if causal else full)


def _attention_case(b, h, length, d, causal: bool, numpy_ok: bool = True) -> Case:
    def torch_(data):
        import torch

        q, k, v = (tensor(data[key]) for key in ("q", "k", "v"))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        return lambda: sdpa(q, k, v, is_causal=causal)

    return Case(
        name="attention causal" if causal else "attention",
        shape=(b, h, length, d),
        quick_shape=(b, h, max(128, length // 4), d),
        label="B{0} H{1} L{2} D{3}",
        setup=_attention_inputs,
        ours=lambda data: lambda: mn.attention(data["q"], data["k"], data["v"], causal=causal),
        numpy=(lambda data: lambda: np_attention(data["q"], data["k"], data["v"], causal))
        if numpy_ok
        else None,
        torch=torch_,
        work=lambda data: _attention_flops(data, causal, 1.0),
        unit="flops",
    )


def _torch_sdpa_train(data: Inputs, options: Callable[[Any, int], dict[str, Any]]):
    """SDPA forward + autograd backward on q, k, v (gradient g), with the keyword arguments
    ``options(torch, L)``."""
    import torch

    q, k, v, g = (tensor(data[key]) for key in ("q", "k", "v", "g"))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    kwargs = options(torch, q.shape[-2])

    def step():
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        sdpa(qg, kg, vg, **kwargs).backward(g)
        return qg.grad, kg.grad, vg.grad

    return step


def _attention_train_case(b, h, length, d, causal: bool) -> Case:
    """Forward (with lse) + attention_backward, against SDPA + autograd backward."""

    def ours(data):
        q, k, v, g = (data[key] for key in ("q", "k", "v", "g"))

        def step():
            out, lse = mn.attention(q, k, v, causal=causal, return_lse=True)
            return mn.attention_backward(q, k, v, out, lse, g, causal=causal)

        return step

    return Case(
        name="attention fwd+bwd causal" if causal else "attention fwd+bwd",
        shape=(b, h, length, d),
        quick_shape=(b, h, max(128, length // 4), d),
        label="B{0} H{1} L{2} D{3}",
        setup=_attention_inputs,
        ours=ours,
        numpy=None,
        torch=lambda data: _torch_sdpa_train(data, lambda torch, length: {"is_causal": causal}),
        # forward 2 GEMMs, backward 5 (dV, dP, dK and dQ, with S recomputed): 3.5x the forward
        work=lambda data: _attention_flops(data, causal, 3.5),
        unit="flops",
    )


CASES.extend(
    [
        _attention_case(1, 8, 2048, 64, False),
        _attention_case(1, 8, 2048, 64, True),
        _attention_case(4, 12, 512, 64, False),
        _attention_case(1, 4, 8192, 64, True, numpy_ok=False),  # L x L: 1 GiB per head in NumPy
        _attention_train_case(1, 8, 2048, 64, False),
        _attention_train_case(1, 8, 2048, 64, True),
    ]
)


# --- attention for today's models (issue 22): decoding, sliding windows, packed batches ----------


def _decode_case(hq: int, hkv: int, lk: int, d: int, num_splits: int = 0) -> Case:
    """One query per head against a KV cache of lk keys (B1, Lq 1), against SDPA with grouped
    heads; work is the bytes of K and V, which a decode reads once (Note [decode])."""

    def setup(shape):
        _, hq_, hkv_, lk_, d_ = shape
        return {
            "q": randn((1, hq_, 1, d_), seed=0),
            "k": randn((1, hkv_, lk_, d_), seed=1),
            "v": randn((1, hkv_, lk_, d_), seed=2),
        }

    def torch_(data):
        import torch

        q, k, v = (tensor(data[key]) for key in ("q", "k", "v"))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        return lambda: sdpa(q, k, v, enable_gqa=True)

    return Case(
        name="attention decode" + (" one chunk" if num_splits == 1 else ""),
        shape=(1, hq, hkv, lk, d),
        quick_shape=(1, hq, hkv, lk // 4, d),
        label="B{0} Hq{1} Hkv{2} Lk{3} D{4}",
        setup=setup,
        ours=lambda data: (
            lambda: mn.attention(data["q"], data["k"], data["v"], num_splits=num_splits)
        ),
        numpy=None,
        torch=torch_,
        work=lambda data: float(data["k"].nbytes + data["v"].nbytes),
        unit="bytes",
    )


def _band_pairs(length: int, window: int) -> float:
    """(query, key) pairs a causal window of ``window`` keys back attends over L queries."""
    full = min(length, window + 1)
    return full * (full + 1) / 2 + (length - full) * (window + 1)


def _window_train_case(length: int, window: int, with_torch: bool) -> Case:
    """Causal sliding-window attention forward + backward (B1 H8 D64); PyTorch: SDPA with the
    equivalent boolean mask (its CPU kernels have no window: they compute every pair)."""

    def setup(shape):
        b, h, length_, d, _ = shape
        return _attention_inputs((b, h, length_, d))

    def ours(data):
        q, k, v, g = (data[key] for key in ("q", "k", "v", "g"))
        opts = {"causal": True, "window": (window, None)}

        def step():
            out, lse = mn.attention(q, k, v, return_lse=True, **opts)
            return mn.attention_backward(q, k, v, out, lse, g, **opts)

        return step

    def band(torch, length_):
        i = torch.arange(length_)
        return {"attn_mask": (i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - window)}

    def flops(data):
        b, h, length_, d = data["q"].shape
        return 3.5 * 4.0 * b * h * d * _band_pairs(length_, window)

    return Case(
        name="attention fwd+bwd window",
        shape=(1, 8, length, 64, window),
        quick_shape=(1, 8, length // 4, 64, window // 4),
        label="B{0} H{1} L{2} D{3} window {4}",
        setup=setup,
        ours=ours,
        numpy=None,
        torch=(lambda data: _torch_sdpa_train(data, band)) if with_torch else None,
        work=flops,
        unit="flops",
    )


# 16 sequences from 64 to 2048 tokens, 16384 in all (the benchmark's packed batch)
VARLEN_LENGTHS = (
    64,
    128,
    256,
    384,
    512,
    640,
    704,
    768,
    896,
    1344,
    1472,
    1600,
    1728,
    1856,
    1984,
    2048,
)


def _varlen_case(how: str) -> Case:
    """Causal attention over a packed batch of VARLEN_LENGTHS (H8 D64): ``how`` is "packed" (one
    call with cu_seqlens), "one by one" (a call per sequence) or "padded" (the batch padded to
    the longest, every padded position computed).  PyTorch: SDPA on the padded batch with a
    causal and key-padding mask (its CPU kernels take no packed batch)."""

    def setup(shape):
        h, d = shape[1], shape[2]
        lengths = [n // shape[0] for n in VARLEN_LENGTHS]
        cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        q, k, v = (randn((int(cu[-1]), h, d), seed=i) for i in range(3))
        longest = max(lengths)
        padded = {}
        for name, a in (("q", q), ("k", k), ("v", v)):
            p = np.zeros((len(lengths), h, longest, d), np.float32)
            for s, n in enumerate(lengths):
                p[s, :, :n] = np.swapaxes(a[cu[s] : cu[s + 1]], 0, 1)
            padded[name] = p
        return {"q": q, "k": k, "v": v, "cu": cu, "padded": padded, "lengths": lengths}

    def ours(data):
        q, k, v, cu = data["q"], data["k"], data["v"], data["cu"]
        if how == "packed":
            return lambda: mn.attention(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)
        if how == "one by one":
            seqs = [
                tuple(np.swapaxes(a[cu[s] : cu[s + 1]], 0, 1) for a in (q, k, v))
                for s in range(cu.size - 1)
            ]
            return lambda: [mn.attention(*qkv, causal=True) for qkv in seqs]
        p = data["padded"]
        return lambda: mn.attention(p["q"], p["k"], p["v"], causal=True)

    def torch_(data):
        import torch

        p = data["padded"]
        q, k, v = (tensor(p[key]) for key in ("q", "k", "v"))
        longest = q.shape[-2]
        i = torch.arange(longest)
        lengths = torch.tensor(data["lengths"])
        allowed = (i[None, :] <= i[:, None])[None] & (i[None, None, :] < lengths[:, None, None])
        mask = allowed[:, None]  # (B, 1, L, L)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        return lambda: sdpa(q, k, v, attn_mask=mask)

    def flops(data):
        heads, dim = data["q"].shape[1:]
        return sum(4.0 * heads * dim * n * (n + 1) / 2 for n in data["lengths"])

    return Case(
        name=f"attention varlen {how}",
        shape=(1, 8, 64),  # (length divisor, H, D)
        quick_shape=(4, 8, 64),
        label="16 seqs 64..2048 /{0} H{1} D{2}",
        setup=setup,
        ours=ours,
        numpy=None,
        torch=torch_ if how == "packed" else None,
        work=flops,
        unit="flops",
    )


CASES.extend(
    [
        _decode_case(32, 8, 32768, 128),
        _decode_case(4, 1, 131072, 128),
        _decode_case(4, 1, 131072, 128, num_splits=1),
        _attention_train_case(1, 8, 4096, 64, True),
        _window_train_case(32768, 4096, with_torch=False),
        _window_train_case(8192, 4096, with_torch=True),
        _varlen_case("packed"),
        _varlen_case("one by one"),
        _varlen_case("padded"),
    ]
)

# --- 16-bit storage: bfloat16 data, float32 math (Note [16-bit storage]) --------------------
#
# A row "<case> bf16" is an existing case with its float inputs rounded to ml_dtypes.bfloat16:
# our kernel on the bfloat16 arrays, PyTorch's on torch.bfloat16 tensors of the same bits (its
# own CPU kernels), and for NumPy, where a row has it, what a NumPy user does without a bfloat16
# kernel: convert to float32, compute, convert back.  Work counts 16-bit bytes, so a
# bandwidth-bound bf16 row at its float32 row's GB/s runs twice as fast.  Needs ml_dtypes
# (pip install ml_dtypes; JAX installs it too).


def _bf16() -> Any:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def _to_bf16(d: Inputs, names: tuple[str, ...]) -> Inputs:
    """The float32 inputs ``names`` of a setup rounded to bfloat16 (lists element-wise)."""

    def convert(v: Any) -> Any:
        return [convert(a) for a in v] if isinstance(v, list) else v.astype(_bf16())

    return {k: (convert(v) if k in names else v) for k, v in d.items()}


def _numpy_through_float32(formula: Callable[..., Any], *names: str) -> Factory:
    """NumPy's contender for bf16 data: widen the inputs, ``formula(*inputs)``, narrow."""

    def factory(d: Inputs):
        def call():
            out = formula(*(d[n].astype(np.float32) for n in names))
            return (
                [a.astype(_bf16()) for a in out] if isinstance(out, tuple) else out.astype(_bf16())
            )

        return call

    return factory


def bf16_variant(
    case: Case,
    names: tuple[str, ...],
    *,
    numpy: Factory | None = None,
    torch: Factory | None | Literal["same"] = "same",
    ours: Factory | None = None,
    name: str | None = None,
    shape: tuple[int, ...] | None = None,
    quick_shape: tuple[int, ...] | None = None,
    work: Callable[[Inputs], float] | None = None,
) -> Case:
    """``case`` on bfloat16 copies of its inputs ``names``.  Its work is the base case's work
    on the bfloat16 inputs (a byte count from ``nbytes`` counts 16-bit bytes by itself) unless
    ``work`` is given."""
    setup = case.setup

    return replace(
        case,
        name=name or f"{case.name} bf16",
        shape=shape or case.shape,
        quick_shape=quick_shape or case.quick_shape,
        setup=lambda s: _to_bf16(setup(s), names),
        ours=ours or case.ours,
        numpy=numpy,
        torch=case.torch if torch == "same" else torch,
        work=work or case.work,
    )


def sixteen_bit_cases() -> list[Case]:
    by_name = {(c.name, c.shape): c for c in CASES}

    def base(name: str, shape: tuple[int, ...]) -> Case:
        return by_name[(name, shape)]

    matmul = base("matmul", (2048, 2048, 2048))
    return [
        bf16_variant(
            base("softmax", (4096, 4096)), ("x",), numpy=_numpy_through_float32(np_softmax, "x")
        ),
        bf16_variant(
            base("cross_entropy+grad", (4096, 32000)),
            ("x",),
            numpy=lambda d: (
                lambda: [
                    a.astype(_bf16())
                    for a in np_cross_entropy_grad(d["x"].astype(np.float32), d["t"])
                ]
            ),
        ),
        # PyTorch's bf16 matmul takes about a minute here (no bf16 GEMM for AVX2 CPUs): the
        # 2048^3 row runs without it and a 128-row slice gives PyTorch's rate
        bf16_variant(matmul, ("a", "b"), torch=None),
        bf16_variant(
            matmul,
            ("a", "b"),
            name="matmul bf16 slice",
            shape=(128, 2048, 2048),
            quick_shape=(64, 1024, 1024),
        ),
        bf16_variant(base("conv2d", (8, 64, 56, 64, 3)), ("x", "w")),
        bf16_variant(base("attention", (1, 8, 2048, 64)), ("q", "k", "v")),
        bf16_variant(base("attention fwd+bwd", (1, 8, 2048, 64)), ("q", "k", "v", "g")),
        bf16_variant(
            base("adamw (torch fused)", (16 << 20, 1)),
            ("params", "grads"),
            name="adamw bf16 state",
            ours=_ours_optim(mn.AdamW, lr=1e-3, state_dtype="bfloat16"),
            torch=_torch_optim("AdamW", lr=1e-3),
            work=lambda d: 7 * 2 * d["n"],  # read p, g, m, v; write p, m, v: 2 bytes each
        ),
    ]


if importlib.util.find_spec("ml_dtypes") is not None:
    CASES.extend(sixteen_bit_cases())


# --- Dask: our kernels on a chunked array, Dask's threaded vs its synchronous scheduler -------


def _dask_inputs(shape: tuple[int, ...]) -> Inputs:
    """(rows, cols) float32 logits as a dask array of 16 row blocks."""
    import dask.array as da

    x = randn(shape) * np.float32(3.0)
    return {"x": x, "dx": da.from_array(x, chunks=(max(1, shape[0] // 16), shape[1]))}


def _dask_compute(scheduler: str, numpy_formula: bool) -> Factory:
    """``softmax(dx).compute(scheduler=...)`` with one kernel thread per task, so that only
    Dask's own threads (as many as the benchmark's --threads) run blocks in parallel; the
    graph is built once, outside the clock.  ``numpy_formula``: the NumPy formula as written,
    on the dask array (Dask's elementwise and reduction tasks)."""

    def factory(d: Inputs):
        import mlmath_native.dask as mnd

        y = np_softmax(d["dx"]) if numpy_formula else mnd.softmax(d["dx"])
        opts = {"num_workers": mn.get_num_threads()} if scheduler == "threads" else {}

        def call():
            before = mn.get_num_threads()
            mn.set_num_threads(1)
            try:
                return y.compute(scheduler=scheduler, **opts)
            finally:
                mn.set_num_threads(before)

        return call

    return factory


def dask_cases() -> list[Case]:
    """Two rows: "dask softmax threads" and "dask softmax synchronous" (the same graph); their
    ``ours_ms`` ratio (see :func:`dask_threads_speedup`) is what Dask's threads gain from
    kernels that release the GIL."""
    return [
        Case(
            name=f"dask softmax {scheduler}",
            shape=(8192, 4096),
            label="{0}x{1}, 16 blocks",
            setup=_dask_inputs,
            ours=_dask_compute(scheduler, numpy_formula=False),
            numpy=_dask_compute(scheduler, numpy_formula=True),
            torch=None,
            work=lambda d: 2 * d["x"].nbytes,
        )
        for scheduler in ("threads", "synchronous")
    ]


def dask_threads_speedup(rows: list[dict]) -> float | None:
    """synchronous / threads time of our dask softmax rows, when both ran."""
    ms = {r["name"]: r["ours_ms"] for r in rows}
    sync, threads = ms.get("dask softmax synchronous"), ms.get("dask softmax threads")
    return sync / threads if sync and threads else None


if importlib.util.find_spec("dask") is not None:
    CASES.extend(dask_cases())


def select(only: list[str] | None, cases: list[Case] | None = None) -> list[Case]:
    """Cases whose name contains any of the substrings in `only` (all cases if empty)."""
    cases = CASES if cases is None else cases
    if not only:
        return list(cases)
    return [c for c in cases if any(s in c.name for s in only)]
