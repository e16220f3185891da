"""mlmath_native.dask.linear_cross_entropy against the in-memory mn.linear_cross_entropy (itself
tested against the float64 reference and PyTorch in test_linear_ce.py) on the same data, for
every reduction and option, several chunkings of hidden's token axes, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

import mlmath_native as mn

# dask is an optional extra (`.[dask]`): without it this file is skipped, not an error
dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
mnd = pytest.importorskip("mlmath_native.dask")

ALL_OUT = dict(return_grad=True, return_logprobs=True, return_entropy=True)
#: norm-wise tolerance relative to an output's largest value: the same kernels, but the blocks'
#: partial sums (loss, d_weight, d_bias, the mean's denominators) are added in another order
RTOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 2e-6, np.dtype(np.float16): 2e-3}

D, V = 6, 9
OPTIONS = {
    "plain": {},
    "smoothing+classes": dict(label_smoothing=0.2, weight_classes="cw"),
    "zloss+softcap+temp": dict(z_loss=0.03, softcap=2.5, temperature=0.7),
    "all": dict(
        label_smoothing=0.1, weight_classes="cw", z_loss=0.01, softcap=3.0, temperature=1.3
    ),
}
#: (hidden's leading shape, its chunks); the first 4 tokens are ignored: whole blocks in all but
#: one-block and 3d-both-axes
CHUNKINGS = {
    "one-block": ((13,), (13,)),
    "uneven": ((13,), (4,)),
    "explicit": ((13,), ((4, 1, 8),)),
    "single-rows": ((13,), (1,)),
    "3d-both-axes": ((4, 5), (2, 3)),
    "3d-uneven": ((4, 5), ((1, 3), (2, 2, 1))),
}


def problem(rng, lead=(13,), dtype=np.float64, bias=True):
    """hidden (*lead, D), weight (V, D), target (the first 4 tokens and one more ignored), bias,
    class weights."""
    hidden = rng.standard_normal((*lead, D)).astype(dtype)
    weight = (rng.standard_normal((V, D)) / np.sqrt(D)).astype(dtype)
    b = rng.standard_normal(V).astype(dtype) if bias else None
    target = rng.integers(0, V, lead)
    flat = target.reshape(-1)
    flat[:4] = -100
    flat[-2] = -100
    cw = rng.uniform(0.5, 2.0, V)
    return hidden, weight, target, b, cw


def options(name, cw):
    return {k: (cw if v == "cw" else v) for k, v in OPTIONS[name].items()}


def sync(*xs):
    return dask.compute(*xs, scheduler="synchronous")


def flat(result, all_out=True):
    """loss, d_hidden, d_weight, d_bias, logprobs, entropy of an ALL_OUT call."""
    if not all_out:
        return [result]
    loss, grads, logprobs, entropy = result
    return [loss, *grads, logprobs, entropy]


def assert_matches(ours, golden, rtol=None):
    names = ["loss", "d_hidden", "d_weight", "d_bias", "logprobs", "entropy"]
    for name, a, g in zip(names, ours, golden, strict=False):
        if g is None:
            assert a is None, name
            continue
        a, g = np.asarray(a), np.asarray(g)
        assert a.dtype == g.dtype and a.shape == g.shape, (name, a.dtype, g.dtype, a.shape)
        tol = RTOL[g.dtype] if rtol is None else rtol
        g64 = g.astype(np.float64)
        scale = np.max(np.abs(g64[np.isfinite(g64)]), initial=1e-30)
        np.testing.assert_allclose(
            a.astype(np.float64), g64, rtol=0, atol=tol * scale, equal_nan=True, err_msg=name
        )


def both(hidden, weight, target, b=None, chunks=None, **kw):
    """(dask result computed, in-memory result), flattened."""
    all_out = kw.get("return_grad", False)
    hd = da.from_array(hidden, chunks=(*chunks, D)) if chunks is not None else hidden
    lazy = mnd.linear_cross_entropy(hd, weight, target, b, **kw)
    golden = mn.linear_cross_entropy(hidden, weight, target, b, **kw)
    lazy_flat = flat(lazy, all_out)
    computed = list(sync(*[x for x in lazy_flat if x is not None]))
    ours = [None if x is None else computed.pop(0) for x in lazy_flat]
    return ours, flat(golden, all_out), lazy_flat


# --- agreement with the in-memory function ---------------------------------------------------


@pytest.mark.parametrize("chunking", list(CHUNKINGS))
@pytest.mark.parametrize("opts", list(OPTIONS))
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_matches_in_memory_float64(rng, reduction, opts, chunking):
    lead, chunks = CHUNKINGS[chunking]
    hidden, weight, target, b, cw = problem(rng, lead)
    ours, golden, lazy = both(
        hidden, weight, target, b, chunks, reduction=reduction, **options(opts, cw), **ALL_OUT
    )
    assert_matches(ours, golden)
    loss, d_hidden, d_weight, d_bias, logprobs, entropy = lazy
    token_chunks = da.from_array(hidden, chunks=(*chunks, D)).chunks[:-1]
    assert loss.chunks == (token_chunks if reduction == "none" else ())
    assert d_hidden.chunks == (*token_chunks, (D,))
    assert d_weight.chunks == ((V,), (D,)) and d_bias.chunks == ((V,),)
    assert logprobs.chunks == token_chunks and entropy.chunks == token_chunks


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_loss_alone_is_not_a_tuple(rng, reduction):
    hidden, weight, target, b, cw = problem(rng, (4, 5))
    kw = dict(reduction=reduction, **options("all", cw))
    lazy = mnd.linear_cross_entropy(da.from_array(hidden, chunks=(2, 2, D)), weight, target, **kw)
    assert isinstance(lazy, da.Array)
    assert_matches([sync(lazy)[0]], [mn.linear_cross_entropy(hidden, weight, target, **kw)])


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_float32(rng, reduction):
    hidden, weight, target, b, cw = problem(rng, (4, 5), np.float32)
    kw = dict(reduction=reduction, **options("all", cw), **ALL_OUT)
    ours, golden, _ = both(hidden, weight, target, b, ((1, 3), (2, 3)), **kw)
    assert np.asarray(ours[0]).dtype == np.float32 and ours[1].dtype == np.float32
    assert_matches(ours, golden)


def test_float16_computes_in_float32_per_block_and_rounds_once(rng):
    hidden, weight, target, b, cw = problem(rng, (12,), np.float16)
    ours, golden, lazy = both(hidden, weight, target, b, (5,), **options("all", cw), **ALL_OUT)
    assert [np.asarray(x).dtype for x in ours] == [np.asarray(x).dtype for x in golden]
    assert lazy[2].dtype == np.float16 and np.asarray(ours[0]).dtype == np.float32
    assert_matches(ours, golden)


def test_without_bias_and_partial_outputs(rng):
    hidden, weight, target, _, cw = problem(rng, (13,), bias=False)
    kw = dict(weight_classes=cw, z_loss=0.02)
    lazy = mnd.linear_cross_entropy(
        da.from_array(hidden, chunks=(4, D)), weight, target, return_grad=True, **kw
    )
    loss, (d_hidden, d_weight, d_bias) = lazy
    assert d_bias is None
    golden_loss, golden_grads = mn.linear_cross_entropy(
        hidden, weight, target, return_grad=True, **kw
    )
    assert_matches(sync(loss, d_hidden, d_weight), [golden_loss, *golden_grads[:2]])
    for kw2 in (dict(return_logprobs=True), dict(return_entropy=True)):
        ours = sync(*mnd.linear_cross_entropy(hidden, weight, target, reduction="sum", **kw2))
        assert_matches(
            ours, mn.linear_cross_entropy(hidden, weight, target, reduction="sum", **kw2)
        )


# --- grad_output, all-ignored, dask operands ---------------------------------------------------


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("as_dask", [False, True])
def test_scalar_grad_output_scales_the_gradients(rng, reduction, as_dask):
    hidden, weight, target, b, cw = problem(rng, (4, 5))
    g = da.from_array(np.array(2.5)) if as_dask else 2.5
    kw = dict(reduction=reduction, **options("all", cw), **ALL_OUT)
    lazy = mnd.linear_cross_entropy(
        da.from_array(hidden, chunks=(1, 2, D)), weight, target, b, grad_output=g, **kw
    )
    golden = mn.linear_cross_entropy(hidden, weight, target, b, grad_output=2.5, **kw)
    assert_matches(sync(*flat(lazy)), flat(golden))


@pytest.mark.parametrize("as_dask", [False, True])
def test_per_token_grad_output_for_none(rng, as_dask):
    hidden, weight, target, b, cw = problem(rng, (4, 5))
    g = rng.uniform(-1.0, 2.0, (4, 5))
    g_in = da.from_array(g, chunks=(4, 1)) if as_dask else g  # other chunks than hidden's
    kw = dict(reduction="none", **options("all", cw), **ALL_OUT)
    lazy = mnd.linear_cross_entropy(
        da.from_array(hidden, chunks=(2, 3, D)), weight, target, b, grad_output=g_in, **kw
    )
    golden = mn.linear_cross_entropy(hidden, weight, target, b, grad_output=g, **kw)
    assert lazy[0].chunks == ((2, 2), (3, 2))
    assert_matches(sync(*flat(lazy)), flat(golden))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_every_token_ignored(rng, reduction):
    hidden, weight, _, b, cw = problem(rng, (10,))
    target = np.full(10, -1)
    kw = dict(reduction=reduction, ignore_index=-1, **options("all", cw), **ALL_OUT)
    ours, golden, _ = both(hidden, weight, target, b, (3,), **kw)
    assert_matches(ours, golden)
    if reduction == "mean":
        assert np.isnan(ours[0])
    else:
        assert np.all(np.asarray(ours[0]) == 0.0)


def test_dask_operands_are_rechunked_and_results_follow_hidden(rng):
    hidden, weight, target, b, cw = problem(rng, (13,))
    kw = dict(reduction="mean", **options("all", cw), **ALL_OUT)
    lazy = mnd.linear_cross_entropy(
        da.from_array(hidden, chunks=(5, 2)),  # D chunked too: rechunked to one chunk
        da.from_array(weight, chunks=(4, 3)),
        da.from_array(target, chunks=3),
        da.from_array(b, chunks=2),
        **{**kw, "weight_classes": da.from_array(cw, chunks=5)},
    )
    assert lazy[1][0].chunks == ((5, 5, 3), (D,)) and lazy[2].chunks == ((5, 5, 3),)
    assert_matches(
        sync(*flat(lazy)), flat(mn.linear_cross_entropy(hidden, weight, target, b, **kw))
    )


def test_one_token_and_no_tokens(rng):
    hidden, weight, target, b, cw = problem(rng, (13,))
    for h, t in ((hidden[5], target[5]), (hidden[:0], target[:0])):
        for reduction in ("none", "sum", "mean"):
            kw = dict(reduction=reduction, **options("all", cw), **ALL_OUT)
            ours = sync(*flat(mnd.linear_cross_entropy(h, weight, t, b, **kw)))
            assert_matches(ours, flat(mn.linear_cross_entropy(h, weight, t, b, **kw)))


def test_one_kernel_call_per_block_and_the_same_bits_every_time(rng, monkeypatch):
    hidden, weight, target, b, cw = problem(rng, (4, 5))
    calls = []
    original = mnd._linear_ce_np

    def spy(h, *args, **kwargs):
        calls.append(h.shape)
        return original(h, *args, **kwargs)

    monkeypatch.setattr(mnd, "_linear_ce_np", spy)
    kw = dict(reduction="mean", **options("all", cw), **ALL_OUT)
    lazy = flat(
        mnd.linear_cross_entropy(da.from_array(hidden, chunks=(2, 2, D)), weight, target, b, **kw)
    )
    first = dask.compute(*lazy, scheduler="threads")
    assert len(calls) == 2 * 3  # one call per block, for all six outputs
    second = dask.compute(*lazy, scheduler="threads")
    for a, c in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, c)


# --- bad input ---------------------------------------------------------------------------------

BAD = [
    ({"weight": np.zeros((5, 4))}, "weight has shape"),
    ({"weight": np.zeros(3)}, "weight has shape"),
    ({"weight": np.array([["a"] * 3] * 4)}, "weight has unsupported dtype"),
    ({"weight": np.zeros((0, 3))}, "no rows"),
    ({"bias": np.zeros(5)}, "bias has shape"),
    ({"weight_classes": np.ones(3)}, "weight_classes has shape"),
    ({"target": np.array([0, 1])}, "target has shape"),
    ({"target": np.array([0.0, 1.0, 2.0])}, "target has dtype"),
    ({"temperature": 0.0}, "temperature"),
    ({"softcap": -1.0}, "softcap"),
    ({"z_loss": -1.0}, "z_loss"),
    ({"z_loss": float("nan")}, "z_loss"),
    ({"label_smoothing": 1.5}, "label_smoothing"),
    ({"reduction": "avg"}, "reduction"),
    ({"ignore_index": 1.5}, "ignore_index"),
    ({"grad_output": np.ones(3)}, "grad_output"),
    ({"grad_output": np.ones(2), "reduction": "none"}, "grad_output"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"hidden": np.zeros(3)[0]}, "hidden is 0-d"),
    ({"hidden": np.array([["a"] * 3] * 3)}, "hidden has unsupported dtype"),
]


def error_of(call):
    try:
        call()
    except (TypeError, ValueError) as exc:
        return type(exc), str(exc)
    raise AssertionError("no error")


def bad_args(rng, change):
    args = {
        "hidden": rng.standard_normal((3, 3)),
        "weight": rng.standard_normal((4, 3)),
        "target": np.array([0, 1, 2]),
        "bias": np.zeros(4),
    }
    kw = {"return_grad": True}
    for key, value in change.items():
        (args if key in args else kw)[key] = value
    return args, kw


@pytest.mark.parametrize("change, match", BAD, ids=[m for _, m in BAD])
def test_bad_input_raises_the_in_memory_error_at_once(rng, change, match):
    args, kw = bad_args(rng, change)
    kind, message = error_of(lambda: mn.linear_cross_entropy(*args.values(), **kw))
    assert match in message
    with pytest.raises(kind) as info:  # at graph construction: nothing is computed
        mnd.linear_cross_entropy(*args.values(), **kw)
    assert str(info.value) == "dask." + message


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("label", [9, -1])
def test_bad_label_names_its_flat_position_in_the_whole_target(rng, reduction, label):
    hidden, weight, target, b, _ = problem(rng, (4, 5))
    target[2, 3] = label
    kind, message = error_of(
        lambda: mn.linear_cross_entropy(hidden, weight, target, b, reduction=reduction)
    )
    assert "flat position 13" in message
    lazy = mnd.linear_cross_entropy(
        da.from_array(hidden, chunks=(3, 2, D)),
        weight,
        da.from_array(target),
        b,
        reduction=reduction,
    )
    with pytest.raises(kind) as info:
        sync(lazy)
    assert str(info.value) == "dask." + message


def test_dask_target_of_unknown_chunk_sizes_is_refused(rng):
    hidden, weight, target, b, _ = problem(rng, (13,))
    t = da.from_array(target, chunks=4)
    t = t[t > -1000]  # the same values, unknown chunk sizes
    with pytest.raises(ValueError, match="target has unknown chunk sizes"):
        mnd.linear_cross_entropy(hidden, weight, t)
