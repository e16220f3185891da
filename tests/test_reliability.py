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
from mlmath_native.reference import transformer_attention

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

# A deadlock fails the test after this long (the test takes about a second natively; the
# emulated arm64 run of .ci/arm64.sh, 20-50 times slower, scales it up).
TIMEOUT_S = 30.0 * float(os.environ.get("MLMATH_TEST_TIMEOUT_SCALE", "1"))


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
    import multiprocessing, os, time
    import numpy as np
    import mlmath_native as mn

    rng = np.random.default_rng(11)
    xs = [rng.standard_normal((256, 1024)).astype(np.float32) for _ in range(4)]
    a = rng.standard_normal((300, 300))
    img = rng.standard_normal((2, 16, 24, 24)).astype(np.float32)
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    mn.set_num_threads(2)

    def same_results():
        return (
            all(np.array_equal(mn.softmax(x), y) for x, y in zip(xs, want))
            and np.array_equal(mn.matmul(a, a), want_mm)
            and np.array_equal(mn.conv2d(img, w, padding=1), want_conv)
        )

    def wait(pid, what):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.01)
        raise AssertionError(what + ": hung")

    # a child forked before any thread team started keeps its threads
    pid = os.fork()
    if pid == 0:
        y = mn.softmax(xs[0])
        os._exit(0 if mn.get_num_threads() == 2 and np.array_equal(y, mn.softmax(xs[0])) else 3)
    assert wait(pid, "early child") == 0, "a child forked before any thread team: lost its threads"

    want = [mn.softmax(x) for x in xs]  # thread teams in this process
    want_mm, want_conv = mn.matmul(a, a), mn.conv2d(img, w, padding=1)

    # a raw fork after the parent's thread teams: the child keeps its threads (Note [fork]:
    # the parent's pool is released before the fork), same bits; and so does a grandchild
    pid = os.fork()
    if pid == 0:
        if not same_results():
            os._exit(3)
        if mn.get_num_threads() != 2:
            os._exit(4)
        pid = os.fork()
        if pid == 0:
            os._exit(0 if same_results() and mn.get_num_threads() == 2 else 5)
        os._exit(wait(pid, "grandchild"))
    status = wait(pid, "fork child")
    assert status != 3, "fork child: wrong results"
    assert status != 4, "fork child: lost its threads"
    assert status != 5, "fork grandchild: wrong results or lost its threads"
    assert status == 0, f"fork child: exit status {status}"
    assert same_results(), "the parent after forking"

    # a fork pool
    with multiprocessing.get_context("fork").Pool(2) as pool:
        got = pool.map_async(mn.softmax, xs).get(timeout=30)
        got_mm = pool.apply_async(mn.matmul, (a, a)).get(timeout=30)
        child_threads = pool.apply_async(mn.get_num_threads).get(timeout=30)
    assert all(np.array_equal(g, y) for g, y in zip(got, want)), "fork pool: wrong results"
    assert np.array_equal(got_mm, want_mm), "fork pool: wrong matmul"
    assert child_threads == 2, f"fork pool: {child_threads} threads"
    assert mn.get_num_threads() == 2  # the parent keeps its threads
    print("fork ok")
    """
)


def run_script_or_kill(script: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Runs ``python -c script`` in a process group of its own, so that a hang fails the test
    (and kills every child it forked) instead of blocking the suite."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the script and every child it forked
        out, err = proc.communicate()
        pytest.fail(f"hung (killed after {timeout} s); stdout: {out[-1000:]} stderr: {err[-1000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_fork_after_the_parent_used_threads():
    """GNU libgomp's thread pool does not survive fork: without Note [fork] the child's first
    multi-threaded kernel waits forever."""
    done = run_script_or_kill(FORK_SCRIPT, timeout=90)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "fork ok"


# PyTorch and this package share one libgomp (its soname is loaded once, by whichever comes
# first), so a thread team that PyTorch started breaks the forking thread's pool for our kernels
# as well (issue 17: a fork after a threaded torch matmul hung the child's next kernel).
TORCH_FORK_SCRIPT = """
import multiprocessing, os, time
{imports}
import numpy as np

x = np.random.default_rng(3).standard_normal((2000, 2000)).astype(np.float32)
torch.set_num_threads(2)
mn.set_num_threads(2)
want = mn.softmax(x)
t = torch.randn(1500, 1500)
t @ t  # a threaded PyTorch matmul in the forking thread, last before the fork

pid = os.fork()
if pid == 0:
    ok = np.array_equal(mn.softmax(x), want) and mn.get_num_threads() == 2
    t @ t  # and PyTorch's own threads in the child
    os._exit(0 if ok else 3)
deadline = time.monotonic() + 30
while not (done := os.waitpid(pid, os.WNOHANG))[0]:
    assert time.monotonic() < deadline, "os.fork child hung"
    time.sleep(0.01)
assert os.waitstatus_to_exitcode(done[1]) == 0, "os.fork child: wrong result or lost its threads"

t @ t
with multiprocessing.get_context("fork").Pool(2) as pool:
    got = pool.map_async(mn.softmax, [x, x]).get(timeout=30)
assert all(np.array_equal(g, want) for g in got), "fork pool: wrong results"
print("ok")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
@pytest.mark.parametrize("torch_first", [True, False], ids=["torch-first", "torch-second"])
def test_fork_after_torch_used_threads(torch_first):
    pytest.importorskip("torch")
    imports = ["import torch", "import mlmath_native as mn"]
    if not torch_first:
        imports.reverse()
    done = run_script_or_kill(TORCH_FORK_SCRIPT.format(imports="\n".join(imports)), timeout=90)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"


# -- interpreter exit while daemon threads are inside kernels -------------------------------------

# Issue 17: on Python 3.10-3.13 a daemon thread that wants the GIL back after finalization began
# is ended by pthread_exit, a forced unwind that went through pybind11's gil_scoped_release
# destructor (noexcept): "terminate called without an active exception", exit code 134, 8 runs
# in 8 (Note [kernels without the GIL] in src/cpp/bindings/without_gil.h).
EXIT_SCRIPT = """
import threading, time
import numpy as np
import mlmath_native as mn

rng = np.random.default_rng(0)
q = rng.standard_normal((1, 4, 1024, 64)).astype(np.float32)
x = rng.standard_normal((2000, 2000)).astype(np.float32)
target = rng.integers(0, 2000, 2000)
a = rng.standard_normal((400, 400)).astype(np.float32)
img = rng.standard_normal((2, 16, 48, 48)).astype(np.float32)
w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
params = [rng.standard_normal(200000).astype(np.float32)]
opt = mn.Adam(params, lr=1e-3)
grads = [np.ones_like(params[0])]
out, lse = mn.attention(q, q, q, return_lse=True)
calls = {
    "attention": lambda: mn.attention(q, q, q),
    "softmax": lambda: mn.softmax(x),
    "attention_backward": lambda: mn.attention_backward(q, q, q, out, lse, out),
    "cross_entropy": lambda: mn.cross_entropy(x, target, return_grad=True),
    "matmul": lambda: mn.matmul(a, a),
    "conv2d": lambda: mn.conv2d(img, w, padding=1),
    "adam": lambda: opt.step(grads),
}
names = {names}

def loop(name):
    while True:
        calls[name]()

for name in names:
    threading.Thread(target=loop, args=(name,), daemon=True).start()
time.sleep(0.5)
"""


@pytest.mark.parametrize(
    "names",
    [
        pytest.param(["attention", "softmax"] * 2, id="regression-attention-softmax"),
        pytest.param(
            [
                "attention",
                "softmax",
                "attention_backward",
                "cross_entropy",
                "matmul",
                "conv2d",
                "adam",
            ],
            id="every-family",
        ),
    ],
)
def test_exit_while_daemon_threads_run_kernels(names):
    runs = 8 if len(names) == 4 else 4
    for run in range(runs):
        done = run_script_or_kill(EXIT_SCRIPT.replace("{names}", repr(names)), timeout=60)
        assert "terminate" not in done.stderr, f"run {run}: {done.stderr[-2000:]}"
        assert done.returncode == 0, f"run {run}: exit {done.returncode}: {done.stderr[-2000:]}"


# -- Ctrl-C inside long kernels ------------------------------------------------------------------

# Issue 17: attention at L = 32768 ignored Ctrl-C for its 8-20 s.  Now the main thread's kernel
# polls for signals between blocks (Note [interrupts] in src/cpp/dispatch/threads.cpp) and raises
# KeyboardInterrupt soon after SIGINT; out= is left as it was (Note [interruptible matmul]).
SIGNAL_AFTER_S = 0.3
ANSWER_WITHIN_S = 2.0  # generous: a poll every 50 ms, then the current block ends
LONG_CALL_S = 6.0  # the interrupted call would take about this long


def _scale_to_long_call(time_one) -> int:
    """How many units (heads, batch items) make a call of about LONG_CALL_S, given the time of
    one unit (a best of two), between 4 and 64."""
    one = min(time_one() for _ in range(2))
    return int(min(max(LONG_CALL_S / max(one, 1e-4), 4), 64))


def _timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def _attention_case(rng, backward: bool):
    lq, lk, d = 4096, 16384, 64
    q1 = rng.standard_normal((1, 1, lq, d)).astype(np.float32)
    k = rng.standard_normal((1, 1, lk, d)).astype(np.float32)  # one kv head for all query heads
    v = rng.standard_normal((1, 1, lk, d)).astype(np.float32)

    def run(heads):
        q = np.broadcast_to(q1, (1, heads, lq, d))
        if not backward:
            return lambda: mn.attention(q, k, v)
        out = np.zeros((1, heads, lq, d), np.float32)  # values do not matter for the timing
        lse = np.full((1, heads, lq), np.log(lk), np.float32)
        return lambda: mn.attention_backward(q, k, v, out, lse, out)

    def check_small():  # a following call works and is right
        q, kk, vv = (rng.standard_normal((1, 2, 100, 16)) for _ in range(3))
        want = transformer_attention.attention(q, kk, vv, causal=True)
        np.testing.assert_allclose(mn.attention(q, kk, vv, causal=True), want, rtol=1e-10)
        out, lse = mn.attention(q, kk, vv, return_lse=True)
        go = rng.standard_normal(out.shape)
        got = mn.attention_backward(q, kk, vv, out, lse, go)
        want = transformer_attention.attention_backward(q, kk, vv, out, lse, go)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12)

    return run, check_small, None


def _matmul_case(rng, _backward: bool):
    m, k, n = 512, 32768, 512
    a1 = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    holder = {}

    def run(batch):
        a = np.broadcast_to(a1, (batch, m, k))  # one matrix, read `batch` times
        out = holder["out"] = np.full((batch, m, n), 7.0, np.float32)
        return lambda: mn.matmul(a, b, out=out)

    def check_small():
        x, y = rng.standard_normal((70, 90)), rng.standard_normal((90, 50))
        np.testing.assert_allclose(mn.matmul(x, y), x @ y, rtol=1e-10, atol=1e-10)

    return run, check_small, holder


@pytest.mark.skipif(not hasattr(signal, "SIGINT"), reason="no SIGINT here")
@pytest.mark.parametrize("case", ["attention", "attention_backward", "matmul"])
def test_ctrl_c_stops_a_long_kernel(case, rng, threads):
    mn.set_num_threads(2)  # a team: worker threads must stop too
    make = _matmul_case if case == "matmul" else _attention_case
    run, check_small, holder = make(rng, case == "attention_backward")
    units = _scale_to_long_call(lambda: _timed(run(1)))
    call = run(units)
    timer = threading.Timer(SIGNAL_AFTER_S, os.kill, (os.getpid(), signal.SIGINT))
    # Python's own SIGINT handler (a shell starts background jobs with SIGINT ignored, and then
    # Python installs none)
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    start = time.perf_counter()
    try:
        with pytest.raises(KeyboardInterrupt):
            timer.start()
            try:
                call()
            finally:
                timer.join()  # the signal has been sent before leaving this block
    finally:
        signal.signal(signal.SIGINT, handler)
    answered = time.perf_counter() - start - SIGNAL_AFTER_S
    assert answered < ANSWER_WITHIN_S, f"KeyboardInterrupt {answered:.2f} s after SIGINT"
    if holder is not None:  # out= left bitwise as it was
        assert (holder["out"] == 7.0).all(), "an interrupted matmul wrote into out="
    check_small()
