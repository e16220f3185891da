"""mlmath_native.dask: the softmax family, cross-entropy and attention on dask arrays, against the
in-memory results (themselves tested against the float64 reference), for several chunkings, on
the synchronous and threaded schedulers and on a two-process ``dask.distributed`` cluster."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys

import numpy as np
import pytest

import mlmath_native as mn
from mlmath_native.reference import cross_entropy as ref_ce
from mlmath_native.reference import softmax as ref_softmax

from conftest import assert_close

# dask is an optional extra (`.[dask]`): without it this file is skipped, not an error
dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
mnd = pytest.importorskip("mlmath_native.dask")

RTOL = {np.dtype(np.float32): 2e-6, np.dtype(np.float64): 1e-13}


def close(actual, expected):
    """Chunked against in-memory results: the same kernels, but a different SIMD split of the
    slices or order of the partial sums can move the last bits (absolute error up to the
    largest magnitude times a few ulp, e.g. for log_softmax = x - logsumexp near 0)."""
    expected = np.asarray(expected)
    actual = np.asarray(actual)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    rtol = RTOL[expected.dtype]
    scale = np.max(np.abs(expected[np.isfinite(expected)]), initial=1.0)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, equal_nan=True)


def sync(x):
    return x.compute(scheduler="synchronous")


# --- import -----------------------------------------------------------------------------------


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )


def test_importing_the_package_does_not_import_dask_and_a_missing_dask_is_explained():
    code = """
import sys
import mlmath_native
assert "dask" not in sys.modules, "import mlmath_native imported dask"
sys.modules["dask"] = None  # as if dask were not installed
try:
    import mlmath_native.dask
except ImportError as exc:
    print(exc)
else:
    raise SystemExit("no ImportError")
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert 'pip install "mlmath_native[dask]"' in result.stdout


# --- softmax family ---------------------------------------------------------------------------

SHAPE = (13, 7, 10)
CHUNKINGS = [
    (13, 7, 10),  # one block
    (4, 7, 10),  # uneven blocks on the leading axis
    (5, 3, 4),  # every axis chunked, the reduction axis too (rechunked)
    ((1, 12), (2, 5), (9, 1)),  # explicit uneven chunks
]


@pytest.mark.parametrize("chunks", CHUNKINGS)
@pytest.mark.parametrize("axis", [-1, 0, 1])
@pytest.mark.parametrize("log", [False, True])
def test_softmax_family_matches_in_memory(rng, chunks, axis, log):
    x = (rng.standard_normal(SHAPE) * 3).astype(np.float32)
    dx = da.from_array(x, chunks=chunks)
    y = (mnd.log_softmax if log else mnd.softmax)(dx, axis=axis)
    assert isinstance(y, da.Array) and y.dtype == np.float32 and y.shape == SHAPE
    # the reduction axis is one chunk, the others keep theirs
    for i, (c_out, c_in) in enumerate(zip(y.chunks, dx.chunks, strict=True)):
        assert c_out == ((SHAPE[i],) if i == axis % 3 else c_in)
    close(sync(y), (mn.log_softmax if log else mn.softmax)(x, axis=axis))


def test_softmax_dtypes_numpy_input_and_reference(rng):
    x = rng.standard_normal((6, 5))
    y = mnd.softmax(da.from_array(x, chunks=2), axis=0)
    assert y.dtype == np.float64
    assert_close(sync(y), ref_softmax.softmax(x, axis=0), np.float64, n=6)
    ints = np.arange(12).reshape(3, 4)
    close(sync(mnd.log_softmax(ints)), mn.log_softmax(ints))  # a NumPy input, computed in f64
    assert sync(mnd.softmax(np.float32(2.0))) == 1.0  # 0-d


def test_softmax_errors_are_raised_at_graph_construction():
    with pytest.raises(TypeError, match="softmax: x has unsupported dtype complex128"):
        mnd.softmax(da.zeros((3, 4), dtype=complex))
    with pytest.raises(ValueError, match="log_softmax: axis 2 is out of bounds"):
        mnd.log_softmax(da.zeros((3, 4)), axis=2)
    unknown = da.zeros((6, 4), chunks=3)[da.arange(6, chunks=3) > 2]
    with pytest.raises(ValueError, match="x has unknown chunk sizes"):
        mnd.softmax(unknown)


# --- cross-entropy ----------------------------------------------------------------------------


def ce_case(rng, layout, num_classes=6, dtype=np.float32):
    """logits, index targets (a run of ignored ones, so that whole blocks are ignored) and the
    class axis: "rows" (N, C) or "cols" (N, C, d)."""
    if layout == "rows":
        shape, axis, elem = (23, num_classes), -1, (23,)
    else:
        shape, axis, elem = (9, num_classes, 5), 1, (9, 5)
    logits = (rng.standard_normal(shape) * 3).astype(dtype)
    target = rng.integers(0, num_classes, elem)
    target[:4] = -100  # the first block(s) entirely ignored
    target.flat[::7] = -100
    return logits, target, axis


CE_CHUNKS = {
    "rows": [(23, 6), (5, 6), (4, 4), ((3, 20), (1, 5))],
    "cols": [(9, 6, 5), (4, 2, 3), ((2, 7), (6,), (1, 4))],
}


@pytest.mark.parametrize("layout, chunks", [(lay, c) for lay, cs in CE_CHUNKS.items() for c in cs])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_index_targets_match_in_memory(rng, layout, chunks, reduction):
    logits, target, axis = ce_case(rng, layout)
    weight = rng.random(6).astype(np.float32) + 0.5
    elem_chunks = chunks[: axis % logits.ndim] + chunks[axis % logits.ndim + 1 :]
    dl = da.from_array(logits, chunks=chunks)
    dt = da.from_array(target, chunks=elem_chunks[:1] + (2,) * (target.ndim - 1))
    for opts in (
        {},
        {"weight": weight},
        {"weight": weight, "label_smoothing": 0.2},
        {"ignore_index": 3, "label_smoothing": 0.1},
    ):
        t = target if "ignore_index" not in opts else np.where(target < 0, 3, target)
        dt_ = dt if t is target else da.from_array(t, chunks=dt.chunks)
        got = mnd.cross_entropy(dl, dt_, axis=axis, reduction=reduction, **opts)
        assert isinstance(got, da.Array) and got.dtype == np.float32
        want = mn.cross_entropy(logits, t, axis=axis, reduction=reduction, **opts)
        close(sync(got), want)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_probability_targets_and_dask_weight(rng, reduction):
    logits = rng.standard_normal((8, 5, 3))
    probs = mn.softmax(rng.standard_normal((8, 5, 3)), axis=1)
    weight = rng.random(5) + 0.5
    got = mnd.cross_entropy(
        da.from_array(logits, chunks=(3, 2, 2)),
        da.from_array(probs, chunks=(2, 5, 1)),  # other chunks than the logits: aligned
        axis=1,
        weight=da.from_array(weight, chunks=2),
        reduction=reduction,
        label_smoothing=0.3,
    )
    want = mn.cross_entropy(
        logits, probs, axis=1, weight=weight, reduction=reduction, label_smoothing=0.3
    )
    close(sync(got), want)
    if reduction == "mean":  # and the float64 reference, PyTorch's definition
        ref = ref_ce.cross_entropy(logits, probs, axis=1, weight=weight, label_smoothing=0.3)
        assert_close(sync(got), ref, np.float64, n=40)


def test_cross_entropy_mean_is_over_all_blocks(rng):
    """Blocks with different weight sums: the mean of block means would be wrong."""
    logits = rng.standard_normal((8, 4))
    target = np.array([0, 0, 0, -100, 1, 2, 3, 3])
    weight = np.array([10.0, 1.0, 0.5, 2.0])
    got = sync(mnd.cross_entropy(da.from_array(logits, chunks=4), target, weight=weight))
    per = mn.cross_entropy(logits, target, weight=weight, reduction="none")
    valid = target != -100
    close(got, np.float64(per.sum() / weight[target[valid]].sum()))
    close(got, mn.cross_entropy(logits, target, weight=weight))


def test_cross_entropy_all_ignored_gives_nan_for_mean_and_zero_for_sum(rng):
    logits = da.from_array(rng.standard_normal((6, 3)).astype(np.float32), chunks=2)
    target = np.full(6, -100)
    mean = sync(mnd.cross_entropy(logits, target))
    assert mean.dtype == np.float32 and np.isnan(mean)
    assert np.isnan(mn.cross_entropy(logits.compute(), target))
    assert sync(mnd.cross_entropy(logits, target, reduction="sum")) == 0.0


def test_cross_entropy_bad_label_names_its_position_in_the_whole_array(rng):
    logits = da.from_array(rng.standard_normal((4, 3, 6)), chunks=(2, 3, 4))
    target = np.zeros((4, 6), dtype=np.int64)
    target[3, 5] = 7
    loss = mnd.cross_entropy(logits, target, axis=1)  # building the graph is fine
    with pytest.raises(ValueError, match=r"target holds 7 at position \(3, 5\) but there are 3"):
        sync(loss)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"target": np.zeros(5, np.int64)}, ValueError, r"target has shape \(5,\)"),
        ({"target": np.zeros((6, 3))}, ValueError, r"target has shape \(6, 3\)"),
        ({"target": np.zeros(6, bool)}, TypeError, "target has dtype bool"),
        ({"weight": np.ones(3)}, ValueError, r"weight has shape \(3,\)"),
        ({"weight": np.ones(4, complex)}, TypeError, "weight has unsupported dtype"),
        ({"reduction": "avg"}, ValueError, "reduction is invalid"),
        ({"label_smoothing": 1.5}, ValueError, "label_smoothing is out of range"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index must be an integer"),
        ({"axis": 2}, ValueError, "axis 2 is out of bounds"),
        ({"logits": da.zeros((6, 4), dtype="U1")}, TypeError, "logits has unsupported dtype"),
        (
            {"target": np.full((6, 4), 0.25), "ignore_index": 0},
            ValueError,
            "ignore_index is not supported for probability targets",
        ),
    ],
)
def test_cross_entropy_errors_are_raised_at_graph_construction(kwargs, exc, match):
    args = {"logits": da.zeros((6, 4), chunks=2), "target": np.zeros(6, np.int64), **kwargs}
    with pytest.raises(exc, match=f"dask.cross_entropy: .*{match}"):
        mnd.cross_entropy(args.pop("logits"), args.pop("target"), **args)


# --- attention --------------------------------------------------------------------------------


def attention_case(rng, dtype=np.float32):
    """GQA: 6 query heads, 2 kv heads; v shared by the batch (leading 1)."""
    q = rng.standard_normal((3, 6, 9, 8)).astype(dtype)
    k = rng.standard_normal((3, 2, 11, 8)).astype(dtype)
    v = rng.standard_normal((1, 2, 11, 5)).astype(dtype)
    return q, k, v


ATTN_CHUNKS = [
    ((3,), (6,), (9,), (8,)),  # one block
    ((1, 2), (3, 3), (9,), (8,)),  # whole groups per block: k and v follow q
    ((2, 1), (2, 4), (4, 5), (3, 5)),  # q's head chunks split groups; L and D chunked too
    ((1, 1, 1), (1, 2, 3), (9,), (8,)),  # blocks inside one group, and a whole group
    ((3,), (2, 2, 2), (9,), (8,)),  # a block straddling two groups
]


@pytest.mark.parametrize("q_chunks", ATTN_CHUNKS)
@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"causal": True},
        {"causal": "lower_right", "mask": "bool"},
        {"mask": "float", "scale": 0.5},
    ],
)
def test_attention_matches_in_memory(rng, q_chunks, opts):
    q, k, v = attention_case(rng)
    opts = dict(opts)
    if opts.get("mask") == "bool":
        opts["mask"] = rng.random((6, 9, 11)) > 0.3  # per head, broadcast over the batch
    elif opts.get("mask") == "float":  # additive, per batch and head, as a chunked dask array
        mask = rng.standard_normal((3, 6, 9, 11)).astype(np.float32)
        opts["mask"] = da.from_array(mask, chunks=(1, 2, 3, 11))
    dq = da.from_array(q, chunks=q_chunks)
    dk = da.from_array(k, chunks=(2, 1, 11, 4))
    out = mnd.attention(dq, dk, v, **opts)
    assert isinstance(out, da.Array) and out.dtype == np.float32 and out.shape == (3, 6, 9, 5)
    assert out.chunks[-2:] == ((9,), (5,))
    mem_opts = {
        key: (val.compute() if isinstance(val, da.Array) else val) for key, val in opts.items()
    }
    close(sync(out), mn.attention(q, k, v, **mem_opts))


@pytest.mark.parametrize("q_chunks", ATTN_CHUNKS)
@pytest.mark.parametrize("dropout", [False, True])
def test_attention_options_match_in_memory(rng, q_chunks, dropout):
    """window, softcap, sinks, ALiBi, kv_len and num_splits: each block takes its heads' sinks
    and slopes and its batches' lengths, alone and with dropout (one call per (batch, head))."""
    q, k, v = attention_case(rng, np.float64)
    opts = {
        "causal": "lower_right",
        "window": (6, None),
        "softcap": 2.0,
        "sinks": rng.standard_normal(6),
        "alibi_slopes": np.linspace(0.0, 0.3, 6),
        "kv_len": np.array([11, 4, 0]),
        "num_splits": 2,
    }
    if dropout:
        opts.update(dropout_p=0.3, seed=7)
    dq = da.from_array(q, chunks=q_chunks)
    out = mnd.attention(dq, da.from_array(k, chunks=(2, 1, 11, 4)), v, **opts)
    close(sync(out), mn.attention(q, k, v, **opts))


def test_attention_options_are_checked_at_graph_construction(rng):
    q, k, v = attention_case(rng)
    dq = da.from_array(q, chunks=(1, 2, 9, 8))
    for opts, match in [
        ({"window": (-1, 0)}, "window left must be >= 0"),
        ({"softcap": 0.0}, "softcap must be finite and > 0"),
        ({"sinks": np.zeros(5)}, "sinks has shape"),
        ({"alibi_slopes": np.zeros(2)}, "alibi_slopes has shape"),
        ({"kv_len": [1, 2]}, "kv_len has shape"),
        ({"kv_len": [1, 2, 12]}, r"kv_len must be in \[0, Lk = 11\]"),
        ({"num_splits": -1}, "num_splits must be >= 0"),
    ]:
        with pytest.raises((ValueError, TypeError), match=f"^dask.attention: {match}"):
            mnd.attention(dq, k, v, **opts)


def test_attention_dropout_is_the_in_memory_draw_for_any_chunking(rng):
    q, k, v = attention_case(rng, np.float64)
    mask = rng.random((9, 11)) > 0.2
    want = mn.attention(q, k, v, mask=mask, causal=True, dropout_p=0.4, seed=2**63 + 5)
    for chunks in [(3, 6, 9, 8), (1, 3, 9, 8), (2, 2, 9, 8)]:
        out = mnd.attention(
            da.from_array(q, chunks=chunks),
            k,
            v,
            mask=mask,
            causal=True,
            dropout_p=0.4,
            seed=2**63 + 5,
        )
        close(sync(out), want)
    # a different seed draws differently
    other = mnd.attention(q, k, v, mask=mask, causal=True, dropout_p=0.4, seed=1)
    assert not np.allclose(sync(other), want)


def test_attention_two_d_and_multi_query(rng):
    q, k, v = (rng.standard_normal((7, 4)) for _ in range(3))
    out = mnd.attention(da.from_array(q, chunks=3), k, v, causal=True)
    assert out.shape == (7, 4)
    close(sync(out), mn.attention(q, k, v, causal=True))
    qh = rng.standard_normal((2, 4, 7, 4))  # multi-query: one kv head, head chunks of 1
    out = mnd.attention(da.from_array(qh, chunks=(1, 1, 7, 4)), k, v)
    assert out.chunks[:2] == ((1, 1), (1, 1, 1, 1))
    close(sync(out), mn.attention(qh, k, v))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"k": np.zeros((2, 3, 11, 7))}, ValueError, "k has feature size 7"),
        ({"k": np.zeros((2, 4, 11, 8)), "v": np.zeros((2, 4, 11, 5))}, ValueError, "multiple"),
        ({"v": np.zeros((2, 3, 10, 5))}, ValueError, "v has 10 rows"),
        ({"q": np.zeros((5, 6, 9, 8))}, ValueError, "leading dimensions"),
        ({"q": np.zeros(8)}, ValueError, "q has 1 dimensions"),
        ({"q": da.zeros((2, 6, 9, 8), dtype=complex)}, TypeError, "q has unsupported dtype"),
        ({"mask": np.ones((9, 10), bool)}, ValueError, r"mask has shape \(9, 10\)"),
        ({"mask": np.ones((9, 11), complex)}, TypeError, "mask has unsupported dtype"),
        ({"causal": "upper"}, ValueError, "causal is invalid"),
        ({"scale": float("inf")}, ValueError, "scale must be finite"),
        ({"dropout_p": 0.5}, ValueError, "needs an explicit seed"),
        ({"dropout_p": 1.0, "seed": 1}, ValueError, "dropout_p must be in"),
    ],
)
def test_attention_errors_are_raised_at_graph_construction(kwargs, exc, match):
    args = {
        "q": da.zeros((2, 6, 9, 8), chunks=(1, 2, 9, 8)),
        "k": np.zeros((2, 3, 11, 8)),
        "v": np.zeros((2, 3, 11, 5)),
        **kwargs,
    }
    with pytest.raises(exc, match=f"dask.attention: .*{match}"):
        mnd.attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


# --- schedulers -------------------------------------------------------------------------------


def check_all_kernels(rng, compute):
    """softmax, cross-entropy mean with ignore_index and weights, GQA attention with a mask:
    `compute(dask_array)` against the in-memory results."""
    x = rng.standard_normal((40, 33)).astype(np.float32)
    close(compute(mnd.softmax(da.from_array(x, chunks=(7, 10)))), mn.softmax(x))

    logits, target, axis = ce_case(rng, "cols")
    weight = rng.random(6).astype(np.float32) + 0.5
    loss = mnd.cross_entropy(
        da.from_array(logits, chunks=(2, 3, 5)), target, axis=axis, weight=weight
    )
    close(compute(loss), mn.cross_entropy(logits, target, axis=axis, weight=weight))

    q, k, v = attention_case(rng)
    mask = rng.random((9, 11)) > 0.3
    out = mnd.attention(da.from_array(q, chunks=(1, 3, 9, 8)), k, v, mask=mask, causal=True)
    close(compute(out), mn.attention(q, k, v, mask=mask, causal=True))
    out = mnd.attention(da.from_array(q, chunks=(1, 3, 9, 8)), k, v, dropout_p=0.3, seed=9)
    close(compute(out), mn.attention(q, k, v, dropout_p=0.3, seed=9))


def test_threaded_scheduler(rng, threads):
    mn.set_num_threads(1)  # one kernel thread per Dask thread
    check_all_kernels(rng, lambda a: a.compute(scheduler="threads", num_workers=2))
    with dask.config.set(scheduler="threads"):
        check_all_kernels(rng, lambda a: a.compute())


@pytest.fixture(scope="module")
def client():
    """A two-process local cluster (spawned workers, one thread each), closed at the end."""
    distributed = pytest.importorskip("distributed")

    def start():
        cluster = distributed.LocalCluster(
            n_workers=2,
            processes=True,
            threads_per_worker=1,
            dashboard_address=None,
            silence_logs=40,
            env={"OMP_NUM_THREADS": "1"},
        )
        return cluster, distributed.Client(cluster, timeout=60, set_as_default=False)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        cluster, client = pool.submit(start).result(timeout=120)
    try:
        client.wait_for_workers(2, timeout=60)
        yield client
    finally:
        client.close(timeout=30)
        cluster.close(timeout=30)


def test_distributed_local_cluster(rng, client):
    check_all_kernels(rng, lambda a: client.compute(a).result(timeout=60))
    # the same code as on one machine, with the cluster as the scheduler
    x = rng.standard_normal((12, 5))
    y = mnd.log_softmax(da.from_array(x, chunks=(5, 2)), axis=0)
    with dask.config.set(scheduler=client):
        close(y.compute(), mn.log_softmax(x, axis=0))
    assert len(client.scheduler_info()["workers"]) == 2


# --- benchmark rows ---------------------------------------------------------------------------


def test_benchmark_rows_run_and_report_the_threads_speedup():
    import dataclasses

    from mlmath_native import bench
    from mlmath_native.bench import suite

    cases = suite.select(["dask softmax"])
    assert [c.name for c in cases] == ["dask softmax threads", "dask softmax synchronous"]
    machine = {"copy_gbs": 20.0, "gemm_gflops": 100.0}
    rows = []
    for case in cases:
        small = dataclasses.replace(case, shape=(64, 33))
        rows.append(bench.run_case(small, machine, repeats=2, quick=False, with_torch=False))
        assert rows[-1]["ours_ms"] > 0 and rows[-1]["numpy_ms"] > 0
    assert suite.dask_threads_speedup(rows) > 0
    assert suite.dask_threads_speedup(rows[:1]) is None
