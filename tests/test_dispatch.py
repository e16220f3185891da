"""ISA dispatch, build facts, threads and the GIL."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import mlmath_native as mn

INFO = mn.build_info()


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_build_info_keys():
    for key in (
        "version",
        "isa",
        "isa_supported",
        "isa_compiled",
        "openmp",
        "openmp_version",
        "num_threads",
        "compiler",
    ):
        assert key in INFO
    assert INFO["version"] == mn.__version__
    assert INFO["isa"] in INFO["isa_supported"]
    assert set(INFO["isa_supported"]) <= set(INFO["isa_compiled"])
    assert INFO["isa_compiled"][0] == "scalar"
    assert INFO["openmp"] is True and INFO["openmp_version"] >= 200805
    assert INFO["num_threads"] >= 1


def test_default_is_the_best_supported_unless_forced():
    forced = os.environ.get("MLMATH_NATIVE_ISA")
    assert INFO["isa"] == (forced or INFO["isa_supported"][-1])


def test_each_architecture_compiles_its_vector_path():
    # x86-64 builds avx2 and avx512 beside scalar; arm64 builds neon (Advanced SIMD is part of
    # the base architecture, so it is always supported there; MSVC on Arm builds scalar only).
    # Other machines: scalar only.
    import platform

    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        assert INFO["isa_compiled"] == ["scalar", "avx2", "avx512"]
    elif machine in ("aarch64", "arm64") and "MSVC" not in INFO["compiler"]:
        assert INFO["isa_compiled"] == ["scalar", "neon"]
        assert INFO["isa_supported"] == ["scalar", "neon"]
    else:
        assert INFO["isa_compiled"] == ["scalar"]


@pytest.mark.parametrize("isa", INFO["isa_supported"])
def test_forcing_each_supported_isa(isa):
    code = (
        "import numpy as np, mlmath_native as mn;"
        "from mlmath_native.reference import softmax as ref;"
        "x = np.linspace(-5, 5, 77, dtype=np.float32).reshape(7, 11);"
        "assert np.allclose(mn.softmax(x), ref.softmax(x), rtol=1e-5, atol=1e-7);"
        "print(mn.build_info()['isa'])"
    )
    res = run_python(code, MLMATH_NATIVE_ISA=isa)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == isa


# Every ISA name of any architecture that this machine cannot run ("neon" on x86-64, "avx2" on
# arm64), and a name that is no ISA at all.
KNOWN_ISAS = ("scalar", "avx2", "avx512", "neon")
UNAVAILABLE = ["sse9"] + [i for i in KNOWN_ISAS if i not in INFO["isa_supported"]]


@pytest.mark.parametrize("isa", UNAVAILABLE)
def test_forcing_an_unavailable_isa_fails_with_the_supported_list(isa):
    res = run_python("import mlmath_native", MLMATH_NATIVE_ISA=isa)
    assert res.returncode != 0
    assert "MLMATH_NATIVE_ISA" in res.stderr
    assert "supported" in res.stderr and "scalar" in res.stderr


def test_threads_default_follows_omp_num_threads():
    res = run_python("import mlmath_native as mn; print(mn.get_num_threads())", OMP_NUM_THREADS="3")
    assert res.stdout.strip() == "3", res.stderr
    res = run_python(
        "import os, mlmath_native as mn; print(mn.get_num_threads(), os.cpu_count())",
        OMP_NUM_THREADS="",
    )
    got, cores = res.stdout.split()
    assert got == cores


def test_set_num_threads_roundtrip(threads):
    mn.set_num_threads(3)
    assert mn.get_num_threads() == 3
    assert mn.build_info()["num_threads"] == 3
    seen = []
    t = threading.Thread(target=lambda: seen.append(mn.get_num_threads()))
    t.start()
    t.join()
    assert seen == [3]  # the setting is global, not per Python thread


def test_threadpoolctl_sees_the_openmp_runtime(threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    infos = threadpoolctl.threadpool_info()
    assert any(i["user_api"] == "openmp" for i in infos)


def test_kernels_run_concurrently_from_python_threads():
    """The GIL is released around kernels: many Python threads calling at once get correct,
    independent results."""
    rng = np.random.default_rng(3)
    inputs = [rng.standard_normal((200, 300)).astype(np.float32) for _ in range(8)]
    expected = [mn.softmax(x) for x in inputs]
    results = [None] * len(inputs)

    def work(i):
        for _ in range(5):
            results[i] = mn.softmax(inputs[i])

    workers = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_array_equal(got, want)
