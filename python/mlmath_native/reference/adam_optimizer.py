"""Adam and AdamW optimizers (float64 reference, ``torch.optim.Adam`` / ``AdamW``).

Formula (step t = 1, 2, …, gradient g_t = ∇J(θ_{t−1}), m_0 = v_0 = 0)::

    m_t = β₁ m_{t−1} + (1 − β₁) g_t              first moment (mean of gradients)
    v_t = β₂ v_{t−1} + (1 − β₂) g_t²             second moment (uncentred variance)
    m̂_t = m_t / (1 − β₁ᵗ)                        bias corrections: m and v start at 0
    v̂_t = v_t / (1 − β₂ᵗ)                        and would underestimate early on
    θ_t = θ_{t−1} − η m̂_t / (√v̂_t + ε)

All operations are element-wise. The seed writes the update as
θ_{t+1} = θ_t − η m_t / (√v_t + ε); the bias-corrected form above is the one from
Kingma & Ba (2015) and is what ``torch.optim.Adam`` computes (with ``t`` starting
at 1), so that is the semantics here.

Dividing by √v̂ gives every coordinate its own step size: the step is about η in
magnitude whenever the gradient's sign is consistent (|m̂| ≈ √v̂), whatever the
gradient's scale. In particular, the very first step from zero state moves each
coordinate by η·g/(|g| + ε) ≈ η · sign(g) against its gradient.

PyTorch's options
-----------------
``adam_step`` follows ``torch.optim.Adam`` and ``torch.optim.AdamW`` (the
single-tensor path) option for option, with λ the weight decay::

    g = −g if maximize                        ascend instead of descend
    g = g + λ θ                               Adam: L2 penalty ½λ‖θ‖², through the moments
    θ = θ (1 − η λ)                           AdamW (decoupled_weight_decay=True) instead:
                                              shrink θ directly, outside the moments
    m, v as above
    v_max = max(v_max, v)                     amsgrad: the largest v seen so far
    θ = θ − (η / (1 − β₁ᵗ)) · m / (√v_max / √(1 − β₂ᵗ) + ε)     (√v without amsgrad)

Note [Adam vs AdamW]: with Adam's L2 decay the penalty's gradient λθ is divided by
√v̂ like the loss gradient, so coordinates with large gradients are barely decayed;
AdamW (Loshchilov & Hutter, 2019) applies the decay to θ itself, at the same rate
η λ for every coordinate, before the Adam update.

API note: ``adam_step`` used to be ``adam_step(theta, grad, m, v, t, lr, beta1,
beta2, eps) -> (theta, m, v)``. It now takes PyTorch's state names and options
(``step`` is keyword-only) and returns four arrays, the fourth being the AMSGrad
state (``None`` unless ``amsgrad``); an old call ``adam_step(θ, g, m, v, t)`` fails
with a TypeError rather than silently unpacking the wrong number of values.

``adam_step`` is the functional single update; ``adam_minimize`` repeats it on a
gradient function (the counterpart of ``gradient_descent.gradient_descent``).
"""

import numpy as np

__all__ = ["adam_step", "adam_minimize"]


def _check_hyper(lr, beta1, beta2, eps, weight_decay, name):
    """Validate Adam's hyper-parameters (torch.optim.Adam's rules, and finite)."""
    checks = (
        ("lr", lr, 0.0 <= lr < np.inf, "a finite value >= 0"),
        ("beta1", beta1, 0.0 <= beta1 < 1.0, "0 <= beta1 < 1"),
        ("beta2", beta2, 0.0 <= beta2 < 1.0, "0 <= beta2 < 1"),
        ("eps", eps, 0.0 <= eps < np.inf, "a finite value >= 0"),
        ("weight_decay", weight_decay, 0.0 <= weight_decay < np.inf, "a finite value >= 0"),
    )
    for arg, value, ok, rule in checks:
        if not ok:  # also catches NaN: every comparison with NaN is False
            raise ValueError(f"{name}: {arg} is invalid (got {value!r}, expected {rule})")


def adam_step(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    *,
    step,
    lr=1e-3,
    beta1=0.9,
    beta2=0.999,
    eps=1e-8,
    weight_decay=0.0,
    amsgrad=False,
    maximize=False,
    decoupled_weight_decay=False,
    max_exp_avg_sq=None,
):
    """One Adam (or AdamW) update, returning new arrays (the inputs are not modified).

    ``torch.optim.Adam`` (``decoupled_weight_decay=False``) or ``torch.optim.AdamW``
    (``True``) on one parameter array, in float64::

        g ← −g if maximize
        g ← g + λ θ              (Adam)    or    θ ← θ (1 − η λ)    (AdamW)
        m ← β₁ m + (1 − β₁) g
        v ← β₂ v + (1 − β₂) g²
        v_max ← max(v_max, v)    (amsgrad; the denominator then uses v_max for v)
        θ ← θ − (η / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε)

    Parameters
    ----------
    param : array_like
        Parameters θ before the step. Converted to float64.
    grad : array_like
        Gradient g at ``param``, same shape.
    exp_avg, exp_avg_sq : array_like
        First and second moment estimates m and v from the previous step, same shape
        (zeros before the first step).
    step : int
        Number of this step t, counted after incrementing: 1 on the first step (this
        is PyTorch's ``state["step"]`` after the update). Keyword-only.
    lr : float, optional
        Learning rate η (>= 0). Default 1e-3.
    beta1, beta2 : float, optional
        Decay rates of the moment estimates, in [0, 1). Defaults 0.9 and 0.999.
    eps : float, optional
        Added to √v̂ to avoid division by zero (>= 0). Default 1e-8.
    weight_decay : float, optional
        Weight decay λ (>= 0). Default 0 (torch.optim.AdamW's default is 1e-2).
    amsgrad : bool, optional
        AMSGrad: divide by the running maximum of v instead of v. Default False.
    maximize : bool, optional
        Ascend the objective instead of descending it (uses −g). Default False.
    decoupled_weight_decay : bool, optional
        True: AdamW's decoupled decay θ ← θ (1 − η λ). False (default): Adam's L2
        penalty g ← g + λ θ. See Note [Adam vs AdamW] in the module docstring.
    max_exp_avg_sq : array_like or None, optional
        The AMSGrad state v_max from the previous step, same shape; ``None`` (default)
        means zeros, i.e. the first step. Ignored unless ``amsgrad``.

    Returns
    -------
    param_new, exp_avg_new, exp_avg_sq_new : ndarray of float64
        Updated parameters and moment estimates; pass them, with ``step + 1``, to the
        next call.
    max_exp_avg_sq_new : ndarray of float64 or None
        The updated v_max if ``amsgrad``, else ``None``.

    Raises
    ------
    ValueError
        If the shapes differ, ``step < 1`` or a hyper-parameter is out of range
        (negative or non-finite ``lr``, ``eps`` or ``weight_decay``; a beta outside
        [0, 1)).

    Examples
    --------
    The first step from zero state moves each coordinate by about ``lr``, against
    the sign of its gradient:

    >>> import numpy as np
    >>> zeros = np.zeros(2)
    >>> p, m, v, _ = adam_step([1.0, 1.0], [3.0, -0.5], zeros, zeros, step=1, lr=0.1)
    >>> print(np.round(p, 6))
    [0.9 1.1]
    >>> print(np.round(m, 6), np.round(v, 6))
    [ 0.3  -0.05] [0.009   0.00025]

    AdamW with a zero gradient only shrinks the parameters, by (1 − η λ):

    >>> p, *_ = adam_step([1.0, -2.0], zeros, zeros, zeros, step=1, lr=0.1,
    ...                   weight_decay=0.5, decoupled_weight_decay=True)
    >>> print(p)
    [ 0.95 -1.9 ]
    """
    name = "adam_step"
    param = np.asarray(param, dtype=np.float64)
    arrays = {
        "grad": np.asarray(grad, dtype=np.float64),
        "exp_avg": np.asarray(exp_avg, dtype=np.float64),
        "exp_avg_sq": np.asarray(exp_avg_sq, dtype=np.float64),
    }
    if amsgrad:
        # PyTorch starts the AMSGrad state at zeros; max(0, v) = v on the first step.
        arrays["max_exp_avg_sq"] = (
            np.zeros_like(param)
            if max_exp_avg_sq is None
            else np.asarray(max_exp_avg_sq, dtype=np.float64)
        )
    for arg, arr in arrays.items():
        if arr.shape != param.shape:
            raise ValueError(
                f"{name}: {arg} has shape {arr.shape} (expected the shape of param, {param.shape})"
            )
    if int(step) != step or step < 1:
        raise ValueError(f"{name}: step is invalid (got {step!r}, expected an integer >= 1)")
    step = int(step)
    _check_hyper(lr, beta1, beta2, eps, weight_decay, name)
    g, m, v = arrays["grad"], arrays["exp_avg"], arrays["exp_avg_sq"]

    if maximize:
        g = -g  # ascending J is descending −J
    if weight_decay != 0.0:
        if decoupled_weight_decay:
            param = param * (1.0 - lr * weight_decay)  # AdamW: shrink θ itself
        else:
            g = g + weight_decay * param  # Adam: gradient of the L2 penalty ½λ‖θ‖²

    # Exponential moving averages of the gradient and of its square.
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g

    # Bias correction: with m_0 = v_0 = 0, E[m_t] ≈ (1 − β₁ᵗ) E[g], likewise for v.
    # Folded into the step size and the denominator, as PyTorch does:
    # η m̂ / (√v̂ + ε) = (η / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε).
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    step_size = lr / bias_correction1

    v_max = None
    if amsgrad:
        v_max = np.maximum(arrays["max_exp_avg_sq"], v)  # never lets the step size grow back
        denom = np.sqrt(v_max) / np.sqrt(bias_correction2) + eps
    else:
        denom = np.sqrt(v) / np.sqrt(bias_correction2) + eps

    param = param - step_size * m / denom
    return param, m, v, v_max


def adam_minimize(
    grad_fn,
    theta0,
    num_steps,
    lr=1e-3,
    beta1=0.9,
    beta2=0.999,
    eps=1e-8,
    return_history=False,
    *,
    weight_decay=0.0,
    amsgrad=False,
    decoupled_weight_decay=False,
):
    """Minimise a function with ``num_steps`` Adam steps from zero moment state.

    Calls ``adam_step`` for ``t = 1, …, num_steps`` with ``g_t = grad_fn(θ_{t−1})``.

    Parameters
    ----------
    grad_fn : callable
        ``grad_fn(theta) -> array_like`` returning the gradient at ``theta`` (same shape).
    theta0 : array_like
        Starting point. Converted to float64; not modified.
    num_steps : int
        Number of steps (>= 0).
    lr, beta1, beta2, eps : float, optional
        As in :func:`adam_step`.
    return_history : bool, optional
        Also return every iterate.
    weight_decay, amsgrad, decoupled_weight_decay : optional
        As in :func:`adam_step` (keyword-only). Defaults: plain Adam.

    Returns
    -------
    theta : ndarray of float64
        The final iterate.
    history : ndarray of float64, shape ``(num_steps + 1,) + theta.shape``
        Only if ``return_history``: ``θ_0, θ_1, …, θ_num_steps``.

    Raises
    ------
    ValueError
        For a negative ``num_steps`` or anything :func:`adam_step` rejects.

    Examples
    --------
    Minimise J(θ) = ½ ‖θ − c‖²:

    >>> import numpy as np
    >>> c = np.array([1.0, -2.0])
    >>> theta = adam_minimize(lambda th: th - c, np.zeros(2), num_steps=500, lr=0.05)
    >>> print(np.allclose(theta, c, atol=1e-3))
    True
    """
    if int(num_steps) != num_steps or num_steps < 0:
        raise ValueError(
            f"adam_minimize: num_steps is invalid (got {num_steps!r}, expected an integer >= 0)"
        )
    theta = np.array(theta0, dtype=np.float64)  # a copy: theta0 is never modified
    m = np.zeros_like(theta)  # moment state starts at zero
    v = np.zeros_like(theta)
    v_max = None  # AMSGrad state (zeros on the first step)
    history = [theta.copy()]
    for t in range(1, int(num_steps) + 1):
        grad = grad_fn(theta)
        theta, m, v, v_max = adam_step(
            theta,
            grad,
            m,
            v,
            step=t,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            decoupled_weight_decay=decoupled_weight_decay,
            max_exp_avg_sq=v_max,
        )
        history.append(theta.copy())
    if return_history:
        return theta, np.stack(history)
    return theta
