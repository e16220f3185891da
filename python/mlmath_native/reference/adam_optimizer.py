"""Adam optimizer (float64 reference).

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

``adam_step`` is the functional single update; ``adam_minimize`` repeats it on a
gradient function (the counterpart of ``gradient_descent.gradient_descent``).
"""

import numpy as np

__all__ = ["adam_step", "adam_minimize"]


def _check_hyper(lr, beta1, beta2, eps, name):
    """Validate Adam's hyper-parameters (the same rules as torch.optim.Adam)."""
    checks = (
        ("lr", lr, 0.0 <= lr < np.inf, "a finite value >= 0"),
        ("beta1", beta1, 0.0 <= beta1 < 1.0, "0 <= beta1 < 1"),
        ("beta2", beta2, 0.0 <= beta2 < 1.0, "0 <= beta2 < 1"),
        ("eps", eps, 0.0 <= eps < np.inf, "a finite value >= 0"),
    )
    for arg, value, ok, rule in checks:
        if not ok:  # also catches NaN: every comparison with NaN is False
            raise ValueError(f"{name}: {arg} is invalid (got {value!r}, expected {rule})")


def adam_step(theta, grad, m, v, t, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8):
    """One Adam update, returning new arrays (the inputs are not modified).

    ::

        m ← β₁ m + (1 − β₁) g
        v ← β₂ v + (1 − β₂) g²
        θ ← θ − η · (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε)

    Parameters
    ----------
    theta : array_like
        Parameters before the step. Converted to float64.
    grad : array_like
        Gradient g at ``theta``, same shape.
    m, v : array_like
        First and second moment estimates from the previous step, same shape
        (zeros before the first step).
    t : int
        Number of this step, starting at 1 (used in the bias corrections).
    lr : float, optional
        Learning rate η. Default 1e-3.
    beta1, beta2 : float, optional
        Decay rates of the moment estimates, in [0, 1). Defaults 0.9 and 0.999.
    eps : float, optional
        Added to √v̂ to avoid division by zero. Default 1e-8.

    Returns
    -------
    theta_new, m_new, v_new : ndarray of float64
        Updated parameters and moment estimates; pass ``m_new``, ``v_new`` and
        ``t + 1`` to the next call.

    Raises
    ------
    ValueError
        If the shapes differ, ``t < 1`` or a hyper-parameter is out of range.

    Examples
    --------
    The first step from zero state moves each coordinate by about ``lr``, against
    the sign of its gradient:

    >>> import numpy as np
    >>> theta, m, v = adam_step([1.0, 1.0], [3.0, -0.5], m=[0.0, 0.0], v=[0.0, 0.0], t=1,
    ...                         lr=0.1)
    >>> print(np.round(theta, 6))
    [0.9 1.1]
    >>> print(np.round(m, 6), np.round(v, 6))
    [ 0.3  -0.05] [0.009   0.00025]
    """
    name = "adam_step"
    theta = np.asarray(theta, dtype=np.float64)
    arrays = {
        "grad": np.asarray(grad, dtype=np.float64),
        "m": np.asarray(m, dtype=np.float64),
        "v": np.asarray(v, dtype=np.float64),
    }
    for arg, arr in arrays.items():
        if arr.shape != theta.shape:
            raise ValueError(
                f"{name}: {arg} has shape {arr.shape} (expected the shape of theta, {theta.shape})"
            )
    if int(t) != t or t < 1:
        raise ValueError(f"{name}: t is invalid (got {t!r}, expected an integer >= 1)")
    _check_hyper(lr, beta1, beta2, eps, name)
    g, m, v = arrays["grad"], arrays["m"], arrays["v"]

    # Exponential moving averages of the gradient and of its square.
    m_new = beta1 * m + (1.0 - beta1) * g
    v_new = beta2 * v + (1.0 - beta2) * g * g

    # Bias correction: with m_0 = v_0 = 0, E[m_t] ≈ (1 − β₁ᵗ) E[g], likewise for v.
    m_hat = m_new / (1.0 - beta1**t)
    v_hat = v_new / (1.0 - beta2**t)

    theta_new = theta - lr * m_hat / (np.sqrt(v_hat) + eps)
    return theta_new, m_new, v_new


def adam_minimize(
    grad_fn,
    theta0,
    num_steps,
    lr=1e-3,
    beta1=0.9,
    beta2=0.999,
    eps=1e-8,
    return_history=False,
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
    history = [theta.copy()]
    for t in range(1, int(num_steps) + 1):
        grad = grad_fn(theta)
        theta, m, v = adam_step(theta, grad, m, v, t, lr=lr, beta1=beta1, beta2=beta2, eps=eps)
        history.append(theta.copy())
    if return_history:
        return theta, np.stack(history)
    return theta
