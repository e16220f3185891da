"""The benchmark CLI's plumbing (the timings themselves never go into pass/fail tests)."""

from __future__ import annotations

import dataclasses
import json

from mlmath_native import bench
from mlmath_native.bench import suite

MACHINE = {"copy_gbs": 20.0, "gemm_gflops": 100.0}


def test_list_and_only(capsys):
    assert bench.run(["--list"]) == 0
    listed = capsys.readouterr().out
    for shape in ("4096x4096", "65536x128", "256x32000"):
        assert shape in listed
    assert bench.run(["--only", "no-such-kernel"]) == 2
    assert {c.name for c in suite.select(["logsumexp"])} == {"logsumexp"}


def small_shape(case):
    """A quick shape of the case's kind: (params, tensors), (m, k, n), (N, C, HW, K, R),
    (B, H, L, D) and the attention rows' own, (N, D, V), 2-d."""
    if "params" in (case.label or ""):
        return (1000, case.shape[1])
    if case.name.startswith("matmul") and "dot-like" not in case.name:
        return (9, 17, 5)
    if case.name == "matmul dot-like":
        return (1, 20001, 1)
    if case.name.startswith("conv2d"):
        n, c, hw, k, r = case.shape
        return (1, c, 2 * r + 3, k, r)
    if case.name.startswith("attention decode"):  # (B, Hq, Hkv, Lk, D)
        return (1, 4, 2, 1000, 16)
    if case.name.startswith("attention fwd+bwd window"):  # (B, H, L, D, window)
        return (1, 2, 300, 16, 50)
    if case.name.startswith("attention varlen"):  # (length divisor, H, D): 2 to 64 tokens
        return (32, 2, 16)
    if case.name.startswith("attention"):
        return (1, 2, 37, 16)
    if case.name.startswith("linear_cross_entropy"):
        return (9, 17, 37)
    return (8, 37)


def test_every_case_runs_on_a_small_shape_and_reports_a_row():
    rows = []
    for case in suite.CASES:
        small = dataclasses.replace(case, shape=small_shape(case))
        row = bench.run_case(small, MACHINE, repeats=2, quick=False, with_torch=False)
        assert row["ours_ms"] > 0 and row["torch_ms"] is None and row["achieved"] > 0
        if case.numpy is not None:  # training steps have no NumPy contender
            assert row["numpy_ms"] > 0 and row["numpy_ratio"] > 0
        assert row["shape"]
        rows.append(row)
    table = bench.format_table(rows)
    assert table.count("\n") == len(rows) + 1
    json.dumps(rows)  # JSON-ready


def test_numpy_formulas_match_ours():
    x = suite.randn((5, 9))
    import numpy as np

    import mlmath_native as mn

    np.testing.assert_allclose(suite.np_softmax(x), mn.softmax(x), rtol=1e-5)
    np.testing.assert_allclose(suite.np_log_softmax(x), mn.log_softmax(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(suite.np_logsumexp(x), mn.logsumexp(x), rtol=1e-5)
    t = np.array([0, 3, 8, 1, 2])
    loss, grad = mn.cross_entropy(x, t, return_grad=True)
    np_loss, np_grad = suite.np_cross_entropy_grad(x, t)
    np.testing.assert_allclose(suite.np_cross_entropy(x, t), loss, rtol=1e-5)
    np.testing.assert_allclose(np_loss, loss, rtol=1e-5)
    np.testing.assert_allclose(np_grad, grad, rtol=1e-5, atol=1e-7)
    q, k, v = (suite.randn((2, 7, 4), seed=i) for i in range(3))
    for causal in (False, True):
        np.testing.assert_allclose(
            suite.np_attention(q, k, v, causal), mn.attention(q, k, v, causal=causal), atol=1e-6
        )


def test_allocating_rows_show_the_cache_off_time():
    """Rows whose results come from the output cache are timed again with it off (NumPy and
    PyTorch have no such cache); in-place rows say the cache plays no part."""
    import mlmath_native as mn

    limit = mn.output_cache_info()["limit_bytes"]
    alloc = [c for c in suite.CASES if c.name == "softmax"][0]
    inplace = [c for c in suite.CASES if c.name == "softmax out="][0]
    shape = (512, 1024)  # 2 MiB of float32 results: above the cache's 1 MiB threshold
    rows = [
        bench.run_case(
            dataclasses.replace(c, shape=shape), MACHINE, repeats=2, quick=False, with_torch=False
        )
        for c in (alloc, inplace)
    ]
    assert rows[0]["output_cache"] and rows[0]["ours_nocache_ms"] > 0
    assert not rows[1]["output_cache"] and rows[1]["ours_nocache_ms"] is None
    assert mn.output_cache_info()["limit_bytes"] == limit  # restored
    lines = bench.format_table(rows).splitlines()
    assert "no-cache ms" in lines[0]
    assert lines[3].split()[4] == "-"  # softmax out=: no cache-off time


def test_machine_line_says_the_calibration_is_a_best_of():
    info = {
        **MACHINE,
        "copy_gbs_1thread": 15.0,
        "copy_bytes": 64 << 20,
        "gemm_n": 1024,
        "numpy": "2",
        "calibration_repeats": 7,
    }
    assert "best of 7 runs" in bench.format_machine(info, 2, None)
