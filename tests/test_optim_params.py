"""The optimizers keep the caller's params (NumPy arrays or PyTorch tensors), never a view of
their memory (Note [fresh views] in optim.py): after a tensor's storage is replaced the step
updates the memory the tensor has now, exactly as torch.optim does; after its shape or dtype
changed the step is refused with an error naming it, changing nothing; memory the tensor no
longer owns is never written."""

from __future__ import annotations

import numpy as np
import pytest

import mlmath_native as mn

torch = pytest.importorskip("torch")

OPTIMIZERS = [
    (mn.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    (mn.Adam, torch.optim.Adam, dict(lr=0.1, amsgrad=True)),
    (mn.AdamW, torch.optim.AdamW, dict(lr=0.1, weight_decay=0.1)),
]
SHAPES = [(37, 5), (5,)]


def _fresh(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# replacement(tensor, new values) -> None; the twin gets the same values through .data
def _data(t, new):
    t.data = new


def _set(t, new):
    t.set_(new)


def _resize_bigger(t, new):
    t.resize_(t.numel() * 64)  # reallocates: the old memory is freed


def _double(t, new):
    t.data = t.data.double()  # what module.double() does to each parameter


REPLACEMENTS = {  # name: (replace, the error it must cause or None)
    ".data=": (_data, None),
    ".set_()": (_set, None),
    ".resize_() bigger": (_resize_bigger, (ValueError, r"params\[0\] changed shape")),
    ".double()": (_double, (TypeError, r"params\[0\] changed dtype")),
}


def _grads(params, seed):
    return [_fresh(p.shape, seed + i, p.dtype) for i, p in enumerate(params)]


def test_data_replaced_regression():
    """The issue's reproducer: the step wrote into the freed storage (which `junk` reused) and
    the tensor did not move."""
    w = torch.zeros(1000)
    opt = mn.SGD([w], lr=1.0)
    w.data = torch.zeros(1000)
    junk = torch.full((1000,), 7.0)
    opt.step([torch.ones(1000)])
    assert (junk == 7).all()
    assert (w == -1).all()


def test_params_are_the_callers_objects():
    w, a = torch.zeros(3), np.zeros(4)
    opt = mn.Adam([w, a])
    assert opt.params[0] is w and opt.params[1] is a


@pytest.mark.parametrize("replacement", list(REPLACEMENTS), ids=list(REPLACEMENTS))
@pytest.mark.parametrize("ours,theirs,opts", OPTIMIZERS, ids=[o[0].__name__ for o in OPTIMIZERS])
def test_replaced_tensor_is_updated_where_it_lives_or_refused(ours, theirs, opts, replacement):
    replace, error = REPLACEMENTS[replacement]
    params = [_fresh(s, i) for i, s in enumerate(SHAPES)]
    twins = [p.clone().requires_grad_() for p in params]
    opt, topt = ours(params, **opts), theirs(twins, **opts)

    def step_both(seed):
        grads = _grads(params, seed)
        opt.step(grads)
        for t, g in zip(twins, grads, strict=True):
            t.grad = g.clone()
        topt.step()

    for seed in (10, 20):
        step_both(seed)
    new = _fresh(SHAPES[0], 99)
    replace(params[0], new.clone())
    with torch.no_grad():
        twins[0].data = new.clone()
    junk = torch.full((4096,), 7.0)  # may reuse the memory the param no longer owns
    if error is None:
        for seed in (30, 40):
            step_both(seed)
        for p, t in zip(params, twins, strict=True):
            np.testing.assert_allclose(p.numpy(), t.detach().numpy(), rtol=2e-5, atol=2e-6)
    else:
        before = [p.clone() for p in params]
        state, count = opt.state_dict(), opt.step_count
        with pytest.raises(error[0], match=error[1]):
            opt.step(_grads(params, 30))
        for p, b in zip(params, before, strict=True):  # bytes: a resized tail may hold NaN
            assert p.dtype == b.dtype and p.numpy().tobytes() == b.numpy().tobytes()
        assert opt.step_count == count
        for k, v in opt.state_dict().items():
            np.testing.assert_array_equal(v, state[k], err_msg=k)
    assert (junk == 7).all()


@pytest.mark.parametrize("cls", [mn.SGD, mn.Adam, mn.AdamW])
def test_module_double_is_refused(cls):
    lin = torch.nn.Linear(3, 2).requires_grad_(False)  # a tensor that requires grad has no DLPack
    opt = cls(list(lin.parameters()), lr=0.1)
    opt.step([torch.ones(2, 3), torch.ones(2)])
    lin.double()
    before = [p.clone() for p in lin.parameters()]
    with pytest.raises(TypeError, match=rf"{cls.__name__}.step: params\[0\] changed dtype"):
        opt.step([torch.ones(2, 3, dtype=torch.float64), torch.ones(2, dtype=torch.float64)])
    for p, b in zip(lin.parameters(), before, strict=True):
        assert torch.equal(p, b)
    assert opt.step_count == 1


@pytest.mark.parametrize("cls", [mn.SGD, mn.Adam, mn.AdamW])
def test_numpy_param_resized_in_place_is_refused(cls):
    a = np.zeros(100)
    opt = cls([a], lr=0.1)
    opt.step(np.ones(100))
    a.resize(1000, refcheck=False)  # a new buffer behind the same ndarray object
    a[:] = 3.0
    with pytest.raises(ValueError, match=rf"{cls.__name__}.step: params\[0\] changed shape"):
        opt.step(np.ones(1000))
    assert (a == 3).all() and opt.step_count == 1


def test_two_params_made_to_share_memory_are_refused():
    """set_() can make two params share a storage after the optimizer checked them."""
    a, b = torch.zeros(8), torch.zeros(8)
    opt = mn.SGD([a, b], lr=1.0)
    b.set_(a)
    with pytest.raises(ValueError, match=r"SGD.step: params\[1\] shares memory with params\[0\]"):
        opt.step([torch.ones(8), torch.ones(8)])
    assert (a == 0).all()


def test_a_replaced_list_entry_must_fit_the_state():
    w = np.zeros(4, np.float32)
    opt = mn.Adam([w], lr=0.1)
    opt.params[0] = np.zeros(4, np.float64)
    with pytest.raises(TypeError, match=r"Adam.step: params\[0\] changed dtype"):
        opt.step(np.ones(4))
    opt.params.append(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="Adam.step: params has 2 arrays"):
        opt.step([np.ones(4, np.float32)] * 2)
