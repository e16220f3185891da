"""Living with the rest of the ecosystem: threadpoolctl controls our OpenMP threads, PyTorch
and this package share one OpenMP runtime (either import order) with both libraries' threaded
kernels running alternately, and the version has one source of truth."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from importlib import metadata

import numpy as np
import pytest

import mlmath_native as mn


def test_threadpool_limits_reach_our_kernels(threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    mn.set_num_threads(2)
    infos = threadpoolctl.threadpool_info()
    assert any(i["user_api"] == "openmp" for i in infos)
    x = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)
    want = mn.softmax(x)
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert mn.get_num_threads() == 1
        np.testing.assert_array_equal(mn.softmax(x), want)  # same result on one thread
    assert mn.get_num_threads() == 2


def test_version_has_one_source():
    assert mn.__version__ == mn.build_info()["version"]
    try:
        installed = metadata.version("mlmath_native")
    except metadata.PackageNotFoundError:  # run from the source tree without an install
        return
    assert mn.__version__ == installed


_BOTH = """
import numpy as np
{first}
{second}
torch.set_num_threads(2)
mn.set_num_threads(2)
rng = np.random.default_rng(0)
x = rng.standard_normal((64, 64, 32, 32)).astype(np.float32)
w = rng.standard_normal((64, 64, 3, 3)).astype(np.float32)
q, k, v = (rng.standard_normal((2, 4, 300, 32)).astype(np.float32) for _ in range(3))
for _ in range(3):  # threaded kernels of both libraries, alternately
    ours = mn.conv2d(x, w, padding=1)
    theirs = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=1)
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-3, atol=1e-2)
    a = mn.attention(q, k, v, causal=True)
    b = torch.nn.functional.scaled_dot_product_attention(
        *(torch.from_numpy(t) for t in (q, k, v)), is_causal=True)
    np.testing.assert_allclose(a, b.numpy(), rtol=1e-4, atol=1e-5)
gomp = set(line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line)
bundled = sum("mlmath_native.libs" in path for path in gomp)  # a repaired wheel's own copy
print(len(gomp) - bundled, "shared libgomp,", bundled, "bundled")
print("ok")
"""


@pytest.mark.parametrize("torch_first", [True, False])
def test_torch_and_us_in_one_process(torch_first):
    """PyTorch bundles a libgomp, but its soname is loaded once per process: whichever library
    is imported first brings the libgomp that both use (checked below; a wheel repaired by
    auditwheel uses its own renamed copy instead), and both libraries' thread teams run from
    the same threads: no crash, no deadlock, the same results.  A
    subprocess, so that the import order is really the one tested.  (Forking after such calls:
    test_reliability.py::test_fork_after_torch_used_threads.)"""
    pytest.importorskip("torch")
    lines = ["import torch", "import mlmath_native as mn"]
    if not torch_first:
        lines.reverse()
    code = textwrap.dedent(_BOTH).format(first=lines[0], second=lines[1])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")
    if sys.platform.startswith("linux"):
        # one libgomp.so.1 for both, whichever import came first; a wheel repaired by
        # auditwheel brings a renamed copy of its own beside it (Note [fork] covers both)
        assert "1 shared libgomp," in done.stdout, done.stdout
        assert done.stdout.count(" bundled") == 1 and " 2 bundled" not in done.stdout
