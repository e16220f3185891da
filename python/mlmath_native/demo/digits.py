"""A small CNN on scikit-learn's bundled 8x8 handwritten digits.

    x (N, 1, 8, 8) -> conv 3x3 (C1) -> ReLU -> conv 3x3 (C2) -> ReLU -> max-pool 2x2
      -> flatten (N, C2*4*4) -> linear -> logits (N, 10) -> cross-entropy

The convolutions (forward and backward), the linear layer's products, the fused cross-entropy
(loss and d loss / d logits in one call) and the Adam update run in mlmath_native; ReLU and
max-pooling and their backward passes are a few lines of NumPy below.

The model is a dict of named arrays (PyTorch's layout: conv weights (K, C, 3, 3), the linear
weight (10, F)) and training is a sequence of index batches, so that the test can feed the
same initial weights and batches to the same network written in PyTorch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

import mlmath_native as mn

from ._common import DemoResult, KernelTimer, Progress, log, require

Array = NDArray[Any]
Params = dict[str, Array]

#: parameter names, in the order the optimizer holds them
NAMES = ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "fc.weight", "fc.bias")
#: the train/test split does not depend on --seed: every seed is scored on the same test set
SPLIT_SEED = 0


@dataclass
class DigitsConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    channels: tuple[int, int] = (16, 32)
    dtype: str = "float32"
    seed: int = 0
    test_size: float = 0.25
    threads: int | None = None


def quick_config(**overrides: Any) -> DigitsConfig:
    """Settings for a run of a few seconds (the tests, ``--quick``)."""
    cfg = DigitsConfig(epochs=3, channels=(8, 16), lr=3e-3)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


# -- data --------------------------------------------------------------------------------------


def load_data(test_size: float = 0.25, dtype: str = "float32") -> tuple[Array, ...]:
    """``(x_train, y_train, x_test, y_test)``: images (N, 1, 8, 8) scaled to [0, 1] (the
    pixels are 0..16), labels int64; a stratified split fixed by SPLIT_SEED."""
    datasets = require("sklearn.datasets")
    model_selection = require("sklearn.model_selection")
    digits = datasets.load_digits()
    x = (digits.images / 16.0).astype(dtype)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = model_selection.train_test_split(
        x, y, test_size=test_size, random_state=SPLIT_SEED, stratify=y
    )
    return x_tr, y_tr, x_te, y_te


def batch_order(n: int, batch_size: int, epochs: int, seed: int) -> Iterator[Array]:
    """Index arrays of the training batches: a fresh permutation per epoch (the last batch of
    an epoch may be smaller)."""
    rng = np.random.default_rng([seed, 1])
    for _ in range(epochs):
        perm = rng.permutation(n)
        for i in range(0, n, batch_size):
            yield perm[i : i + batch_size]


# -- the model ---------------------------------------------------------------------------------


def init_params(
    seed: int = 0, channels: tuple[int, int] = (16, 32), dtype: str = "float32"
) -> Params:
    """He-uniform weights (bound sqrt(6 / fan_in), suited to ReLU), biases uniform in
    +-1/sqrt(fan_in) as PyTorch initialises them."""
    rng = np.random.default_rng([seed, 0])
    c1, c2 = channels
    features = c2 * 4 * 4  # after the 2x2 pool of the 8x8 map

    def uniform(shape: tuple[int, ...], bound: float) -> Array:
        return rng.uniform(-bound, bound, shape).astype(dtype)

    return {
        "conv1.weight": uniform((c1, 1, 3, 3), math.sqrt(6 / 9)),
        "conv1.bias": uniform((c1,), 1 / 3),
        "conv2.weight": uniform((c2, c1, 3, 3), math.sqrt(6 / (9 * c1))),
        "conv2.bias": uniform((c2,), 1 / math.sqrt(9 * c1)),
        "fc.weight": uniform((10, features), 1 / math.sqrt(features)),
        "fc.bias": uniform((10,), 1 / math.sqrt(features)),
    }


def relu(z: Array) -> Array:
    return np.maximum(z, 0)


def relu_backward(dy: Array, z: Array) -> Array:
    """dz = dy where z > 0, else 0 (the subgradient 0 at z == 0, as PyTorch)."""
    return np.where(z > 0, dy, 0).astype(dy.dtype, copy=False)


def maxpool2x2(a: Array) -> tuple[Array, Array]:
    """2x2 max-pooling with stride 2 of (N, C, H, W): the result (N, C, H/2, W/2) and which
    of the four window elements (row-major, 0..3) won, for the backward pass."""
    n, c, h, w = a.shape
    # (N, C, H/2, 2, W/2, 2) -> (N, C, H/2, W/2, 2, 2) -> each window as a last axis of 4
    win = a.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5)
    win = win.reshape(n, c, h // 2, w // 2, 4)
    arg = win.argmax(axis=-1)  # the first maximum, as PyTorch picks it
    return np.take_along_axis(win, arg[..., None], axis=-1)[..., 0], arg


def maxpool2x2_backward(dout: Array, arg: Array) -> Array:
    """The gradient flows only to the element that won each window."""
    n, c, h2, w2 = dout.shape
    dwin = np.zeros((n, c, h2, w2, 4), dout.dtype)
    np.put_along_axis(dwin, arg[..., None], dout[..., None], axis=-1)
    # the forward's reshapes, undone
    return dwin.reshape(n, c, h2, w2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, 2 * h2, -1)


def forward(params: Params, x: Array, kt: KernelTimer) -> tuple[Array, dict[str, Array]]:
    """Logits (N, 10) and what the backward pass needs."""
    z1 = kt.conv2d(x, params["conv1.weight"], params["conv1.bias"], padding=1)  # (N, C1, 8, 8)
    a1 = relu(z1)
    z2 = kt.conv2d(a1, params["conv2.weight"], params["conv2.bias"], padding=1)  # (N, C2, 8, 8)
    a2 = relu(z2)
    pooled, arg = maxpool2x2(a2)  # (N, C2, 4, 4)
    h = pooled.reshape(len(x), -1)  # (N, F), F = C2*16
    logits = kt.matmul(h, params["fc.weight"].T) + params["fc.bias"]  # h W^T + b
    return logits, {"x": x, "z1": z1, "a1": a1, "z2": z2, "arg": arg, "h": h}


def backward(params: Params, cache: dict[str, Array], dlogits: Array, kt: KernelTimer) -> Params:
    """Gradients of the loss for every parameter, given d loss / d logits (N, 10)."""
    h = cache["h"]
    # linear: logits = h W^T + b  ->  dW = dlogits^T h,  db = sum_n dlogits,  dh = dlogits W
    grads = {
        "fc.weight": kt.matmul(dlogits.T, h),
        "fc.bias": dlogits.sum(axis=0),
    }
    dh = kt.matmul(dlogits, params["fc.weight"])
    z2 = cache["z2"]
    da2 = maxpool2x2_backward(dh.reshape(z2.shape[0], z2.shape[1], 4, 4), cache["arg"])
    dz2 = relu_backward(da2, z2)
    da1, grads["conv2.weight"], grads["conv2.bias"] = kt.conv2d_backward(
        cache["a1"], params["conv2.weight"], dz2, padding=1
    )
    dz1 = relu_backward(da1, cache["z1"])
    _, grads["conv1.weight"], grads["conv1.bias"] = kt.conv2d_backward(
        cache["x"], params["conv1.weight"], dz1, padding=1, needs=("weight", "bias")
    )
    return grads


def make_optimizer(params: Params, lr: float) -> mn.Adam:
    return mn.Adam([params[k] for k in NAMES], lr=lr)


def train_step(
    params: Params, opt: mn.Adam, xb: Array, yb: Array, kt: KernelTimer
) -> tuple[float, Array]:
    """One Adam step on a batch; returns the batch's loss (before the update) and logits."""
    logits, cache = forward(params, xb, kt)
    loss, dlogits = kt.cross_entropy(logits, yb, return_grad=True)  # mean over the batch
    grads = backward(params, cache, dlogits, kt)
    kt.call(opt.step, [grads[k] for k in NAMES])
    return float(loss), logits


def evaluate(params: Params, x: Array, y: Array, batch: int = 512) -> tuple[float, float, Array]:
    """Mean loss, accuracy and the predicted labels over a whole set."""
    kt = KernelTimer()  # not counted in the training steps' timing
    losses, preds = [], []
    for i in range(0, len(x), batch):
        logits, _ = forward(params, x[i : i + batch], kt)
        losses.append(float(mn.cross_entropy(logits, y[i : i + batch], reduction="sum")))
        preds.append(logits.argmax(axis=1))
    pred = np.concatenate(preds)
    return sum(losses) / len(x), float((pred == y).mean()), pred


# -- the demo ----------------------------------------------------------------------------------


def run(
    cfg: DigitsConfig | None = None,
    *,
    out: str | None = "digits.png",
    progress: bool = True,
    verbose: bool = True,
) -> DemoResult:
    """Train the CNN, print the test accuracy and the kernels' share of the step time, and
    write the plot to ``out`` (None: no plot).  Returns a :class:`DemoResult` whose history has
    ``loss`` per step and ``train_loss``, ``train_accuracy``, ``test_loss``,
    ``test_accuracy`` per epoch."""
    cfg = cfg or DigitsConfig()
    if out:
        require("matplotlib")  # before training, not after it
    if cfg.threads:
        mn.set_num_threads(cfg.threads)
    x_tr, y_tr, x_te, y_te = load_data(cfg.test_size, cfg.dtype)
    log(
        f"digits: {len(x_tr)} training and {len(x_te)} test images of 8x8; "
        f"CNN {cfg.channels}, {cfg.epochs} epochs of batch {cfg.batch_size}, Adam lr {cfg.lr}, "
        f"{cfg.dtype}, {mn.get_num_threads()} threads",
        verbose=verbose,
    )
    params = init_params(cfg.seed, cfg.channels, cfg.dtype)
    opt = make_optimizer(params, cfg.lr)
    kt = KernelTimer()
    steps_per_epoch = math.ceil(len(x_tr) / cfg.batch_size)
    bar = Progress(cfg.epochs * steps_per_epoch, "digits", enabled=progress)
    hist: dict[str, list[float]] = {
        k: [] for k in ("loss", "train_loss", "train_accuracy", "test_loss", "test_accuracy")
    }
    t0 = time.perf_counter()
    epoch_loss, epoch_correct, seen, test_acc = 0.0, 0, 0, float("nan")
    for step, idx in enumerate(batch_order(len(x_tr), cfg.batch_size, cfg.epochs, cfg.seed)):
        with kt.step():
            loss, logits = train_step(params, opt, x_tr[idx], y_tr[idx], kt)
        hist["loss"].append(loss)
        epoch_loss += loss * len(idx)
        epoch_correct += int((logits.argmax(axis=1) == y_tr[idx]).sum())
        seen += len(idx)
        shown = {"loss": epoch_loss / seen, "acc": epoch_correct / seen}  # this epoch so far
        if (step + 1) % steps_per_epoch == 0:  # end of an epoch: score the test set
            hist["train_loss"].append(epoch_loss / seen)
            hist["train_accuracy"].append(epoch_correct / seen)
            test_loss, test_acc, _ = evaluate(params, x_te, y_te)
            hist["test_loss"].append(test_loss)
            hist["test_accuracy"].append(test_acc)
            epoch_loss, epoch_correct, seen = 0.0, 0, 0
        bar.update(1, **shown, test_acc=test_acc)
    bar.close()
    wall = time.perf_counter() - t0
    test_loss, test_acc, pred = evaluate(params, x_te, y_te)
    log(
        f"test accuracy {100 * test_acc:.2f}% ({int(round(test_acc * len(y_te)))}/{len(y_te)}), "
        f"test loss {test_loss:.4f}, final train loss {hist['train_loss'][-1]:.4f}",
        verbose=verbose,
    )
    log(f"training {wall:.1f} s; steps: {kt.report()}", verbose=verbose)
    result = DemoResult(
        name="digits",
        final_loss=hist["train_loss"][-1],
        accuracy=test_acc,
        history=hist,
        kernel_seconds=kt.seconds,
        step_seconds=kt.step_seconds,
        extra={"test_loss": test_loss, "wall_seconds": wall, "params": params, "plot": None},
    )
    if out:
        plot(result, x_te, y_te, pred, out)
        result.extra["plot"] = out
        log(f"wrote {out}", verbose=verbose)
    return result


def plot(result: DemoResult, x_te: Array, y_te: Array, pred: Array, path: str) -> None:
    """Loss and accuracy curves beside a grid of test digits titled with the predictions
    (wrong ones in red).  matplotlib's object API with the Agg canvas: no display, no pyplot
    state."""
    require("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    hist = result.history
    fig = Figure(figsize=(13, 4.2))
    FigureCanvasAgg(fig)
    outer = fig.add_gridspec(1, 3, width_ratios=(1, 1, 1.3), wspace=0.28)

    ax = fig.add_subplot(outer[0])
    steps_per_epoch = len(hist["loss"]) / max(len(hist["train_loss"]), 1)
    ax.plot(
        np.arange(1, len(hist["loss"]) + 1) / steps_per_epoch,
        hist["loss"],
        lw=0.6,
        alpha=0.45,
        color="tab:blue",
        label="batch",
    )
    epochs = np.arange(1, len(hist["train_loss"]) + 1)
    ax.plot(epochs, hist["train_loss"], "o-", ms=3, color="tab:blue", label="train (epoch mean)")
    ax.plot(epochs, hist["test_loss"], "s-", ms=3, color="tab:orange", label="test")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title("loss")
    ax.legend()

    ax = fig.add_subplot(outer[1])
    ax.plot(epochs, 100 * np.asarray(hist["train_accuracy"]), "o-", ms=3, label="train")
    ax.plot(epochs, 100 * np.asarray(hist["test_accuracy"]), "s-", ms=3, label="test")
    ax.axhline(97, color="gray", lw=0.8, ls="--")
    ax.set_ylim(max(0, 100 * min(hist["test_accuracy"] + hist["train_accuracy"]) - 2), 100.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"accuracy (test {100 * result.accuracy:.1f}%)")
    ax.legend(loc="lower right")

    rows, cols = 4, 6
    wrong = np.flatnonzero(pred != y_te)
    right = np.flatnonzero(pred == y_te)
    # show the mistakes first (at most half the grid), then correct ones
    shown = np.concatenate([wrong[: rows * cols // 2], right])[: rows * cols]
    grid = outer[2].subgridspec(rows, cols, hspace=0.45, wspace=0.1)
    for k, i in enumerate(shown):
        ax = fig.add_subplot(grid[k // cols, k % cols])
        ax.imshow(x_te[i, 0], cmap="gray_r", vmin=0, vmax=1)
        ok = pred[i] == y_te[i]
        label = f"{pred[i]}" if ok else f"{pred[i]} (is {y_te[i]})"
        ax.set_title(label, fontsize=8, color="black" if ok else "red")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"mlmath_native CNN on sklearn digits: {len(y_te)} test images, "
        f"{len(wrong)} wrong (shown first, in red)",
        fontsize=10,
    )
    fig.savefig(path, dpi=110, bbox_inches="tight")
