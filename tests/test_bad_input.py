"""The table of bad calls: each raises the documented exception, names the argument, and leaves
every array it was given bitwise unchanged.  Later kernels add their rows to BAD_CALLS."""

from __future__ import annotations

import numpy as np
import pytest

import mlmath_native as mn
from mlmath_native import _core

# np.exceptions is NumPy >= 1.25; the package supports 1.23 (Debian 12 has 1.24)
AxisError = getattr(np, "exceptions", np).AxisError


def _readonly(shape):
    out = np.zeros(shape)
    out.flags.writeable = False
    return out


def arrays():
    """Fresh inputs for one bad call (a new set per row, so rows cannot affect each other)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    return {
        "x": x,
        "y": mn.softmax(x),
        "out": np.full((4, 6), 7.0, np.float32),
        "out64": np.full((4, 6), 7.0, np.float64),
        "out_small": np.full((4, 5), 7.0, np.float32),
        "out_ro": np.full((4, 6), 7.0, np.float32),
        "x_c": np.ones((2, 3), np.complex64),
        "x_obj": np.array([1.0, "a"], dtype=object),
        "x_str": np.array(["a", "b"]),
        "dy_wrong": np.ones((4, 5), np.float32),
        "x_strided": rng.standard_normal((4, 12)).astype(np.float32)[:, ::2],
        "logits": rng.standard_normal((4, 10)).astype(np.float32),
        "labels": np.array([1, 12, 3, -1]),
        "labels_ok": np.array([1, 2, 3, 4]),
        "probs": np.full((4, 10), 0.1, np.float32),
        "w": np.ones(6, np.float32),
        "w2": np.ones(6, np.float32),
        "g": np.ones(6, np.float32),
    }


# (name, call, exception, text the message must contain)
BAD_CALLS = [
    ("softmax axis too big", lambda a: mn.softmax(a["x"], axis=2), ValueError, "axis 2"),
    ("softmax axis too small", lambda a: mn.softmax(a["x"], axis=-3), ValueError, "axis -3"),
    ("softmax axis float", lambda a: mn.softmax(a["x"], axis=1.0), TypeError, "axis"),
    ("softmax axis list", lambda a: mn.softmax(a["x"], axis=[0]), TypeError, "axis"),
    ("softmax axis tuple of floats", lambda a: mn.softmax(a["x"], axis=(0.5,)), TypeError, "axis"),
    ("softmax complex", lambda a: mn.softmax(a["x_c"]), TypeError, "x has unsupported dtype"),
    ("softmax object", lambda a: mn.softmax(a["x_obj"]), TypeError, "x has unsupported dtype"),
    ("softmax string", lambda a: mn.softmax(a["x_str"]), TypeError, "x has unsupported dtype"),
    ("softmax ragged list", lambda a: mn.softmax([[1.0], [1.0, 2.0]]), TypeError, "x could not"),
    ("softmax None", lambda a: mn.softmax(None), TypeError, "x has unsupported dtype"),
    (
        "softmax out shape",
        lambda a: mn.softmax(a["x"], out=a["out_small"]),
        ValueError,
        "out has shape",
    ),
    ("softmax out dtype", lambda a: mn.softmax(a["x"], out=a["out64"]), TypeError, "out has dtype"),
    ("softmax out list", lambda a: mn.softmax(a["x"], out=[0.0] * 24), TypeError, "out must be"),
    (
        "softmax out read-only",
        lambda a: mn.softmax(a["x"], out=a["out_ro"]),
        ValueError,
        "not writeable",
    ),
    (
        "log_softmax out shape",
        lambda a: mn.log_softmax(a["x"], out=a["out_small"]),
        ValueError,
        "log_softmax: out",
    ),
    ("log_softmax axis", lambda a: mn.log_softmax(a["x"], axis=5), ValueError, "log_softmax: axis"),
    ("logsumexp axis", lambda a: mn.logsumexp(a["x"], axis=-7), ValueError, "logsumexp: axis"),
    ("logsumexp complex", lambda a: mn.logsumexp(a["x_c"]), TypeError, "logsumexp: x"),
    (
        "softmax_backward shapes",
        lambda a: mn.softmax_backward(a["y"], a["dy_wrong"]),
        ValueError,
        "dy has shape",
    ),
    (
        "softmax_backward dtype",
        lambda a: mn.softmax_backward(a["x_c"], a["x_c"]),
        TypeError,
        "y has unsupported",
    ),
    (
        "softmax_backward axis",
        lambda a: mn.softmax_backward(a["y"], a["y"], axis=2),
        ValueError,
        "axis 2",
    ),
    (
        "log_softmax_backward shapes",
        lambda a: mn.log_softmax_backward(a["y"], a["dy_wrong"]),
        ValueError,
        "log_softmax_backward: dy",
    ),
    ("set_num_threads 0", lambda a: mn.set_num_threads(0), ValueError, "n must be >= 1"),
    ("set_num_threads str", lambda a: mn.set_num_threads("2"), TypeError, "n must be an integer"),
    (
        "set_output_cache negative",
        lambda a: mn.set_output_cache(-1),
        ValueError,
        "max_bytes must be >= 0",
    ),
    (
        "set_output_cache float",
        lambda a: mn.set_output_cache(1.5),
        TypeError,
        "max_bytes must be an integer",
    ),
    (
        "ce label too big",
        lambda a: mn.cross_entropy(a["logits"], a["labels"]),
        ValueError,
        "target holds 12 at position (1,) but there are 10 classes",
    ),
    (
        "ce label negative",
        lambda a: mn.cross_entropy(a["logits"], np.array([0, 1, -1, 2])),
        ValueError,
        "target holds -1 at position (2,)",
    ),
    (
        "ce label 2-d position",
        lambda a: mn.cross_entropy(a["logits"].reshape(2, 2, 10), np.array([[0, 1], [10, 2]])),
        ValueError,
        "at position (1, 0)",
    ),
    (
        "ce target shape",
        lambda a: mn.cross_entropy(a["logits"], np.array([1, 2, 3])),
        ValueError,
        "target has shape (3,)",
    ),
    (
        "ce prob target shape",
        lambda a: mn.cross_entropy(a["logits"], a["probs"][:, :5]),
        ValueError,
        "target has shape (4, 5)",
    ),
    (
        "ce target bool",
        lambda a: mn.cross_entropy(a["logits"], np.ones(4, bool)),
        TypeError,
        "target has dtype bool",
    ),
    (
        "ce target string",
        lambda a: mn.cross_entropy(a["logits"], np.array(["a"] * 4)),
        TypeError,
        "target has dtype",
    ),
    (
        "ce logits complex",
        lambda a: mn.cross_entropy(a["x_c"], np.zeros(2, int)),
        TypeError,
        "logits has unsupported dtype",
    ),
    (
        "ce logits 0-d",
        lambda a: mn.cross_entropy(np.float32(1), np.int64(0)),
        ValueError,
        "class axis",
    ),
    (
        "ce axis",
        lambda a: mn.cross_entropy(a["logits"], a["labels_ok"], axis=2),
        ValueError,
        "axis 2",
    ),
    (
        "ce weight length",
        lambda a: mn.cross_entropy(a["logits"], a["labels_ok"], weight=np.ones(9)),
        ValueError,
        "weight has shape (9,)",
    ),
    (
        "ce weight complex",
        lambda a: mn.cross_entropy(a["logits"], a["labels_ok"], weight=np.ones(10, complex)),
        TypeError,
        "weight has unsupported dtype",
    ),
    (
        "ce smoothing negative",
        lambda a: mn.cross_entropy(a["logits"], a["labels_ok"], label_smoothing=-0.1),
        ValueError,
        "label_smoothing is out of range",
    ),
    (
        "ce smoothing > 1",
        lambda a: mn.cross_entropy(a["logits"], a["labels_ok"], label_smoothing=1.5),
        ValueError,
        "label_smoothing is out of range",
    ),
    (
        "ce smoothing nan",
        lambda a: mn.cross_entropy(a["logits"], a["labels_ok"], label_smoothing=float("nan")),
        ValueError,
        "label_smoothing is out of range",
    ),
    (
        "ce smoothing str",
        lambda a: mn.cross_entropy(a["logits"], a["labels_ok"], label_smoothing="x"),
        TypeError,
        "label_smoothing must be a real number",
    ),
    (
        "ce reduction",
        lambda a: mn.cross_entropy(a["logits"], a["labels_ok"], reduction="avg"),
        ValueError,
        "reduction is invalid",
    ),
    (
        "ce ignore_index float",
        lambda a: mn.cross_entropy(a["logits"], a["labels_ok"], ignore_index=1.5),
        TypeError,
        "ignore_index must be an integer",
    ),
    (
        "ce grad_output shape",
        lambda a: mn.cross_entropy(
            a["logits"], a["labels_ok"], reduction="none", return_grad=True, grad_output=np.ones(3)
        ),
        ValueError,
        "grad_output has shape (3,)",
    ),
    (
        "ce grad_output not scalar",
        lambda a: mn.cross_entropy(
            a["logits"], a["labels_ok"], return_grad=True, grad_output=np.ones(4)
        ),
        ValueError,
        "grad_output must be a scalar",
    ),
    (
        "core ce label",
        lambda a: _core.cross_entropy_into(
            a["logits"],
            np.array([1, 2, 99, 3]),
            -1,
            np.ones(10, np.float32),
            -100,
            0.0,
            np.zeros(4, np.float32),
            None,
            None,
            1.0,
        ),
        ValueError,
        "target holds 99 at flat position 2",
    ),
    (
        "core ce int32 target",
        lambda a: _core.cross_entropy_into(
            a["logits"],
            np.zeros(4, np.int32),
            -1,
            np.ones(10, np.float32),
            -100,
            0.0,
            np.zeros(4, np.float32),
            None,
            None,
            1.0,
        ),
        TypeError,
        "int64",
    ),
    (
        "core ce smoothing",
        lambda a: _core.cross_entropy_into(
            a["logits"],
            a["labels_ok"],
            -1,
            np.ones(10, np.float32),
            -100,
            2.0,
            np.zeros(4, np.float32),
            None,
            None,
            1.0,
        ),
        ValueError,
        "label_smoothing",
    ),
    ("SGD lr zero", lambda a: mn.SGD(a["w"], lr=0.0), ValueError, "lr is invalid"),
    ("SGD lr nan", lambda a: mn.SGD(a["w"], lr=float("nan")), ValueError, "lr is invalid"),
    ("SGD lr str", lambda a: mn.SGD(a["w"], lr="0.1"), TypeError, "lr must be a real number"),
    (
        "SGD momentum negative",
        lambda a: mn.SGD(a["w"], lr=0.1, momentum=-0.5),
        ValueError,
        "momentum is invalid",
    ),
    (
        "SGD nesterov without momentum",
        lambda a: mn.SGD(a["w"], lr=0.1, nesterov=True),
        ValueError,
        "nesterov needs momentum > 0",
    ),
    (
        "SGD nesterov with dampening",
        lambda a: mn.SGD(a["w"], lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
        ValueError,
        "dampening == 0",
    ),
    ("SGD params empty", lambda a: mn.SGD([], lr=0.1), ValueError, "params is empty"),
    (
        "SGD params int",
        lambda a: mn.SGD(np.zeros(3, int), lr=0.1),
        TypeError,
        "params[0] has dtype int64",
    ),
    (
        "SGD params strided",
        lambda a: mn.SGD(a["x_strided"], lr=0.1),
        ValueError,
        "params[0] must be C-contiguous",
    ),
    (
        "SGD params read-only",
        lambda a: mn.SGD(a["out_ro"], lr=0.1),
        ValueError,
        "params[0] is not writeable",
    ),
    (
        "SGD params list",
        lambda a: mn.SGD([[1.0, 2.0]], lr=0.1),
        TypeError,
        "params[0] must be a numpy.ndarray",
    ),
    (
        "SGD step grad count",
        lambda a: mn.SGD([a["w"], a["w2"]], lr=0.1).step([a["g"]]),
        ValueError,
        "got 1 grads for 2 params",
    ),
    (
        "SGD step max_grad_norm",
        lambda a: mn.SGD(a["w"], lr=0.1, max_grad_norm=0).step(a["g"]),
        ValueError,
        "max_grad_norm is invalid",
    ),
    (
        "Adam beta1 = 1",
        lambda a: mn.Adam(a["w"], betas=(1.0, 0.999)),
        ValueError,
        "betas[0] is invalid",
    ),
    (
        "Adam beta2 negative",
        lambda a: mn.Adam(a["w"], betas=(0.9, -0.1)),
        ValueError,
        "betas[1] is invalid",
    ),
    ("Adam betas scalar", lambda a: mn.Adam(a["w"], betas=0.9), TypeError, "betas must be a pair"),
    ("Adam eps zero", lambda a: mn.Adam(a["w"], eps=0.0), ValueError, "eps is invalid"),
    (
        "AdamW weight_decay negative",
        lambda a: mn.AdamW(a["w"], weight_decay=-1.0),
        ValueError,
        "weight_decay is invalid",
    ),
    (
        "sgd_step no buffer",
        lambda a: mn.sgd_step(a["w"], a["g"], lr=0.1, momentum=0.9),
        ValueError,
        "momentum_buffer is required",
    ),
    (
        "sgd_step buffer shape",
        lambda a: mn.sgd_step(a["w"], a["g"], np.zeros(5, np.float32), lr=0.1, momentum=0.9),
        ValueError,
        "momentum_buffer has shape",
    ),
    (
        "sgd_step grad dtype",
        lambda a: mn.sgd_step(a["w"], np.ones(6), lr=0.1),
        TypeError,
        "grad has dtype float64",
    ),
    (
        "adam_step step 0",
        lambda a: mn.adam_step(a["w"], a["g"], a["w2"], np.zeros(6, np.float32), step=0),
        ValueError,
        "step must be >= 1",
    ),
    (
        "adam_step state read-only",
        lambda a: mn.adam_step(a["w"], a["g"], a["out_ro"][0], a["w2"], step=1),
        ValueError,
        "exp_avg is not writeable",
    ),
    (
        "gradient_descent optimizer",
        lambda a: mn.gradient_descent(lambda x: x, a["w"], lr=0.1, optimizer="lbfgs"),
        ValueError,
        "optimizer is invalid",
    ),
    (
        "gradient_descent steps",
        lambda a: mn.gradient_descent(lambda x: x, a["w"], lr=0.1, steps=-1),
        ValueError,
        "steps must be >= 0",
    ),
    (
        "core adam state count",
        lambda a: _core.adam_step(
            [a["w"]], [a["g"]], [], [a["w2"]], None, 1, 0.1, 0.9, 0.99, 1e-8, 0.0, False, 1.0
        ),
        ValueError,
        "exp_avg has 0 arrays for 1 params",
    ),
    (
        "core sgd dtype",
        lambda a: _core.sgd_step(
            [a["w"]], [np.ones(6)], None, 0.1, 0.0, 0.0, 0.0, False, False, 1.0
        ),
        TypeError,
        "grads[0] has dtype",
    ),
    (
        "matmul 0-d",
        lambda a: mn.matmul(np.float32(2), a["w"]),
        ValueError,
        "at least one dimension",
    ),
    (
        "matmul inner",
        lambda a: mn.matmul(np.ones((2, 3)), np.ones((4, 2))),
        ValueError,
        "inner dimensions differ",
    ),
    (
        "matmul batch",
        lambda a: mn.matmul(np.ones((2, 2, 3)), np.ones((3, 3, 2))),
        ValueError,
        "batch dimensions do not broadcast",
    ),
    (
        "matmul complex",
        lambda a: mn.matmul(a["x_c"], a["x_c"]),
        TypeError,
        "a has unsupported dtype",
    ),
    (
        "matmul out shape",
        lambda a: mn.matmul(np.ones((2, 3), np.float32), np.ones((3, 2), np.float32), out=a["out"]),
        ValueError,
        "out has shape",
    ),
    (
        "matmul out dtype",
        lambda a: mn.matmul(np.ones((4, 3)), np.ones((3, 6)), out=a["out"]),
        TypeError,
        "out has dtype",
    ),
    (
        "conv2d channels",
        lambda a: mn.conv2d(np.ones((1, 3, 5, 5)), np.ones((2, 2, 3, 3))),
        ValueError,
        "x has 3 channels",
    ),
    (
        "conv2d groups",
        lambda a: mn.conv2d(np.ones((1, 4, 5, 5)), np.ones((3, 2, 3, 3)), groups=2),
        ValueError,
        "not divisible by groups=2",
    ),
    (
        "conv2d groups zero",
        lambda a: mn.conv2d(np.ones((1, 4, 5, 5)), np.ones((3, 2, 3, 3)), groups=0),
        ValueError,
        "groups must be >= 1",
    ),
    (
        "conv2d kernel too big",
        lambda a: mn.conv2d(np.ones((1, 1, 3, 3)), np.ones((1, 1, 5, 5))),
        ValueError,
        "larger than the padded input",
    ),
    (
        "conv2d stride 0",
        lambda a: mn.conv2d(np.ones((1, 1, 5, 5)), np.ones((1, 1, 3, 3)), stride=0),
        ValueError,
        "stride must be >= 1",
    ),
    (
        "conv2d dilation tuple",
        lambda a: mn.conv2d(np.ones((1, 1, 5, 5)), np.ones((1, 1, 3, 3)), dilation=(1, 1, 1)),
        ValueError,
        "dilation has 3 values",
    ),
    (
        "conv2d stride float",
        lambda a: mn.conv2d(np.ones((1, 1, 5, 5)), np.ones((1, 1, 3, 3)), stride=1.5),
        TypeError,
        "stride must be an integer",
    ),
    (
        "conv2d padding string",
        lambda a: mn.conv2d(np.ones((1, 1, 5, 5)), np.ones((1, 1, 3, 3)), padding="full"),
        ValueError,
        "padding is invalid",
    ),
    (
        "conv2d padding negative",
        lambda a: mn.conv2d(np.ones((1, 1, 5, 5)), np.ones((1, 1, 3, 3)), padding=-1),
        ValueError,
        "padding must be >= 0",
    ),
    (
        "conv2d padding length",
        lambda a: mn.conv2d(np.ones((1, 1, 5, 5)), np.ones((1, 1, 3, 3)), padding=(1, 1, 1)),
        ValueError,
        "padding has 3 values",
    ),
    (
        "conv2d padding_mode",
        lambda a: mn.conv2d(np.ones((1, 1, 5, 5)), np.ones((1, 1, 3, 3)), padding_mode="mirror"),
        ValueError,
        "padding_mode is invalid",
    ),
    (
        "conv2d reflect too big",
        lambda a: mn.conv2d(
            np.ones((1, 1, 3, 3)), np.ones((1, 1, 3, 3)), padding=3, padding_mode="reflect"
        ),
        ValueError,
        "reflect padding 3",
    ),
    (
        "conv2d x ndim",
        lambda a: mn.conv2d(np.ones((5, 5)), np.ones((1, 1, 3, 3))),
        ValueError,
        "x has 2 dimensions",
    ),
    (
        "conv2d w ndim",
        lambda a: mn.conv2d(np.ones((1, 1, 5, 5)), np.ones((1, 3, 3))),
        ValueError,
        "w has 3 dimensions",
    ),
    (
        "conv2d bias shape",
        lambda a: mn.conv2d(np.ones((1, 1, 5, 5)), np.ones((2, 1, 3, 3)), np.ones(3)),
        ValueError,
        "bias has shape (3,)",
    ),
    (
        "conv2d complex",
        lambda a: mn.conv2d(np.ones((1, 1, 5, 5), complex), np.ones((1, 1, 3, 3))),
        TypeError,
        "x has unsupported dtype",
    ),
    (
        "conv1d padding same pair",
        lambda a: mn.conv1d(np.ones((1, 1, 5)), np.ones((1, 1, 3)), padding=(1, 1, 1)),
        ValueError,
        "padding has 3 values",
    ),
    (
        "correlate2d mode",
        lambda a: mn.correlate2d(np.ones((3, 3)), np.ones((2, 2)), mode="wide"),
        ValueError,
        "mode is invalid",
    ),
    (
        "correlate2d boundary",
        lambda a: mn.correlate2d(np.ones((3, 3)), np.ones((2, 2)), boundary="zero"),
        ValueError,
        "boundary is invalid",
    ),
    (
        "correlate2d 1-d",
        lambda a: mn.correlate2d(np.ones(3), np.ones((2, 2))),
        ValueError,
        "must be 2-D",
    ),
    (
        "correlate2d valid mixed",
        lambda a: mn.correlate2d(np.ones((3, 5)), np.ones((5, 3)), mode="valid"),
        ValueError,
        "at least as large",
    ),
    (
        "conv2d_backward grad_out shape",
        lambda a: mn.conv2d_backward(
            np.ones((1, 1, 5, 5)), np.ones((1, 1, 3, 3)), np.ones((1, 1, 2, 2))
        ),
        ValueError,
        "grad_out has shape (1, 1, 2, 2)",
    ),
    (
        "conv2d_backward needs",
        lambda a: mn.conv2d_backward(
            np.ones((1, 1, 5, 5)), np.ones((1, 1, 3, 3)), np.ones((1, 1, 3, 3)), needs=("bias", "x")
        ),
        ValueError,
        "needs is invalid",
    ),
    (
        "conv2d_backward needs string",
        lambda a: mn.conv2d_backward(
            np.ones((1, 1, 5, 5)), np.ones((1, 1, 3, 3)), np.ones((1, 1, 3, 3)), needs="bias"
        ),
        ValueError,
        "needs is invalid",
    ),
    # an empty kernel has no output size: refused as PyTorch does (it used to return
    # uninitialised memory of shape (1, 1, 5, 5) for a 4x4 input)
    (
        "conv2d empty kernel",
        lambda a: mn.conv2d(np.ones((1, 1, 4, 4)), np.ones((1, 1, 0, 0))),
        ValueError,
        "conv2d: w has an empty kernel (got shape (1, 1, 0, 0)",
    ),
    (
        "conv2d zero-width kernel",
        lambda a: mn.conv2d(np.ones((1, 1, 4, 4)), np.ones((1, 1, 3, 0)), padding=1),
        ValueError,
        "conv2d: w has an empty kernel (got shape (1, 1, 3, 0)",
    ),
    (
        "conv2d zero-height kernel winograd",
        lambda a: mn.conv2d(np.ones((1, 1, 4, 4)), np.ones((1, 1, 0, 3)), algorithm="winograd"),
        ValueError,
        "conv2d: w has an empty kernel",
    ),
    (
        "conv1d empty kernel",
        lambda a: mn.conv1d(np.ones((1, 1, 4)), np.ones((1, 1, 0)), padding="same"),
        ValueError,
        "conv1d: w has an empty kernel (got shape (1, 1, 0)",
    ),
    (
        "conv2d_backward empty kernel",
        lambda a: mn.conv2d_backward(
            np.ones((1, 1, 4, 4)), np.ones((1, 1, 0, 0)), np.ones((1, 1, 5, 5))
        ),
        ValueError,
        "conv2d_backward: w has an empty kernel",
    ),
    (
        "conv1d_backward empty kernel",
        lambda a: mn.conv1d_backward(np.ones((1, 1, 4)), np.ones((1, 1, 0)), np.ones((1, 1, 5))),
        ValueError,
        "conv1d_backward: w has an empty kernel",
    ),
    (
        "correlate2d empty in2",
        lambda a: mn.correlate2d(np.ones((4, 5)), np.ones((0, 0)), mode="valid"),
        ValueError,
        "correlate2d: in2 is empty (got shape (0, 0)",
    ),
    (
        "convolve2d empty in1",
        lambda a: mn.convolve2d(np.ones((0, 3)), np.ones((2, 2))),
        ValueError,
        "convolve2d: in1 is empty (got shape (0, 3)",
    ),
    (
        "core conv empty kernel",
        lambda a: _core.conv2d_into(
            np.ones((1, 1, 4, 4)),
            np.ones((1, 1, 0, 0)),
            None,
            a["out64"][None, None],
            1,
            1,
            0,
            0,
            1,
            1,
            1,
        ),
        ValueError,
        "conv2d: w has an empty kernel",
    ),
    (
        "core grad input empty kernel",
        lambda a: _core.conv2d_grad_input_into(
            np.ones((1, 1, 5, 5)), np.ones((1, 1, 0, 0)), a["out64"][None, None], 1, 1, 1, 1, 1
        ),
        ValueError,
        "conv2d_backward: w has an empty kernel",
    ),
    (
        "core grad weight empty kernel",
        lambda a: _core.conv2d_grad_weight_into(
            np.ones((1, 1, 4, 4)),
            np.ones((1, 1, 5, 5)),
            np.zeros((1, 1, 0, 0)),
            1,
            1,
            0,
            0,
            1,
            1,
            1,
        ),
        ValueError,
        "conv2d_backward: grad_weight has an empty kernel",
    ),
    (
        "core grad weight shapes",
        lambda a: _core.conv2d_grad_weight_into(
            np.ones((1, 2, 5, 5)),
            np.ones((1, 3, 3, 3)),
            np.zeros((3, 3, 3, 3)),
            1,
            1,
            0,
            0,
            1,
            1,
            1,
        ),
        ValueError,
        "inconsistent shapes for the weight gradient",
    ),
    (
        "core grad input shapes",
        lambda a: _core.conv2d_grad_input_into(
            np.ones((1, 3, 3, 3)), np.ones((3, 2, 3, 3)), np.zeros((1, 2, 4, 4)), 1, 1, 1, 1, 1
        ),
        ValueError,
        "inconsistent shapes for the input gradient",
    ),
    (
        "core grad input dilation 0",
        lambda a: _core.conv2d_grad_input_into(
            np.ones((1, 3, 3, 3)), np.ones((3, 2, 3, 3)), np.zeros((1, 2, 5, 5)), 1, 1, 0, 1, 1
        ),
        ValueError,
        "bad arrays or sizes for the input gradient",
    ),
    (
        "core grad input read-only",
        lambda a: _core.conv2d_grad_input_into(
            np.ones((1, 3, 3, 3)), np.ones((3, 2, 3, 3)), _readonly((1, 2, 5, 5)), 1, 1, 1, 1, 1
        ),
        ValueError,
        "not writeable",
    ),
    (
        "core grad weight stride 0",
        lambda a: _core.conv2d_grad_weight_into(
            np.ones((1, 3, 5, 5)),
            np.ones((1, 3, 3, 3)),
            np.zeros((3, 3, 3, 3)),
            0,
            1,
            0,
            0,
            1,
            1,
            1,
        ),
        ValueError,
        "bad arrays or sizes for the weight gradient",
    ),
    (
        "core winograd 5x5",
        lambda a: _core.conv2d_into(
            np.ones((1, 1, 5, 5)),
            np.ones((1, 1, 5, 5)),
            None,
            np.zeros((1, 1, 1, 1)),
            1,
            1,
            0,
            0,
            1,
            1,
            1,
            2,
        ),
        ValueError,
        "winograd needs a 3x3 kernel",
    ),
    (
        "core winograd4 5x5",
        lambda a: _core.conv2d_into(
            np.ones((1, 1, 5, 5)),
            np.ones((1, 1, 5, 5)),
            None,
            np.zeros((1, 1, 1, 1)),
            1,
            1,
            0,
            0,
            1,
            1,
            1,
            4,
        ),
        ValueError,
        "winograd needs a 3x3 kernel",
    ),
    (
        "core winograd tile 3",
        lambda a: _core.conv2d_into(
            np.ones((1, 1, 5, 5)),
            np.ones((1, 1, 3, 3)),
            None,
            np.zeros((1, 1, 3, 3)),
            1,
            1,
            0,
            0,
            1,
            1,
            1,
            3,
        ),
        ValueError,
        "winograd must be 0 (direct), 2 or 4",
    ),
    (
        "core conv groups",
        lambda a: _core.conv2d_into(
            np.ones((1, 4, 5, 5)),
            np.ones((2, 3, 3, 3)),
            None,
            np.zeros((1, 2, 3, 3)),
            1,
            1,
            0,
            0,
            1,
            1,
            1,
        ),
        ValueError,
        "input channels",
    ),
    (
        "core gemm reach",
        lambda a: _core.gemm_into(
            np.ones((2, 2)),
            np.ones((2, 2)),
            np.zeros((2, 2)),
            2,
            2,
            5,
            2,
            1,
            2,
            1,
            2,
            np.zeros(1, np.int64),
            np.zeros(1, np.int64),
            np.zeros(1, np.int64),
            False,
        ),
        ValueError,
        "reach outside",
    ),
    (
        "attention D mismatch",
        lambda a: mn.attention(a["x"], a["out_small"], a["x"]),
        ValueError,
        "attention: k has feature size 5 (expected q's, 6)",
    ),
    (
        "attention Lk mismatch",
        lambda a: mn.attention(a["x"], a["x"], np.ones((3, 6), np.float32)),
        ValueError,
        "v has 3 rows (expected k's length, 4)",
    ),
    (
        "attention heads",
        lambda a: mn.attention(np.ones((3, 4, 6)), np.ones((2, 4, 6)), np.ones((2, 4, 6))),
        ValueError,
        "q's 3 heads are not a multiple of k's and v's 2",
    ),
    (
        "attention mask shape",
        lambda a: mn.attention(a["x"], a["x"], a["x"], mask=np.ones((3, 4), bool)),
        ValueError,
        "mask has shape (3, 4)",
    ),
    (
        "attention causal string",
        lambda a: mn.attention(a["x"], a["x"], a["x"], causal="diagonal"),
        ValueError,
        "causal is invalid (got 'diagonal'",
    ),
    (
        "attention causal int",
        lambda a: mn.attention(a["x"], a["x"], a["x"], causal=2),
        ValueError,
        "causal is invalid (got 2",
    ),
    (
        "attention dropout 1",
        lambda a: mn.attention(a["x"], a["x"], a["x"], dropout_p=1.0, seed=0),
        ValueError,
        "dropout_p must be in [0, 1) (got 1.0)",
    ),
    (
        "attention dropout negative",
        lambda a: mn.attention(a["x"], a["x"], a["x"], dropout_p=-0.1, seed=0),
        ValueError,
        "dropout_p must be in [0, 1) (got -0.1)",
    ),
    (
        "attention dropout without seed",
        lambda a: mn.attention(a["x"], a["x"], a["x"], dropout_p=0.1),
        ValueError,
        "dropout_p > 0 needs an explicit seed",
    ),
    (
        "attention seed negative",
        lambda a: mn.attention(a["x"], a["x"], a["x"], dropout_p=0.1, seed=-1),
        ValueError,
        "seed must be in [0, 2**64) (got -1)",
    ),
    (
        "attention seed 2**64",
        lambda a: mn.attention(a["x"], a["x"], a["x"], dropout_p=0.1, seed=2**64),
        ValueError,
        "seed must be in [0, 2**64)",
    ),
    (
        "attention scale nan",
        lambda a: mn.attention(a["x"], a["x"], a["x"], scale=float("nan")),
        ValueError,
        "scale must be finite (got nan)",
    ),
    (
        "attention q complex",
        lambda a: mn.attention(a["x_c"], np.ones((2, 3)), np.ones((2, 3))),
        TypeError,
        "attention: q has unsupported dtype complex64",
    ),
    (
        "attention mask complex",
        lambda a: mn.attention(a["x"], a["x"], a["x"], mask=np.ones((4, 4), complex)),
        TypeError,
        "attention: mask has unsupported dtype complex128",
    ),
    # the compiled layer checks again, so calling it directly is safe too
    (
        "core non-contiguous",
        lambda a: _core.softmax_into(a["x_strided"], a["out"], -1, False),
        ValueError,
        "C-contiguous",
    ),
    (
        "core dtype",
        lambda a: _core.softmax_into(a["x"], a["out64"], -1, False),
        TypeError,
        "out has dtype",
    ),
    (
        "core shape",
        lambda a: _core.softmax_into(a["x"], a["out_small"], -1, False),
        ValueError,
        "out has shape",
    ),
    ("core axis", lambda a: _core.softmax_into(a["x"], a["out"], 3, False), ValueError, "axis 3"),
    (
        "core read-only",
        lambda a: _core.softmax_into(a["x"], a["out_ro"], -1, False),
        ValueError,
        "not writeable",
    ),
    (
        "core lse size",
        lambda a: _core.logsumexp_into(a["x"], a["out"], -1),
        ValueError,
        "out has 24 elements",
    ),
    (
        "core int input",
        lambda a: _core.exp_into(np.arange(3), np.zeros(3)),
        TypeError,
        "float32 or float64",
    ),
    (
        "core backward shape",
        lambda a: _core.softmax_backward_into(a["y"], a["dy_wrong"], a["out"], -1, False),
        ValueError,
        "dy has shape",
    ),
    (
        "core unknown isa",
        lambda a: _core.select_isa("sse9"),
        ValueError,
        "unknown or not compiled ISA 'sse9'",
    ),
]


@pytest.mark.parametrize("name,call,exc,text", BAD_CALLS, ids=[row[0] for row in BAD_CALLS])
def test_bad_call_raises_and_changes_nothing(name, call, exc, text):
    a = arrays()
    a["out_ro"].flags.writeable = False
    before = {k: v.copy() for k, v in a.items()}
    with pytest.raises(exc) as info:
        call(a)
    assert text in str(info.value), f"message {str(info.value)!r} should mention {text!r}"
    for key, value in a.items():
        assert value.dtype == before[key].dtype
        if value.dtype.kind in "fc":
            np.testing.assert_array_equal(value, before[key], err_msg=f"{name} changed {key}")
        else:
            assert (value == before[key]).all()


def test_axis_error_is_numpy_axis_error():
    with pytest.raises(AxisError):
        mn.softmax(np.ones(3), axis=1)
