"""Zero-copy interop (Note [zero copy] in _checks.py): any CPU array that exports the buffer
protocol, ``__array_interface__`` or ``__dlpack__`` is accepted without a copy when its dtype
and layout already fit; results are NumPy arrays; ``out=`` and the optimizers update a PyTorch
tensor in place.  "Without a copy" is proven by catching the array the C++ kernel receives
and checking that it shares memory with the caller's object."""

from __future__ import annotations

import array

import numpy as np
import pytest

import mlmath_native as mn


class DLPackOnly:
    """A producer that exports only DLPack (as JAX arrays and other libraries do)."""

    def __init__(self, a: np.ndarray):
        self._a = a

    def __dlpack__(self, **kwargs):
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


class InterfaceOnly:
    """A producer that exports only ``__array_interface__``."""

    def __init__(self, a: np.ndarray):
        self._a = a
        self.__array_interface__ = a.__array_interface__


def _data(rng):
    return rng.standard_normal((3, 8)).astype(np.float32)


@pytest.mark.parametrize("kind", ["dlpack", "array_interface", "buffer"])
def test_inputs_are_not_copied(kind, seen):
    rng = np.random.default_rng(0)
    base = _data(rng)
    if kind == "dlpack":
        obj = DLPackOnly(base)
    elif kind == "array_interface":
        obj = InterfaceOnly(base)
    else:
        obj = memoryview(base)
    y = mn.softmax(obj)
    assert isinstance(y, np.ndarray)
    np.testing.assert_array_equal(y, mn.softmax(base))
    assert np.shares_memory(seen[-1], base), "the kernel read a copy"


def test_python_buffer_protocol_array():
    a = array.array("f", [1.0, 2.0, 3.0])
    np.testing.assert_allclose(mn.softmax(a), mn.softmax(np.array([1.0, 2.0, 3.0], np.float32)))
    assert mn.softmax(a).dtype == np.float32


torch = pytest.importorskip("torch")


def test_torch_inputs_every_family(seen):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 10, generator=g)
    y = mn.softmax(x)
    assert isinstance(y, np.ndarray) and np.shares_memory(seen[-1], x.numpy())
    np.testing.assert_allclose(y, torch.softmax(x, -1).numpy(), rtol=1e-6, atol=1e-7)
    target = torch.tensor([1, 0, 9, 3])
    loss = mn.cross_entropy(x, target)
    np.testing.assert_allclose(loss, torch.nn.functional.cross_entropy(x, target).item(), rtol=1e-6)
    a, b = torch.randn(5, 6, generator=g), torch.randn(6, 7, generator=g)
    np.testing.assert_allclose(mn.matmul(a, b), (a @ b).numpy(), rtol=1e-5, atol=1e-5)
    xi, w = torch.randn(2, 3, 8, 8, generator=g), torch.randn(4, 3, 3, 3, generator=g)
    np.testing.assert_allclose(
        mn.conv2d(xi, w, padding=1),
        torch.nn.functional.conv2d(xi, w, padding=1).numpy(),
        rtol=1e-4,
        atol=1e-4,
    )
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g) for _ in range(3))
    np.testing.assert_allclose(
        mn.attention(q, k, v, causal=True),
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).numpy(),
        rtol=1e-5,
        atol=1e-6,
    )


def test_torch_out_is_written_in_place():
    x = torch.randn(3, 5)
    out = torch.zeros(3, 5)
    result = mn.softmax(x, out=out)
    assert isinstance(result, np.ndarray) and np.shares_memory(result, out.numpy())
    np.testing.assert_allclose(out.numpy(), torch.softmax(x, -1).numpy(), rtol=1e-6)
    c = torch.zeros(2, 4)
    mn.matmul(torch.ones(2, 3), torch.ones(3, 4), out=c)
    assert (c == 3).all()


def test_torch_out_with_the_wrong_dtype_is_refused():
    with pytest.raises(TypeError, match="softmax: out has dtype float64"):
        mn.softmax(torch.randn(3, 5), out=torch.zeros(3, 5, dtype=torch.float64))


@pytest.mark.parametrize("cls", [mn.SGD, mn.Adam, mn.AdamW])
def test_optimizers_update_torch_tensors_in_place(cls):
    """The same step on a torch tensor and on a NumPy copy of it: the tensor sees the update."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 3, generator=g)
    b = torch.randn(3, generator=g)
    w_np, b_np = w.numpy().copy(), b.numpy().copy()
    opt_t = cls([w, b], lr=0.1)
    opt_n = cls([w_np, b_np], lr=0.1)
    for _ in range(3):
        gw, gb = torch.randn(4, 3, generator=g), torch.randn(3, generator=g)
        opt_t.step([gw, gb])
        opt_n.step([gw.numpy(), gb.numpy()])
    np.testing.assert_array_equal(w.numpy(), w_np)
    np.testing.assert_array_equal(b.numpy(), b_np)
    assert not np.array_equal(w_np, torch.randn(4, 3, generator=torch.Generator().manual_seed(1)))


def test_functional_steps_on_torch_tensors():
    p, grad = torch.ones(5), torch.full((5,), 2.0)
    mn.sgd_step(p, grad, lr=0.25)
    assert (p == 0.5).all()
    m, v = torch.zeros(5), torch.zeros(5)
    mn.adam_step(p, grad, m, v, step=1, lr=0.1)
    assert (m != 0).all() and (v != 0).all() and (p < 0.5).all()


def test_torch_tensor_that_requires_grad_is_a_clear_error():
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(TypeError, match="softmax: x could not be shared through DLPack"):
        mn.softmax(x)
    with pytest.raises(TypeError, match=r"SGD: params\[0\] could not be shared"):
        mn.SGD([x], lr=0.1)


def test_non_contiguous_torch_input_is_read_correctly():
    x = torch.randn(6, 8)[:, ::2]
    np.testing.assert_allclose(mn.softmax(x), torch.softmax(x, -1).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="must be C-contiguous"):
        mn.SGD([torch.zeros(4, 4)[:, ::2]], lr=0.1)


def _torch_args(args):
    return {
        key: torch.from_numpy(value.copy()) if isinstance(value, np.ndarray) else value
        for key, value in args.items()
    }


def _same(a, b, what):
    if isinstance(a, tuple | list):
        assert len(a) == len(b), what
        for x, y in zip(a, b, strict=True):
            _same(x, y, what)
    elif isinstance(a, np.ndarray) or np.isscalar(a):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=what)
    elif hasattr(a, "__dict__"):  # StepResult, GradientDescentResult, an optimizer
        for key, value in vars(a).items():
            if isinstance(value, np.ndarray | tuple | list | float | int):
                _same(value, vars(b)[key], f"{what}.{key}")


def _specs():
    from test_bad_input_matrix import SPECS

    return [s for s in SPECS if not s.name.endswith(".step")]  # steps: tested above


@pytest.mark.parametrize("spec", _specs(), ids=lambda s: s.name)
def test_every_function_takes_torch_tensors(spec):
    """Every public function (the valid calls of the bad-input matrix), with every array argument
    a PyTorch tensor: the same results, bit for bit, as with NumPy arrays, and the tensors that
    a call updates in place (optimizer params, sgd_step/adam_step state) see the update."""
    args_np = spec.make()
    args_t = _torch_args(args_np)
    want = spec.call(args_np)
    got = spec.call(args_t)
    _same(want, got, spec.name)
    for key, value in args_np.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(args_t[key].numpy(), value, err_msg=f"{key} after")
