"""Nothing leaks: 10,000 mixed kernel calls keep the process's resident memory flat after
warm-up (results of 1 MiB and more go through the output cache, which reuses its blocks)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import mlmath_native as mn

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/statm")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * 4096 / 2**20


def _calls():
    rng = np.random.default_rng(0)
    big = rng.standard_normal((512, 1024)).astype(np.float32)  # 2 MiB: the output cache
    logits = rng.standard_normal((64, 100)).astype(np.float32)
    labels = rng.integers(0, 100, size=64)
    a = rng.standard_normal((96, 80)).astype(np.float32)
    b = rng.standard_normal((80, 70)).astype(np.float32)
    x = rng.standard_normal((2, 8, 12, 12)).astype(np.float32)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    g = rng.standard_normal((2, 16, 12, 12)).astype(np.float32)
    q, k, v = (rng.standard_normal((2, 2, 40, 16)).astype(np.float32) for _ in range(3))
    out, lse = mn.attention(q, k, v, return_lse=True)
    params = [rng.standard_normal(1000) for _ in range(3)]
    grads = [rng.standard_normal(1000) for _ in range(3)]
    opt = mn.Adam(params, lr=1e-3)
    return [
        lambda: mn.softmax(big),
        lambda: mn.log_softmax(logits, axis=0),
        lambda: mn.cross_entropy(logits, labels, return_grad=True),
        lambda: mn.matmul(a, b),
        lambda: mn.conv2d(x, w, padding=1),
        lambda: mn.conv2d(x, w, padding=1, algorithm="winograd_f4"),
        lambda: mn.conv2d_backward(x, w, g, padding=1),
        lambda: mn.attention(q, k, v, causal=True),
        lambda: mn.attention_backward(q, k, v, out, lse, out),
        lambda: opt.step(grads),
    ]


def test_ten_thousand_mixed_calls_keep_rss_flat():
    calls = _calls()
    for i in range(1000):  # warm-up: caches, thread team, allocator arenas
        calls[i % len(calls)]()
    before = rss_mib()
    for i in range(10_000):
        calls[i % len(calls)]()
    grown = rss_mib() - before
    assert grown < 2.0, f"resident memory grew by {grown:.1f} MiB over 10,000 calls"
