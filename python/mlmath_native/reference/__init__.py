"""Float64 NumPy reference oracle for ``mlmath_native``.

The readable version of every kernel: one module per topic, each opening with
its formula, then plain, commented NumPy computed in float64, written for clarity
and not for speed. The native kernels are tested against these functions, and
these functions are tested against closed-form cases and, where it is installed,
PyTorch (``tests/test_reference.py``).

Modules
-------
gradient_descent
    ``θ_{t+1} = θ_t − η ∇J(θ_t)``: ``gradient_descent_step``, ``gradient_descent``,
    ``sgd_step`` (torch.optim.SGD: momentum, dampening, nesterov, weight decay, maximize).
softmax
    ``softmax(z)_i = exp(z_i) / Σ_j exp(z_j)``: ``softmax``, ``log_softmax``,
    ``logsumexp``, ``softmax_backward``, ``log_softmax_backward``.
cross_entropy
    ``L = − Σ_i y_i log ŷ_i``: ``cross_entropy`` (from logits, PyTorch's options),
    ``cross_entropy_grad``, ``cross_entropy_from_probs``.
linear_cross_entropy
    ``L = cross_entropy(softcap(H Wᵀ + b) / T, t) + z_loss · lse²``:
    ``linear_cross_entropy`` (the logits materialised; loss, gradients, log-probabilities,
    entropy).
adam_optimizer
    ``θ ← θ − η m̂ / (√v̂ + ε)``: ``adam_step`` (Adam/AdamW, amsgrad, maximize),
    ``adam_minimize``.
convolution
    ``O(i, j) = Σ_m Σ_n I(i+m, j+n) K(m, n)``: ``correlate2d_valid``, ``conv2d``,
    ``conv1d`` (PyTorch's options), ``conv2d_backward``, ``conv1d_backward``,
    ``correlate2d``, ``convolve2d`` (SciPy's).
transformer_attention
    ``Attention(Q, K, V) = softmax(Q Kᵀ / √d_k) V``: ``attention`` (grouped-query heads,
    masks, causal alignments, dropout, logsumexp), ``attention_backward``, ``dropout_keep``.

This package depends on NumPy only. It never imports ``mlmath_native._core`` or
anything else from its parent package, so it stays usable (and correct) when the
compiled extension is missing or broken. Functions are reached through their
modules, e.g. ``reference.softmax.softmax``.
"""

from . import (
    adam_optimizer,
    convolution,
    cross_entropy,
    gradient_descent,
    linear_cross_entropy,
    softmax,
    transformer_attention,
)

__all__ = [
    "adam_optimizer",
    "convolution",
    "cross_entropy",
    "gradient_descent",
    "linear_cross_entropy",
    "softmax",
    "transformer_attention",
]
