"""mn.linear_cross_entropy (fused linear + cross-entropy) against the float64 reference
(mlmath_native.reference.linear_cross_entropy, itself checked against PyTorch in
test_linear_ce_reference.py), on every ISA path (run with MLMATH_NATIVE_ISA=scalar|avx2|...)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from sixteen import HALF_NAMES, dtype_of, unit_roundoff

import mlmath_native as mn
from mlmath_native.reference import linear_cross_entropy as ref_module

ref = ref_module.linear_cross_entropy

ALL_OUT = dict(return_grad=True, return_logprobs=True, return_entropy=True)


def problem(rng, n, d, v, dtype=np.float64, bias=True, ignored=(0,)):
    hidden = rng.standard_normal((n, d)).astype(dtype)
    weight = (rng.standard_normal((v, d)) / np.sqrt(max(d, 1))).astype(dtype)
    b = rng.standard_normal(v).astype(dtype) if bias else None
    target = rng.integers(0, v, n)
    for i in ignored:
        if i < n:
            target[i] = -100
    return hidden, weight, target, b


def flat(result):
    """loss, d_hidden, d_weight, d_bias, logprobs, entropy of an ALL_OUT call."""
    loss, grads, logprobs, entropy = result
    return [np.asarray(loss), *grads, logprobs, entropy]


def assert_matches(ours, golden, rtol):
    names = ["loss", "d_hidden", "d_weight", "d_bias", "logprobs", "entropy"]
    for name, a, g in zip(names, flat(ours), flat(golden), strict=True):
        if g is None:
            assert a is None, name
            continue
        a = np.asarray(a, dtype=np.float64)
        assert a.shape == np.shape(g), name
        scale = float(np.max(np.abs(g))) if np.size(g) else 0.0
        np.testing.assert_allclose(a, g, rtol=0, atol=rtol * max(scale, 1e-30), err_msg=name)


def rtol_for(dtype, *lengths):
    """Norm-wise tolerance relative to an output's largest value: a few ulps plus the drift of
    sums of the given lengths."""
    eps = float(np.finfo(dtype).eps)
    return eps * (32 + 8 * sum(np.sqrt(max(n, 1)) for n in lengths))


OPTIONS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"label_smoothing": 0.1},
    {"weight_classes": "random", "label_smoothing": 0.2},
    {"z_loss": 1e-3},
    {"softcap": 4.0},
    {"temperature": 0.7},
    {"softcap": 3.0, "temperature": 1.5, "z_loss": 1e-2, "reduction": "sum"},
    {
        "weight_classes": "random",
        "label_smoothing": 0.1,
        "z_loss": 1e-3,
        "softcap": 5.0,
        "temperature": 0.8,
        "reduction": "none",
        "grad_output": "random",
    },
    {"reduction": "mean", "grad_output": 2.5},
]


def resolve(options, rng, n, v):
    out = dict(options)
    if out.get("weight_classes") == "random":
        out["weight_classes"] = rng.random(v) + 0.25
    if out.get("grad_output") == "random":
        out["grad_output"] = rng.standard_normal(n)
    return out


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(sorted(o)) or "plain")
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_matches_reference_for_every_option(rng, dtype, options, chunk_size):
    n, d, v = 11, 9, 37
    hidden, weight, target, bias = problem(rng, n, d, v, dtype, ignored=(0, 5))
    kw = resolve(options, rng, n, v)
    ours = mn.linear_cross_entropy(
        hidden, weight, target, bias, chunk_size=chunk_size, **kw, **ALL_OUT
    )
    golden = ref(hidden, weight, target, bias, **kw, **ALL_OUT)
    assert np.asarray(ours[0]).dtype == dtype
    assert_matches(ours, golden, rtol_for(dtype, d, v, n))


@pytest.mark.parametrize("n", [1, 7, 16, 17, 33])
@pytest.mark.parametrize("d", [1, 8, 9])
@pytest.mark.parametrize("v", [1, 8, 17, 31])
def test_tails_of_tokens_features_and_classes(rng, n, d, v):
    hidden, weight, target, bias = problem(rng, n, d, v, np.float32, ignored=(1,))
    for chunk_size in (None, 16, 5):
        ours = mn.linear_cross_entropy(
            hidden, weight, target, bias, chunk_size=chunk_size, label_smoothing=0.1, **ALL_OUT
        )
        golden = ref(hidden, weight, target, bias, label_smoothing=0.1, **ALL_OUT)
        assert_matches(ours, golden, rtol_for(np.float32, d, v, n))


def test_no_bias_and_loss_only_forms(rng):
    hidden, weight, target, _ = problem(rng, 6, 5, 9, ignored=())
    loss = mn.linear_cross_entropy(hidden, weight, target)
    assert np.ndim(loss) == 0
    np.testing.assert_allclose(loss, ref(hidden, weight, target), rtol=1e-13)
    loss, (dh, dw, db) = mn.linear_cross_entropy(hidden, weight, target, return_grad=True)
    assert db is None and dh.shape == hidden.shape and dw.shape == weight.shape
    loss, logprobs = mn.linear_cross_entropy(hidden, weight, target, return_logprobs=True)
    np.testing.assert_allclose(logprobs, ref(hidden, weight, target, return_logprobs=True)[1])


def test_threads_give_the_same_bits(rng, threads):
    hidden, weight, target, bias = problem(rng, 70, 40, 300, np.float32, ignored=(3,))
    results = []
    for t in (1, 2, 3):
        mn.set_num_threads(t)
        results.append(
            flat(
                mn.linear_cross_entropy(
                    hidden, weight, target, bias, chunk_size=16, z_loss=1e-3, **ALL_OUT
                )
            )
        )
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_array_equal(a, b)


def test_strided_and_batched_inputs(rng):
    base = rng.standard_normal((4, 3, 2 * 6))
    hidden = base[..., ::2]  # (4, 3, 6), a stride of 2 elements
    weight = np.asfortranarray(rng.standard_normal((10, 6)))
    target = rng.integers(0, 10, (4, 3))
    target[1, 2] = -100
    ours = mn.linear_cross_entropy(hidden, weight, target, reduction="none", **ALL_OUT)
    golden = ref(
        np.ascontiguousarray(hidden),
        np.ascontiguousarray(weight),
        target,
        reduction="none",
        **ALL_OUT,
    )
    assert ours[0].shape == (4, 3) and ours[1][0].shape == (4, 3, 6)
    assert_matches(ours, golden, rtol_for(np.float64, 6, 10, 12))
    reversed_weight = weight[::-1]  # negative strides: copied by the wrapper
    np.testing.assert_allclose(
        mn.linear_cross_entropy(hidden, reversed_weight, target),
        ref(hidden, np.ascontiguousarray(reversed_weight), target),
        rtol=1e-13,
    )


def test_masked_classes_at_minus_infinity(rng):
    hidden, weight, target, bias = problem(rng, 5, 4, 12, ignored=())
    bias[[2, 7]] = -np.inf  # masked vocabulary entries
    target[target == 2] = 3
    target[target == 7] = 3
    loss, (dh, dw, db), logprobs, entropy = mn.linear_cross_entropy(
        hidden, weight, target, bias, **ALL_OUT
    )
    assert np.isfinite(loss) and np.all(np.isfinite(dh)) and np.all(np.isfinite(dw))
    assert np.all(np.isfinite(entropy)) and np.all(db[[2, 7]] == 0)
    golden = ref(hidden, weight, target, bias, return_grad=True, return_logprobs=True)
    np.testing.assert_allclose(loss, golden[0], rtol=1e-13)
    np.testing.assert_allclose(dh, golden[1][0], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(logprobs, golden[2], rtol=1e-13)
    finite = bias.copy()
    finite[[2, 7]] = -1e4  # the same distribution to double precision
    np.testing.assert_allclose(
        entropy, ref(hidden, weight, target, finite, return_entropy=True)[1], rtol=1e-12
    )


def test_all_tokens_ignored(rng):
    hidden, weight, _, bias = problem(rng, 4, 3, 5)
    target = np.full(4, -100)
    loss, (dh, dw, db) = mn.linear_cross_entropy(
        hidden, weight, target, bias, z_loss=1e-3, return_grad=True
    )
    assert np.isnan(loss)
    assert not dh.any() and not dw.any() and not db.any()
    assert mn.linear_cross_entropy(hidden, weight, target, bias, reduction="sum") == 0


def test_empty_tokens(rng):
    hidden = np.zeros((0, 3))
    weight = rng.standard_normal((5, 3))
    loss, (dh, dw, db) = mn.linear_cross_entropy(
        hidden, weight, np.zeros(0, np.int64), return_grad=True
    )
    assert np.isnan(loss) and dh.shape == (0, 3) and not dw.any() and db is None


def test_large_vocabulary_in_float32(rng):
    """V = 262144 with float32 accumulation against float64 (Megatron's drift past 250k)."""
    n, d, v = 3, 16, 262144
    hidden, weight, target, bias = problem(rng, n, d, v, np.float32, ignored=())
    hidden *= 4
    ours = mn.linear_cross_entropy(hidden, weight, target, bias, z_loss=1e-4, **ALL_OUT)
    golden = ref(hidden, weight, target, bias, z_loss=1e-4, **ALL_OUT)
    assert_matches(
        ours, golden, rtol_for(np.float32, d, n) + 4 * np.finfo(np.float32).eps * np.log2(v)
    )


@pytest.mark.parametrize("name", HALF_NAMES)
def test_16bit_inputs_compute_in_float32(rng, name):
    dtype = dtype_of(name)
    n, d, v = 13, 24, 50
    hidden, weight, target, bias = problem(rng, n, d, v, np.float32, ignored=(2,))
    hidden, weight, bias = (a.astype(dtype) for a in (hidden, weight, bias))
    ours = mn.linear_cross_entropy(
        hidden, weight, target, bias, softcap=6.0, chunk_size=4, **ALL_OUT
    )
    golden = ref(
        *(a.astype(np.float64) for a in (hidden, weight)),
        target,
        bias.astype(np.float64),
        softcap=6.0,
        **ALL_OUT,
    )
    assert np.asarray(ours[0]).dtype == np.float32
    assert all(g.dtype == dtype for g in ours[1])
    np.testing.assert_allclose(ours[0], golden[0], rtol=1e-5)
    u = unit_roundoff(dtype)
    for got, want in zip(ours[1], golden[1], strict=True):  # one rounding of a float32 sum
        got = got.astype(np.float64)
        np.testing.assert_allclose(got, want, rtol=2 * u, atol=1e-5 * np.max(np.abs(want)))


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(sorted(o)) or "plain")
def test_against_pytorch_autograd(rng, options):
    """Every output against F.linear + F.cross_entropy (+ the z-loss) and autograd in float64."""
    pytest.importorskip("torch")
    from test_linear_ce_reference import torch_lce  # needs torch: imported once it is there

    hidden, weight, target, bias = problem(rng, 9, 7, 23, ignored=(4,))
    kw = resolve(options, rng, 9, 23)
    ours = mn.linear_cross_entropy(hidden, weight, target, bias, chunk_size=4, **kw, **ALL_OUT)
    theirs = torch_lce(hidden, weight, target, bias, **kw)
    assert_matches(ours, theirs, rtol_for(np.float64, 7, 23, 9))


BAD = [
    ({"weight": np.zeros((5, 4))}, ValueError, "weight has shape"),
    ({"bias": np.zeros(5)}, ValueError, "bias has shape"),
    ({"weight_classes": np.ones(3)}, ValueError, "weight_classes has shape"),
    ({"target": np.array([0, 5, 1])}, ValueError, "target holds 5"),
    ({"target": np.array([0, -1, 1])}, ValueError, "target holds -1"),
    ({"target": np.array([0, 1])}, ValueError, "target has shape"),
    ({"target": np.array([0.0, 1.0, 2.0])}, TypeError, "target has dtype"),
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"softcap": -1.0}, ValueError, "softcap"),
    ({"z_loss": -1.0}, ValueError, "z_loss"),
    ({"z_loss": float("nan")}, ValueError, "z_loss"),
    ({"label_smoothing": 1.5}, ValueError, "label_smoothing"),
    ({"reduction": "avg"}, ValueError, "reduction"),
    ({"grad_output": np.ones(3)}, ValueError, "grad_output"),
    ({"chunk_size": 0}, ValueError, "chunk_size"),
    ({"hidden": np.zeros(3)[0]}, ValueError, "hidden is 0-d"),
    ({"hidden": np.array([["a"] * 3] * 3)}, TypeError, "hidden"),
    ({"weight": np.zeros((0, 3))}, ValueError, "no rows"),
]


@pytest.mark.parametrize("change, error, match", BAD, ids=[m for _, _, m in BAD])
def test_bad_input_is_refused_clearly(rng, change, error, match):
    args = {
        "hidden": rng.standard_normal((3, 3)),
        "weight": rng.standard_normal((4, 3)),
        "target": np.array([0, 1, 2]),
        "bias": np.zeros(4),
    }
    kw = {"return_grad": True}
    for key, value in change.items():
        (args if key in args else kw)[key] = value
    before = {k: np.copy(a) for k, a in args.items()}
    with pytest.raises(error, match=match):
        mn.linear_cross_entropy(args["hidden"], args["weight"], args["target"], args["bias"], **kw)
    for k, a in args.items():
        np.testing.assert_array_equal(a, before[k])


PEAK_SCRIPT = """
import json, numpy as np, mlmath_native as mn
n, d, v = {n}, 256, 131072
rng = np.random.default_rng(0)
hidden = rng.standard_normal((n, d), dtype=np.float32)
weight = rng.standard_normal((v, d), dtype=np.float32) * 0.05
target = rng.integers(0, v, n)
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
before = peak()
loss, (dh, dw, db) = mn.linear_cross_entropy(hidden, weight, target, return_grad=True)
print(json.dumps({{"extra": peak() - before - dh.nbytes - dw.nbytes, "loss": float(loss)}}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's VmHWM reset")
def test_memory_stays_bounded_at_a_large_vocabulary():
    """D = 256, V = 131072: the logits of 512 tokens would be 256 MiB (and their gradient as much
    again); the fused call may add at most 160 MiB above its inputs and outputs (the 128 MiB chunk
    of logits, the GEMM's packing buffers and the per-token vectors)."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PEAK_SCRIPT.format(n=512))],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout)
    assert np.isfinite(result["loss"])
    assert result["extra"] <= 160 * 2**20, result
