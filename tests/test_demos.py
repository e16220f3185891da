"""The demos (``python -m mlmath_native.demo``): each trains in its quick mode and must learn;
the digits CNN and the transformer match the same models written in PyTorch step for step;
the NumPy backward passes of the demos match finite differences; the CLI and the lazy imports.

scikit-learn and matplotlib are in the test extra (no skip); only the PyTorch twins skip
without torch.
"""

from __future__ import annotations

import io
import itertools
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import mlmath_native as mn
from mlmath_native import demo
from mlmath_native.demo import digits, transformer
from mlmath_native.demo._common import KernelTimer, Progress

PARITY_STEPS = 20


@pytest.fixture
def one_thread(threads):
    """Kernel results are bitwise the same for any thread count; one thread keeps these
    small-batch runs from waiting on a busy machine's second core (restored afterwards)."""
    mn.set_num_threads(1)


# -- quick runs: the models learn ----------------------------------------------------------------


def test_digits_quick_learns_and_writes_png(tmp_path, one_thread):
    pytest.importorskip("sklearn")  # the demo extra
    pytest.importorskip("matplotlib")
    out = tmp_path / "digits.png"
    res = demo.run_digits(quick=True, out=str(out), progress=False, verbose=False)
    loss = res.history["loss"]
    assert np.mean(loss[:3]) > 2.0  # ~ln 10 at the start
    assert np.mean(loss[-10:]) < 0.5 * np.mean(loss[:10])
    assert res.history["test_accuracy"][-1] > res.history["test_accuracy"][0]
    assert res.accuracy >= 0.85  # 3 epochs of a small CNN; the full run reaches >= 0.97
    assert res.final_loss == res.history["train_loss"][-1] < 0.6
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    assert res["plot"] == str(out)
    assert 0 < res.kernel_seconds <= res.step_seconds


def test_transformer_quick_beats_unigram_entropy(one_thread):
    res = demo.run_transformer(quick=True, progress=False, verbose=False)
    h1 = res["unigram_entropy"]
    assert h1 == pytest.approx(3.1088, abs=1e-3)  # the Zen of Python's character entropy
    loss = res.history["loss"]
    assert loss[0] > 3.5  # ~ln 45 = 3.8 at the start: uniform over the characters
    assert res.final_loss < min(0.5 * h1, res["bigram_entropy"])  # whole text, at the end
    assert np.mean(res.history["accuracy"][-20:]) > np.mean(res.history["accuracy"][:20]) + 0.25
    assert all(s.startswith(("Beautiful is", "Errors should")) for s in res["samples"])
    assert 0 < res.kernel_seconds <= res.step_seconds


def test_regression_quick_matches_closed_forms():
    pytest.importorskip("sklearn")  # the demo extra
    res = demo.run_regression(quick=True, verbose=False)
    lin, logi = res["linear"], res["logistic"]
    assert lin["param_rel_diff"] < 1e-4  # vs np.linalg.lstsq, after 5000 Nesterov steps
    assert lin["mse_gd"] - lin["mse_lstsq"] < 1e-8
    assert lin["plain_param_rel_diff"] > 0.1  # plain gradient descent is far from it
    assert lin["test_accuracy_gd"] == lin["test_accuracy_lstsq"] > 0.9
    assert logi["converged"]
    assert logi["param_rel_diff"] < 1e-4  # vs sklearn's LogisticRegression(C=1)
    assert abs(logi["objective"] - logi["objective_sklearn"]) < 1e-10
    assert res.accuracy == logi["test_accuracy"] >= 0.93
    assert logi["prediction_agreement"] == 1.0
    hist = res.history["logistic_loss"]
    assert hist[-1] < 0.2 * hist[0]
    assert res.final_loss == pytest.approx(hist[-1], rel=1e-6)


# -- helpers -------------------------------------------------------------------------------------


def test_progress_bar_fallback_draws_one_line():
    buf = io.StringIO()
    bar = Progress(4, "demo", use_tqdm=False, file=buf)
    for i in range(4):
        bar.update(1, loss=1.0 / (i + 1), acc=float("nan"))
    bar.close()
    text = buf.getvalue()
    assert text.startswith("\rdemo [") and text.endswith("\n") and text.count("\n") == 1
    assert "4/4" in text and "loss 0.2500" in text and "acc -" in text


def test_kernel_timer_counts_calls_inside_steps():
    kt = KernelTimer()
    with kt.step():
        y = kt.softmax(np.zeros((2, 3)))
        kt.call(lambda: None)
    np.testing.assert_allclose(y, np.full((2, 3), 1 / 3))
    assert kt.calls == 2 and kt.steps == 1 and 0 < kt.seconds <= kt.step_seconds
    assert "kernels" in kt.report()
    with pytest.raises(AttributeError):
        kt.no_such_kernel  # noqa: B018


def test_cli_help_and_regression(capsys):
    pytest.importorskip("sklearn")  # the demo extra
    with pytest.raises(SystemExit) as exc:
        demo.main(["--help"])
    assert exc.value.code == 0
    assert "digits" in capsys.readouterr().out
    assert demo.main(["regression", "--quick", "--no-progress", "--steps", "500"]) == 0
    out = capsys.readouterr().out
    assert "np.linalg.lstsq" in out and "LogisticRegression" in out and "kernels" in out


def test_import_needs_no_demo_dependencies():
    code = textwrap.dedent(
        """
        import sys
        import mlmath_native, mlmath_native.demo
        loaded = [m for m in ("sklearn", "matplotlib", "tqdm", "torch") if m in sys.modules]
        assert not loaded, loaded
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- the NumPy backward passes against finite differences ----------------------------------------


def _check_grads(loss_fn, params, grads, rng, per_param=3, rtol=1e-5):
    """Central differences (float64) on a few random coordinates of every parameter."""
    for name, p in params.items():
        for flat in rng.choice(p.size, size=min(per_param, p.size), replace=False):
            i = np.unravel_index(flat, p.shape)
            h = 1e-6
            old = p[i]
            p[i] = old + h
            up = loss_fn()
            p[i] = old - h
            down = loss_fn()
            p[i] = old
            numeric = (up - down) / (2 * h)
            assert grads[name][i] == pytest.approx(numeric, rel=rtol, abs=1e-8), (name, i)


def test_digits_backward_matches_finite_differences(rng):
    pytest.importorskip("sklearn")  # the demo extra: the digits data set
    x_tr, y_tr, _, _ = digits.load_data(dtype="float64")
    params = digits.init_params(3, (4, 6), "float64")
    xb, yb = x_tr[:16], y_tr[:16]
    kt = KernelTimer()
    logits, cache = digits.forward(params, xb, kt)
    _, dlogits = mn.cross_entropy(logits, yb, return_grad=True)
    grads = digits.backward(params, cache, dlogits, kt)

    def loss():
        return float(mn.cross_entropy(digits.forward(params, xb, kt)[0], yb))

    _check_grads(loss, params, grads, rng)


def test_transformer_backward_matches_finite_differences(rng):
    cfg = transformer.quick_config(dtype="float64", d_model=16, block=12, layers=2)
    params = transformer.init_params(cfg, 45)
    for v in params.values():  # move LN gains and biases off their initial 1 and 0
        if v.ndim == 1:
            v += 0.1 * rng.standard_normal(v.shape)
    x = rng.integers(0, 45, (3, cfg.block))
    y = rng.integers(0, 45, (3, cfg.block))
    kt = KernelTimer()
    logits, caches = transformer.forward(params, x, cfg, kt)
    _, dlogits = mn.cross_entropy(logits, y.ravel(), return_grad=True)
    grads = transformer.backward(params, caches, dlogits, cfg, kt)

    def loss():
        return float(mn.cross_entropy(transformer.forward(params, x, cfg, kt)[0], y.ravel()))

    _check_grads(loss, params, grads, rng)


# -- the same models in PyTorch: step-for-step parity --------------------------------------------


def _torch_digits_losses(torch, params, x, y, batches, lr):
    """The digits CNN in PyTorch: same weights, same batches, torch.optim.Adam."""
    F = torch.nn.functional
    p = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    opt = torch.optim.Adam([p[k] for k in digits.NAMES], lr=lr)
    losses = []
    for idx in batches:
        h = F.relu(
            F.conv2d(torch.from_numpy(x[idx]), p["conv1.weight"], p["conv1.bias"], padding=1)
        )
        h = F.relu(F.conv2d(h, p["conv2.weight"], p["conv2.bias"], padding=1))
        h = F.max_pool2d(h, 2).flatten(1)
        logits = F.linear(h, p["fc.weight"], p["fc.bias"])
        loss = F.cross_entropy(logits, torch.from_numpy(y[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return np.array(losses), {k: v.detach().numpy() for k, v in p.items()}


# Tolerances (losses of the 20 steps, and every weight after them).  float64: both sides do
# the same float64 arithmetic in different orders; observed within 3e-16 relative (losses) and
# 1e-15 absolute (weights); asserted rtol 1e-12 and atol 1e-12.  float32: rounding of ~6e-8
# per operation, carried through 20 steps of training; observed 6e-6 relative on the digits'
# losses (4e-7 on the transformer's) and 3e-5 absolute on the weights; asserted rtol 1e-4 on
# the losses and atol 3e-4 (a tenth of the learning rate, Adam's step size) on the weights.
_TOL = {
    "float64": {"loss": 1e-12, "param_rtol": 1e-12, "param_atol": 1e-12},
    "float32": {"loss": 1e-4, "param_rtol": 1e-3, "param_atol": 3e-4},
}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_digits_matches_pytorch(dtype, one_thread):
    torch = pytest.importorskip("torch")
    cfg = digits.DigitsConfig(dtype=dtype, channels=(8, 16), lr=3e-3)
    x_tr, y_tr, _, _ = digits.load_data(dtype=dtype)
    params = digits.init_params(cfg.seed, cfg.channels, dtype)
    batches = list(itertools.islice(digits.batch_order(len(x_tr), 32, 1, cfg.seed), PARITY_STEPS))
    want, want_params = _torch_digits_losses(
        torch, {k: v.copy() for k, v in params.items()}, x_tr, y_tr, batches, cfg.lr
    )
    opt, kt = digits.make_optimizer(params, cfg.lr), KernelTimer()
    got = np.array([digits.train_step(params, opt, x_tr[i], y_tr[i], kt)[0] for i in batches])
    tol = _TOL[dtype]
    assert got[-1] < 0.7 * got[0]  # it is learning
    np.testing.assert_allclose(got, want, rtol=tol["loss"])
    for k in digits.NAMES:
        np.testing.assert_allclose(
            params[k], want_params[k], rtol=tol["param_rtol"], atol=tol["param_atol"], err_msg=k
        )


def _torch_transformer_losses(torch, params, cfg, batches):
    """The transformer in PyTorch: same weights and batches, torch.optim.AdamW with the same
    two parameter groups and the same learning-rate schedule."""
    F = torch.nn.functional
    p = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    groups = [
        {
            "params": [p[k] for k, v in params.items() if transformer.decayed(k, v)],
            "weight_decay": cfg.weight_decay,
        },
        {
            "params": [p[k] for k, v in params.items() if not transformer.decayed(k, v)],
            "weight_decay": 0.0,
        },
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    d, heads = cfg.d_model, cfg.heads
    losses = []
    for step, (x, y) in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = transformer.lr_at(step, cfg)
        b, t = x.shape
        h = p["tok_emb"][torch.from_numpy(x)] + p["pos_emb"][:t]
        for layer in range(cfg.layers):
            n = f"blocks.{layer}."
            a = F.layer_norm(h, (d,), p[n + "ln1.weight"], p[n + "ln1.bias"])
            q, k, v = (a @ p[n + "attn.wqkv"]).view(b, t, 3, heads, -1).permute(2, 0, 3, 1, 4)
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + att.transpose(1, 2).reshape(b, t, d) @ p[n + "attn.wo"]
            f = F.layer_norm(h, (d,), p[n + "ln2.weight"], p[n + "ln2.bias"])
            u = f @ p[n + "ff.w1"] + p[n + "ff.b1"]
            h = h + F.gelu(u, approximate="tanh") @ p[n + "ff.w2"] + p[n + "ff.b2"]
        h = F.layer_norm(h, (d,), p["ln_f.weight"], p["ln_f.bias"])
        logits = h @ p["head.weight"] + p["head.bias"]
        loss = F.cross_entropy(logits.reshape(b * t, -1), torch.from_numpy(y).reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return np.array(losses), {k: v.detach().numpy() for k, v in p.items()}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_transformer_matches_pytorch(dtype, one_thread):
    torch = pytest.importorskip("torch")
    cfg = transformer.quick_config(dtype=dtype, layers=2, steps=PARITY_STEPS, lr=3e-3)
    text = transformer.zen_text()
    vocab = transformer.Vocab(text)
    data = vocab.encode(text)
    params = transformer.init_params(cfg, len(vocab))
    batches = list(transformer.batches(data, cfg.batch_size, cfg.block, cfg.steps, cfg.seed))
    want, want_params = _torch_transformer_losses(
        torch, {k: v.copy() for k, v in params.items()}, cfg, batches
    )
    opt, kt = transformer.GroupedAdamW(params, cfg.lr, cfg.weight_decay), KernelTimer()
    got = []
    for step, (x, y) in enumerate(batches):
        opt.set_lr(transformer.lr_at(step, cfg))
        got.append(transformer.train_step(params, opt, x, y, cfg, kt)[0])
    tol = _TOL[dtype]
    assert got[-1] < 0.8 * got[0]  # it is learning
    np.testing.assert_allclose(got, want, rtol=tol["loss"])
    for k in params:
        np.testing.assert_allclose(
            params[k], want_params[k], rtol=tol["param_rtol"], atol=tol["param_atol"], err_msg=k
        )
