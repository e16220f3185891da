"""Drop-in ``torch.optim`` optimizers on the fused C++ kernels: ``SGD``, ``Adam``, ``AdamW``.

They are ``torch.optim.Optimizer`` subclasses with torch's semantics (``param_groups`` with
per-group hyper-parameters, ``add_param_group``, ``zero_grad``, ``step(closure)``, the LR
schedulers, ``state_dict``/``load_state_dict`` for ``torch.save``/``torch.load``) whose step
updates CPU tensors in place, zero copy, through ``_core.adam_step``/``_core.sgd_step``: one
fused call per batch of params that share (group, param dtype, state format, step), on NumPy
views of the tensors' memory.  The options of :mod:`mlmath_native.optim` come as keywords:
``state_dtype``, ``master_weights``, ``max_grad_norm``, ``skip_nonfinite``,
``stochastic_rounding``, ``seed`` (Note [16-bit optimizers] in optim.py), and ``offload``
(Note [offload]).  PyTorch stays optional: ``import mlmath_native`` never imports torch, and
importing this module without torch raises ImportError.

Note [torch state]: a param's state is torch's ``self.state[p]``, a dict of CPU tensors:
``step`` (a float32 scalar, as torch keeps it), the buffers of the algorithm (``exp_avg``,
``exp_avg_sq``, ``max_exp_avg_sq``; ``momentum_buffer``) in the optimizer's state format
(``_FORMATS``: how each buffer is stored, a table so that a new format plugs in), and
``master`` (float32) for 16-bit params with ``master_weights``.  Buffers are made on the first
step that needs them.  ``load_state_dict`` converts every buffer into this optimizer's format
(a copy, bit for bit, when the formats agree), so checkpoints move between state dtypes and
between these optimizers and torch.optim's; torch's own load would cast the state to the
param's dtype.

Note [all or nothing]: a step checks every group's hyper-parameters, every param, grad and
state buffer first; a step that raises (or that ``skip_nonfinite`` skips) changes no byte of
any param or state.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, cast

try:
    import torch
except ImportError as exc:  # PyTorch is optional: only this module needs it
    raise ImportError(
        "mlmath_native.torch needs PyTorch, which is not installed (pip install torch); the "
        "rest of mlmath_native works without it"
    ) from exc

from numpy.typing import NDArray

from . import _core
from . import optim as _optim
from .optim import StepResult

__all__ = ["SGD", "Adam", "AdamW", "StepResult"]

#: params of a step are batched into kernel calls of at most about this many elements (64 MB
#: of float32): the offload path overlaps the copies of one bucket with the update of another,
#: and both paths use the same buckets, so that they agree bit for bit (stochastic rounding
#: included); smaller buckets cost the direct path a little (one parallel region each)
_BUCKET_ELEMENTS = 1 << 24
#: spreads the stochastic-rounding seeds of the kernel calls of one step (the golden ratio)
_SEED_STRIDE = 0x9E3779B97F4A7C15
#: the optimizer-wide settings (the hyper-parameters live in param_groups)
_SETTINGS = (
    "state_dtype",
    "master_weights",
    "max_grad_norm",
    "skip_nonfinite",
    "stochastic_rounding",
    "seed",
    "offload",
)
_PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# -- state formats (Note [torch state]) --------------------------------------------------------


class _Dense:
    """A state buffer stored as one tensor of a float dtype.  A format knows the state-dict
    keys of buffer ``buf``, makes, checks, encodes (from any float tensor), decodes and
    exposes it to the kernel; a blockwise int8 format would keep ``buf`` (the codes) and
    ``<buf>_absmax`` and pass both to the kernel."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.name = str(dtype).removeprefix("torch.")

    def keys(self, buf: str) -> tuple[str, ...]:
        return (buf,)

    def holds(self, buf: str, entry: dict[str, Any]) -> bool:
        """Whether a saved state ``entry`` stores ``buf`` in this format."""
        value = entry.get(buf)
        return isinstance(value, torch.Tensor) and value.dtype == self.dtype

    def new(self, buf: str, shape: torch.Size) -> dict[str, torch.Tensor]:
        return {buf: torch.zeros(shape, dtype=self.dtype)}

    def encode(self, buf: str, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """``values`` (any float dtype) stored in this format (round to nearest even)."""
        return {buf: values.detach().to("cpu", self.dtype, copy=True).contiguous()}

    def decode(self, buf: str, entry: dict[str, Any]) -> torch.Tensor:
        return cast("torch.Tensor", entry[buf])

    def check(self, fn: str, label: str, buf: str, entry: dict[str, Any], shape: Any) -> None:
        """ValueError/TypeError unless ``entry`` holds ``buf`` for a param of ``shape``."""
        value = entry.get(buf)
        if not isinstance(value, torch.Tensor) or value.device.type != "cpu":
            raise TypeError(f"{fn}: {label}['{buf}'] must be a CPU tensor (got {_what(value)})")
        if value.dtype != self.dtype or value.shape != shape or not value.is_contiguous():
            raise ValueError(
                f"{fn}: {label}['{buf}'] has dtype {value.dtype} and shape "
                f"{tuple(value.shape)} (expected a contiguous {self.dtype} tensor of the "
                f"param's shape {tuple(shape)})"
            )

    def arrays(
        self, fn: str, label: str, buf: str, entry: dict[str, Any]
    ) -> tuple[NDArray[Any], ...]:
        """What the kernel reads and writes, one array per key: views of the tensors' memory."""
        return tuple(_optim._param_array(fn, f"{label}['{k}']", entry[k]) for k in self.keys(buf))


class _Quantized(_Dense):
    """A state buffer stored as 8-bit codes ``buf`` (int8 for exp_avg and momentum_buffer,
    uint8 for the second moments) and float32 block scales ``<buf>_absmax`` (Note [8-bit
    optimizer state] in optim.py)."""

    def __init__(self) -> None:
        self.dtype = torch.int8
        self.name = "int8"

    @staticmethod
    def _code_dtype(buf: str) -> torch.dtype:
        return torch.int8 if buf in _optim._SIGNED_STATES else torch.uint8

    def keys(self, buf: str) -> tuple[str, ...]:
        return (buf, f"{buf}_absmax")

    def holds(self, buf: str, entry: dict[str, Any]) -> bool:
        value = entry.get(buf)
        return (
            f"{buf}_absmax" in entry
            and isinstance(value, torch.Tensor)
            and value.dtype == self._code_dtype(buf)
        )

    def new(self, buf: str, shape: torch.Size) -> dict[str, torch.Tensor]:
        blocks = _optim._blocks(math.prod(shape))
        return {
            buf: torch.zeros(shape, dtype=self._code_dtype(buf)),
            f"{buf}_absmax": torch.zeros(blocks, dtype=torch.float32),
        }

    def encode(self, buf: str, values: torch.Tensor) -> dict[str, torch.Tensor]:
        wide = values.detach().to("cpu", torch.float32).numpy()
        codes, absmax = _optim.quantize_blockwise(wide, signed=buf in _optim._SIGNED_STATES)
        return {buf: torch.from_numpy(codes), f"{buf}_absmax": torch.from_numpy(absmax)}

    def decode(self, buf: str, entry: dict[str, Any]) -> torch.Tensor:
        codes, absmax = entry[buf], entry[f"{buf}_absmax"]
        return torch.from_numpy(_optim.dequantize_blockwise(codes.numpy(), absmax.numpy()))

    def check(self, fn: str, label: str, buf: str, entry: dict[str, Any], shape: Any) -> None:
        blocks = _optim._blocks(math.prod(shape))
        wanted = ((buf, self._code_dtype(buf), tuple(shape)),) + (
            (f"{buf}_absmax", torch.float32, (blocks,)),
        )
        for key, dtype, want in wanted:
            value = entry.get(key)
            if not isinstance(value, torch.Tensor) or value.device.type != "cpu":
                raise TypeError(f"{fn}: {label}['{key}'] must be a CPU tensor (got {_what(value)})")
            if value.dtype != dtype or tuple(value.shape) != want or not value.is_contiguous():
                raise ValueError(
                    f"{fn}: {label}['{key}'] has dtype {value.dtype} and shape "
                    f"{tuple(value.shape)} (expected a contiguous {dtype} tensor of shape {want})"
                )

    def arrays(
        self, fn: str, label: str, buf: str, entry: dict[str, Any]
    ) -> tuple[NDArray[Any], ...]:
        return (entry[buf].detach().numpy(), entry[f"{buf}_absmax"].detach().numpy())


_FORMATS: dict[str, _Dense] = {
    "int8": _Quantized(),  # first: holds() of the dense formats would not tell codes apart
    "float32": _Dense(torch.float32),
    "bfloat16": _Dense(torch.bfloat16),
    "float64": _Dense(torch.float64),  # float64 params with state_dtype=None
}


def _what(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor on {value.device}"
    return type(value).__name__


def _convert(
    fn: str, label: str, buf: str, entry: dict[str, Any], shape: Any, target: _Dense
) -> dict[str, torch.Tensor]:
    """Saved buffer ``buf`` of ``entry`` in format ``target``: an exact copy when it is stored
    in that format already, else decoded and encoded (any float tensor is read, so that the
    state of a torch.optim optimizer with 16-bit params loads too)."""
    source = next((f for f in _FORMATS.values() if f.holds(buf, entry)), None)
    if source is None:
        value = entry[buf]
        if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
            raise TypeError(f"{fn}: {label}['{buf}'] must be a float tensor (got {_what(value)})")
        values = value
    else:
        values = source.decode(buf, entry)
    if values.shape != shape:
        raise ValueError(
            f"{fn}: {label}['{buf}'] has shape {tuple(values.shape)} (expected the param's "
            f"shape {tuple(shape)})"
        )
    if source is target:
        return {k: entry[k].detach().to("cpu", copy=True).contiguous() for k in target.keys(buf)}
    return target.encode(buf, values)


def _step_number(fn: str, label: str, step: object) -> int:
    """A saved ``step`` (a scalar tensor, as torch keeps it, or a number) as an int >= 0."""
    if isinstance(step, torch.Tensor):
        step = step.item() if step.numel() == 1 else math.nan
    if not (isinstance(step, int | float) and float(step).is_integer() and step >= 0):
        raise ValueError(f"{fn}: {label} has step {step!r} (expected an integer >= 0)")
    return int(step)


# -- offload (Note [offload]) ------------------------------------------------------------------


@dataclass
class _Host:
    """The CPU side of an offloaded param: a copy of its values and a buffer for its grad
    (pinned when CUDA exists), and the param's (version, address) when they were last equal."""

    param: torch.Tensor
    grad: torch.Tensor
    seen: tuple[int, int] = (-1, 0)


def _mark(p: torch.Tensor) -> tuple[int, int]:
    return (p._version, p.data_ptr())


# -- a step's plan -----------------------------------------------------------------------------


@dataclass
class _Slot:
    """One param in a step: its views, its state and what the step makes for it."""

    index: int  # the param's index over all groups (names it in errors, seeds SR)
    param: torch.Tensor
    fmt: _Dense
    view: NDArray[Any]  # what the kernel writes: the param's memory or its host copy
    grad: NDArray[Any]
    host: _Host | None = None
    new_host: bool = False
    state: dict[str, Any] = field(default_factory=dict)  # existing entries and new ones
    created: list[str] = field(default_factory=list)  # keys made by this step
    buffers: dict[str, tuple[NDArray[Any], ...]] = field(default_factory=dict)  # _Dense.arrays
    master: NDArray[Any] | None = None
    step: int = 0


class _Optimizer(torch.optim.Optimizer):
    """The shared step, state checks and conversions; subclasses name their buffers, check
    their hyper-parameters and call their kernel (``_update``)."""

    _name = "optimizer"

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        state_dtype: str | None,
        master_weights: bool,
        max_grad_norm: float | None,
        skip_nonfinite: bool,
        stochastic_rounding: bool,
        seed: int,
        offload: bool,
    ) -> None:
        fn = self._name
        self._check_hyper(fn, defaults)
        self.state_dtype = _optim._state_dtype_name(fn, state_dtype)
        self.master_weights = _optim._flag(fn, "master_weights", master_weights)
        self.max_grad_norm = _optim._max_grad_norm(fn, max_grad_norm)
        self.skip_nonfinite = _optim._flag(fn, "skip_nonfinite", skip_nonfinite)
        self.stochastic_rounding = _optim._flag(fn, "stochastic_rounding", stochastic_rounding)
        self.seed = _optim._seed(fn, seed)
        self.offload = _optim._flag(fn, "offload", offload)
        #: what the last step did (applied, grad_norm, clip_coef), None before the first
        self.last_step: StepResult | None = None
        self._host: dict[torch.Tensor, _Host] = {}  # Note [offload]
        self._stream: Any = None  # the side CUDA stream of the offload copies
        super().__init__(params, defaults)

    # what a subclass defines ---------------------------------------------------------------------
    @classmethod
    def _check_hyper(cls, fn: str, group: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _buffers(self, hyper: dict[str, Any]) -> list[str]:
        """The state buffers a step with ``hyper`` reads and writes."""
        raise NotImplementedError

    def _update(
        self,
        slots: list[_Slot],
        hyper: dict[str, Any],
        scale: float,
        sr_seed: int | None,
    ) -> None:
        raise NotImplementedError

    # params --------------------------------------------------------------------------------------
    def _fmt(self, fn: str, p: torch.Tensor, label: str) -> _Dense:
        """The state format of param ``p`` (Note [16-bit optimizers] in optim.py)."""
        if p.dtype == torch.float64:
            if self.state_dtype is not None:
                raise ValueError(
                    f"{fn}: state_dtype {self.state_dtype!r} does not fit {label}, which is "
                    "float64 (float64 params keep float64 state; expected state_dtype=None)"
                )
            return _FORMATS["float64"]
        return _FORMATS[self.state_dtype or "float32"]

    def _check_param(self, fn: str, p: torch.Tensor, label: str) -> None:
        if p.dtype not in _PARAM_DTYPES:
            raise TypeError(
                f"{fn}: {label} has dtype {p.dtype} (expected float32, float64, bfloat16 or "
                "float16)"
            )
        if p.device.type != "cpu" and not self.offload:
            raise ValueError(
                f"{fn}: {label} is on {p.device} (expected a CPU tensor; offload=True keeps the "
                "state on the CPU for params on other devices)"
            )
        if self.stochastic_rounding and not self.master_weights and p.dtype == torch.float16:
            raise ValueError(
                f"{fn}: stochastic_rounding is for bfloat16 storage (got float16 {label} "
                "without master weights; use master_weights=True for float16 params)"
            )
        self._fmt(fn, p, label)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's add_param_group, then the group's hyper-parameters and params are checked
        (ValueError/TypeError, the group not added)."""
        fn = f"{self._name}.add_param_group"
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_hyper(fn, group)
            first = sum(len(g["params"]) for g in self.param_groups[:-1])
            for k, p in enumerate(group["params"]):
                self._check_param(fn, p, f"params[{first + k}]")
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    # the step ------------------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every param that has a grad; returns ``closure()``'s value (the
        closure, if given, is called first with grad enabled).  ``self.last_step`` tells
        whether it was applied and the grad norm (Note [all or nothing])."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            self.last_step = self._step()
        return loss

    def _hypers(self, fn: str) -> list[dict[str, Any]]:
        hypers = []
        for i, group in enumerate(self.param_groups):
            try:
                hypers.append(self._check_hyper(fn, group))
            except (TypeError, ValueError) as exc:
                message = str(exc).removeprefix(f"{fn}: ")
                raise type(exc)(f"{fn}: param_groups[{i}].{message}") from None
        return hypers

    def _slot(
        self, fn: str, index: int, p: torch.Tensor, g: torch.Tensor, hyper: dict[str, Any]
    ) -> _Slot:
        """Checks param ``p`` with its grad ``g`` and its state, and takes the views its update
        needs; writes nothing (what it makes stays in the slot until the step commits)."""
        label = f"params[{index}]"
        self._check_param(fn, p, label)
        if g.layout != torch.strided:
            raise TypeError(f"{fn}: {label}.grad is sparse (expected a dense tensor)")
        if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
            raise ValueError(
                f"{fn}: {label}.grad is a {g.dtype} tensor of shape {tuple(g.shape)} on "
                f"{g.device} (expected the param's dtype {p.dtype}, shape {tuple(p.shape)} "
                f"and device {p.device})"
            )
        host, new_host = None, False
        if self.offload:  # the kernel works on the host copies (Note [offload])
            host = self._host.get(p)
            if host is None or host.param.shape != p.shape or host.param.dtype != p.dtype:
                pin = torch.cuda.is_available()
                host = _Host(
                    torch.empty(p.shape, dtype=p.dtype, pin_memory=pin),
                    torch.empty(p.shape, dtype=p.dtype, pin_memory=pin),
                )
                new_host = True
            view = _optim._param_array(fn, label, host.param)
            grad = _optim._param_array(fn, f"{label}.grad", host.grad)
        else:
            view = _optim._param_array(fn, label, p.detach())
            grad = _optim._grad_array(fn, f"{label}.grad", g.detach(), view)
        slot = _Slot(index, p, self._fmt(fn, p, label), view, grad, host, new_host)
        self._state_of(fn, slot, hyper)
        return slot

    def _state_of(self, fn: str, slot: _Slot, hyper: dict[str, Any]) -> None:
        """The slot's state: the param's own entries, checked, and the buffers its first step
        (or a newly enabled amsgrad) needs, made anew."""
        p, label = slot.param, f"state of params[{slot.index}]"
        state = dict(self.state.get(p, {}))  # self.state is a defaultdict: .get adds nothing
        slot.step = _step_number(fn, label, state.get("step", 0))
        step = state.get("step")
        if not (isinstance(step, torch.Tensor) and step.dtype == torch.float32 and not step.ndim):
            state["step"] = torch.tensor(float(slot.step), dtype=torch.float32)
        for buf in self._buffers(hyper):
            if state.get(buf) is not None:
                slot.fmt.check(fn, label, buf, state, p.shape)
            else:
                state.update(slot.fmt.new(buf, p.shape))
                slot.created += slot.fmt.keys(buf)
            slot.buffers[buf] = slot.fmt.arrays(fn, label, buf, state)
        if self.master_weights and p.dtype.itemsize == 2:
            if "master" in state:
                _FORMATS["float32"].check(fn, label, "master", state, p.shape)
            else:  # exact float32 copies of the param (Note [16-bit optimizers])
                state["master"] = p.detach().to("cpu", torch.float32, copy=True)
                slot.created.append("master")
            slot.master = _optim._param_array(fn, f"{label}['master']", state["master"])
        slot.state = state

    def _plan(self, fn: str, hypers: list[dict[str, Any]]) -> list[tuple[int, list[_Slot]]]:
        """Every param with a grad checked, batched (group, dtype, format, step, master) and
        cut into buckets: [(group index, slots)]."""
        batches: dict[tuple[Any, ...], list[_Slot]] = {}
        index = 0
        for number, (group, hyper) in enumerate(zip(self.param_groups, hypers, strict=True)):
            for p in group["params"]:
                if p.grad is not None:
                    slot = self._slot(fn, index, p, p.grad, hyper)
                    key: tuple[Any, ...] = (number, p.dtype, slot.fmt.name, slot.step)
                    key += (slot.master is not None, *self._batch_key(slot))
                    batches.setdefault(key, []).append(slot)
                index += 1
        buckets = []
        for key, slots in batches.items():
            bucket: list[_Slot] = []
            size = 0
            for slot in slots:
                if bucket and size + slot.param.numel() > _BUCKET_ELEMENTS:
                    buckets.append((key[0], bucket))
                    bucket, size = [], 0
                bucket.append(slot)
                size += slot.param.numel()
            buckets.append((key[0], bucket))
        return buckets

    def _batch_key(self, slot: _Slot) -> tuple[Any, ...]:
        return ()

    def _step(self) -> StepResult:
        fn = f"{self._name}.step"
        max_norm = _optim._max_grad_norm(fn, self.max_grad_norm)
        skip = _optim._flag(fn, "skip_nonfinite", self.skip_nonfinite)
        sr = _optim._flag(fn, "stochastic_rounding", self.stochastic_rounding)
        seed = _optim._seed(fn, self.seed)
        hypers = self._hypers(fn)
        buckets = self._plan(fn, hypers)
        slots = [s for _, bucket in buckets for s in bucket]
        written = [(f"params[{s.index}]", s.view) for s in slots]
        written += [
            (f"state of params[{s.index}]['{b}']", a)
            for s in slots
            for b, arrays in s.buffers.items()
            for a in arrays
        ]
        written += [
            (f"state of params[{s.index}]['master']", s.master)
            for s in slots
            if s.master is not None
        ]
        grads = _optim._reads_apart_from_writes(fn, written, [s.grad for s in slots])
        for s, g in zip(slots, grads, strict=True):
            s.grad = g
        # everything is checked: from here on nothing raises (Note [all or nothing])

        copier = _Copier(self, buckets) if self.offload else None
        grad_norm, coef = None, 1.0
        if max_norm is not None or skip:
            if copier is not None:
                copier.wait_all()
            grad_norm = _core.grad_norm(grads) if grads else 0.0
            if skip and not math.isfinite(grad_norm):
                return StepResult(applied=False, grad_norm=grad_norm)
            if max_norm is not None:
                coef = min(1.0, max_norm / (grad_norm + 1e-6))  # as torch's clip_grad_norm_
        for s in slots:  # commit what the step made
            self.state[s.param] = s.state
        for number, (group_index, bucket) in enumerate(buckets):
            hyper = hypers[group_index]
            scale = -coef if hyper.get("maximize") else coef
            sr_seed = (seed + (bucket[0].index + 1) * _SEED_STRIDE) % 2**64 if sr else None
            if copier is not None:
                copier.wait(number)
            self._update(bucket, hyper, scale, sr_seed)
            if copier is not None:
                copier.send_back(number)
        for s in slots:
            s.state["step"] += 1  # a float32 tensor, as torch keeps it (_state_of)
        if copier is not None:
            copier.finish()
        return StepResult(applied=True, grad_norm=grad_norm, clip_coef=coef)

    # state dicts ---------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """torch's pickled state (defaults, state, param_groups) and this optimizer's settings,
        so that ``copy.deepcopy`` and pickling keep them; host copies are made anew."""
        state = super().__getstate__()
        return state | {name: getattr(self, name) for name in _SETTINGS}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._host, self._stream = {}, None
        self.last_step = getattr(self, "last_step", None)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load_state_dict, the state converted to this optimizer's format and dtypes
        (Note [torch state]); every entry is checked before anything changes."""
        fn = f"{self._name}.load_state_dict"
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise TypeError(
                f"{fn}: state_dict must be a dict with 'state' and 'param_groups' (got "
                f"{type(state_dict).__name__})"
            )
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"])
            for s, g in zip(saved_groups, self.param_groups, strict=True)
        ):
            raise ValueError(
                f"{fn}: state_dict has groups of {[len(s['params']) for s in saved_groups]} "
                f"params (expected {[len(g['params']) for g in self.param_groups]})"
            )
        for i, saved in enumerate(saved_groups):  # the hyper-parameters it will set
            self._hypers_of(
                fn, i, self.defaults | {k: v for k, v in saved.items() if k != "params"}
            )
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        ids = list(chain.from_iterable(s["params"] for s in saved_groups))
        id_map = dict(zip(ids, range(len(params)), strict=True))
        state: dict[torch.Tensor, dict[str, Any]] = {}
        for key, entry in state_dict["state"].items():
            if key not in id_map:
                raise ValueError(f"{fn}: state_dict has state for param id {key!r}, in no group")
            index = id_map[key]
            state[params[index]] = self._converted(fn, index, params[index], dict(entry))
        keep = {k: v for k, v in state_dict.items() if k != "state"}
        super().load_state_dict(keep | {"state": {}})
        for group in self.param_groups:  # a key the checkpoint lacks takes its default
            for k, v in self.defaults.items():
                group.setdefault(k, v)
        self.state.clear()
        self.state.update(state)

    def _hypers_of(self, fn: str, i: int, values: dict[str, Any]) -> None:
        try:
            self._check_hyper(fn, values)
        except (TypeError, ValueError) as exc:
            message = str(exc).removeprefix(f"{fn}: ")
            raise type(exc)(f"{fn}: param_groups[{i}].{message}") from None

    def _converted(
        self, fn: str, index: int, p: torch.Tensor, entry: dict[str, Any]
    ) -> dict[str, Any]:
        """A saved param state in this optimizer's format (Note [torch state])."""
        label = f"state of params[{index}]"
        fmt = self._fmt(fn, p, f"params[{index}]")
        out: dict[str, Any] = {}
        step = _step_number(fn, label, entry.pop("step", 0))
        out["step"] = torch.tensor(float(step), dtype=torch.float32)
        master = entry.pop("master", None)
        for buf in self._all_buffers:
            if entry.get(buf) is not None:
                out.update(_convert(fn, label, buf, entry, p.shape, fmt))
        if self.master_weights and p.dtype.itemsize == 2:
            source = p.detach() if master is None else master
            if not (isinstance(source, torch.Tensor) and source.is_floating_point()):
                raise TypeError(f"{fn}: {label}['master'] must be a float tensor")
            if source.shape != p.shape:
                raise ValueError(
                    f"{fn}: {label}['master'] has shape {tuple(source.shape)} (expected the "
                    f"param's shape {tuple(p.shape)})"
                )
            out["master"] = source.detach().to("cpu", torch.float32, copy=True).contiguous()
        return out

    _all_buffers: tuple[str, ...] = ()


class _Copier:
    """Note [offload]: with ``offload=True`` every param is updated through host copies: a
    CPU copy of its values and a CPU buffer for its grad (``_Host``, pinned when CUDA exists),
    the state (and float32 master) living on the CPU like any other.  A step copies the grads
    in, bucket by bucket (``_BUCKET_ELEMENTS``), each bucket's copies non-blocking on a side
    CUDA stream with an event after them, so that the CPU updates bucket k while bucket k + 1
    is in flight; each updated bucket goes back to its device the same way, and the default
    stream waits for the side stream before the step returns.  The params are not read each
    step: a host copy is refreshed from its param only when the param changed in place since
    the step wrote it (its version counter moved: ``model.load_state_dict``, in-place ops; a
    change through ``.data`` is not seen) or when its memory moved.  For CPU params the same
    path runs with plain copies: the test of this logic on machines without a GPU."""

    def __init__(self, opt: _Optimizer, buckets: list[tuple[int, list[_Slot]]]) -> None:
        self.buckets = buckets
        self.stream: Any = None
        if torch.cuda.is_available() and any(s.param.is_cuda for _, b in buckets for s in b):
            if opt._stream is None:
                opt._stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
            self.stream = opt._stream
            self.stream.wait_stream(torch.cuda.current_stream())  # the grads are ready there
        self.events: list[Any] = []
        for _, bucket in buckets:
            with self._on_stream():
                for s in bucket:
                    host = cast("_Host", s.host)
                    if s.new_host:
                        opt._host[s.param] = host
                    if host.seen != _mark(s.param):
                        host.param.copy_(s.param.detach(), non_blocking=self._async(s))
                    grad = cast("torch.Tensor", s.param.grad)
                    host.grad.copy_(grad, non_blocking=self._async(s))
                self.events.append(self._event())

    def _on_stream(self) -> Any:
        return contextlib.nullcontext() if self.stream is None else torch.cuda.stream(self.stream)

    def _async(self, s: _Slot) -> bool:
        return self.stream is not None and s.param.is_cuda

    def _event(self) -> Any:
        if self.stream is None:
            return None
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(self.stream)
        return event

    def wait(self, number: int) -> None:
        """Until the grads of bucket ``number`` are on the host."""
        if self.events[number] is not None:
            self.events[number].synchronize()

    def wait_all(self) -> None:
        for number in range(len(self.events)):
            self.wait(number)

    def send_back(self, number: int) -> None:
        """The updated params of bucket ``number`` to their devices."""
        with self._on_stream():
            for s in self.buckets[number][1]:
                host = cast("_Host", s.host)
                s.param.detach().copy_(host.param, non_blocking=self._async(s))
                host.seen = _mark(s.param)

    def finish(self) -> None:
        if self.stream is not None:  # the next forward pass reads the updated params
            torch.cuda.current_stream().wait_stream(self.stream)


def _values(fn: str, group: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The hyper-parameters ``names`` of a param group, or ValueError naming a missing one."""
    missing = [k for k in names if k not in group]
    if missing:
        raise ValueError(
            f"{fn}: {missing[0]} is missing (expected a group with {', '.join(names)})"
        )
    return {k: group[k] for k in names}


def _column(slots: list[_Slot], buf: str) -> list[NDArray[Any]]:
    """The arrays of state buffer ``buf`` of a bucket, for the kernel (dense formats: one
    array each; a format of several arrays would pass its others as further arguments)."""
    return [s.buffers[buf][0] for s in slots]


def _scales(slots: list[_Slot], bufs: list[str]) -> list[list[NDArray[Any]]] | None:
    """The block scales of the 8-bit state buffers ``bufs`` of a bucket (one list per
    buffer), or None for dense formats."""
    if len(slots[0].buffers[bufs[0]]) == 1:
        return None
    return [[s.buffers[b][1] for s in slots] for b in bufs]


def _masters(slots: list[_Slot]) -> list[NDArray[Any]] | None:
    """The float32 master weights of a bucket (all or none of its params have them)."""
    return None if slots[0].master is None else [cast("NDArray[Any]", s.master) for s in slots]


# -- the optimizers ----------------------------------------------------------------------------


class Adam(_Optimizer):
    """torch.optim.Adam on the fused kernels (L2 weight decay added to the gradient).

    ``params``, ``lr``, ``betas``, ``eps``, ``weight_decay``, ``amsgrad`` and ``maximize`` as
    torch.optim.Adam (per group); the keywords as :class:`mlmath_native.optim.Adam`, plus
    ``offload`` (Note [offload]).
    """

    _name = "Adam"
    _decoupled = False
    _all_buffers = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        state_dtype: str | None = None,
        master_weights: bool = False,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        stochastic_rounding: bool = False,
        seed: int = 0,
        offload: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
        )
        super().__init__(
            params,
            defaults,
            state_dtype=state_dtype,
            master_weights=master_weights,
            max_grad_norm=max_grad_norm,
            skip_nonfinite=skip_nonfinite,
            stochastic_rounding=stochastic_rounding,
            seed=seed,
            offload=offload,
        )

    @classmethod
    def _check_hyper(cls, fn: str, group: dict[str, Any]) -> dict[str, Any]:
        names = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")
        return _optim.Adam._check_hyper(fn, _values(fn, group, names))

    def _buffers(self, hyper: dict[str, Any]) -> list[str]:
        return ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if hyper["amsgrad"] else [])

    def _update(
        self, slots: list[_Slot], h: dict[str, Any], scale: float, sr_seed: int | None
    ) -> None:
        _core.adam_step(
            [s.view for s in slots],
            [s.grad for s in slots],
            _column(slots, "exp_avg"),
            _column(slots, "exp_avg_sq"),
            _column(slots, "max_exp_avg_sq") if h["amsgrad"] else None,
            slots[0].step + 1,
            h["lr"],
            h["beta1"],
            h["beta2"],
            h["eps"],
            h["weight_decay"],
            self._decoupled,
            scale,
            _masters(slots),
            sr_seed,
            _scales(slots, self._buffers(h)),
        )


class AdamW(Adam):
    """torch.optim.AdamW on the fused kernels (decoupled weight decay, default 1e-2).

    >>> import torch, mlmath_native.torch as mt
    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> opt = mt.AdamW([w], lr=0.1, weight_decay=0.5)
    >>> w.grad = torch.zeros(2)  # a zero gradient: only the decay acts
    >>> opt.step()
    >>> w.detach()
    tensor([0.9500, 0.9500])
    """

    _name = "AdamW"
    _decoupled = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        state_dtype: str | None = None,
        master_weights: bool = False,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        stochastic_rounding: bool = False,
        seed: int = 0,
        offload: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            maximize=maximize,
            state_dtype=state_dtype,
            master_weights=master_weights,
            max_grad_norm=max_grad_norm,
            skip_nonfinite=skip_nonfinite,
            stochastic_rounding=stochastic_rounding,
            seed=seed,
            offload=offload,
        )


class SGD(_Optimizer):
    """torch.optim.SGD on the fused kernels (momentum, dampening, nesterov, weight decay,
    maximize per group); the keywords as :class:`mlmath_native.optim.SGD`, plus ``offload``.
    The state holds ``step`` too (torch's SGD keeps none): stochastic rounding draws new bits
    each step."""

    _name = "SGD"
    _all_buffers = ("momentum_buffer",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        state_dtype: str | None = None,
        master_weights: bool = False,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        stochastic_rounding: bool = False,
        seed: int = 0,
        offload: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
        )
        super().__init__(
            params,
            defaults,
            state_dtype=state_dtype,
            master_weights=master_weights,
            max_grad_norm=max_grad_norm,
            skip_nonfinite=skip_nonfinite,
            stochastic_rounding=stochastic_rounding,
            seed=seed,
            offload=offload,
        )

    @classmethod
    def _check_hyper(cls, fn: str, group: dict[str, Any]) -> dict[str, Any]:
        names = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
        return _optim.SGD._check_hyper(fn, _values(fn, group, names))

    def _buffers(self, hyper: dict[str, Any]) -> list[str]:
        return ["momentum_buffer"] if hyper["momentum"] != 0 else []

    def _batch_key(self, slot: _Slot) -> tuple[Any, ...]:
        # a buffer made by this step starts as the (decayed) gradient, as in torch
        return ("momentum_buffer" in slot.created,)

    def _update(
        self, slots: list[_Slot], h: dict[str, Any], scale: float, sr_seed: int | None
    ) -> None:
        _core.sgd_step(
            [s.view for s in slots],
            [s.grad for s in slots],
            _column(slots, "momentum_buffer") if h["momentum"] != 0 else None,
            h["lr"],
            h["momentum"],
            h["dampening"],
            h["weight_decay"],
            h["nesterov"],
            "momentum_buffer" in slots[0].created,
            scale,
            _masters(slots),
            sr_seed,
            slots[0].step + 1,
            _scales(slots, ["momentum_buffer"]) if h["momentum"] != 0 else None,
        )
