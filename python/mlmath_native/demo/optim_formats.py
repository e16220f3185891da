"""Optimizer state formats against float32 AdamW: does training still converge?

Two models, each trained with every format on the same seeds (same initial weights, same
batches):

- ``transformer``: the character transformer of :mod:`.transformer` (NumPy and mlmath_native
  kernels; its quick size, cosine learning rate).  Baseline: our float32 AdamW; with torch
  installed, torch.optim.AdamW on the same NumPy weights is a row too.
- ``mlp``: a PyTorch MLP (64-128-128-10, ReLU) on the 8x8 digits of :mod:`.digits`, its
  ``model.parameters()`` stepped by ``mn.AdamW`` (torch CPU tensors, updated in place).
  Baseline: torch.optim.AdamW in float32.  Needs torch (skipped with a message without it).

The formats are the rows of :data:`FORMATS`; a row whose options this build's ``mn.AdamW``
refuses (e.g. ``state_dtype="int8"`` before it exists) is reported as skipped, so a new state
format appears in the table once the optimizer accepts it.

Note [bfloat16 params in the demo]: the transformer's bfloat16 rows keep the weights in
bfloat16 arrays (what ``mn.AdamW`` updates, from bfloat16 gradients) and run the model on
float32 copies of them, refreshed after each step (the widening is exact): only the storage
format changes.  The MLP's bfloat16 rows are ``model.to(torch.bfloat16)``: the model also
computes in bfloat16, as bfloat16 training in PyTorch does.  Every bfloat16 row starts from
the float32 initial weights rounded to bfloat16.

"Within": a format's final loss (the mean training loss of the last ``tail`` steps, averaged
over the seeds) is within the margin when it differs from the baseline's by at most
``margin_sigmas`` standard deviations of the baseline's final loss across the seeds: the
format changes the result no more than changing the seed does.  The seeds draw the initial
weights; the batch order is the same for every seed and format (``data_seed``), so that the
spread is that of the training itself, not of which batches the last steps happen to see
(which would widen the margin several times over: the final batches' difficulty is common to
the formats of one seed).

Round to nearest stalls: an update smaller than half a unit in the last place of a bfloat16
weight (2**-9 of it: 1.2e-4 for a weight of 0.06) is rounded away at every step.
:func:`stall_run` trains the transformer at a constant learning rate below that and measures
how far the weights move: round to nearest leaves most weights bitwise unchanged, stochastic
rounding moves them as float32 does on average.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

import mlmath_native as mn

from . import digits, transformer
from ._common import DemoResult, Progress, log

Array = NDArray[Any]
Params = dict[str, Array]

#: the name of the baseline rows (each model's reference for "within")
OURS_FP32 = "fp32 state"
TORCH_FP32 = "torch.optim.AdamW fp32"


@dataclass(frozen=True)
class Format:
    """One row: the dtype the params are stored in and the ``mn.AdamW`` keyword arguments
    (``torch=True``: torch.optim.AdamW instead, float32)."""

    name: str
    params: str = "float32"
    options: Mapping[str, Any] = field(default_factory=dict)
    torch: bool = False


FORMATS: tuple[Format, ...] = (
    Format(TORCH_FP32, torch=True),
    Format(OURS_FP32),
    Format("bf16 state, SR", options={"state_dtype": "bfloat16", "stochastic_rounding": True}),
    Format("int8 state", options={"state_dtype": "int8"}),
    Format("bf16 params, nearest", params="bfloat16"),
    Format("bf16 params, SR", params="bfloat16", options={"stochastic_rounding": True}),
    Format(
        "bf16 params+state, SR",
        params="bfloat16",
        options={"state_dtype": "bfloat16", "stochastic_rounding": True},
    ),
    Format("bf16 params, fp32 master", params="bfloat16", options={"master_weights": True}),
)

#: the formats of the stall experiment (a tiny constant learning rate)
STALL_FORMATS = tuple(
    f
    for name in (OURS_FP32, "bf16 params, nearest", "bf16 params, SR")
    for f in FORMATS
    if f.name == name
)


@dataclass
class FormatsConfig:
    models: tuple[str, ...] = ("transformer", "mlp")
    seeds: tuple[int, ...] = (0, 1, 2)  # the initial weights
    data_seed: int = 0  # the batch order, the same for every seed (see the module's doc)
    steps: int = 300  # transformer steps per run
    mlp_epochs: int = 15  # of 1347 digits in batches of 64: 22 steps an epoch
    mlp_lr: float = 2e-3
    mlp_hidden: int = 128
    tail: int = 50  # final loss: the mean over the last `tail` steps
    margin_sigmas: float = 1.0
    stall_steps: int = 200
    stall_lr: float = 1e-5  # below half an ulp of bfloat16 weights of ~0.03 and more
    threads: int | None = None
    transformer: transformer.TransformerConfig = field(
        default_factory=lambda: transformer.quick_config(steps=300)
    )


def quick_config(**overrides: Any) -> FormatsConfig:
    """A run of a few seconds (the tests, ``--quick``)."""
    cfg = FormatsConfig(
        seeds=(0, 1),
        steps=40,
        mlp_epochs=2,
        tail=10,
        stall_steps=20,
        transformer=transformer.quick_config(steps=40, block=16, d_model=16),
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


# -- which formats this build supports ---------------------------------------------------------


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


def skip_reason(fmt: Format) -> str | None:
    """None when this installation can run ``fmt``, else why not (torch or ml_dtypes missing,
    or ``mn.AdamW`` refusing the options: a format not in this build yet)."""
    if fmt.torch:
        return None if _torch() is not None else "needs torch (pip install torch)"
    try:
        dtype = _param_dtype(fmt)
    except ImportError:
        return "needs ml_dtypes for bfloat16 arrays (pip install ml_dtypes)"
    try:
        mn.AdamW([np.zeros(4, dtype)], **fmt.options)
    except (ValueError, TypeError) as exc:
        return f"not in this build: {exc}"
    return None


def _param_dtype(fmt: Format) -> np.dtype[Any]:
    if fmt.params == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(fmt.params)


# -- the transformer ---------------------------------------------------------------------------


class _Bf16Storage:
    """Note [bfloat16 params in the demo]: the weights live in bfloat16 arrays that
    ``mn.AdamW`` updates; the model computes on ``params``, float32 copies of them."""

    def __init__(self, params: Params, lr: float, weight_decay: float, **options: Any) -> None:
        self.bf16 = _param_dtype(Format("", params="bfloat16"))
        self.params = params
        self.stored = {k: v.astype(self.bf16) for k, v in params.items()}
        self._refresh()
        self.opt = transformer.GroupedAdamW(self.stored, lr, weight_decay, **options)

    def _refresh(self) -> None:
        for k, v in self.stored.items():
            self.params[k][...] = v

    def set_lr(self, lr: float) -> None:
        self.opt.set_lr(lr)

    def step(self, grads: Params) -> None:
        self.opt.step({k: g.astype(self.bf16) for k, g in grads.items()})
        self._refresh()


class _TorchGroupedAdamW:
    """torch.optim.AdamW over the transformer's NumPy weights (shared memory), with the same
    two parameter groups as :class:`transformer.GroupedAdamW`."""

    def __init__(self, params: Params, lr: float, weight_decay: float) -> None:
        torch = _torch()
        self.torch = torch
        self.tensors = {k: torch.from_numpy(v) for k, v in params.items()}
        decay = [k for k, v in params.items() if transformer.decayed(k, v)]
        plain = [k for k in params if k not in decay]
        self.opt = torch.optim.AdamW(
            [
                {"params": [self.tensors[k] for k in decay], "weight_decay": weight_decay},
                {"params": [self.tensors[k] for k in plain], "weight_decay": 0.0},
            ],
            lr=lr,
        )

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr

    def step(self, grads: Params) -> None:
        for k, t in self.tensors.items():
            t.grad = self.torch.from_numpy(grads[k])
        self.opt.step()


def _transformer_optimizer(fmt: Format, params: Params, lr: float, weight_decay: float) -> Any:
    if fmt.torch:
        return _TorchGroupedAdamW(params, lr, weight_decay)
    if fmt.params == "bfloat16":
        return _Bf16Storage(params, lr, weight_decay, **fmt.options)
    return transformer.GroupedAdamW(params, lr, weight_decay, **fmt.options)


def _stored(opt: Any, params: Params) -> Params:
    """The weights as the optimizer stores them (bfloat16 for the bfloat16 rows)."""
    return opt.stored if isinstance(opt, _Bf16Storage) else params


def _zen() -> Array:
    text = transformer.zen_text()
    return transformer.Vocab(text).encode(text)


def train_transformer(
    fmt: Format, seed: int, tcfg: transformer.TransformerConfig, data: Array | None = None
) -> dict[str, Any]:
    """One run from the initial weights of ``seed`` on the batches of ``tcfg.seed``:
    ``losses`` per step, ``seconds``, the initial and final stored weights."""
    data = _zen() if data is None else data
    params = transformer.init_params(dataclasses.replace(tcfg, seed=seed), int(data.max()) + 1)
    opt = _transformer_optimizer(fmt, params, tcfg.lr, tcfg.weight_decay)
    start = {k: v.copy() for k, v in _stored(opt, params).items()}
    t0 = time.perf_counter()
    hist = transformer.train(params, opt, data, tcfg)
    return {
        "losses": np.array(hist["loss"]),
        "seconds": time.perf_counter() - t0,
        "start": start,
        "end": _stored(opt, params),
    }


# -- the PyTorch MLP ---------------------------------------------------------------------------


def _digits_flat() -> tuple[Array, Array]:
    x, y, _, _ = digits.load_data()
    return x.reshape(len(x), -1), y


def train_mlp(fmt: Format, seed: int, cfg: FormatsConfig, data: tuple[Array, Array]) -> dict:
    """One run of the torch MLP on the digits from the initial weights of ``seed``, on the
    batches of ``cfg.data_seed``: ``losses`` per step and ``seconds``."""
    torch = _torch()
    x_all, y_all = data
    torch.manual_seed(seed)
    h = cfg.mlp_hidden
    nn = torch.nn
    model = nn.Sequential(
        nn.Linear(x_all.shape[1], h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10)
    )
    dtype = torch.bfloat16 if fmt.params == "bfloat16" else torch.float32
    model = model.to(dtype)  # Note [bfloat16 params in the demo]
    params = list(model.parameters())
    if fmt.torch:
        opt = torch.optim.AdamW(params, lr=cfg.mlp_lr, weight_decay=1e-2)
    else:
        # detach(): the same storage, updated in place; DLPack refuses to export a tensor
        # that requires grad (every nn.Parameter)
        weights = [p.detach() for p in params]
        opt = mn.AdamW(weights, lr=cfg.mlp_lr, weight_decay=1e-2, **fmt.options)
    x, y = torch.from_numpy(x_all).to(dtype), torch.from_numpy(y_all)
    losses = []
    t0 = time.perf_counter()
    for idx in digits.batch_order(len(x_all), 64, cfg.mlp_epochs, cfg.data_seed):
        i = torch.from_numpy(idx)
        loss = torch.nn.functional.cross_entropy(model(x[i]).float(), y[i])
        model.zero_grad()
        loss.backward()
        if fmt.torch:
            opt.step()
        else:
            opt.step([p.grad for p in params])
        losses.append(loss.item())
    return {"losses": np.array(losses), "seconds": time.perf_counter() - t0}


# -- the comparison ----------------------------------------------------------------------------


def compare(
    runs: Mapping[str, Sequence[Array]], baseline: str, tail: int, sigmas: float
) -> tuple[list[dict[str, Any]], float]:
    """Rows of the table from the loss curves of each format (one per seed), and the margin:
    ``sigmas`` standard deviations of the baseline's final loss across the seeds."""
    final = {name: np.array([c[-tail:].mean() for c in curves]) for name, curves in runs.items()}
    base = final[baseline]
    spread = float(base.std(ddof=1)) if len(base) > 1 else float("nan")
    margin = sigmas * spread
    rows = []
    for name, f in final.items():
        diff = float(f.mean() - base.mean())
        rows.append(
            {
                "format": name,
                "final": float(f.mean()),
                "diff": diff,
                "rel": diff / float(base.mean()),
                "within": abs(diff) <= margin,
            }
        )
    return rows, margin


def _row_text(row: dict[str, Any], baseline: str) -> str:
    if "skip" in row:
        return f"  {row['format']:<26} skipped: {row['skip']}"
    within = "baseline" if row["format"] == baseline else ("yes" if row["within"] else "NO")
    return (
        f"  {row['format']:<26} {row['final']:>8.4f} {row['diff']:>+9.4f} {row['rel']:>+7.1%} "
        f"{within:>8} {row['seconds']:>7.2f}"
    )


def table(
    model: str, rows: list[dict[str, Any]], baseline: str, margin: float, n: int, tail: int
) -> str:
    head = (
        f"{model}: final loss = mean of the last {tail} steps, averaged over {n} seeds; "
        f"within = |diff| <= {margin:.4f}\n"
        f"  {'format':<26} {'final':>8} {'diff':>9} {'rel':>7} {'within':>8} {'wall s':>7}"
    )
    return "\n".join([head] + [_row_text(r, baseline) for r in rows])


# -- the stall of round to nearest -------------------------------------------------------------


def stall_run(
    tcfg: transformer.TransformerConfig, steps: int, lr: float, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """The transformer at the constant learning rate ``lr`` for ``steps`` steps, in each of
    :data:`STALL_FORMATS`.  Per format: ``losses``; ``moved``, the fraction of the weights
    that changed at all; ``progress``, its displacement of the weights projected on float32's,
    <d, d_fp32> / |d_fp32|^2: 1 where it went as far as float32 in float32's direction (on
    average: stochastic rounding), near 0 where it stalled."""
    tcfg = dataclasses.replace(tcfg, steps=steps, lr=lr, min_lr=lr)
    data = _zen()
    out: dict[str, dict[str, Any]] = {}
    ref = None
    for fmt in STALL_FORMATS:
        run = train_transformer(fmt, seed, tcfg, data)
        delta = np.concatenate(
            [
                (run["end"][k].astype(np.float64) - run["start"][k].astype(np.float64)).ravel()
                for k in run["start"]
            ]
        )
        ref = delta if ref is None else ref
        out[fmt.name] = {
            "losses": run["losses"],
            "moved": float(np.mean(delta != 0)),
            "progress": float(delta @ ref / (ref @ ref)),
        }
    return out


def stall_table(res: Mapping[str, Mapping[str, Any]], lr: float, tail: int) -> str:
    lines = [
        f"stall: transformer at a constant lr {lr:g}, {len(next(iter(res.values()))['losses'])} "
        "steps (moved: the fraction of the weights that changed; progress: the displacement "
        "of the weights projected on fp32's, 1 = as far as fp32)",
        f"  {'format':<26} {'first':>7} {'last':>7} {'moved':>7} {'progress':>9}",
    ]
    for name, r in res.items():
        first, last = r["losses"][:tail].mean(), r["losses"][-tail:].mean()
        lines.append(
            f"  {name:<26} {first:>7.4f} {last:>7.4f} {r['moved']:>7.1%} {r['progress']:>9.3f}"
        )
    return "\n".join(lines)


# -- the demo ----------------------------------------------------------------------------------


def _run_model(
    model: str,
    cfg: FormatsConfig,
    train: Callable[[Format, int], dict],
    baseline: str,
    progress: bool,
    verbose: bool,
) -> dict[str, Any]:
    curves: dict[str, list[Array]] = {}
    seconds: dict[str, float] = {}
    skipped = []
    todo = []
    for fmt in FORMATS:
        reason = skip_reason(fmt)
        if reason is None:
            todo.append(fmt)
        else:
            skipped.append({"format": fmt.name, "skip": reason})
    bar = Progress(len(todo) * len(cfg.seeds), model, enabled=progress)
    for fmt in todo:
        runs = [train(fmt, seed) for seed in cfg.seeds]
        curves[fmt.name] = [r["losses"] for r in runs]
        seconds[fmt.name] = float(np.mean([r["seconds"] for r in runs]))
        bar.update(len(runs))
    bar.close()
    tail = min(cfg.tail, min(len(c[0]) for c in curves.values()))
    rows, margin = compare(curves, baseline, tail, cfg.margin_sigmas)
    for r in rows:
        r["seconds"] = seconds[r["format"]]
    order = {f.name: i for i, f in enumerate(FORMATS)}
    rows = sorted(rows + skipped, key=lambda r: order[r["format"]])
    log(table(model, rows, baseline, margin, len(cfg.seeds), tail), verbose=verbose)
    return {"rows": rows, "margin": margin, "curves": curves, "baseline": baseline, "tail": tail}


def run(
    cfg: FormatsConfig | None = None,
    *,
    out: str | None = "optim_formats.png",
    progress: bool = True,
    verbose: bool = True,
) -> DemoResult:
    """Train each model with each format; print the tables and the stall experiment, plot the
    curves to ``out``.  ``result.extra``: per model ``rows`` (format, final, diff, rel, within,
    seconds; or skip), ``margin``, ``curves``; ``stall``; ``plot`` (None without
    matplotlib)."""
    cfg = cfg or FormatsConfig()
    if cfg.threads:
        mn.set_num_threads(cfg.threads)
    torch = _torch()
    torch_threads = None if torch is None else torch.get_num_threads()
    try:
        if torch is not None:
            torch.set_num_threads(mn.get_num_threads())  # the same threads for both
        return _run(cfg, out, progress, verbose)
    finally:
        if torch is not None:
            torch.set_num_threads(torch_threads)


def _run(cfg: FormatsConfig, out: str | None, progress: bool, verbose: bool) -> DemoResult:
    torch = _torch()
    tcfg = dataclasses.replace(cfg.transformer, steps=cfg.steps, seed=cfg.data_seed)
    log(
        f"optim_formats: AdamW state formats vs float32, seeds {list(cfg.seeds)}, "
        f"{mn.get_num_threads()} threads; within = |final - baseline| <= "
        f"{cfg.margin_sigmas:g} x the baseline's seed-to-seed standard deviation",
        verbose=verbose,
    )
    extra: dict[str, Any] = {}
    if "transformer" in cfg.models:
        data = _zen()
        log(
            f"transformer: {tcfg.layers} block, d {tcfg.d_model}, context {tcfg.block}, batch "
            f"{tcfg.batch_size}, {tcfg.steps} steps, AdamW lr {tcfg.lr:g} -> {tcfg.min_lr:g}",
            verbose=verbose,
        )
        extra["transformer"] = _run_model(
            "transformer",
            cfg,
            lambda fmt, seed: train_transformer(fmt, seed, tcfg, data),
            OURS_FP32,
            progress,
            verbose,
        )
    if "mlp" in cfg.models:
        if torch is None:
            log("mlp: skipped, it needs torch (pip install torch)", verbose=verbose)
        else:
            xy = _digits_flat()
            log(
                f"mlp (torch): 64-{cfg.mlp_hidden}-{cfg.mlp_hidden}-10 on the digits, "
                f"{cfg.mlp_epochs} epochs of batch 64, AdamW lr {cfg.mlp_lr:g}",
                verbose=verbose,
            )
            extra["mlp"] = _run_model(
                "mlp",
                cfg,
                lambda fmt, seed: train_mlp(fmt, seed, cfg, xy),
                TORCH_FP32,
                progress,
                verbose,
            )
    stall_tail = max(1, min(cfg.tail, cfg.stall_steps // 4))
    missing = [r for r in map(skip_reason, STALL_FORMATS) if r is not None]
    if missing:
        log(f"stall: skipped, {missing[0]}", verbose=verbose)
    else:
        extra["stall"] = stall_run(tcfg, cfg.stall_steps, cfg.stall_lr, cfg.seeds[0])
        log(stall_table(extra["stall"], cfg.stall_lr, stall_tail), verbose=verbose)
    extra["plot"] = None
    if out and plot(extra, out, cfg):
        extra["plot"] = out
        log(f"wrote {out}", verbose=verbose)
    base = extra.get("transformer", {}).get("rows", [{}])
    return DemoResult(
        name="optim_formats",
        final_loss=float(base[0].get("final", math.nan)) if base else math.nan,
        accuracy=math.nan,
        extra=extra,
    )


def _smooth(y: Array, width: int) -> Array:
    """Moving average over ``width`` steps (the first ones over what there is)."""
    c = np.concatenate([[0.0], np.cumsum(y)])
    hi = np.arange(1, len(y) + 1)
    lo = np.maximum(hi - width, 0)
    return (c[hi] - c[lo]) / (hi - lo)


def plot(extra: Mapping[str, Any], path: str, cfg: FormatsConfig) -> bool:
    """The loss curves (seed of the first run, smoothed) of each model and of the stall
    experiment; False with a message when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print(
            f"matplotlib is not installed: skipping the plot {path} (pip install matplotlib)",
            flush=True,
        )
        return False
    panels = [m for m in ("transformer", "mlp", "stall") if m in extra]
    fig = Figure(figsize=(5.2 * len(panels), 4.2), constrained_layout=True)
    FigureCanvasAgg(fig)
    width = max(1, cfg.tail // 2)
    color = {f.name: f"C{i}" for i, f in enumerate(FORMATS)}  # one colour per format
    for i, name in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        if name == "stall":
            curves = {k: v["losses"] for k, v in extra["stall"].items()}
            title = f"transformer at a constant lr {cfg.stall_lr:g}: the stall"
        else:
            curves = {k: v[0] for k, v in extra[name]["curves"].items()}
            title = f"{name}, seed {cfg.seeds[0]}"
            ax.set_yscale("log")
        for label, y in curves.items():
            ls = "--" if "nearest" in label else "-"
            x = np.arange(1, len(y) + 1)
            ax.plot(x, _smooth(y, width), lw=1, ls=ls, color=color.get(label), label=label)
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    fig.axes[0].set_ylabel(f"training loss (moving mean of {width} steps)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return True
