"""Reliability: every kernel family gives bitwise identical results for 1, 2 and 3 threads;
many Python threads calling mixed kernels while another changes the thread count get the
single-threaded results without deadlock; multiprocessing (spawn, forkserver, fork) works after
the parent has started OpenMP threads (Note [fork] in src/cpp/dispatch/threads.cpp)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import mlmath_native as mn

THREAD_COUNTS = (1, 2, 3)


def as_arrays(result) -> list[np.ndarray]:
    """A kernel's result (an array, a scalar or a tuple of them) as a flat list of arrays."""
    if isinstance(result, (tuple, list)):
        return [a for r in result for a in as_arrays(r)]
    return [np.asarray(result)]


def assert_bitwise_equal(got, want, what: str = "") -> None:
    got, want = as_arrays(got), as_arrays(want)
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{what}[{i}]"
        if np.ascontiguousarray(a).tobytes() != np.ascontiguousarray(b).tobytes():
            np.testing.assert_array_equal(a, b, err_msg=f"{what}[{i}]")
            raise AssertionError(f"{what}[{i}]: equal values, different bits (signed zeros?)")


# -- every kernel family: 1, 2 and 3 threads give the same bits ------------------------------------
#
# Each case builds its inputs once and returns a call that runs the kernel(s) from scratch
# (optimizer steps start from fresh copies of the parameters).  Sizes are a few hundred thousand
# elements or several MFLOP, well above the work one thread takes alone (kMinParallelWork).


def _softmax_axis(axis, dtype=np.float32, shape=(48, 80, 96)):
    def build(rng):
        x = (rng.standard_normal(shape) * 3).astype(dtype)
        return lambda: [f(x, axis=axis) for f in (mn.softmax, mn.log_softmax, mn.logsumexp)]

    return build


def _softmax_backward(rng):
    x = rng.standard_normal((64, 60, 100)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y = {axis: mn.softmax(x, axis=axis) for axis in (0, 2)}
    ly = {axis: mn.log_softmax(x, axis=axis) for axis in (0, 2)}
    return lambda: [
        r
        for axis in (0, 2)
        for r in (
            mn.softmax_backward(y[axis], dy, axis=axis),
            mn.log_softmax_backward(ly[axis], dy, axis=axis),
        )
    ]


def _cross_entropy_index(rng):
    logits = (rng.standard_normal((4096, 100)) * 2).astype(np.float32)
    target = rng.integers(0, 100, 4096)
    target[::17] = -100
    weight = rng.random(100).astype(np.float32) + 0.5
    return lambda: [
        mn.cross_entropy(
            logits, target, weight=weight, label_smoothing=ls, reduction=red, return_grad=True
        )
        for red in ("none", "mean", "sum")
        for ls in (0.0, 0.1)
    ]


def _cross_entropy_spatial_prob(rng):
    logits = rng.standard_normal((8, 40, 32, 32)).astype(np.float64)
    target = mn.softmax(rng.standard_normal(logits.shape), axis=1)
    index = rng.integers(0, 40, (8, 32, 32))
    return lambda: [
        mn.cross_entropy(logits, t, axis=1, reduction=red, return_grad=True)
        for t in (target, index)
        for red in ("none", "mean", "sum")
    ]


def _optimizer(make):
    def build(rng):
        start = [rng.standard_normal(n).astype(np.float32) for n in (300000, 7, 70000)]
        grads = [[(rng.standard_normal(p.shape)).astype(np.float32) for p in start] for _ in "abc"]

        def run():
            params = [p.copy() for p in start]
            opt = make(params)
            norms = [opt.step(g).grad_norm for g in grads]
            return params + [np.array(norms, dtype=np.float64)]

        return run

    return build


def _matmul_batched(rng):
    a = rng.standard_normal((6, 160, 200)).astype(np.float32)
    b = rng.standard_normal((6, 200, 120)).astype(np.float32)
    a2 = rng.standard_normal((200, 300))
    b2 = rng.standard_normal((3, 300, 150))
    return lambda: [mn.matmul(a, b), mn.matmul(a2, b2)]


# (N, C, H, W, K, groups, stride, padding, algorithm)
CONV = {
    "direct": (2, 32, 28, 28, 32, 1, 1, 1, "direct"),
    "winograd_f2": (2, 32, 28, 30, 32, 1, 1, 1, "winograd_f2"),
    "winograd_f4": (2, 32, 29, 28, 32, 1, 1, 1, "winograd_f4"),
    "strided": (2, 24, 41, 39, 48, 1, 2, 1, "auto"),
    "depthwise": (2, 64, 40, 40, 64, 64, 1, 1, "auto"),
    "groups": (2, 32, 30, 30, 48, 4, 1, "same", "auto"),
}


def _conv(name):
    n, c, h, w_, k, groups, stride, padding, algorithm = CONV[name]

    def build(rng):
        x = rng.standard_normal((n, c, h, w_)).astype(np.float32)
        w = rng.standard_normal((k, c // groups, 3, 3)).astype(np.float32)
        b = rng.standard_normal(k).astype(np.float32)
        opts = dict(stride=stride, padding=padding, groups=groups)
        return lambda: mn.conv2d(x, w, b, algorithm=algorithm, **opts)

    return build


def _conv_backward(name):
    n, c, h, w_, k, groups, stride, padding, _ = CONV[name]

    def build(rng):
        x = rng.standard_normal((n, c, h, w_)).astype(np.float32)
        w = rng.standard_normal((k, c // groups, 3, 3)).astype(np.float32)
        opts = dict(stride=stride, padding=padding, groups=groups)
        grad_out = rng.standard_normal(mn.conv2d(x, w, **opts).shape).astype(np.float32)
        return lambda: mn.conv2d_backward(x, w, grad_out, **opts)

    return build


def _attention_inputs(rng, dtype=np.float32):
    q = rng.standard_normal((2, 4, 256, 64)).astype(dtype)
    k = rng.standard_normal((2, 2, 320, 64)).astype(dtype)  # grouped-query: 2 kv heads
    v = rng.standard_normal((2, 2, 320, 48)).astype(dtype)
    bool_mask = rng.random((256, 320)) < 0.75
    float_mask = np.where(bool_mask, rng.standard_normal((256, 320)), -np.inf).astype(dtype)
    return q, k, v, bool_mask, float_mask


def _attention(rng):
    q, k, v, bool_mask, float_mask = _attention_inputs(rng)
    calls = [
        dict(return_lse=True),
        dict(causal=True, return_lse=True),
        dict(causal="lower_right"),
        dict(mask=bool_mask, return_lse=True),
        dict(mask=float_mask, dropout_p=0.2, seed=7, return_lse=True),
    ]
    return lambda: [mn.attention(q, k, v, **c) for c in calls]


def _attention_backward(rng):
    q, k, v, bool_mask, float_mask = _attention_inputs(rng)
    calls = [dict(), dict(causal=True, dropout_p=0.1, seed=3), dict(mask=float_mask)]
    saved = []
    for c in calls:
        out, lse = mn.attention(q, k, v, return_lse=True, **c)
        saved.append((out, lse, rng.standard_normal(out.shape).astype(np.float32)))
    return lambda: [
        mn.attention_backward(q, k, v, out, lse, go, **c)
        for c, (out, lse, go) in zip(calls, saved, strict=True)
    ]


FAMILIES = {
    "softmax-axis0": _softmax_axis(0),
    "softmax-axis1": _softmax_axis(1),
    "softmax-axis2": _softmax_axis(2),
    "softmax-float64-rows": _softmax_axis(-1, np.float64, (300, 1200)),
    "softmax-float64-cols": _softmax_axis(0, np.float64, (1200, 300)),
    "softmax_backward": _softmax_backward,
    "cross_entropy-index": _cross_entropy_index,
    "cross_entropy-spatial": _cross_entropy_spatial_prob,
    "sgd": _optimizer(lambda p: mn.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    "adam": _optimizer(lambda p: mn.Adam(p, lr=1e-2, weight_decay=1e-3, max_grad_norm=100.0)),
    "adamw-amsgrad": _optimizer(lambda p: mn.AdamW(p, lr=1e-2, amsgrad=True, skip_nonfinite=True)),
    "matmul": _matmul_batched,
    **{f"conv2d-{name}": _conv(name) for name in CONV},
    **{f"conv2d_backward-{name}": _conv_backward(name) for name in CONV if "wino" not in name},
    "attention": _attention,
    "attention_backward": _attention_backward,
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_thread_count_does_not_change_bits(family, rng, threads):
    run = FAMILIES[family](rng)
    results = []
    for t in THREAD_COUNTS:
        mn.set_num_threads(t)
        results.append(run())
    for t, result in zip(THREAD_COUNTS[1:], results[1:], strict=True):
        assert_bitwise_equal(result, results[0], f"{family}, {t} threads")


# -- Python threads, while another thread changes the thread count ---------------------------------

TIMEOUT_S = 30.0  # a deadlock fails the test after this long (the test takes about a second)


def _mixed_calls(rng):
    """Small calls of every family (some large enough for a thread team), as name -> call."""
    x = rng.standard_normal((256, 512)).astype(np.float32)
    target = rng.integers(0, 512, 256)
    a = rng.standard_normal((192, 256)).astype(np.float32)
    b = rng.standard_normal((256, 160)).astype(np.float32)
    img = rng.standard_normal((2, 16, 24, 24)).astype(np.float32)
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    q = rng.standard_normal((2, 128, 32)).astype(np.float32)
    kv = rng.standard_normal((2, 192, 32)).astype(np.float32)
    return {
        "softmax": lambda: mn.softmax(x),
        "log_softmax": lambda: mn.log_softmax(x, axis=0),
        "cross_entropy": lambda: mn.cross_entropy(x, target, return_grad=True),
        "matmul": lambda: mn.matmul(a, b),
        "conv2d": lambda: mn.conv2d(img, w, padding=1, algorithm="direct"),
        "conv2d-winograd": lambda: mn.conv2d(img, w, padding=1, algorithm="winograd_f2"),
        "attention": lambda: mn.attention(q, kv, kv, causal=True, return_lse=True),
    }


def test_python_threads_while_the_thread_count_changes(rng, threads):
    calls = _mixed_calls(rng)
    start = [rng.standard_normal(n).astype(np.float32) for n in (50000, 33)]
    grads = [[rng.standard_normal(p.shape).astype(np.float32) for p in start] for _ in range(3)]
    rounds = 10

    mn.set_num_threads(1)
    want = {name: call() for name, call in calls.items()}
    params = [p.copy() for p in start]
    opt = mn.Adam(params, lr=1e-2)
    want_params = []
    for r in range(rounds):
        opt.step(grads[r % len(grads)])
        want_params.append([p.copy() for p in params])

    errors: list[str] = []
    stop = threading.Event()
    switches = [0]

    def switcher():
        while not stop.is_set():
            for n in (1, 2, 3):
                mn.set_num_threads(n)
                switches[0] += 1
                time.sleep(0)

    def worker(i):
        try:
            own = [p.copy() for p in start]  # thread-private parameters and optimizer state
            own_opt = mn.Adam(own, lr=1e-2)
            names = list(calls)
            for r in range(rounds):
                for j in range(len(names)):
                    name = names[(i + j) % len(names)]
                    assert_bitwise_equal(calls[name](), want[name], f"worker {i} {name}")
                own_opt.step(grads[r % len(grads)])
                assert_bitwise_equal(own, want_params[r], f"worker {i} Adam step {r}")
        except Exception as e:  # reported by the main thread
            errors.append(f"{type(e).__name__}: {e}")

    setter = threading.Thread(target=switcher, daemon=True)
    workers = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(16)]
    setter.start()
    for w in workers:
        w.start()
    deadline = time.monotonic() + TIMEOUT_S
    for w in workers:
        w.join(max(deadline - time.monotonic(), 0.0))
    stop.set()
    setter.join(max(deadline - time.monotonic(), 1.0))
    alive = sum(w.is_alive() for w in workers + [setter])
    assert alive == 0, f"{alive} threads still running after {TIMEOUT_S} s: deadlock?"
    assert not errors, "\n".join(errors[:5])
    assert switches[0] > 3  # the thread count did change underneath the workers


# -- multiprocessing after the parent started OpenMP threads ---------------------------------------


def _parent_inputs():
    rng = np.random.default_rng(11)
    return [rng.standard_normal((256, 1024)).astype(np.float32) for _ in range(4)]


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_pool_after_the_parent_used_threads(method, threads):
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} start method here")
    mn.set_num_threads(2)
    xs = _parent_inputs()
    want = [mn.softmax(x) for x in xs]  # starts a thread team in this process
    with multiprocessing.get_context(method).Pool(2) as pool:
        got = pool.map_async(mn.softmax, xs).get(timeout=60)
        child_threads = pool.apply_async(mn.get_num_threads).get(timeout=60)
    for g, w in zip(got, want, strict=True):
        assert_bitwise_equal(g, w, method)
    assert child_threads >= 1


FORK_SCRIPT = textwrap.dedent(
    """
    import multiprocessing, os
    import numpy as np
    import mlmath_native as mn

    rng = np.random.default_rng(11)
    xs = [rng.standard_normal((256, 1024)).astype(np.float32) for _ in range(4)]
    a = rng.standard_normal((300, 300))
    img = rng.standard_normal((2, 16, 24, 24)).astype(np.float32)
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    mn.set_num_threads(2)

    # a child forked before any thread team started keeps its threads
    pid = os.fork()
    if pid == 0:
        y = mn.softmax(xs[0])
        os._exit(0 if mn.get_num_threads() == 2 and np.array_equal(y, mn.softmax(xs[0])) else 3)
    assert os.waitpid(pid, 0)[1] == 0, "a child forked before any thread team: lost its threads"

    want = [mn.softmax(x) for x in xs]
    want_mm, want_conv = mn.matmul(a, a), mn.conv2d(img, w, padding=1)

    # a raw fork after the parent's thread team: kernels run (on one thread), same bits
    pid = os.fork()
    if pid == 0:
        same = (
            all(np.array_equal(mn.softmax(x), y) for x, y in zip(xs, want))
            and np.array_equal(mn.matmul(a, a), want_mm)
            and np.array_equal(mn.conv2d(img, w, padding=1), want_conv)
        )
        one = mn.get_num_threads() == 1
        mn.set_num_threads(2)  # cannot bring back the threads libgomp lost
        one = one and mn.get_num_threads() == 1
        os._exit(3 if not same else 4 if not one else 0)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    assert status != 3, "fork child: wrong results"
    assert status != 4, "fork child: kernels not single-threaded"
    assert status == 0, f"fork child: exit status {status}"

    # a fork pool
    with multiprocessing.get_context("fork").Pool(2) as pool:
        got = pool.map_async(mn.softmax, xs).get(timeout=30)
        got_mm = pool.apply_async(mn.matmul, (a, a)).get(timeout=30)
    assert all(np.array_equal(g, y) for g, y in zip(got, want)), "fork pool: wrong results"
    assert np.array_equal(got_mm, want_mm), "fork pool: wrong matmul"
    assert mn.get_num_threads() == 2  # the parent keeps its threads
    print("fork ok")
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_fork_after_the_parent_used_threads():
    """GNU libgomp's thread pool does not survive fork: without Note [fork] the child's first
    multi-threaded kernel waits forever.  Run in a process group of its own so that a hang
    fails the test (and its forked children are killed) instead of blocking the suite."""
    proc = subprocess.Popen(
        [sys.executable, "-c", FORK_SCRIPT],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=60)
        hung = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the script and every child it forked
        out, err = proc.communicate()
        hung = True
    if hung:
        pytest.fail("a forked child hung calling kernels after the parent used OpenMP threads")
    assert proc.returncode == 0, err
    assert out.strip() == "fork ok"
