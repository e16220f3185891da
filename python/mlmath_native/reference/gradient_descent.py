"""Gradient descent (float64 reference).

Formula::

    θ_{t+1} = θ_t − η ∇J(θ_t)

* θ_t      the parameters at step t,
* η        the learning rate (step size),
* ∇J(θ_t)  the gradient of the cost J with respect to θ, evaluated at θ_t.

Moving a small step against the gradient decreases J (to first order), so
repeating the step walks θ downhill towards a local minimum. For the quadratic
J(θ) = ½ (θ − c)ᵀ A (θ − c) with A symmetric positive definite, the iteration
converges to c whenever 0 < η < 2 / λ_max(A).

``gradient_descent_step`` is the single update; ``gradient_descent`` repeats it
for a fixed number of steps, optionally stopping early once the gradient is small.

SGD with momentum (``torch.optim.SGD``)
---------------------------------------
``sgd_step`` is the step of ``torch.optim.SGD`` for one parameter array, with all of
its options (μ momentum, τ dampening, λ weight decay; b the momentum buffer)::

    d = −g if maximize else g                   the direction to descend along
    d = d + λ θ                                  weight decay (an L2 penalty ½λ‖θ‖²)
    b = d                          first step    (momentum μ > 0 only: the buffer
    b = μ b + (1 − τ) d            later steps    starts as a copy, not damped)
    d = d + μ b if nesterov else b               Nesterov looks one step ahead
    θ = θ − η d

With μ = λ = 0 and ``maximize=False`` this is the plain step θ − η g above. The
buffer is the only state; it is passed in and returned (``None`` before the first
step, and always ``None`` without momentum).
"""

import numpy as np

__all__ = ["gradient_descent_step", "gradient_descent", "sgd_step"]


def gradient_descent_step(theta, grad, lr):
    """One gradient descent update: ``θ_new = θ − η ∇J(θ)``.

    Parameters
    ----------
    theta : array_like
        Current parameters θ_t. Converted to float64; not modified.
    grad : array_like
        Gradient ∇J(θ_t), same shape as ``theta``.
    lr : float
        Learning rate η (>= 0).

    Returns
    -------
    theta_new : ndarray of float64, same shape as ``theta``

    Raises
    ------
    ValueError
        If the shapes differ or ``lr`` is negative or not finite.

    Examples
    --------
    >>> print(gradient_descent_step([1.0, 2.0], [0.5, -1.0], lr=0.1))
    [0.95 2.1 ]
    """
    theta = np.asarray(theta, dtype=np.float64)
    grad = np.asarray(grad, dtype=np.float64)
    if theta.shape != grad.shape:
        raise ValueError(
            f"gradient_descent_step: grad has shape {grad.shape} "
            f"(expected the shape of theta, {theta.shape})"
        )
    lr = _check_lr(lr, "gradient_descent_step")
    return theta - lr * grad


def gradient_descent(grad_fn, theta0, lr, num_steps, tol=None, return_history=False):
    """Minimise a function by repeated gradient descent steps.

    Runs ``θ_{t+1} = θ_t − η ∇J(θ_t)`` for ``t = 0, 1, …, num_steps − 1``, starting at
    ``θ_0 = theta0``. If ``tol`` is given, it stops before a step as soon as the
    gradient is small: ``‖∇J(θ_t)‖₂ <= tol`` (so the returned θ is the first iterate
    that satisfies the test, and ``grad_fn`` is called once more than steps taken).

    Parameters
    ----------
    grad_fn : callable
        ``grad_fn(theta) -> array_like`` returning ∇J(θ), same shape as ``theta``.
        It receives a float64 array it may read but should not modify.
    theta0 : array_like
        Starting point. Converted to float64; not modified.
    lr : float
        Learning rate η (>= 0).
    num_steps : int
        Maximum number of steps (>= 0).
    tol : float or None, optional
        Gradient-norm stopping tolerance; ``None`` (default) always runs ``num_steps``.
    return_history : bool, optional
        Also return every iterate.

    Returns
    -------
    theta : ndarray of float64
        The final iterate.
    history : ndarray of float64, shape ``(k + 1,) + theta.shape``
        Only if ``return_history``: ``θ_0, θ_1, …, θ_k`` where k is the number of
        steps taken.

    Raises
    ------
    ValueError
        For a negative or non-finite ``lr``, a negative ``num_steps`` or ``tol``, or a
        gradient of the wrong shape.

    Examples
    --------
    Minimise J(θ) = ½ ‖θ − c‖², whose gradient is θ − c:

    >>> import numpy as np
    >>> c = np.array([3.0, -1.0])
    >>> theta = gradient_descent(lambda th: th - c, np.zeros(2), lr=0.5, num_steps=60)
    >>> print(np.allclose(theta, c))
    True
    >>> theta, hist = gradient_descent(
    ...     lambda th: th - c, np.zeros(2), lr=1.0, num_steps=10, tol=1e-12,
    ...     return_history=True)
    >>> print(hist)
    [[ 0.  0.]
     [ 3. -1.]]
    """
    theta = np.array(theta0, dtype=np.float64)  # a copy: theta0 is never modified
    lr = _check_lr(lr, "gradient_descent")
    if int(num_steps) != num_steps or num_steps < 0:
        raise ValueError(
            f"gradient_descent: num_steps is invalid (got {num_steps!r}, expected an integer >= 0)"
        )
    if tol is not None and not tol >= 0:
        raise ValueError(f"gradient_descent: tol is invalid (got {tol!r}, expected >= 0 or None)")

    history = [theta.copy()]
    for _ in range(int(num_steps)):
        grad = np.asarray(grad_fn(theta), dtype=np.float64)
        if grad.shape != theta.shape:
            raise ValueError(
                f"gradient_descent: grad_fn returned shape {grad.shape} "
                f"(expected the shape of theta, {theta.shape})"
            )
        # Converged: the gradient is (almost) zero, further steps barely move θ.
        if tol is not None and np.linalg.norm(grad) <= tol:
            break
        theta = theta - lr * grad  # θ_{t+1} = θ_t − η ∇J(θ_t)
        history.append(theta.copy())

    if return_history:
        return theta, np.stack(history)
    return theta


def sgd_step(
    param,
    grad,
    momentum_buffer=None,
    *,
    lr,
    momentum=0.0,
    dampening=0.0,
    nesterov=False,
    weight_decay=0.0,
    maximize=False,
):
    """One step of ``torch.optim.SGD`` on one parameter array, in float64.

    ::

        d = (−g if maximize else g) + λ θ
        b = d  if b is None  else  μ b + (1 − τ) d        (only when μ > 0)
        d = d + μ b  if nesterov  else  b                 (only when μ > 0)
        θ_new = θ − η d

    A pure function: the inputs are not modified; the new parameters and the new
    momentum buffer are returned. Pass the buffer back in on the next step.

    Parameters
    ----------
    param : array_like
        Parameters θ before the step. Converted to float64.
    grad : array_like
        Gradient g at ``param``, same shape.
    momentum_buffer : array_like or None, optional
        The buffer b returned by the previous step, same shape. ``None`` (default)
        means this is the first step: the buffer then starts as a copy of d, with no
        dampening, as in PyTorch. Ignored when ``momentum == 0``.
    lr : float
        Learning rate η (>= 0). Keyword-only and required, as in PyTorch's SGD.
    momentum : float, optional
        Momentum factor μ (>= 0). Default 0: plain (stochastic) gradient descent.
    dampening : float, optional
        Dampening τ of the gradient's share in the buffer. Default 0.
    nesterov : bool, optional
        Nesterov momentum; requires ``momentum > 0`` and ``dampening == 0``.
    weight_decay : float, optional
        L2 penalty λ (>= 0), added to the gradient. Default 0.
    maximize : bool, optional
        Ascend the objective instead of descending it (uses −g). Default False.

    Returns
    -------
    param_new : ndarray of float64, same shape as ``param``
    momentum_buffer_new : ndarray of float64 or None
        The updated buffer b, or ``None`` when ``momentum == 0``.

    Raises
    ------
    ValueError
        If the shapes differ; if ``lr``, ``momentum`` or ``weight_decay`` is negative
        or not finite; if ``nesterov`` is set without momentum or with dampening.

    Examples
    --------
    >>> import numpy as np
    >>> p, buf = sgd_step([1.0, 2.0], [0.5, -1.0], lr=0.1)   # plain: θ − η g
    >>> print(p, buf)
    [0.95 2.1 ] None
    >>> p, buf = sgd_step(p, [1.0, 1.0], lr=0.1, momentum=0.9)  # first step: b = g
    >>> print(p, buf)
    [0.85 2.  ] [1. 1.]
    >>> p, buf = sgd_step(p, [1.0, 1.0], buf, lr=0.1, momentum=0.9)  # b = 0.9 b + g
    >>> print(np.round(p, 6), buf)
    [0.66 1.81] [1.9 1.9]
    """
    name = "sgd_step"
    param = np.asarray(param, dtype=np.float64)
    grad = np.asarray(grad, dtype=np.float64)
    if grad.shape != param.shape:
        raise ValueError(
            f"{name}: grad has shape {grad.shape} (expected the shape of param, {param.shape})"
        )
    lr = _check_lr(lr, name)
    momentum = _check_nonnegative(momentum, "momentum", name)
    weight_decay = _check_nonnegative(weight_decay, "weight_decay", name)
    dampening = float(dampening)  # any value, as in PyTorch
    if nesterov and (momentum <= 0.0 or dampening != 0.0):
        raise ValueError(
            f"{name}: nesterov requires momentum > 0 and dampening == 0 "
            f"(got momentum={momentum!r}, dampening={dampening!r})"
        )
    if momentum_buffer is not None:
        momentum_buffer = np.asarray(momentum_buffer, dtype=np.float64)
        if momentum_buffer.shape != param.shape:
            raise ValueError(
                f"{name}: momentum_buffer has shape {momentum_buffer.shape} "
                f"(expected the shape of param, {param.shape}, or None)"
            )

    d = -grad if maximize else grad  # the direction to descend along
    if weight_decay != 0.0:
        d = d + weight_decay * param  # gradient of the L2 penalty ½λ‖θ‖²

    buf = None
    if momentum != 0.0:
        if momentum_buffer is None:
            buf = d.copy()  # first step: the buffer starts as d, not (1 − τ) d
        else:
            buf = momentum * momentum_buffer + (1.0 - dampening) * d
        d = d + momentum * buf if nesterov else buf

    return param - lr * d, buf


def _check_nonnegative(value, arg, name):
    value = float(value)
    if not (np.isfinite(value) and value >= 0):  # also rejects NaN
        raise ValueError(f"{name}: {arg} is invalid (got {value!r}, expected a finite value >= 0)")
    return value


def _check_lr(lr, name):
    lr = float(lr)
    if not (np.isfinite(lr) and lr >= 0):
        raise ValueError(f"{name}: lr is invalid (got {lr!r}, expected a finite value >= 0)")
    return lr
