"""Type stub of the compiled module ``mlmath_native._core`` (src/cpp; use the wrappers instead)."""

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

__version__: str

# -- build, threads, output cache -----------------------------------------------------------------

def build_info() -> dict[str, Any]: ...
def get_num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
def select_isa(name: str) -> None: ...
def set_output_cache_limit(bytes: int) -> None: ...
def output_cache_info() -> dict[str, int]: ...
def empty(shape: Sequence[int], dtype: np.dtype[Any]) -> NDArray[Any]:
    """An uninitialised C-contiguous output array (large ones come from the output cache)"""

# -- elementwise and softmax family ---------------------------------------------------------------

def convert_into(x: NDArray[Any], out: NDArray[Any]) -> None:
    """out = x converted float32 <-> bfloat16/float16 by the vector layer (for tests)"""

def exp_into(x: NDArray[Any], out: NDArray[Any]) -> None:
    """out = exp(x) with the vector exp of the ISA"""

def softmax_into(x: NDArray[Any], out: NDArray[Any], axis: int, log: bool) -> None:
    """out = softmax(x) (log=False) or log_softmax(x) along axis; C-contiguous float arrays"""

def softmax_backward_into(
    y: NDArray[Any], dy: NDArray[Any], out: NDArray[Any], axis: int, log: bool
) -> None:
    """out = gradient of (log_)softmax given its output y and the upstream dy"""

def logsumexp_into(x: NDArray[Any], out: NDArray[Any], axis: int) -> None:
    """out = logsumexp(x) along axis; out holds x.size / x.shape[axis] elements"""

def cross_entropy_into(
    logits: NDArray[Any],
    target: NDArray[Any],
    axis: int,
    weight: NDArray[Any],
    ignore_index: int,
    label_smoothing: float,
    loss: NDArray[Any],
    grad: NDArray[Any] | None,
    grad_scale: NDArray[Any] | None,
    grad_scale_all: float,
) -> None:
    """Per-element cross-entropy losses into `loss`, and the gradient into `grad` unless None"""

def linear_cross_entropy_into(
    hidden: NDArray[Any],
    weight: NDArray[Any],
    bias: NDArray[Any] | None,
    target: NDArray[Any],
    class_weight: NDArray[Any],
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    inv_temperature: float,
    chunk: int,
    loss: NDArray[Any],
    lse: NDArray[Any],
    logprob: NDArray[Any] | None,
    entropy: NDArray[Any] | None,
    d_hidden: NDArray[Any] | None,
    d_weight: NDArray[Any] | None,
    d_bias: NDArray[Any] | None,
    ce_scale: NDArray[Any] | None,
    ce_scale_all: float,
    z_scale: NDArray[Any] | None,
    z_scale_all: float,
) -> None:
    """Per-token fused linear + cross-entropy losses into `loss` and `lse`; gradients unless None"""

# -- matrix product and convolution ---------------------------------------------------------------

def gemm_into(
    a: NDArray[Any],
    b: NDArray[Any],
    out: NDArray[Any],
    m: int,
    n: int,
    k: int,
    a_rs: int,
    a_cs: int,
    b_rs: int,
    b_cs: int,
    c_rs: int,
    a_offsets: NDArray[np.int64],
    b_offsets: NDArray[np.int64],
    c_offsets: NDArray[np.int64],
    accumulate: bool,
    interruptible: bool = True,
) -> None:
    """Batched strided matrix product on the packed GEMM core; interruptible=False when out is
    the caller's array (Ctrl-C would leave it half-written)"""

def conv2d_into(
    x: NDArray[Any],
    w: NDArray[Any],
    bias: NDArray[Any] | None,
    out: NDArray[Any],
    stride_h: int,
    stride_w: int,
    pad_top: int,
    pad_left: int,
    dil_h: int,
    dil_w: int,
    groups: int,
    winograd: int = 0,
) -> None:
    """out = conv2d(x, w) + bias with zero padding (top, left given; sizes from out)"""

def conv2d_grad_input_into(
    grad_out: NDArray[Any],
    w: NDArray[Any],
    grad_input: NDArray[Any],
    stride_h: int,
    stride_w: int,
    dil_h: int,
    dil_w: int,
    groups: int,
) -> None:
    """grad_input = the gradient of conv2d's padded input (GEMM + col2im)"""

def all_finite(x: NDArray[Any]) -> bool:
    """True when no element of x (float32/float64, C-contiguous) is NaN or +-inf"""

def conv2d_grad_weight_into(
    x: NDArray[Any],
    grad_out: NDArray[Any],
    grad_weight: NDArray[Any],
    stride_h: int,
    stride_w: int,
    pad_top: int,
    pad_left: int,
    dil_h: int,
    dil_w: int,
    groups: int,
) -> None:
    """grad_weight = the weight gradient of conv2d(x, w) with zero padding"""

# -- attention ------------------------------------------------------------------------------------

class AttentionExtras:
    """window, softcap, sinks and ALiBi slopes of an attention call"""

    def __init__(
        self,
        window_left: int,
        window_right: int,
        softcap: float,
        sinks: NDArray[Any] | None,
        alibi_slopes: NDArray[Any] | None,
        kv_len: NDArray[Any] | None = None,
        dropout_bh_offset: int = 0,
        num_splits: int = 0,
    ) -> None: ...

def attention_into(
    q: NDArray[Any],
    k: NDArray[Any],
    v: NDArray[Any],
    mask: NDArray[Any] | None,
    causal: int,
    scale: float,
    dropout_p: float,
    seed: int,
    extras: AttentionExtras,
    out: NDArray[Any],
    lse: NDArray[Any] | None,
) -> None:
    """out (and lse) = scaled dot-product attention of 4-D q, k, v (see _attention.py)"""

def attention_backward_into(
    q: NDArray[Any],
    k: NDArray[Any],
    v: NDArray[Any],
    out: NDArray[Any],
    lse: NDArray[Any],
    grad_out: NDArray[Any],
    mask: NDArray[Any] | None,
    causal: int,
    scale: float,
    dropout_p: float,
    seed: int,
    extras: AttentionExtras,
    dq: NDArray[Any],
    dk: NDArray[Any],
    dv: NDArray[Any],
    dsinks: NDArray[Any] | None,
) -> None:
    """dq, dk, dv (and dsinks) = the gradients of attention (see _attention.py)"""

# -- optimizers -----------------------------------------------------------------------------------

def find_overlaps(
    written: Sequence[NDArray[Any]], read: Sequence[NDArray[Any]]
) -> tuple[tuple[int, int] | None, list[int]]:
    """(None or (i, j) written arrays sharing memory, read indices overlapping a written one)"""

def grad_norm(grads: Sequence[NDArray[Any]]) -> float:
    """the global L2 norm of all arrays (fixed order, scaled: no overflow)"""

def sgd_step(
    params: Sequence[NDArray[Any]],
    grads: Sequence[NDArray[Any]],
    momentum_buffers: Sequence[NDArray[Any]] | None,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    first_step: bool,
    grad_scale: float,
    masters: Sequence[NDArray[Any]] | None = None,
    sr_seed: int | None = None,
    sr_step: int = 0,
    absmaxes: Sequence[Sequence[NDArray[Any]]] | None = None,
) -> None:
    """One fused SGD step over lists of arrays, in place"""

def adam_step(
    params: Sequence[NDArray[Any]],
    grads: Sequence[NDArray[Any]],
    exp_avgs: Sequence[NDArray[Any]],
    exp_avg_sqs: Sequence[NDArray[Any]],
    max_exp_avg_sqs: Sequence[NDArray[Any]] | None,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    grad_scale: float,
    masters: Sequence[NDArray[Any]] | None = None,
    sr_seed: int | None = None,
    absmaxes: Sequence[Sequence[NDArray[Any]]] | None = None,
) -> None:
    """One fused Adam/AdamW step over lists of arrays, in place"""
