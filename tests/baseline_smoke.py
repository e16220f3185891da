"""Smoke test of an installed wheel on a CPU without AVX (run by .ci/run under
``qemu-x86_64 -cpu Nehalem``): the import picks the baseline ISA, and one call of each kernel
family agrees with the float64 reference.  An AVX instruction anywhere on these paths (the
baseline kernels, the dispatch, the start-up code) would kill the process with SIGILL.

Not a pytest module (no test_ prefix): ``python tests/baseline_smoke.py``.
"""

from __future__ import annotations

import numpy as np

import mlmath_native as mn
from mlmath_native import reference as ref


def close(got, want, tol):
    err = float(np.max(np.abs(np.asarray(got, np.float64) - want), initial=0.0))
    assert err <= tol, f"error {err:.3g} > {tol:.3g}"


def main() -> None:
    info = mn.build_info()
    assert info["isa"] == "scalar", info  # the baseline: this CPU has no AVX
    rng = np.random.default_rng(0)

    x = rng.standard_normal((5, 37)).astype(np.float32)
    close(mn.softmax(x), ref.softmax.softmax(x), 1e-6)

    target = rng.integers(0, 37, size=5)
    loss, grad = mn.cross_entropy(x, target, return_grad=True)
    close(loss, ref.cross_entropy.cross_entropy(x, target), 1e-5)
    close(grad, ref.cross_entropy.cross_entropy_grad(x, target), 1e-6)

    p = rng.standard_normal(100)
    g = rng.standard_normal(100)
    want = p - 0.1 * g
    mn.sgd_step(p, g, lr=0.1)
    close(p, want, 1e-12)

    xc = rng.standard_normal((2, 3, 9, 8))
    w = rng.standard_normal((4, 3, 3, 3))
    close(mn.conv2d(xc, w, padding=1), ref.convolution.conv2d(xc, w, padding=1), 1e-12)

    # float16 without F16C: the scalar path converts in software (Note [16-bit storage])
    h = x.astype(np.float16)
    close(mn.softmax(h), ref.softmax.softmax(h.astype(np.float64)), 2.0**-11)
    close(mn.matmul(h, h.T), h.astype(np.float64) @ h.astype(np.float64).T, 0.1)

    q, k, v = (rng.standard_normal((2, 9, 8)) for _ in range(3))
    close(
        mn.attention(q, k, v, causal=True),
        ref.transformer_attention.attention(q, k, v, causal=True),
        1e-12,
    )
    print(f"baseline smoke test passed (isa {info['isa']}, version {info['version']})")


if __name__ == "__main__":
    main()
