"""Linear and logistic regression by gradient descent on scikit-learn's breast-cancer data,
checked against the closed-form answers.

Data: 569 tumours, 30 features each (standardised with the training set's mean and standard
deviation), label 1 = benign; a fixed stratified split of 75 % / 25 %.  A column of ones is
appended to the features so that the intercept is one more weight: A = [X, 1].

- **Linear regression** (least squares on the 0/1 label):  J(theta) = ||A theta - y||^2 / n,
  grad J = 2 A^T (A theta - y) / n, minimised by ``mn.gradient_descent`` and compared with
  ``np.linalg.lstsq``.  J is quadratic with Hessian H = 2 A^T A / n, whose condition number
  kappa = L / mu is about 1e5 here (the features are strongly correlated): plain gradient
  descent (lr = 1/L) shrinks the error along the flattest direction by only 1 - 1/kappa per
  step, so the demo uses Nesterov's momentum, lr = 1/L and
  momentum = (sqrt kappa - 1) / (sqrt kappa + 1), which needs about sqrt(kappa) steps per
  e-fold (the demo also runs plain gradient descent for as many steps, to show the
  difference).
- **Logistic regression** as a two-class softmax: logits = A W, W (31, 2), loss
  ``mn.cross_entropy`` (with its fused gradient) plus an L2 penalty lam/2 ||W||^2 (intercepts
  not penalised), compared with scikit-learn's ``LogisticRegression(C=1)``.  Its binary weight
  vector is w = W[:, 1] - W[:, 0]; the penalty that makes the two objectives the same is
  lam = 2 / (C n) (at the optimum W[:, 0] = -W[:, 1], so lam/2 ||W||^2 = lam/4 ||w||^2, which
  must equal ||w||^2 / (2 C n), sklearn's penalty per sample).  Minimised by Nesterov's method
  as above with L = lambda_max(A^T A / n) / 2 + lam (the softmax's Hessian is at most 1/2)
  and mu = lam.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

import mlmath_native as mn

from ._common import DemoResult, KernelTimer, log, require

Array = NDArray[Any]
SPLIT_SEED = 0


@dataclass
class RegressionConfig:
    steps: int = 20000  # at most; gradient descent stops at ||grad|| <= tol
    tol: float | None = 1e-12
    C: float = 1.0  # sklearn's inverse regularisation strength
    momentum: bool = True  # False: plain gradient descent (lr = 1/L), to see why it matters
    seed: int = 0  # unused by the deterministic fits; kept for a uniform CLI
    threads: int | None = None


def quick_config(**overrides: Any) -> RegressionConfig:
    cfg = RegressionConfig(steps=5000, tol=1e-10)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def load_data() -> tuple[Array, Array, Array, Array]:
    """``(A_train, y_train, A_test, y_test)``: standardised features with a column of ones."""
    datasets = require("sklearn.datasets")
    model_selection = require("sklearn.model_selection")
    x, y = datasets.load_breast_cancer(return_X_y=True)
    x_tr, x_te, y_tr, y_te = model_selection.train_test_split(
        x, y, test_size=0.25, random_state=SPLIT_SEED, stratify=y
    )
    mean, std = x_tr.mean(axis=0), x_tr.std(axis=0)

    def design(x: Array) -> Array:
        return np.hstack([(x - mean) / std, np.ones((len(x), 1))])

    return design(x_tr), y_tr.astype(np.int64), design(x_te), y_te.astype(np.int64)


def timed_optimizer(cls: type, kt: KernelTimer) -> type:
    """``cls`` (an mlmath_native optimizer) whose ``step`` counts as kernel time."""

    class Timed(cls):  # type: ignore[misc, valid-type]
        def step(self, grads: Any) -> Any:
            return kt.call(super().step, grads)

    return Timed


def fit_linear(
    a: Array, y: Array, cfg: RegressionConfig, kt: KernelTimer
) -> tuple[mn.optim.GradientDescentResult, dict[str, float]]:
    """Least squares by gradient descent with Nesterov's momentum (or plain)."""
    n = len(a)
    yf = y.astype(np.float64)
    # the Hessian's extreme eigenvalues fix the step size and the momentum (31 x 31: cheap)
    eig = np.linalg.eigvalsh(2 / n * (a.T @ a))
    big, small = float(eig[-1]), float(eig[0])
    kappa = big / small
    momentum = (math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1) if cfg.momentum else 0.0

    def grad(theta: Array) -> tuple[float, Array]:
        r = kt.matmul(a, theta) - yf  # residuals A theta - y
        return float(r @ r) / n, kt.matmul(a.T, r) * (2 / n)

    res = mn.gradient_descent(
        grad,
        np.zeros(a.shape[1]),
        lr=1 / big,
        steps=cfg.steps,
        tol=cfg.tol,
        optimizer=timed_optimizer(mn.SGD, kt),
        momentum=momentum,
        nesterov=cfg.momentum,
    )
    return res, {"L": big, "mu": small, "kappa": kappa, "lr": 1 / big, "momentum": momentum}


def fit_logistic(
    a: Array, y: Array, cfg: RegressionConfig, kt: KernelTimer
) -> tuple[mn.optim.GradientDescentResult, dict[str, float]]:
    """Two-class softmax regression with sklearn's L2 penalty, by Nesterov's method."""
    n, f = a.shape
    lam = 2 / (cfg.C * n)
    big = float(np.linalg.eigvalsh(a.T @ a / n)[-1]) / 2 + lam
    kappa = big / lam
    momentum = (math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1) if cfg.momentum else 0.0

    def grad(theta: Array) -> tuple[float, Array]:
        w = theta.reshape(f, 2)
        # mean cross-entropy and d/d logits (n, 2) in one fused call; chain rule: A^T dlogits
        loss, dlogits = kt.cross_entropy(kt.matmul(a, w), y, return_grad=True)
        gw = kt.matmul(a.T, dlogits)
        gw[:-1] += lam * w[:-1]  # the penalty's gradient (not on the intercept row)
        penalty = 0.5 * lam * float((w[:-1] * w[:-1]).sum())
        return float(loss) + penalty, gw.ravel()

    res = mn.gradient_descent(
        grad,
        np.zeros(2 * f),
        lr=1 / big,
        steps=cfg.steps,
        tol=cfg.tol,
        optimizer=timed_optimizer(mn.SGD, kt),
        momentum=momentum,
        nesterov=cfg.momentum,
    )
    return res, {"L": big, "lam": lam, "kappa": kappa, "momentum": momentum}


def sklearn_objective(w: Array, a: Array, y: Array, c: float) -> float:
    """sklearn's binary objective per sample: mean log-loss + ||w||^2 / (2 C n)."""
    z = a @ w
    return float(np.mean(np.logaddexp(0, z) - y * z) + 0.5 * (w[:-1] @ w[:-1]) / (c * len(a)))


def run(
    cfg: RegressionConfig | None = None,
    *,
    out: str | None = None,
    progress: bool = True,
    verbose: bool = True,
) -> DemoResult:
    """Fit both models and print the comparisons.  Returns a :class:`DemoResult`:
    ``final_loss`` the logistic objective, ``accuracy`` the logistic test accuracy, history the
    objective per step of both fits (``linear_loss``, ``logistic_loss``), extra the
    comparisons (relative parameter differences, objective gaps, accuracies)."""
    del progress  # the fits take well under a second: no progress bar
    cfg = cfg or RegressionConfig()
    if out:
        require("matplotlib")  # before training, not after it
    if cfg.threads:
        mn.set_num_threads(cfg.threads)
    a_tr, y_tr, a_te, y_te = load_data()
    log(
        f"regression: breast cancer, {len(a_tr)} training and {len(a_te)} test tumours, "
        f"{a_tr.shape[1] - 1} standardised features + intercept",
        verbose=verbose,
    )
    extra: dict[str, Any] = {}
    kt = KernelTimer()

    # -- linear least squares ------------------------------------------------------------------
    t0 = time.perf_counter()
    lin, info = fit_linear(a_tr, y_tr, cfg, kt)
    lin_seconds = time.perf_counter() - t0
    exact, *_ = np.linalg.lstsq(a_tr, y_tr.astype(np.float64), rcond=None)
    mse_gd = float(np.mean((a_tr @ lin.x - y_tr) ** 2))
    mse_ls = float(np.mean((a_tr @ exact - y_tr) ** 2))
    extra["linear"] = {
        **info,
        "steps": lin.steps,
        "converged": lin.converged,
        "param_rel_diff": float(np.linalg.norm(lin.x - exact) / np.linalg.norm(exact)),
        "mse_gd": mse_gd,
        "mse_lstsq": mse_ls,
        "test_accuracy_gd": float(((a_te @ lin.x > 0.5) == y_te).mean()),
        "test_accuracy_lstsq": float(((a_te @ exact > 0.5) == y_te).mean()),
    }
    e = extra["linear"]
    if cfg.momentum:  # what the momentum buys: plain gradient descent, as many steps
        plain_cfg = dataclasses.replace(cfg, momentum=False, steps=max(lin.steps, 1), tol=None)
        plain, _ = fit_linear(a_tr, y_tr, plain_cfg, KernelTimer())
        e["plain_param_rel_diff"] = float(np.linalg.norm(plain.x - exact) / np.linalg.norm(exact))
    log(
        f"linear regression: Hessian condition number {e['kappa']:.3g}; "
        + (
            f"Nesterov lr 1/L = {e['lr']:.3g}, momentum {e['momentum']:.4f}"
            if cfg.momentum
            else f"plain gradient descent, lr 1/L = {e['lr']:.3g}"
        )
        + f": {lin.steps} steps ({'converged' if lin.converged else 'not converged'}, "
        f"||grad|| <= {cfg.tol:g}) in {lin_seconds:.2f} s",
        verbose=verbose,
    )
    if cfg.momentum:
        log(
            f"  (plain gradient descent, lr 1/L, the same {plain.steps} steps: "
            f"|theta - theta*| / |theta*| = {e['plain_param_rel_diff']:.2e})",
            verbose=verbose,
        )
    log(
        f"  vs np.linalg.lstsq: |theta - theta*| / |theta*| = {e['param_rel_diff']:.2e}, "
        f"MSE {mse_gd:.10f} vs {mse_ls:.10f} (diff {mse_gd - mse_ls:.1e}); "
        f"test accuracy (threshold 0.5) {e['test_accuracy_gd']:.1%} vs "
        f"{e['test_accuracy_lstsq']:.1%}",
        verbose=verbose,
    )

    # -- logistic regression ---------------------------------------------------------------------
    t0 = time.perf_counter()
    logi, info = fit_logistic(a_tr, y_tr, cfg, kt)
    log_seconds = time.perf_counter() - t0
    w2 = logi.x.reshape(-1, 2)
    w = w2[:, 1] - w2[:, 0]  # the binary model's weights (intercept last)
    linear_model = require("sklearn.linear_model")
    # lbfgs to a tight tolerance: the reference optimum
    sk = linear_model.LogisticRegression(C=cfg.C, tol=1e-12, max_iter=100000)
    sk.fit(a_tr[:, :-1], y_tr)
    w_sk = np.concatenate([sk.coef_[0], sk.intercept_])
    obj, obj_sk = (sklearn_objective(v, a_tr, y_tr, cfg.C) for v in (w, w_sk))
    extra["logistic"] = {
        **info,
        "steps": logi.steps,
        "converged": logi.converged,
        "param_rel_diff": float(np.linalg.norm(w - w_sk) / np.linalg.norm(w_sk)),
        "objective": obj,
        "objective_sklearn": obj_sk,
        "train_accuracy": float(((a_tr @ w > 0) == y_tr).mean()),
        "test_accuracy": float(((a_te @ w > 0) == y_te).mean()),
        "test_accuracy_sklearn": float(sk.score(a_te[:, :-1], y_te)),
        "prediction_agreement": float(((a_te @ w > 0) == sk.predict(a_te[:, :-1])).mean()),
    }
    e = extra["logistic"]
    log(
        f"logistic regression (softmax cross-entropy, L2 lam {e['lam']:.3g} = sklearn C "
        f"{cfg.C:g}): Nesterov lr {1 / e['L']:.3g}, momentum {e['momentum']:.4f}: "
        f"{logi.steps} steps ({'converged' if logi.converged else 'not converged'}) in "
        f"{log_seconds:.2f} s",
        verbose=verbose,
    )
    log(
        f"  vs sklearn LogisticRegression: |w - w_sk| / |w_sk| = {e['param_rel_diff']:.2e}, "
        f"objective {obj:.10f} vs {obj_sk:.10f} (diff {obj - obj_sk:.1e}); test accuracy "
        f"{e['test_accuracy']:.1%} vs {e['test_accuracy_sklearn']:.1%}, same prediction on "
        f"{e['prediction_agreement']:.1%} of the test set",
        verbose=verbose,
    )
    steps = lin.steps + logi.steps
    kt.step_seconds, kt.steps = lin_seconds + log_seconds, steps
    log(f"gradient descent: {kt.report()}", verbose=verbose)
    result = DemoResult(
        name="regression",
        final_loss=obj,
        accuracy=e["test_accuracy"],
        history={"linear_loss": lin.history.tolist(), "logistic_loss": logi.history.tolist()},
        kernel_seconds=kt.seconds,
        step_seconds=kt.step_seconds,
        extra=extra,
    )
    if out:
        plot(result, mse_ls, obj_sk, out)
        extra["plot"] = out
        log(f"wrote {out}", verbose=verbose)
    return result


def plot(result: DemoResult, mse_ls: float, obj_sk: float, path: str) -> None:
    """Both objectives' distance to the closed-form optimum, per step (log scale)."""
    require("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, best, label in (
        ("linear_loss", mse_ls, "least squares: J - J(lstsq)"),
        ("logistic_loss", obj_sk, "logistic: J - J(sklearn)"),
    ):
        gap = np.maximum(np.asarray(result.history[key]) - best, 1e-16)
        ax.plot(np.arange(1, len(gap) + 1), gap, label=label)
    ax.set_yscale("log")
    ax.set_xscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("objective gap")
    ax.set_title("gradient descent on breast cancer")
    ax.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")
