"""The float64 reference ``reference.linear_cross_entropy`` against PyTorch autograd (float64).

PyTorch builds the same loss from its parts (F.linear, softcap, temperature, F.cross_entropy
with weight / ignore_index / label_smoothing, plus the z-loss on logsumexp) and backpropagates
grad_output; the reference's analytic gradients, log-probabilities and entropies must agree to
float64 accuracy. Then the edge cases (every token ignored, leading shapes, empty input) and the
errors of the spec (docs: issue 21).
"""

import itertools

import numpy as np
import pytest

from mlmath_native.reference import linear_cross_entropy as ref_lce

torch = pytest.importorskip("torch")
F = torch.nn.functional

lce = ref_lce.linear_cross_entropy

RTOL = 1e-10
ATOL = 1e-12
IGNORE = -100

NS, DS, VS = (1, 5, 17), (3, 8), (2, 7, 33)


def shapes_for(k):
    """The (N, D, V) of option combination k: every (N, V) pair, D alternating (both D in
    every combination, and each (N, D, V) in half the combinations: the full product for
    all 192 combinations would take ~10 s)."""
    pairs = itertools.product(NS, VS)
    return [(n, DS[(k + i) % 2], v) for i, (n, v) in enumerate(pairs)]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny tensors: torch's thread pool costs ~10x the arithmetic, so one thread here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True)


def torch_lce(
    hidden,
    weight,
    target,
    bias=None,
    *,
    ignore_index=IGNORE,
    reduction="mean",
    label_smoothing=0.0,
    weight_classes=None,
    z_loss=0.0,
    softcap=None,
    temperature=1.0,
    grad_output=None,
):
    """The spec's loss built from PyTorch ops in float64: (loss, grads, logprobs, entropy)."""
    d = hidden.shape[-1]
    h = torch.tensor(hidden, dtype=torch.float64, requires_grad=True)
    w = torch.tensor(weight, dtype=torch.float64, requires_grad=True)
    b = None if bias is None else torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    t = torch.as_tensor(np.asarray(target, dtype=np.int64)).reshape(-1)
    wc = None if weight_classes is None else torch.tensor(weight_classes, dtype=torch.float64)

    z = F.linear(h.reshape(-1, d), w, b)
    u = softcap * torch.tanh(z / softcap) if softcap is not None else z
    x = u / temperature
    ce = F.cross_entropy(
        x,
        t,
        weight=wc,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    active = t != ignore_index
    lse = torch.logsumexp(x, dim=-1)
    zl = torch.where(active, lse**2, torch.zeros_like(lse))
    if reduction == "mean":
        loss = ce + z_loss * zl.sum() / active.sum()
    elif reduction == "sum":
        loss = ce + z_loss * zl.sum()
    else:
        loss = (ce + z_loss * zl).reshape(hidden.shape[:-1])

    go = torch.ones_like(loss) if grad_output is None else torch.as_tensor(grad_output)
    loss.backward(go.to(torch.float64).expand_as(loss))

    with torch.no_grad():
        lsm = torch.log_softmax(x, dim=-1)
        t_safe = torch.where(active, t, torch.zeros_like(t))
        logprobs = torch.where(active, lsm.gather(1, t_safe[:, None])[:, 0], 0.0)
        entropy = -(lsm.exp() * lsm).sum(-1)
    lead = hidden.shape[:-1]
    grads = (
        h.grad.numpy(),
        w.grad.numpy(),
        None if b is None else b.grad.numpy(),
    )
    return (
        loss.detach().numpy(),
        grads,
        logprobs.numpy().reshape(lead),
        entropy.numpy().reshape(lead),
    )


def check_against_torch(hidden, weight, target, bias=None, **opts):
    """Every output of the reference against torch_lce, with the same arguments."""
    loss, grads, logprobs, entropy = lce(
        hidden,
        weight,
        target,
        bias,
        return_grad=True,
        return_logprobs=True,
        return_entropy=True,
        **opts,
    )
    t_loss, t_grads, t_logprobs, t_entropy = torch_lce(hidden, weight, target, bias, **opts)

    assert np.shape(loss) == np.shape(t_loss)
    assert np.asarray(loss).dtype == np.float64
    assert_close(loss, t_loss)
    d_hidden, d_weight, d_bias = grads
    assert d_hidden.shape == np.shape(hidden)
    assert d_weight.shape == np.shape(weight)
    assert_close(d_hidden, t_grads[0])
    assert_close(d_weight, t_grads[1])
    if bias is None:
        assert d_bias is None
    else:
        assert d_bias.shape == np.shape(bias)
        assert_close(d_bias, t_grads[2])
    assert logprobs.shape == entropy.shape == np.shape(target)
    assert_close(logprobs, t_logprobs)
    assert_close(entropy, t_entropy)
    return loss, grads, logprobs, entropy


def make_case(rng, n, d, v, *, ignore=True, lead=None, scale=1.0):
    """Random hidden (lead + (D,)), weight (V, D), bias (V,), targets with some ignored."""
    lead = (n,) if lead is None else lead
    hidden = rng.standard_normal((*lead, d)) * scale
    weight = rng.standard_normal((v, d)) / np.sqrt(d)
    bias = rng.standard_normal(v) * 0.5
    target = rng.integers(0, v, size=lead)
    flat = target.reshape(-1)
    if ignore and flat.size >= 2:
        drop = rng.random(flat.size) < 0.3
        drop[0], drop[-1] = True, False  # at least one ignored token and one that counts
        flat[drop] = IGNORE
    return hidden, weight, bias, target


def grad_output_for(rng, reduction, lead):
    if reduction == "none":
        return rng.uniform(-2.0, 2.0, size=lead)
    return np.float64(rng.uniform(0.3, 2.0))


# --------------------------------------------------------------------------------------
# Every option combination, every small shape
# --------------------------------------------------------------------------------------

OPTIONS = list(
    itertools.product(
        ("mean", "sum", "none"),  # reduction
        (0.0, 0.1),  # label_smoothing
        (False, True),  # weight_classes
        (0.0, 1e-3),  # z_loss
        (None, 5.0),  # softcap
        (1.0, 0.7),  # temperature
        (False, True),  # bias
    )
)


@pytest.mark.parametrize(
    "k, reduction, label_smoothing, use_wc, z_loss, softcap, temperature, use_bias",
    [(k, *opts) for k, opts in enumerate(OPTIONS)],
)
def test_every_option_against_torch(
    k, reduction, label_smoothing, use_wc, z_loss, softcap, temperature, use_bias, rng
):
    for n, d, v in shapes_for(k):
        hidden, weight, bias, target = make_case(rng, n, d, v, scale=2.0)
        wc = rng.uniform(0.2, 3.0, size=v) if use_wc else None
        check_against_torch(
            hidden,
            weight,
            target,
            bias if use_bias else None,
            reduction=reduction,
            label_smoothing=label_smoothing,
            weight_classes=wc,
            z_loss=z_loss,
            softcap=softcap,
            temperature=temperature,
            grad_output=grad_output_for(rng, reduction, target.shape),
        )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_leading_shape(reduction, rng):
    """hidden (2, 3, D): loss ("none"), logprobs and entropy (2, 3), d_hidden (2, 3, D)."""
    hidden, weight, bias, target = make_case(rng, None, 8, 7, lead=(2, 3))
    loss, (d_hidden, _, _), logprobs, entropy = check_against_torch(
        hidden,
        weight,
        target,
        bias,
        reduction=reduction,
        label_smoothing=0.1,
        weight_classes=rng.uniform(0.5, 2.0, size=7),
        z_loss=1e-3,
        softcap=5.0,
        temperature=0.7,
        grad_output=grad_output_for(rng, reduction, (2, 3)),
    )
    assert d_hidden.shape == (2, 3, 8)
    assert logprobs.shape == entropy.shape == (2, 3)
    assert np.shape(loss) == ((2, 3) if reduction == "none" else ())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_single_token_without_leading_axis(reduction, rng):
    """hidden (D,) with a 0-d target is one token: loss and extras are 0-d."""
    hidden, weight, bias, target = make_case(rng, None, 8, 7, lead=())
    loss, (d_hidden, _, _), logprobs, entropy = check_against_torch(
        hidden, weight, target, bias, reduction=reduction, z_loss=1e-3, label_smoothing=0.1
    )
    assert np.shape(loss) == logprobs.shape == entropy.shape == ()
    assert d_hidden.shape == (8,)


@pytest.mark.parametrize("ignore_index", [-1, 3])
def test_other_ignore_index(ignore_index, rng):
    """A custom ignore_index, also one inside [0, V): those tokens are skipped as in torch."""
    hidden, weight, bias, target = make_case(rng, 17, 8, 7, ignore=False)
    target[::3] = ignore_index
    for reduction in ("mean", "sum", "none"):
        _, (d_hidden, _, _), logprobs, _ = check_against_torch(
            hidden,
            weight,
            target,
            bias,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=0.1,
            z_loss=1e-3,
        )
        assert np.all(d_hidden[::3] == 0.0)
        assert np.all(logprobs[::3] == 0.0)


def test_large_logits_are_stable(rng):
    """Logits around 1e3 (no softcap): a stable logsumexp keeps everything finite."""
    hidden, weight, bias, target = make_case(rng, 17, 8, 33, scale=1e3)
    for reduction in ("mean", "sum", "none"):
        loss, grads, _, _ = check_against_torch(
            hidden, weight, target, bias, reduction=reduction, z_loss=1e-3, label_smoothing=0.1
        )
        assert np.all(np.isfinite(loss))
        assert all(np.all(np.isfinite(g)) for g in grads)


def test_grad_output_default_and_scalar_for_none(rng):
    """grad_output defaults to 1; a scalar for "none" applies to every token."""
    hidden, weight, bias, target = make_case(rng, 5, 8, 7)
    opts = dict(z_loss=1e-3, label_smoothing=0.1)
    for reduction in ("mean", "sum", "none"):
        _, g_default = lce(hidden, weight, target, bias, reduction=reduction, return_grad=True)
        _, g_ones = lce(
            hidden,
            weight,
            target,
            bias,
            reduction=reduction,
            return_grad=True,
            grad_output=np.ones(target.shape) if reduction == "none" else 1.0,
        )
        for a, b in zip(g_default, g_ones, strict=True):
            np.testing.assert_array_equal(a, b)
    _, g_scalar = lce(
        hidden, weight, target, bias, reduction="none", return_grad=True, grad_output=2.5, **opts
    )
    _, g_full = lce(
        hidden,
        weight,
        target,
        bias,
        reduction="none",
        return_grad=True,
        grad_output=np.full(target.shape, 2.5),
        **opts,
    )
    for a, b in zip(g_scalar, g_full, strict=True):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------------
# Every token ignored; empty input
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_all_tokens_ignored(reduction, z_loss, rng):
    """mean -> NaN (0 / 0, like torch), sum -> 0, none -> zeros; gradients exactly zero;
    logprobs 0; the entropy is still every token's."""
    hidden, weight, bias, target = make_case(rng, 5, 8, 7)
    target[:] = IGNORE
    out = lce(
        hidden,
        weight,
        target,
        bias,
        reduction=reduction,
        z_loss=z_loss,
        label_smoothing=0.1,
        return_grad=True,
        return_logprobs=True,
        return_entropy=True,
    )
    loss, (d_hidden, d_weight, d_bias), logprobs, entropy = out
    if reduction == "mean":
        assert np.isnan(loss)
    else:
        assert np.all(loss == 0.0)
    for g in (d_hidden, d_weight, d_bias):
        assert np.all(g == 0.0)
    assert np.all(logprobs == 0.0)
    assert np.all(entropy > 0.0)
    # torch agrees on the loss and the entropy (its "mean" gradient is 0 · inf = NaN
    # for label smoothing, so only the forward values are compared).
    t_loss, _, t_logprobs, t_entropy = torch_lce(
        hidden, weight, target, bias, reduction=reduction, z_loss=z_loss, label_smoothing=0.1
    )
    assert_close(loss, t_loss)
    assert_close(logprobs, t_logprobs)
    assert_close(entropy, t_entropy)


def test_all_tokens_ignored_gradients_match_torch_without_smoothing(rng):
    """Without smoothing or z-loss, torch's backward of the NaN mean is zeros too."""
    hidden, weight, bias, target = make_case(rng, 5, 8, 7)
    target[:] = IGNORE
    check_against_torch(hidden, weight, target, bias, reduction="mean")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_input(reduction, rng):
    hidden = np.zeros((0, 8))
    weight = rng.standard_normal((7, 8))
    target = np.zeros(0, dtype=np.int64)
    loss, (d_hidden, d_weight, d_bias), logprobs, entropy = lce(
        hidden,
        weight,
        target,
        np.zeros(7),
        reduction=reduction,
        z_loss=1e-3,
        return_grad=True,
        return_logprobs=True,
        return_entropy=True,
    )
    if reduction == "mean":
        assert np.isnan(loss)
    elif reduction == "sum":
        assert loss == 0.0
    else:
        assert loss.shape == (0,)
    assert d_hidden.shape == (0, 8)
    assert np.all(d_weight == 0.0) and np.all(d_bias == 0.0)
    assert logprobs.shape == entropy.shape == (0,)


# --------------------------------------------------------------------------------------
# Return structure, dtypes, chunk_size
# --------------------------------------------------------------------------------------


def test_return_structure(rng):
    hidden, weight, bias, target = make_case(rng, 5, 8, 7)
    loss = lce(hidden, weight, target, bias)
    assert isinstance(loss, np.float64)  # the loss alone, not a tuple
    assert isinstance(lce(hidden, weight, target, reduction="sum"), np.float64)
    none = lce(hidden, weight, target, reduction="none")
    assert isinstance(none, np.ndarray) and none.dtype == np.float64 and none.shape == (5,)

    full = lce(
        hidden,
        weight,
        target,
        bias,
        return_grad=True,
        return_logprobs=True,
        return_entropy=True,
    )
    assert len(full) == 4 and full[0] == loss and len(full[1]) == 3
    lp_only = lce(hidden, weight, target, bias, return_logprobs=True)
    ent_only = lce(hidden, weight, target, bias, return_entropy=True)
    assert len(lp_only) == len(ent_only) == 2
    np.testing.assert_array_equal(lp_only[1], full[2])
    np.testing.assert_array_equal(ent_only[1], full[3])
    lp_ent = lce(hidden, weight, target, bias, return_logprobs=True, return_entropy=True)
    np.testing.assert_array_equal(lp_ent[1], full[2])
    np.testing.assert_array_equal(lp_ent[2], full[3])
    grad_only = lce(hidden, weight, target, return_grad=True)
    assert len(grad_only) == 2 and grad_only[1][2] is None  # no bias, no d_bias


def test_float32_inputs_are_widened(rng):
    """The reference computes in float64 whatever the input dtype."""
    hidden, weight, bias, target = make_case(rng, 5, 8, 7)
    h32, w32, b32 = (a.astype(np.float32) for a in (hidden, weight, bias))
    out32 = lce(h32, w32, target.astype(np.int32), b32, return_grad=True, z_loss=1e-3)
    out64 = lce(
        h32.astype(np.float64),
        w32.astype(np.float64),
        target,
        b32.astype(np.float64),
        return_grad=True,
        z_loss=1e-3,
    )
    assert out32[0].dtype == np.float64 and out32[0] == out64[0]
    for a, b in zip(out32[1], out64[1], strict=True):
        assert a.dtype == np.float64
        np.testing.assert_array_equal(a, b)


def test_chunk_size_is_ignored(rng):
    hidden, weight, bias, target = make_case(rng, 17, 8, 7)
    base = lce(hidden, weight, target, bias, reduction="none", return_grad=True)
    for chunk_size in (1, 4, 1000):
        out = lce(
            hidden, weight, target, bias, reduction="none", return_grad=True, chunk_size=chunk_size
        )
        np.testing.assert_array_equal(out[0], base[0])
        for a, b in zip(out[1], base[1], strict=True):
            np.testing.assert_array_equal(a, b)


def test_closed_form_uniform_logits():
    """Zero weight and bias: uniform over V classes, ce = log V, entropy = log V,
    z-loss term = (log V)², gradient dx = p - onehot = 1/V - [c == t]."""
    v, d = 4, 3
    hidden = np.ones((2, d))
    weight = np.zeros((v, d))
    target = np.array([1, 3])
    loss, (d_hidden, d_weight, d_bias), logprobs, entropy = lce(
        hidden,
        weight,
        target,
        np.zeros(v),
        reduction="sum",
        z_loss=0.5,
        return_grad=True,
        return_logprobs=True,
        return_entropy=True,
    )
    log_v = np.log(v)
    assert_close(loss, 2 * (log_v + 0.5 * log_v**2))
    assert_close(logprobs, [-log_v, -log_v])
    assert_close(entropy, [log_v, log_v])
    dz = np.full((2, v), 1.0 / v) * (1.0 + 0.5 * 2 * log_v)
    dz[0, 1] -= 1.0
    dz[1, 3] -= 1.0
    assert_close(d_bias, dz.sum(0))
    assert_close(d_weight, dz.T @ hidden)
    assert_close(d_hidden, np.zeros((2, d)))  # weight is zero


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


def _valid(rng):
    hidden, weight, bias, target = make_case(rng, 5, 8, 7)
    return dict(hidden=hidden, weight=weight, target=target, bias=bias)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(weight=np.zeros((7, 6))), ValueError, "weight"),
        (dict(weight=np.zeros(8)), ValueError, "weight"),
        (dict(hidden=np.float64(1.0)), ValueError, "hidden"),
        (dict(bias=np.zeros(6)), ValueError, "bias"),
        (dict(weight_classes=np.ones(6)), ValueError, "weight_classes"),
        (dict(target=np.zeros(4, dtype=np.int64)), ValueError, "target"),
        (dict(target=np.zeros((5, 1), dtype=np.int64)), ValueError, "target"),
        (dict(target=np.array([0, 1, 7, 2, 3])), ValueError, "target"),
        (dict(target=np.array([0, 1, -1, 2, 3])), ValueError, "target"),
        (dict(target=np.zeros(5)), TypeError, "target"),
        (dict(target=np.zeros(5, dtype=bool)), TypeError, "target"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(softcap=0.0), ValueError, "softcap"),
        (dict(softcap=-5.0), ValueError, "softcap"),
        (dict(softcap=float("nan")), ValueError, "softcap"),
        (dict(z_loss=-1e-3), ValueError, "z_loss"),
        (dict(z_loss=float("inf")), ValueError, "z_loss"),
        (dict(z_loss=float("nan")), ValueError, "z_loss"),
        (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(label_smoothing=float("nan")), ValueError, "label_smoothing"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(grad_output=np.ones(5)), ValueError, "grad_output"),  # mean: a scalar
        (dict(reduction="sum", grad_output=np.ones(1)), ValueError, "grad_output"),
        (dict(reduction="none", grad_output=np.ones(4)), ValueError, "grad_output"),
        (dict(reduction="none", grad_output=np.ones((5, 1))), ValueError, "grad_output"),
        (dict(temperature="1"), TypeError, "temperature"),
        (dict(hidden=np.zeros((5, 8), dtype=complex)), TypeError, "hidden"),
    ],
)
def test_errors(change, exc, match, rng):
    args = {**_valid(rng), **change}
    with pytest.raises(exc, match=match):
        lce(**args, return_grad=True)


def test_target_out_of_range_with_other_ignore_index(rng):
    """-100 is an ordinary out-of-range value once ignore_index is something else."""
    args = _valid(rng)
    with pytest.raises(ValueError, match="target"):
        lce(**args, ignore_index=-1)
    with pytest.raises(TypeError):
        lce(**args, ignore_index=1.5)
