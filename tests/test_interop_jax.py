"""Zero-copy input from JAX CPU arrays (Note [zero copy]): JAX exports DLPack, and the kernel
reads the array's own buffer (its address is jax's unsafe_buffer_pointer()).  JAX arrays are
immutable, so they cannot be ``out=`` or optimizer params: a clear error says so.  .ci/run
installs jax (a comparison only, never a dependency)."""

from __future__ import annotations

import numpy as np
import pytest

import mlmath_native as mn
from mlmath_native import _core

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
# keep float64 and int64 as they are (JAX would narrow them to 32 bits by default)
jax.config.update("jax_enable_x64", True)


def test_jax_input_is_read_in_place(monkeypatch):
    seen = []
    original = _core.softmax_into

    def spy(x, out, *args):
        seen.append(x)
        return original(x, out, *args)

    monkeypatch.setattr(_core, "softmax_into", spy)
    base = np.random.default_rng(0).standard_normal((5, 33)).astype(np.float32)
    x = jnp.asarray(base)
    y = mn.softmax(x)
    assert isinstance(y, np.ndarray)
    assert seen[-1].__array_interface__["data"][0] == x.unsafe_buffer_pointer(), "a copy"
    np.testing.assert_array_equal(y, mn.softmax(base))


def test_jax_arrays_in_every_family():
    """The valid calls of the bad-input matrix with every array argument a JAX array (the
    optimizers excepted: JAX arrays are immutable): bit for bit the NumPy results."""
    from test_bad_input_matrix import SPECS

    for spec in SPECS:
        if spec.name in ("sgd_step", "adam_step") or "SGD" in spec.name or "Adam" in spec.name:
            continue
        args = spec.make()
        want = spec.call(args)
        got = spec.call(
            {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in args.items()}
        )
        for a, b in zip(
            want if isinstance(want, tuple) else (want,),
            got if isinstance(got, tuple) else (got,),
            strict=True,
        ):
            if hasattr(a, "x"):  # gradient_descent's result
                a, b = a.x, b.x
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=spec.name)


def test_jax_arrays_cannot_be_written():
    x = jnp.ones((3, 4))
    with pytest.raises(ValueError, match="softmax: out is not writeable"):
        mn.softmax(x, out=x)
    with pytest.raises(ValueError, match=r"SGD: params\[0\] is not writeable"):
        mn.SGD([jnp.ones(3)], lr=0.1)
    np.testing.assert_array_equal(np.asarray(x), 1.0)
