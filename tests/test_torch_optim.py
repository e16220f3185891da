"""mlmath_native.torch: the drop-in torch.optim optimizers against torch.optim itself (several
groups, every option, schedulers, clipping), their state dicts through torch.save/torch.load
(exact round trips, conversion between formats and from/to torch.optim checkpoints), 16-bit
params, the all-or-nothing contract, bad input, the offload copy path and the PyTorch guide's
example (docs/guide/torch.md, examples/torch_adamw.py)."""

from __future__ import annotations

import copy
import io
import pathlib
import runpy
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
mt = pytest.importorskip("mlmath_native.torch")

STEPS = 4
SHAPES = [(7,), (33, 5), (300,), (4, 4, 3)]
EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "torch_adamw.py"
GUIDE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "guide" / "torch.md"


def make_params(dtype=torch.float32, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float32).to(dtype))
        for s in shapes
    ]


def clone(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def set_grads(params, step, scale=1.0):
    """The same pseudo-random grads for any copy of ``params`` at ``step``."""
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = (scale * torch.randn(p.shape, generator=gen)).to(p.dtype)


def groups(params, **second):
    """Two param groups: the optimizer's defaults, and ``second`` overriding them."""
    return [{"params": params[:2]}, {"params": params[2:], **second}]


def assert_same(a, b):
    """Bitwise equal tensors (or lists/dicts of them)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, list | tuple):
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(
            a.detach().view(-1).view(torch.uint8), b.detach().view(-1).view(torch.uint8)
        )
    else:
        assert a == b


def states(opt, params):
    return [{k: v.clone() for k, v in opt.state[p].items()} for p in params if p in opt.state]


def assert_close(ours, theirs):
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=2e-5, atol=2e-6)


# -- torch.optim's results ---------------------------------------------------------------------

CASES = [
    ("AdamW", dict(lr=0.01), dict(lr=0.03, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01, amsgrad=True, maximize=True), dict(betas=(0.8, 0.99), eps=1e-6)),
    ("Adam", dict(lr=0.01, weight_decay=0.01, amsgrad=True), dict(lr=0.002, weight_decay=0.0)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01), dict(lr=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.3, maximize=True), dict(momentum=0.5)),
    ("SGD", dict(lr=0.05), dict(weight_decay=0.1, maximize=True)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("name", "opts", "second"), CASES)
def test_matches_torch_optim(name, opts, second, dtype):
    ours_p = make_params(dtype)
    theirs_p = clone(ours_p)
    opt = getattr(mt, name)(groups(ours_p, **second), **opts)
    ref = getattr(torch.optim, name)(groups(theirs_p, **second), **opts)
    for t in range(STEPS):
        for ps, o in ((ours_p, opt), (theirs_p, ref)):
            set_grads(ps, t)
            o.step()
    assert_close(ours_p, theirs_p)
    for p, q in zip(ours_p, theirs_p, strict=True):
        assert opt.state[p].keys() >= {k for k in ref.state[q] if ref.state[q][k] is not None}
        for k, v in ref.state[q].items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(opt.state[p][k].to(v.dtype), v, rtol=2e-5, atol=2e-6)


def test_grads_missing_params_are_left_alone():
    ours_p = make_params()
    theirs_p = clone(ours_p)
    opt, ref = mt.AdamW(ours_p, lr=0.01), torch.optim.AdamW(theirs_p, lr=0.01)
    for t in range(STEPS):
        for ps, o in ((ours_p, opt), (theirs_p, ref)):
            o.zero_grad()
            set_grads(ps[t % 2 :: 2], t)  # half the params, alternating: steps differ per param
            o.step()
    assert_close(ours_p, theirs_p)
    assert [float(opt.state[p]["step"]) for p in ours_p] == [2.0, 2.0, 2.0, 2.0]


def test_add_param_group_closure_and_zero_grad():
    ours_p, theirs_p = make_params(), None
    theirs_p = clone(ours_p)
    opt = mt.Adam(ours_p[:2], lr=0.01)
    ref = torch.optim.Adam(theirs_p[:2], lr=0.01)
    opt.add_param_group({"params": ours_p[2:], "lr": 0.05, "amsgrad": True})
    ref.add_param_group({"params": theirs_p[2:], "lr": 0.05, "amsgrad": True})
    for t in range(STEPS):
        for ps, o in ((ours_p, opt), (theirs_p, ref)):

            def closure(ps=ps, o=o, t=t):
                o.zero_grad()
                set_grads(ps, t)
                return torch.tensor(float(t))

            assert float(o.step(closure)) == float(t)
    assert_close(ours_p, theirs_p)
    opt.zero_grad()
    assert all(p.grad is None for p in ours_p)
    before = [p.detach().clone() for p in ours_p]
    opt.step()  # no grads: nothing to do
    assert_same([p.detach() for p in ours_p], before)
    assert opt.last_step.applied and float(opt.state[ours_p[0]]["step"]) == STEPS


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
@pytest.mark.parametrize("schedule", ["StepLR", "LambdaLR", "OneCycleLR"])
def test_lr_schedulers_work_unchanged(name, schedule):
    def make_schedule(o):
        if schedule == "StepLR":
            return torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)
        if schedule == "LambdaLR":
            return torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + t))
        return torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=8)

    opts = dict(lr=0.01, momentum=0.9) if name == "SGD" else dict(lr=0.01)
    ours_p = make_params()
    theirs_p = clone(ours_p)
    opt = getattr(mt, name)(groups(ours_p, lr=0.02), **opts)
    ref = getattr(torch.optim, name)(groups(theirs_p, lr=0.02), **opts)
    scheds = [make_schedule(opt), make_schedule(ref)]
    for t in range(6):
        for ps, o, s in zip((ours_p, theirs_p), (opt, ref), scheds, strict=True):
            set_grads(ps, t)
            o.step()
            s.step()
        for g, h in zip(opt.param_groups, ref.param_groups, strict=True):
            assert g["lr"] == h["lr"]
            key = "momentum" if name == "SGD" else "betas"
            assert g[key] == h[key]  # OneCycleLR cycles them
    assert_close(ours_p, theirs_p)


# -- state dicts -------------------------------------------------------------------------------


def saved(opt):
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer)


STATE_CASES = [
    ("AdamW", torch.float32, dict(amsgrad=True)),
    ("AdamW", torch.float32, dict(state_dtype="bfloat16", stochastic_rounding=True, seed=5)),
    ("Adam", torch.bfloat16, dict(master_weights=True, state_dtype="bfloat16")),
    ("AdamW", torch.bfloat16, dict(stochastic_rounding=True, seed=3)),
    ("SGD", torch.float32, dict(momentum=0.9, state_dtype="bfloat16", stochastic_rounding=True)),
    ("AdamW", torch.float32, dict(state_dtype="int8", amsgrad=True)),
    ("AdamW", torch.bfloat16, dict(state_dtype="int8", stochastic_rounding=True, seed=2)),
    ("SGD", torch.float32, dict(momentum=0.9, nesterov=True, state_dtype="int8")),
]


@pytest.mark.parametrize(("name", "dtype", "opts"), STATE_CASES)
def test_state_dict_round_trip_continues_identically(name, dtype, opts):
    a_p = make_params(dtype)
    opt_a = getattr(mt, name)(groups(a_p, lr=0.02), lr=0.01, **opts)
    for t in range(2):
        set_grads(a_p, t)
        opt_a.step()
    b_p = clone(a_p)
    opt_b = getattr(mt, name)(groups(b_p, lr=0.5), lr=0.5, **opts)  # lr comes from the state
    opt_b.load_state_dict(saved(opt_a))
    assert_same(states(opt_a, a_p), states(opt_b, b_p))  # every dtype kept, bit for bit
    assert [g["lr"] for g in opt_b.param_groups] == [0.01, 0.02]
    for t in range(2, 4):
        for ps, o in ((a_p, opt_a), (b_p, opt_b)):
            set_grads(ps, t)
            o.step()
    assert_same(list(a_p), list(b_p))
    assert_same(states(opt_a, a_p), states(opt_b, b_p))


def test_conversion_between_state_dtypes():
    a_p = make_params()
    opt_a = mt.AdamW(a_p, lr=0.01, amsgrad=True)  # float32 state
    set_grads(a_p, 0)
    opt_a.step()
    f32 = states(opt_a, a_p)
    opt_b = mt.AdamW(clone(a_p), lr=0.01, amsgrad=True, state_dtype="bfloat16")
    opt_b.load_state_dict(saved(opt_a))
    b16 = [opt_b.state[p] for p in opt_b.param_groups[0]["params"]]
    for s32, s16 in zip(f32, b16, strict=True):
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert_same(s16[k], s32[k].to(torch.bfloat16))  # rounded to nearest even
        assert_same(s16["step"], s32["step"])
    opt_c = mt.AdamW(clone(a_p), lr=0.01, amsgrad=True)  # and back: exact widening
    opt_c.load_state_dict(saved(opt_b))
    for s16, p in zip(b16, opt_c.param_groups[0]["params"], strict=True):
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert_same(opt_c.state[p][k], s16[k].float())


@pytest.mark.parametrize(
    ("name", "opts"), [("AdamW", {"amsgrad": True}), ("SGD", {"momentum": 0.9})]
)
def test_checkpoints_move_to_and_from_torch_optim(name, opts):
    theirs_p = make_params()
    ref = getattr(torch.optim, name)(groups(theirs_p, lr=0.02), lr=0.01, **opts)
    for t in range(2):
        set_grads(theirs_p, t)
        ref.step()
    ours_p = clone(theirs_p)
    opt = getattr(mt, name)(groups(ours_p, lr=0.5), lr=0.5, **opts)
    opt.load_state_dict(saved(ref))  # torch.optim's checkpoint into ours
    back_p = clone(theirs_p)
    back = getattr(torch.optim, name)(groups(back_p, lr=0.5), lr=0.5, **opts)
    back.load_state_dict(saved(opt))  # and ours into torch.optim
    for t in range(2, 5):
        for ps, o in ((theirs_p, ref), (ours_p, opt), (back_p, back)):
            set_grads(ps, t)
            o.step()
    assert_close(ours_p, theirs_p)
    assert_close(back_p, theirs_p)


def test_a_bad_checkpoint_changes_nothing():
    params = make_params()
    opt = mt.AdamW(groups(params, lr=0.02), lr=0.01)
    set_grads(params, 0)
    opt.step()
    bad = saved(opt)
    bad["param_groups"][0]["lr"] = 0.5
    bad["state"][3]["exp_avg"] = torch.zeros(5)  # the second group's last param
    before = states(opt, params)
    with pytest.raises(ValueError, match=r"state of params\[3\]\['exp_avg'\] has shape"):
        opt.load_state_dict(bad)
    assert_same(states(opt, params), before)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.02]
    bad = saved(opt)
    bad["param_groups"][1]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\.betas\[1\] is invalid"):
        opt.load_state_dict(bad)


def test_master_weights_are_made_from_params_when_the_checkpoint_has_none():
    p32 = make_params()
    ref = torch.optim.AdamW(p32, lr=0.01)
    set_grads(p32, 0)
    ref.step()
    p16 = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in p32]
    opt = mt.AdamW(p16, lr=0.01, master_weights=True)
    opt.load_state_dict(saved(ref))
    for p in p16:
        assert_same(opt.state[p]["master"], p.detach().float())
        assert opt.state[p]["exp_avg"].dtype == torch.float32


# -- 16-bit params -----------------------------------------------------------------------------


def test_bf16_params_stall_without_stochastic_rounding_and_move_with_it():
    def run(**opts):
        w = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        opt = mt.SGD([w], lr=1e-3, **opts)  # each update: 1e-3, under half an ulp of 1 (2**-8)
        for _ in range(20):
            w.grad = torch.ones_like(w)
            opt.step()
        return w.detach().float()

    assert torch.equal(run(), torch.ones(4096))  # round to nearest even drops every update
    moved = run(stochastic_rounding=True, seed=1)
    assert abs(float(moved.mean()) - (1 - 20e-3)) < 2e-3  # unbiased: the mean follows float32
    assert_same(moved, run(stochastic_rounding=True, seed=1))  # reproducible


def test_bf16_params_with_master_weights_follow_float32_params():
    p32 = [p.detach().to(torch.bfloat16).float() for p in make_params()]  # exact in bf16
    p32 = [torch.nn.Parameter(p) for p in p32]
    p16 = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in p32]
    opt32 = mt.AdamW(p32, lr=0.01)
    opt16 = mt.AdamW(p16, lr=0.01, master_weights=True)
    for t in range(STEPS):
        set_grads(p32, t)
        for p, q in zip(p16, p32, strict=True):
            p.grad = q.grad.to(torch.bfloat16)
        # the same grads, rounded: feed the float32 run the rounded ones too
        for p, q in zip(p16, p32, strict=True):
            q.grad = p.grad.float()
        opt32.step()
        opt16.step()
    for p, q in zip(p16, p32, strict=True):
        assert_same(opt16.state[p]["master"], q.detach())
        assert_same(p.detach(), q.detach().to(torch.bfloat16))


# -- clipping, skipping, all or nothing --------------------------------------------------------


def test_clipping_equals_clip_grad_norm_then_torch_optim():
    ours_p = make_params()
    theirs_p = clone(ours_p)
    opt = mt.AdamW(groups(ours_p, lr=0.05), lr=0.01, max_grad_norm=0.5)
    ref = torch.optim.AdamW(groups(theirs_p, lr=0.05), lr=0.01)
    for t in range(STEPS):
        set_grads(ours_p, t, scale=3.0)
        set_grads(theirs_p, t, scale=3.0)
        opt.step()
        norm = torch.nn.utils.clip_grad_norm_(theirs_p, 0.5)
        ref.step()
        assert opt.last_step.applied
        assert opt.last_step.grad_norm == pytest.approx(float(norm), rel=1e-5)
        assert opt.last_step.clip_coef < 1
    assert_close(ours_p, theirs_p)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_skip_nonfinite_changes_nothing(bad):
    params = make_params()
    opt = mt.AdamW(groups(params, lr=0.02), lr=0.01, skip_nonfinite=True)
    set_grads(params, 0)
    opt.step()
    before, state = [p.detach().clone() for p in params], states(opt, params)
    set_grads(params, 1)
    params[3].grad[0, 1, 2] = bad  # in the second group
    opt.step()
    assert not opt.last_step.applied
    assert_same([p.detach() for p in params], before)
    assert_same(states(opt, params), state)
    set_grads(params, 1)
    opt.step()
    assert opt.last_step.applied and float(opt.state[params[0]]["step"]) == 2


def test_skip_nonfinite_on_the_first_step_makes_no_state():
    params = make_params()
    opt = mt.Adam(params, lr=0.01, skip_nonfinite=True)
    set_grads(params, 0)
    params[0].grad[0] = float("nan")
    opt.step()
    assert len(opt.state) == 0 and not opt.last_step.applied


def corrupt_hyper(opt, params):
    opt.param_groups[1]["lr"] = -1.0
    return ValueError, r"param_groups\[1\]\.lr is invalid"


def corrupt_state(opt, params):
    opt.state[params[3]]["exp_avg"] = torch.zeros(3)
    return ValueError, r"state of params\[3\]\['exp_avg'\] has dtype"


def corrupt_grad(opt, params):
    params[2].grad = params[2].grad.to_sparse()
    return TypeError, r"params\[2\]\.grad is sparse"


def corrupt_overlap(opt, params):
    opt.state[params[2]]["exp_avg_sq"] = opt.state[params[2]]["exp_avg"]
    return ValueError, "shares memory"


@pytest.mark.parametrize("corrupt", [corrupt_hyper, corrupt_state, corrupt_grad, corrupt_overlap])
def test_a_bad_second_group_leaves_the_first_untouched(corrupt):
    params = make_params()
    opt = mt.AdamW(groups(params, lr=0.02), lr=0.01, max_grad_norm=1.0)
    set_grads(params, 0)
    opt.step()
    set_grads(params, 1)
    exc, match = corrupt(opt, params)
    before, state = [p.detach().clone() for p in params], states(opt, params)
    with pytest.raises(exc, match=match):
        opt.step()
    assert_same([p.detach() for p in params], before)
    assert_same(states(opt, params), state)


def test_bad_arguments_are_refused_clearly():
    params = make_params()
    with pytest.raises(ValueError, match="AdamW: lr is invalid"):
        mt.AdamW(params, lr=-1.0)
    with pytest.raises(TypeError, match="Adam: betas must be a pair"):
        mt.Adam(params, betas=0.9)
    with pytest.raises(ValueError, match="SGD: nesterov needs momentum > 0"):
        mt.SGD(params, nesterov=True)
    with pytest.raises(ValueError, match="state_dtype is invalid"):
        mt.AdamW(params, state_dtype="int4")
    with pytest.raises(ValueError, match=r"params\[0\], which is float64"):
        mt.AdamW(make_params(torch.float64), state_dtype="bfloat16")
    with pytest.raises(ValueError, match="stochastic_rounding is for bfloat16"):
        mt.AdamW(make_params(torch.float16), stochastic_rounding=True)
    with pytest.raises(TypeError, match=r"params\[0\] has dtype torch.int32"):
        mt.SGD([torch.zeros(3, dtype=torch.int32)])
    with pytest.raises(ValueError, match=r"params\[0\] is on meta"):
        mt.SGD([torch.zeros(3, device="meta")])
    with pytest.raises(TypeError, match="max_grad_norm must be a real number"):
        mt.SGD(params, max_grad_norm="1")
    opt = mt.AdamW(params[:2])
    with pytest.raises(ValueError, match=r"add_param_group: lr is invalid"):
        opt.add_param_group({"params": params[2:], "lr": float("nan")})
    assert len(opt.param_groups) == 1
    w = torch.nn.Parameter(torch.zeros(4, 4).t())  # not contiguous: its update would be lost
    opt = mt.SGD([w], lr=0.1)
    w.grad = torch.ones(4, 4)
    with pytest.raises(ValueError, match=r"params\[0\] must be C-contiguous"):
        opt.step()
    assert torch.equal(w.detach(), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="groups of"):
        mt.SGD(make_params()).load_state_dict({"state": {}, "param_groups": []})


def test_importing_without_torch_is_a_clear_error():
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "import mlmath_native\n"
        "try:\n"
        "    import mlmath_native.torch\n"
        "except ImportError as exc:\n"
        "    print('ImportError:', exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "mlmath_native.torch needs PyTorch" in done.stdout and "pip install torch" in done.stdout
    code = "import sys, mlmath_native\nprint('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


# -- offload -----------------------------------------------------------------------------------

OFFLOAD_CASES = [
    ("AdamW", torch.float32, dict(amsgrad=True, max_grad_norm=1.0)),
    ("AdamW", torch.bfloat16, dict(state_dtype="bfloat16", stochastic_rounding=True, seed=9)),
    ("Adam", torch.bfloat16, dict(master_weights=True, skip_nonfinite=True)),
    ("SGD", torch.float32, dict(momentum=0.9, nesterov=True)),
]


@pytest.mark.parametrize("buckets", ["one", "many"])
@pytest.mark.parametrize(("name", "dtype", "opts"), OFFLOAD_CASES)
def test_offload_copy_path_is_bit_identical(name, dtype, opts, buckets, monkeypatch):
    if buckets == "many":  # several buckets per batch: copies and updates interleave
        monkeypatch.setattr(mt, "_BUCKET_ELEMENTS", 200)
    direct_p = make_params(dtype)
    off_p = clone(direct_p)
    direct = getattr(mt, name)(groups(direct_p, lr=0.02), lr=0.01, **opts)
    off = getattr(mt, name)(groups(off_p, lr=0.02), lr=0.01, offload=True, **opts)
    for t in range(STEPS):
        if t == 2:  # weights changed in place by their owner between steps are followed
            with torch.no_grad():
                for p in (*direct_p, *off_p):
                    p.mul_(0.5)  # as model.load_state_dict does (a .data change is not seen)
        for ps, o in ((direct_p, direct), (off_p, off)):
            set_grads(ps, t)
            o.step()
        assert_same(list(direct_p), list(off_p))
    assert_same(states(direct, direct_p), states(off, off_p))
    for p in off_p:  # the host copies are the optimizer's own memory
        assert off._host[p].param.data_ptr() != p.data_ptr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_of_cuda_params_matches_the_cpu_step():
    cpu_p = make_params()
    gpu_p = [torch.nn.Parameter(p.detach().cuda()) for p in cpu_p]
    cpu = mt.AdamW(groups(cpu_p, lr=0.02), lr=0.01, max_grad_norm=1.0)
    gpu = mt.AdamW(groups(gpu_p, lr=0.02), lr=0.01, max_grad_norm=1.0, offload=True)
    for t in range(STEPS):
        set_grads(cpu_p, t)
        for p, q in zip(gpu_p, cpu_p, strict=True):
            p.grad = q.grad.cuda()
        cpu.step()
        gpu.step()
    assert_same([p.detach() for p in cpu_p], [p.detach().cpu() for p in gpu_p])
    assert all(v.device.type == "cpu" for p in gpu_p for v in gpu.state[p].values())
    assert_same(states(cpu, cpu_p), states(gpu, gpu_p))


# -- the example of docs/guide/torch.md --------------------------------------------------------


def test_the_torch_guide_example_runs_and_learns(capsys):
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    losses = [float(line.rsplit(" ", 1)[1]) for line in lines]
    assert len(losses) == 2 and losses[1] < losses[0] < 0.5


@pytest.mark.skipif(not GUIDE.exists(), reason="an installed package without the source tree")
def test_the_torch_guide_shows_the_example_file():
    code = EXAMPLE.read_text().split('"""', 2)[2].strip()  # less the module docstring
    assert code in GUIDE.read_text()


def test_a_deep_copy_keeps_the_settings_and_continues_identically():
    params = make_params(torch.bfloat16)
    opt = mt.AdamW(params, lr=0.01, state_dtype="bfloat16", stochastic_rounding=True, seed=4)
    set_grads(params, 0)
    opt.step()
    twin = copy.deepcopy({"params": params, "opt": opt})  # the optimizer keeps its params
    assert (twin["opt"].state_dtype, twin["opt"].seed) == ("bfloat16", 4)
    for t in (1, 2):
        for ps, o in ((params, opt), (twin["params"], twin["opt"])):
            set_grads(ps, t)
            o.step()
    assert_same(list(params), list(twin["params"]))


def test_hyper_parameters_a_checkpoint_lacks_take_the_defaults():
    sgd = torch.optim.SGD(make_params(), lr=0.1)  # its groups have no betas, eps, amsgrad
    opt = mt.AdamW(make_params(), betas=(0.8, 0.9))
    opt.load_state_dict(saved(sgd))
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["betas"] == (0.8, 0.9)
    set_grads(opt.param_groups[0]["params"], 0)
    opt.step()
    assert opt.last_step.applied


@pytest.mark.parametrize(
    ("name", "opts"), [("AdamW", {"amsgrad": True}), ("SGD", {"momentum": 0.9})]
)
def test_int8_state_is_the_numpy_optimizers_int8_state(name, opts):
    """The torch face and mlmath_native.optim run the same kernel on the same codes."""
    import mlmath_native as mn

    t_p = make_params()
    opt = getattr(mt, name)(t_p, lr=0.01, state_dtype="int8", **opts)
    n_p = [p.detach().clone().numpy() for p in t_p]
    ref = getattr(mn.optim, name)(n_p, lr=0.01, state_dtype="int8", **opts)
    for t in range(3):
        set_grads(t_p, t)
        opt.step()
        ref.step([p.grad.numpy().copy() for p in t_p])
    for p, q in zip(t_p, n_p, strict=True):
        assert torch.equal(p.detach(), torch.from_numpy(q))
    buf = "exp_avg" if name == "AdamW" else "momentum_buffer"
    for i, p in enumerate(t_p):
        assert torch.equal(opt.state[p][buf], torch.from_numpy(ref.state[buf][i]))
        assert torch.equal(
            opt.state[p][f"{buf}_absmax"], torch.from_numpy(ref.state[f"{buf}_absmax"][i])
        )


def test_int8_checkpoint_converts_to_float32_and_torch_optim():
    import mlmath_native as mn

    a_p = make_params()
    opt_a = mt.AdamW(a_p, lr=0.01, state_dtype="int8")
    for t in range(2):
        set_grads(a_p, t)
        opt_a.step()
    back = torch.optim.AdamW(clone(a_p), lr=0.01)
    ours = mt.AdamW(clone(a_p), lr=0.01)  # float32 state from the int8 checkpoint
    ours.load_state_dict(saved(opt_a))
    for p, q in zip(a_p, ours.param_groups[0]["params"], strict=True):
        codes = opt_a.state[p]["exp_avg"].numpy()
        want = mn.optim.dequantize_blockwise(codes, opt_a.state[p]["exp_avg_absmax"].numpy())
        assert torch.equal(ours.state[q]["exp_avg"], torch.from_numpy(want))
    back.load_state_dict(saved(ours))  # and on into torch.optim
    set_grads(a_p, 2)
    for p, q in zip(a_p, back.param_groups[0]["params"], strict=True):
        q.grad = p.grad.clone()
    back.step()
