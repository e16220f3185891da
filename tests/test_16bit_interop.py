"""16-bit data from every source, zero copy (Note [zero copy] and Note [16-bit storage] in
_checks.py): NumPy float16 and ml_dtypes.bfloat16 arrays, PyTorch bfloat16/float16 tensors
(bfloat16 crosses DLPack as int16 and is viewed as ml_dtypes.bfloat16) and JAX bfloat16/float16
arrays.  The kernel must receive the caller's own memory, the three sources must give the same
bits, a 16-bit ``out=`` tensor is written in place, and results are NumPy arrays of the input's
dtype (ml_dtypes.bfloat16 for bfloat16)."""

from __future__ import annotations

import numpy as np
import pytest
from sixteen import HALF_NAMES, dtype_of, random

import mlmath_native as mn

torch = pytest.importorskip("torch")


def torch_dtype(name):
    return getattr(torch, name)


def address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_numpy_16bit_input_is_not_copied(dtype_name, seen, rng):
    x = random(rng, (4, 33), dtype_of(dtype_name))
    y = mn.softmax(x)
    assert address(seen[-1]) == address(x), "the kernel read a copy"
    assert y.dtype == x.dtype and isinstance(y, np.ndarray)


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_torch_16bit_input_is_not_copied(dtype_name, seen):
    t = torch.randn(4, 33).to(torch_dtype(dtype_name))
    y = mn.softmax(t)
    assert address(seen[-1]) == t.data_ptr(), "the kernel read a copy"
    assert isinstance(y, np.ndarray) and y.dtype == dtype_of(dtype_name)


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_torch_non_contiguous_16bit_input(dtype_name):
    t = torch.randn(8, 40).to(torch_dtype(dtype_name))[::2, 1::3]
    want = mn.softmax(np.ascontiguousarray(t.float().numpy()).astype(dtype_of(dtype_name)))
    np.testing.assert_array_equal(mn.softmax(t).view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_torch_16bit_out_is_written_in_place(dtype_name):
    t = torch.randn(3, 9).to(torch_dtype(dtype_name))
    out = torch.zeros(3, 9, dtype=torch_dtype(dtype_name))
    result = mn.log_softmax(t, out=out)
    assert address(result) == out.data_ptr()
    want = torch.log_softmax(t.float(), -1).to(out.dtype)
    assert torch.equal(out, want)


def test_torch_bfloat16_out_for_a_float32_input_is_refused():
    out = torch.zeros(3, 9, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="out has dtype bfloat16"):
        mn.softmax(np.ones((3, 9), np.float32), out=out)
    assert not out.any()


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_three_sources_agree_bit_for_bit(dtype_name, rng):
    jnp = pytest.importorskip("jax.numpy")
    dtype = dtype_of(dtype_name)
    x = random(rng, (5, 70), dtype, 3.0)
    from_numpy = mn.softmax(x)
    from_torch = mn.softmax(torch.from_numpy(x.view(np.int16).copy()).view(torch_dtype(dtype_name)))
    from_jax = mn.softmax(jnp.asarray(x))
    assert from_numpy.dtype == from_torch.dtype == from_jax.dtype == dtype
    np.testing.assert_array_equal(from_torch.view(np.uint16), from_numpy.view(np.uint16))
    np.testing.assert_array_equal(from_jax.view(np.uint16), from_numpy.view(np.uint16))
    # and the loss and gradient of cross_entropy
    target = rng.integers(0, 70, 5)
    for source in (
        torch.from_numpy(x.view(np.int16).copy()).view(torch_dtype(dtype_name)),
        jnp.asarray(x),
    ):
        loss, grad = mn.cross_entropy(source, target, return_grad=True)
        want_loss, want_grad = mn.cross_entropy(x, target, return_grad=True)
        assert loss == want_loss
        np.testing.assert_array_equal(grad.view(np.uint16), want_grad.view(np.uint16))


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_jax_16bit_input_is_read_in_place(dtype_name, seen, rng):
    jnp = pytest.importorskip("jax.numpy")
    x = jnp.asarray(random(rng, (5, 33), dtype_of(dtype_name)))
    mn.softmax(x)
    assert address(seen[-1]) == x.unsafe_buffer_pointer(), "a copy"


def test_torch_bfloat16_without_ml_dtypes_says_to_install_it(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ml_dtypes(name, *args, **kwargs):
        if name == "ml_dtypes":
            raise ImportError("no ml_dtypes")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ml_dtypes)
    with pytest.raises(TypeError, match="pip install ml_dtypes"):
        mn.softmax(torch.ones(2, 3, dtype=torch.bfloat16))


def test_import_does_not_import_ml_dtypes():
    import subprocess
    import sys

    code = "import sys, mlmath_native; print('ml_dtypes' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
