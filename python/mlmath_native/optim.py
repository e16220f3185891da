"""Fused, multi-tensor optimizers that update NumPy arrays in place, torch.optim's semantics.

``SGD``, ``Adam`` and ``AdamW`` hold a list of parameters (NumPy arrays or PyTorch CPU tensors,
the caller's objects: Note [fresh views]) and their state; ``step(grads)``
updates every parameter in one pass over memory (all tensors in one parallel region), after
optionally clipping all gradients together by their global L2 norm (``max_grad_norm``) and
skipping the whole step when a gradient holds NaN or Inf (``skip_nonfinite``).  The functional
kernels ``sgd_step`` and ``adam_step`` update single arrays for embedding in other code, and
``gradient_descent`` minimises a user function with them.

Every argument of a step is validated before anything is written, for params of both dtypes:
a step that raises leaves every parameter, every state buffer and the step count bitwise
unchanged.  ``state_dict()`` records the optimizer's kind and every setting;
``load_state_dict`` checks all of it before writing.

Note [16-bit optimizers]: params (and their grads, of the same dtype: a float16 grad for a
bfloat16 param is refused) may be float32, float64, bfloat16 or float16.  16-bit params
compute in float32: each value is widened on load and each stored value rounded once.

- ``state_dtype``: the dtype of exp_avg, exp_avg_sq, max_exp_avg_sq and momentum_buffer:
  None (float32 for float32 and 16-bit params, float64 for float64 params), ``"float32"`` or
  ``"bfloat16"`` (rounded each step; also for float32 params; float64 params refuse both).
- ``master_weights=True``: a float32 copy of each 16-bit param lives in the state
  (``state["master"]``, ``"master.<i>"`` in the state dict), made exactly from the param when
  the optimizer is made; each step updates it in float32 and writes it rounded to nearest even
  into the param, which is not read (a param changed between steps by its owner is overwritten
  from the master: load new weights into a new optimizer).  float32 and float64 params are
  their own master copy: for them the option is a no-op, so that mixed models may use it.
- ``stochastic_rounding=True`` (with ``seed``): the bfloat16 values a step stores without a
  master copy (bfloat16 params, bfloat16 state) are rounded stochastically: up with probability
  equal to the fraction of the gap, so rounding is unbiased and updates far below half an ulp
  of a weight still move it on average (round to nearest would drop them: the stall of bf16
  training).  The random bits are a counter-based hash of (seed, step, tensor, element): the
  same seed gives bitwise the same results for any thread count.  It is bfloat16 only:
  float16 params need ``master_weights=True`` with it (else ValueError).

Note [8-bit optimizer state]: ``state_dtype="int8"`` (float32, bfloat16 and float16 params)
keeps each state buffer as one byte per element plus one float32 scale per block of
:data:`QUANT_BLOCK` = 256 elements, the block's largest magnitude (``"<name>_absmax"`` in
``state`` and the state dict).  exp_avg and momentum_buffer are int8 codes c in [-127, 127]
for ``absmax * sign(c) * (c / 127)**2``; exp_avg_sq and max_exp_avg_sq uint8 codes c in
[0, 255] for ``absmax * (c / 255)**4`` (the power laws keep small values a linear map would
round to zero; a positive second moment is never coded as 0, which would make the next step
divide by eps alone).  Each step dequantises, updates in float32 from the new moments at full
precision, and requantises in the same pass (Note [8-bit optimizer state] in
src/cpp/kernels/optim.cpp); :func:`quantize_blockwise` and :func:`dequantize_blockwise` are
the same maps in NumPy.  Optimizer state is 2.03 bytes per parameter for Adam (0.254 of
float32's 8).  A NaN or Inf moment makes its block's scale NaN: every value of the block
decodes to NaN on the next step.
``load_state_dict`` converts a state saved in another format (float32, bfloat16, int8) into
this optimizer's.
"""

from __future__ import annotations

import inspect
import math
import operator
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import _core
from ._checks import as_array, as_float_array, bfloat16_dtype, is_storage_dtype

__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "GradientDescentResult",
    "StepResult",
    "QUANT_BLOCK",
    "adam_step",
    "dequantize_blockwise",
    "gradient_descent",
    "quantize_blockwise",
    "sgd_step",
]

#: parameters or gradients: one array or a sequence of arrays
_Arrays = NDArray[Any] | Sequence[NDArray[Any]]
#: a state dict: the optimizer's kind, the step count, the settings and state buffers (NumPy)
_StateDict = dict[str, NDArray[Any] | np.generic]


# -- argument checks ---------------------------------------------------------------------------


def _real(
    fn: str,
    name: str,
    value: float,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite float within the given bounds, else ValueError/TypeError naming it."""
    if isinstance(value, bool | np.bool_ | str | bytes):
        raise TypeError(f"{fn}: {name} must be a real number (got {value!r})")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: {name} must be a real number (got {value!r})") from None
    bad = not math.isfinite(value)
    if low is not None:
        bad |= value <= low if low_open else value < low
    if high is not None:
        bad |= value >= high if high_open else value > high
    if bad:
        lo = "" if low is None else f"{low} {'<' if low_open else '<='} "
        hi = "" if high is None else f" {'<' if high_open else '<='} {high}"
        raise ValueError(f"{fn}: {name} is invalid (got {value}, expected finite {lo}{name}{hi})")
    return value


def _flag(fn: str, name: str, value: object) -> bool:
    """A bool (or NumPy bool, or the integer 0 or 1), else TypeError naming it."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer) and value in (0, 1):
        return bool(value)
    raise TypeError(f"{fn}: {name} must be a bool (got {value!r})")


def _max_grad_norm(fn: str, value: object) -> float | None:
    """None (no clipping) or a finite max_grad_norm > 0."""
    if value is None:
        return None
    return _real(fn, "max_grad_norm", cast("float", value), low=0, low_open=True)


def _param_array(fn: str, name: str, p: object) -> NDArray[Any]:
    """A parameter (or state) array that can be updated in place: never a silent copy.  A DLPack
    exporter (a PyTorch CPU tensor) is used through a view of its memory (Note [zero copy]),
    taken anew by every call (Note [fresh views])."""
    if not isinstance(p, np.ndarray):
        if not hasattr(p, "__dlpack__"):
            raise TypeError(
                f"{fn}: {name} must be a numpy.ndarray or a DLPack exporter such as a PyTorch "
                f"CPU tensor (got {type(p).__name__})"
            )
        p = as_array(p, fn, name)
    if not is_storage_dtype(p.dtype):
        raise TypeError(
            f"{fn}: {name} has dtype {p.dtype} (expected float32, float64, bfloat16 or float16)"
        )
    if not p.flags.c_contiguous:
        raise ValueError(
            f"{fn}: {name} must be C-contiguous (an in-place update of a copy would be lost)"
        )
    if not p.flags.aligned:
        raise ValueError(
            f"{fn}: {name} is not aligned to its item size (an in-place update of a copy would "
            "be lost; np.require(a, requirements='A') makes an aligned copy)"
        )
    if not p.flags.writeable:
        raise ValueError(f"{fn}: {name} is not writeable")
    return p


def _reads_apart_from_writes(
    fn: str, written: Sequence[tuple[str, NDArray[Any]]], grads: list[NDArray[Any]]
) -> list[NDArray[Any]]:
    """Note [overlap policy]: no two arrays a step writes (params, state buffers, of every dtype
    group) may share memory: which update would win is undefined, so ValueError names both.
    Grads are only read: a grad that shares memory with a written array (a grad_fn returning x
    itself, a float64 grad viewing a float32 param) is replaced by a copy taken before any
    update, as NumPy reads an input that overlaps its output.  Returns the grads to read.  The
    byte-range sweep is ``_core.find_overlaps`` (all arrays here are C-contiguous); the binding
    asserts its result before every kernel call."""
    pair, hits = _core.find_overlaps([a for _, a in written], grads)
    if pair is not None:
        first, second = pair  # named in the order they were given
        raise ValueError(
            f"{fn}: {written[second][0]} shares memory with {written[first][0]} (each param "
            "and state buffer must be its own array)"
        )
    copied = set(hits)
    return [g.copy() if k in copied else g for k, g in enumerate(grads)]


def _grad_array(fn: str, name: str, g: object, param: NDArray[Any]) -> NDArray[Any]:
    """A gradient matching ``param``'s shape and dtype; non-contiguous ones are copied."""
    if not isinstance(g, np.ndarray):
        if not hasattr(g, "__dlpack__"):
            raise TypeError(
                f"{fn}: {name} must be a numpy.ndarray or a DLPack exporter such as a PyTorch "
                f"CPU tensor (got {type(g).__name__})"
            )
        g = as_array(g, fn, name)
    if not g.flags.aligned:
        g = g.copy()
    if g.dtype != param.dtype:
        raise TypeError(f"{fn}: {name} has dtype {g.dtype} (expected the param's {param.dtype})")
    if g.shape != param.shape:
        raise ValueError(f"{fn}: {name} has shape {g.shape} (expected the param's {param.shape})")
    return np.ascontiguousarray(g) if g.ndim else g


def _as_list(fn: str, name: str, arrays: object) -> list[Any]:
    if isinstance(arrays, np.ndarray) or hasattr(arrays, "__dlpack__"):
        return [arrays]
    if isinstance(arrays, Sequence) and not isinstance(arrays, str | bytes):
        return list(arrays)
    raise TypeError(
        f"{fn}: {name} must be an array or a list of arrays (got {type(arrays).__name__})"
    )


def _is_16bit(dtype: np.dtype[Any]) -> bool:
    return dtype.itemsize == 2


def _state_dtype_name(fn: str, value: object) -> str | None:
    """None, "float32", "bfloat16" or "int8" (a name or a dtype), else ValueError/TypeError."""
    if value is None:
        return None
    if isinstance(value, str):
        name = value
    else:
        try:
            name = np.dtype(cast("Any", value)).name
        except TypeError:
            raise TypeError(
                f"{fn}: state_dtype must be None, 'float32', 'bfloat16' or 'int8' (got {value!r})"
            ) from None
    if name not in ("float32", "bfloat16", "int8"):
        raise ValueError(
            f"{fn}: state_dtype is invalid (got {value!r}, expected None, 'float32', "
            "'bfloat16' or 'int8')"
        )
    return name


def _state_dtype_for(fn: str, name: str | None, param_dtype: np.dtype[Any], i: int) -> str:
    """The dtype name of a param's state buffers (Note [16-bit optimizers])."""
    if name is None:
        return "float64" if param_dtype == np.float64 else "float32"
    if param_dtype == np.float64:
        raise ValueError(
            f"{fn}: state_dtype {name!r} does not fit params[{i}], which is float64 (float64 "
            "params keep float64 state; expected state_dtype=None)"
        )
    return name


def _check_state(
    fn: str,
    name: str,
    buf: object,
    param: NDArray[Any],
    dtype: np.dtype[Any] | None = None,
    shape: tuple[int, ...] | None = None,
) -> NDArray[Any]:
    """A state buffer of ``shape`` (the param's when None) and of ``dtype`` (the param's own
    when None); 8-bit codes must be C-contiguous and writable NumPy arrays."""
    if dtype is not None and dtype.kind in "iu":
        buf = np.asarray(buf)
        if not buf.flags.c_contiguous or not buf.flags.writeable:
            raise ValueError(f"{fn}: {name} must be a C-contiguous, writable array")
    else:
        buf = _param_array(fn, name, buf)
    want = param.dtype if dtype is None else dtype
    want_shape = param.shape if shape is None else shape
    if buf.dtype != want or buf.shape != want_shape:
        raise ValueError(
            f"{fn}: {name} has shape {buf.shape} and dtype {buf.dtype} (expected "
            f"shape {want_shape} and dtype {want})"
        )
    return buf


# -- 8-bit state (Note [8-bit optimizer state]) ---------------------------------------------

#: elements per block of an 8-bit state (one float32 scale each)
QUANT_BLOCK = 256
_SIGNED_LEVELS, _UNSIGNED_LEVELS = 127, 255
#: the states coded as int8 (signed); the others are uint8
_SIGNED_STATES = ("exp_avg", "momentum_buffer")


def _blocks(n: int) -> int:
    return -(-n // QUANT_BLOCK)


def _padded_blocks(x: NDArray[Any]) -> NDArray[Any]:
    """x flattened and zero-padded to whole blocks, shape (blocks, QUANT_BLOCK)."""
    flat = x.reshape(-1)
    out = np.zeros(_blocks(flat.size) * QUANT_BLOCK, flat.dtype)
    out[: flat.size] = flat
    return out.reshape(-1, QUANT_BLOCK)


def _round_sqrt(y: NDArray[np.float32]) -> NDArray[np.float32]:
    """round(sqrt(y)), ties up, exactly (the kernels' round_sqrt): the float square root
    rounded, corrected by comparing y with the squares of the midpoints."""
    c = np.rint(np.sqrt(y))
    up, down = c + np.float32(0.5), c - np.float32(0.5)
    c = c + (y >= up * up) - (y < down * down)
    return np.maximum(c, np.float32(0)).astype(np.float32)


def quantize_blockwise(x: ArrayLike, signed: bool) -> tuple[NDArray[Any], NDArray[np.float32]]:
    """(codes, absmax): ``x`` coded as an 8-bit optimizer state, as the kernels code it.

    ``signed``: int8 codes of the square law (exp_avg, momentum_buffer), else uint8 codes of
    the fourth-power law (exp_avg_sq, max_exp_avg_sq; ``x`` >= 0); ``absmax`` holds one
    float32 scale per block of :data:`QUANT_BLOCK` elements (Note [8-bit optimizer state]).
    The arithmetic is float32 and the rounding exact; the kernels' codes for the same values
    are the same, or one off where a value lies within a tenth of a code of a midpoint.

    Examples
    --------
    >>> import numpy as np, mlmath_native as mn
    >>> codes, absmax = mn.optim.quantize_blockwise(np.array([0.5, -2.0, 0.0]), signed=True)
    >>> codes, absmax
    (array([  64, -127,    0], dtype=int8), array([2.], dtype=float32))
    >>> mn.optim.dequantize_blockwise(codes, absmax)
    array([ 0.507905, -2.      ,  0.      ], dtype=float32)
    """
    x = np.asarray(x, dtype=np.float32)
    blocks = _padded_blocks(x)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        kept = np.abs(blocks) if signed else np.sqrt(blocks)  # what the kernel's buffer keeps
        top = np.max(kept, axis=1) if blocks.size else np.zeros(0, np.float32)  # NaN stays
        usable = (top > 0) & np.isfinite(top)
        levels = np.float32(_SIGNED_LEVELS if signed else _UNSIGNED_LEVELS)
        safe_top = np.where(usable, top, np.float32(1))
        to_code = np.where(usable, levels * levels / safe_top, np.float32(0)).astype(np.float32)
        codes = _round_sqrt(kept * to_code[:, None])
        if signed:
            codes = np.copysign(codes, blocks)
        else:
            codes = np.maximum(codes, (blocks != 0).astype(np.float32))
        codes = np.nan_to_num(codes, nan=0.0)
    top = np.where(np.isfinite(top), top, np.float32(np.nan))  # a NaN or Inf block: NaN
    absmax = (top if signed else top * top).astype(np.float32)
    kind = np.int8 if signed else np.uint8
    return codes.reshape(-1)[: x.size].astype(kind).reshape(x.shape), absmax


def dequantize_blockwise(codes: ArrayLike, absmax: ArrayLike) -> NDArray[np.float32]:
    """The float32 values of an 8-bit optimizer state: int8 ``codes`` by the square law,
    uint8 by the fourth-power law, with ``absmax`` one scale per block of :data:`QUANT_BLOCK`
    (Note [8-bit optimizer state])."""
    codes = np.asarray(codes)
    absmax = np.asarray(absmax, dtype=np.float32).reshape(-1)
    if codes.dtype not in (np.int8, np.uint8):
        raise TypeError(f"dequantize_blockwise: codes must be int8 or uint8 (got {codes.dtype})")
    if absmax.size != _blocks(codes.size):
        raise ValueError(
            f"dequantize_blockwise: absmax has {absmax.size} scales (expected "
            f"{_blocks(codes.size)}, one per block of {QUANT_BLOCK})"
        )
    c = _padded_blocks(codes).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        if codes.dtype == np.int8:
            x = c * np.abs(c) * (absmax / np.float32(_SIGNED_LEVELS**2))[:, None]
        else:
            x = (c * c) * (c * c) * (absmax / np.float32(float(_UNSIGNED_LEVELS) ** 4))[:, None]
    return x.reshape(-1)[: codes.size].reshape(codes.shape)


def _check_functional_state(fn: str, name: str, buf: object, param: NDArray[Any]) -> NDArray[Any]:
    """A state buffer for the functional steps: of the param's dtype for float64 params, else
    float32 or bfloat16 (Note [16-bit optimizers])."""
    view = _param_array(fn, name, buf)
    if param.dtype == np.float64 or view.dtype.name != "bfloat16":
        want = param.dtype if param.dtype == np.float64 else np.dtype(np.float32)
    else:
        want = view.dtype
    return _check_state(fn, name, view, param, want)


def _sixteen_bit(params: Sequence[NDArray[Any]]) -> list[int]:
    """The indices of the bfloat16 / float16 params."""
    return [i for i, p in enumerate(params) if _is_16bit(p.dtype)]


def _seed(fn: str, value: object) -> int:
    """A seed for stochastic rounding: an integer in [0, 2**64)."""
    try:
        seed = operator.index(cast("Any", value))
    except TypeError:
        raise TypeError(f"{fn}: seed must be an integer (got {value!r})") from None
    if not 0 <= seed < 2**64:
        raise ValueError(f"{fn}: seed is invalid (got {seed}, expected 0 <= seed < 2**64)")
    return seed


def _check_rounding(
    fn: str, stochastic: bool, master: bool, layout: Sequence[tuple[Any, np.dtype[Any]]]
) -> None:
    """Stochastic rounding is for bfloat16: float16 params need master weights with it."""
    if stochastic and not master:
        for i, (_, dtype) in enumerate(layout):
            if dtype == np.float16:
                raise ValueError(
                    f"{fn}: stochastic_rounding is for bfloat16 storage (got float16 params[{i}] "
                    "without master weights; use master_weights=True for float16 params)"
                )


def _state_array(fn: str, name: str, value: object) -> NDArray[Any]:
    """An entry of a state dict as an array, or TypeError naming it."""
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{fn}: {name} could not be converted to an array ({exc})") from None


def _state_int(fn: str, name: str, value: object) -> int:
    """An integer entry of a state dict (a Python or NumPy integer, or a 0-d integer array)."""
    arr = _state_array(fn, name, value)
    if arr.ndim != 0 or arr.dtype.kind not in "iu":
        raise TypeError(f"{fn}: {name} must be an integer (got {value!r})")
    return int(arr)


def _state_scalar(fn: str, name: str, value: object) -> Any:
    """A 0-d entry of a state dict as a Python scalar (betas: a pair)."""
    arr = _state_array(fn, name, value)
    if arr.dtype.kind not in "biuf" or arr.shape != ((2,) if name == "betas" else ()):
        raise TypeError(
            f"{fn}: {name} must be {'a pair of' if name == 'betas' else 'a'} real "
            f"number{'s' if name == 'betas' else ''} (got {value!r})"
        )
    return tuple(arr.tolist()) if name == "betas" else arr[()].item()


# -- results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepResult:
    """What a step did.

    applied : bool
        False when ``skip_nonfinite`` found NaN or Inf in a gradient (nothing was changed).
    grad_norm : float or None
        The global L2 norm of all gradients before clipping; computed when ``max_grad_norm`` or
        ``skip_nonfinite`` is set (it costs one more read of the gradients), else None.
    clip_coef : float
        The factor the gradients were multiplied by (1.0 without clipping).
    """

    applied: bool
    grad_norm: float | None = None
    clip_coef: float = 1.0


# -- the optimizers ----------------------------------------------------------------------------


class _Optimizer:
    """Shared machinery: params, grads, clipping, state dicts.  Subclasses define the names of
    their hyper-parameters and state, _check_hyper(fn, values) and _update (one dtype group).

    Note [fresh views]: the optimizer keeps the caller's objects (``params``: NumPy arrays or
    PyTorch tensors, as given) and the shape and dtype its state was made for, never a view of
    their memory.  Every step takes a fresh view of each param's *current* memory, so a tensor
    whose storage was replaced (``w.data = ...``, ``w.set_(...)``) is updated where it lives
    now; a param whose shape or dtype no longer fits the state (``w.resize_(...)``,
    ``module.double()``, ``a.resize(...)``) is refused with an error naming it, changing
    nothing.  The views live only as long as the call that took them.
    """

    _name = "optimizer"

    def __init__(
        self,
        params: _Arrays,
        *,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        master_weights: bool = False,
        state_dtype: str | None = None,
        stochastic_rounding: bool = False,
        seed: int = 0,
    ) -> None:
        fn = self._name
        objects = _as_list(fn, "params", params)
        if not objects:
            raise ValueError(f"{fn}: params is empty (expected at least one array)")
        views = [_param_array(fn, f"params[{i}]", p) for i, p in enumerate(objects)]
        _reads_apart_from_writes(fn, [(f"params[{i}]", v) for i, v in enumerate(views)], [])
        #: the caller's arrays or tensors, as given (Note [fresh views])
        self.params: list[Any] = objects
        self._layout = [(v.shape, v.dtype) for v in views]  # what the state was made for
        self.max_grad_norm = _max_grad_norm(fn, max_grad_norm)
        self.skip_nonfinite = _flag(fn, "skip_nonfinite", skip_nonfinite)
        self.step_count = 0
        self.master_weights = _flag(fn, "master_weights", master_weights)
        self.state_dtype = _state_dtype_name(fn, state_dtype)
        # every param is checked before ml_dtypes is needed for a bfloat16 state
        names = [
            _state_dtype_for(fn, self.state_dtype, dtype, i)
            for i, (_, dtype) in enumerate(self._layout)
        ]
        self._state_dtypes = [bfloat16_dtype(fn) if n == "bfloat16" else np.dtype(n) for n in names]
        self.stochastic_rounding = _flag(fn, "stochastic_rounding", stochastic_rounding)
        self.seed = _seed(fn, seed)
        _check_rounding(fn, self.stochastic_rounding, self.master_weights, self._layout)
        self.state: dict[str, list[NDArray[Any] | None]] = {
            name: [self._new_buffer(name, i) for i in range(len(self._layout))]
            for name in self._with_scales(self._state_names())
        }
        if self.master_weights:  # Note [16-bit optimizers]: exact float32 copies
            self.state["master"] = [
                v.astype(np.float32) if _is_16bit(v.dtype) else None for v in views
            ]

    # what a subclass defines ---------------------------------------------------------------------
    def _state_names(self) -> list[str]:
        raise NotImplementedError

    def _with_scales(self, names: list[str]) -> list[str]:
        """``names`` and, for an int8 state, the names of their block scales."""
        if self.state_dtype != "int8":
            return names
        return names + [f"{n}_absmax" for n in names if n != "master"]

    def _hyper_names(self) -> list[str]:
        raise NotImplementedError

    @classmethod
    def _check_hyper(cls, fn: str, values: Mapping[str, Any]) -> dict[str, Any]:
        """The hyper-parameters ``values`` (by name) checked and normalised, or an error."""
        raise NotImplementedError

    def _step_state(self, hyper: dict[str, Any]) -> list[str]:
        """The state buffers a step with ``hyper`` reads and writes."""
        raise NotImplementedError

    def _required_state(self, step: int, hyper: dict[str, Any]) -> list[str]:
        """The state buffers a state dict at ``step`` with ``hyper`` must hold."""
        raise NotImplementedError

    def _update(
        self,
        params: list[NDArray[Any]],
        grads: list[NDArray[Any]],
        states: dict[str, list[NDArray[Any]]],
        hyper: dict[str, Any],
        scale: float,
        masters: list[NDArray[Any]] | None,
        sr_seed: int | None,
    ) -> None:
        """One fused kernel call over params of one dtype (and state dtype): ``masters`` the
        float32 master weights of 16-bit params, ``sr_seed`` None (round to nearest even) or
        the seed of stochastic rounding."""
        raise NotImplementedError

    # the step ------------------------------------------------------------------------------------
    def _hyper_values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._hyper_names()}

    def _views(self, fn: str) -> list[NDArray[Any]]:
        """Fresh views of the params' current memory, checked against the state's layout
        (Note [fresh views])."""
        if len(self.params) != len(self._layout):
            raise ValueError(
                f"{fn}: params has {len(self.params)} arrays (expected the "
                f"{len(self._layout)} the optimizer was made with)"
            )
        views = []
        for i, (p, (shape, dtype)) in enumerate(zip(self.params, self._layout, strict=True)):
            v = _param_array(fn, f"params[{i}]", p)
            if v.dtype != dtype:
                raise TypeError(
                    f"{fn}: params[{i}] changed dtype after the optimizer was made (got "
                    f"{v.dtype}, expected {dtype}, the dtype of its state; make a new optimizer "
                    "for converted params)"
                )
            if v.shape != shape:
                raise ValueError(
                    f"{fn}: params[{i}] changed shape after the optimizer was made (got "
                    f"{v.shape}, expected {shape}, the shape of its state)"
                )
            views.append(v)
        return views

    def _state_views(
        self, fn: str, params: list[NDArray[Any]], hyper: dict[str, Any]
    ) -> dict[str, list[NDArray[Any]]]:
        """The state buffers the step writes, checked; a missing one (max_exp_avg_sq when
        amsgrad was just turned on) is a new zero array, kept only if the step succeeds."""
        states: dict[str, list[NDArray[Any]]] = {}
        names = self._with_scales(self._step_state(hyper))
        for name in names + (["master"] if self.master_weights else []):
            bufs = self.state[name]
            states[name] = [
                self._new_buffer(name, i)
                if b is None
                else _check_state(
                    fn,
                    f"{name}[{i}]",
                    b,
                    p,
                    self._buffer_dtype(name, i),
                    self._buffer_shape(name, i),
                )
                for i, (b, p) in enumerate(zip(bufs, params, strict=True))
                if b is not None or name != "master"
            ]
        return states

    def _buffer_dtype(self, name: str, i: int) -> np.dtype[Any]:
        """The dtype of state buffer ``name`` of params[i]."""
        if name == "master" or name.endswith("_absmax"):
            return np.dtype(np.float32)
        if self.state_dtype == "int8":
            return np.dtype(np.int8 if name in _SIGNED_STATES else np.uint8)
        return self._state_dtypes[i]

    def _buffer_shape(self, name: str, i: int) -> tuple[int, ...]:
        """The shape of state buffer ``name`` of params[i]: the param's, or for block scales
        one per block."""
        shape = self._layout[i][0]
        return (_blocks(math.prod(shape)),) if name.endswith("_absmax") else shape

    def _new_buffer(self, name: str, i: int) -> NDArray[Any]:
        return np.zeros(self._buffer_shape(name, i), self._buffer_dtype(name, i))

    def _scales(self, states: dict[str, list[NDArray[Any]]], names: list[str]) -> Any:
        """The block scales of the states ``names`` of a step (one list per state), or None
        when the state is not int8."""
        if self.state_dtype != "int8":
            return None
        return [states[f"{n}_absmax"] for n in names]

    def step(self, grads: _Arrays) -> StepResult:
        """Update every param in place from ``grads`` (an array or a list matching params).

        Returns a :class:`StepResult`.  Raises ValueError/TypeError, changing nothing, for
        mismatched or non-writable arrays, params whose shape or dtype changed since the
        optimizer was made, and invalid hyper-parameters.
        """
        fn = f"{self._name}.step"
        hyper = self._check_hyper(fn, self._hyper_values())
        self.seed = _seed(fn, self.seed)
        self.stochastic_rounding = _flag(fn, "stochastic_rounding", self.stochastic_rounding)
        _check_rounding(fn, self.stochastic_rounding, self.master_weights, self._layout)
        max_norm = _max_grad_norm(fn, self.max_grad_norm)
        skip = _flag(fn, "skip_nonfinite", self.skip_nonfinite)
        grads = _as_list(fn, "grads", grads)
        params = self._views(fn)
        if len(grads) != len(params):
            raise ValueError(
                f"{fn}: got {len(grads)} grads for {len(params)} params (expected one each)"
            )
        states = self._state_views(fn, params, hyper)
        grads = [
            _grad_array(fn, f"grads[{i}]", g, p)
            for i, (g, p) in enumerate(zip(grads, params, strict=True))
        ]
        written = [(f"params[{i}]", p) for i, p in enumerate(params)] + [
            (f"{name}[{j}]", b)
            for name, bufs in states.items()
            for j, b in zip(
                _sixteen_bit(params) if name == "master" else range(len(bufs)), bufs, strict=True
            )
        ]
        grads = _reads_apart_from_writes(fn, written, grads)
        # everything is checked: from here on nothing raises (all or nothing)

        grad_norm, coef = None, 1.0
        if max_norm is not None or skip:
            grad_norm = _core.grad_norm(grads)
            if skip and not math.isfinite(grad_norm):
                return StepResult(applied=False, grad_norm=grad_norm)
            if max_norm is not None:
                coef = min(1.0, max_norm / (grad_norm + 1e-6))  # as torch's clip_grad_norm_
        scale = -coef if hyper.get("maximize") else coef
        masters = states.pop("master", None)  # one per 16-bit param (Note [16-bit optimizers])
        master_of = {}
        if masters is not None:
            master_of = {i: m for i, m in zip(_sixteen_bit(params), masters, strict=True)}
        # one fused call per (param dtype, state dtype) group (params of several dtypes may mix;
        # keyed by the dtypes themselves: dtype.name costs ~4 us, a tenth of a 4K tensor's step)
        groups: dict[tuple[np.dtype[Any], np.dtype[Any]], list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault((p.dtype, self._state_dtypes[i]), []).append(i)
        for number, idx in enumerate(groups.values()):
            sr_seed = None
            if self.stochastic_rounding:  # a seed per group: tensor indices restart in each
                sr_seed = (self.seed + number * 0x9E3779B97F4A7C15) % 2**64
            self._update(
                [params[i] for i in idx],
                [grads[i] for i in idx],
                {name: [bufs[i] for i in idx] for name, bufs in states.items()},
                hyper,
                scale,
                [master_of[i] for i in idx] if idx[0] in master_of else None,
                sr_seed,
            )
        for name, bufs in states.items():  # keep the buffers this step created
            for i, b in enumerate(bufs):
                if self.state[name][i] is None:
                    self.state[name][i] = b
        self.step_count += 1
        self._after_step(hyper)
        return StepResult(applied=True, grad_norm=grad_norm, clip_coef=coef)

    def _after_step(self, hyper: dict[str, Any]) -> None:
        pass

    # state ---------------------------------------------------------------------------------------
    def state_dict(self) -> _StateDict:
        """A flat dict of NumPy values (``np.savez(f, **opt.state_dict())`` saves it): the
        optimizer's kind (``"optimizer"``: ``"SGD"``, ``"Adam"`` or ``"AdamW"``), the step count,
        the hyper-parameters, ``max_grad_norm`` (NaN standing for None, so that it survives
        ``np.savez``), ``skip_nonfinite``, and copies of every state buffer as
        ``"<name>.<index>"``."""
        d: _StateDict = {"optimizer": np.str_(self._name), "step": np.int64(self.step_count)}
        for name in self._hyper_names():
            d[name] = np.asarray(getattr(self, name))
        norm = self.max_grad_norm
        d["max_grad_norm"] = np.float64(np.nan if norm is None else norm)
        d["skip_nonfinite"] = np.bool_(self.skip_nonfinite)
        d["master_weights"] = np.bool_(self.master_weights)
        d["state_dtype"] = np.str_(self.state_dtype or "")
        d["stochastic_rounding"] = np.bool_(self.stochastic_rounding)
        d["seed"] = np.uint64(self.seed)
        for name, bufs in self.state.items():
            for i, b in enumerate(bufs):
                if b is not None:
                    d[f"{name}.{i}"] = np.array(b, copy=True)
        return d

    def _state_keys(self) -> set[str]:
        keys = {"optimizer", "step", "max_grad_norm", "skip_nonfinite", *self._hyper_names()}
        keys |= {"master_weights", "state_dtype", "stochastic_rounding", "seed"}
        names = set(self.state) | {f"{n}_absmax" for n in self._state_names()}
        return keys | {f"{n}.{i}" for n in names for i in range(len(self._layout))}

    def load_state_dict(self, d: Mapping[str, ArrayLike]) -> None:
        """Restore what :meth:`state_dict` returned (or ``dict(np.load(file))``); every entry is
        checked before anything is changed.  A state saved by another kind of optimizer (its
        ``"optimizer"`` entry, or entries this optimizer does not have) is refused; a state
        without ``max_grad_norm``/``skip_nonfinite`` (older saves) keeps the current ones."""
        fn = f"{self._name}.load_state_dict"
        if not isinstance(d, Mapping):
            raise TypeError(f"{fn}: the state must be a mapping (got {type(d).__name__})")
        d = dict(d)
        if "optimizer" in d:
            kind = _state_array(fn, "optimizer", d["optimizer"])
            if kind.dtype.kind != "U" or kind.ndim or str(kind) != self._name:
                raise ValueError(
                    f"{fn}: the state is another optimizer's (got optimizer "
                    f"{d['optimizer']!r}, expected {self._name!r})"
                )
        unknown = sorted(set(d) - self._state_keys())
        if unknown:
            raise ValueError(
                f"{fn}: the state has entries that {self._name} does not have (got "
                f"{', '.join(unknown[:3])}; is it another optimizer's state?)"
            )
        if "step" not in d:
            raise ValueError(f"{fn}: the state has no 'step' entry")
        step = _state_int(fn, "step", d["step"])
        if step < 0:
            raise ValueError(f"{fn}: step must be >= 0 (got {step})")
        values = self._hyper_values()
        values.update(
            {name: _state_scalar(fn, name, d[name]) for name in self._hyper_names() if name in d}
        )
        hyper = self._check_hyper(fn, values)
        max_norm = self.max_grad_norm
        if "max_grad_norm" in d:
            norm = _state_scalar(fn, "max_grad_norm", d["max_grad_norm"])
            max_norm = None if isinstance(norm, float) and math.isnan(norm) else norm
        max_norm = _max_grad_norm(fn, max_norm)
        skip = self.skip_nonfinite
        if "skip_nonfinite" in d:
            skip = _state_scalar(fn, "skip_nonfinite", d["skip_nonfinite"])
        skip = _flag(fn, "skip_nonfinite", skip)
        # the layout of the state (master weights, state dtype) must be this optimizer's
        if "master_weights" in d:
            master = _flag(
                fn, "master_weights", _state_scalar(fn, "master_weights", d["master_weights"])
            )
            if master != self.master_weights:
                raise ValueError(
                    f"{fn}: the state was saved with master_weights={master} (expected "
                    f"{self.master_weights}, this optimizer's)"
                )
        saved_format = (
            self.state_dtype
        )  # another format is converted (Note [8-bit optimizer state])
        if "state_dtype" in d:
            kind = _state_array(fn, "state_dtype", d["state_dtype"])
            if kind.dtype.kind != "U" or kind.ndim:
                raise TypeError(f"{fn}: state_dtype must be a string (got {d['state_dtype']!r})")
            saved_format = _state_dtype_name(fn, str(kind) or None)
            for i, (_, dtype) in enumerate(self._layout):
                _state_dtype_for(fn, saved_format, dtype, i)
        sr = self.stochastic_rounding
        if "stochastic_rounding" in d:
            sr = _state_scalar(fn, "stochastic_rounding", d["stochastic_rounding"])
        sr = _flag(fn, "stochastic_rounding", sr)
        seed = self.seed
        if "seed" in d:
            seed = _seed(fn, _state_int(fn, "seed", d["seed"]))
        _check_rounding(fn, sr, self.master_weights, self._layout)
        buffers: dict[tuple[str, int], NDArray[Any]] = {}
        if saved_format != self.state_dtype:
            buffers = self._converted_state(fn, d, saved_format)
        for name in self.state if saved_format == self.state_dtype else ["master"]:
            for i, (shape, _) in enumerate(self._layout):
                key = f"{name}.{i}"
                if key not in d:
                    continue
                if name == "master" and self.state[name][i] is None:
                    raise ValueError(
                        f"{fn}: the state has {key}, but params[{i}] has no master weights "
                        "(only bfloat16 and float16 params have them)"
                    )
                dtype = self._buffer_dtype(name, i)
                value = _state_array(fn, key, d[key])
                if (
                    value.dtype.kind == "V"
                    and value.dtype.itemsize == 2
                    and dtype.name == "bfloat16"
                ):
                    value = value.view(dtype)  # np.save stores bfloat16 as 2-byte voids
                shape = self._buffer_shape(name, i)
                if value.shape != shape:
                    raise ValueError(f"{fn}: {key} has shape {value.shape} (expected {shape})")
                if value.dtype != dtype:
                    raise TypeError(f"{fn}: {key} has dtype {value.dtype} (expected {dtype})")
                buffers[(name, i)] = value
        required = self._with_scales(self._required_state(step, hyper))
        missing = [
            f"{n}.{i}" for n in required for i in range(len(self._layout)) if (n, i) not in buffers
        ]
        if self.master_weights:
            missing += [
                f"master.{i}"
                for i in range(len(self._layout))
                if self.state["master"][i] is not None and ("master", i) not in buffers
            ]
        if missing:
            raise ValueError(f"{fn}: the state lacks {', '.join(missing[:3])}")
        # all checked: now write
        for name in self._hyper_names():
            setattr(self, name, values[name])
        self.max_grad_norm, self.skip_nonfinite = max_norm, skip
        self.stochastic_rounding, self.seed = sr, seed
        for (name, i), value in buffers.items():
            self.state[name][i] = np.array(value, order="C", copy=True)  # checked above
        self.step_count = step
        self._after_load(buffers)

    def _after_load(self, buffers: dict[tuple[str, int], NDArray[Any]]) -> None:
        pass

    def _converted_state(
        self, fn: str, d: Mapping[str, Any], saved_format: str | None
    ) -> dict[tuple[str, int], NDArray[Any]]:
        """The state buffers of ``d``, saved with state_dtype ``saved_format``, checked, read
        as float32 (float64 for float64 params) and stored in this optimizer's format."""
        out: dict[tuple[str, int], NDArray[Any]] = {}
        for name in self._state_names():
            for i, (shape, dtype) in enumerate(self._layout):
                key = f"{name}.{i}"
                if key not in d:
                    continue
                value = _state_array(fn, key, d[key])
                if value.shape != shape:
                    raise ValueError(f"{fn}: {key} has shape {value.shape} (expected {shape})")
                want: np.dtype[Any]
                if saved_format == "int8":
                    want = np.dtype(np.int8 if name in _SIGNED_STATES else np.uint8)
                    scale_key = f"{name}_absmax.{i}"
                    if scale_key not in d:
                        raise ValueError(f"{fn}: the state lacks {scale_key}")
                    scales = _state_array(fn, scale_key, d[scale_key])
                    if scales.dtype != np.float32 or scales.shape != (_blocks(value.size),):
                        raise ValueError(
                            f"{fn}: {scale_key} has shape {scales.shape} and dtype "
                            f"{scales.dtype} (expected ({_blocks(value.size)},) and float32)"
                        )
                elif value.dtype.kind == "V" and value.dtype.itemsize == 2:
                    value, want = value.view(bfloat16_dtype(fn)), bfloat16_dtype(fn)
                else:
                    want = np.dtype(np.float64 if dtype == np.float64 else np.float32)
                    if saved_format == "bfloat16":
                        want = bfloat16_dtype(fn)
                if value.dtype != want:
                    raise TypeError(f"{fn}: {key} has dtype {value.dtype} (expected {want})")
                wide = (
                    dequantize_blockwise(value, scales)
                    if saved_format == "int8"
                    else value.astype(np.float64 if dtype == np.float64 else np.float32)
                )
                if self.state_dtype == "int8":
                    codes, absmax = quantize_blockwise(wide, signed=name in _SIGNED_STATES)
                    out[(name, i)], out[(f"{name}_absmax", i)] = codes, absmax
                else:
                    out[(name, i)] = wide.astype(self._buffer_dtype(name, i))
        return out

    def __repr__(self) -> str:
        hyper = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._hyper_names())
        return f"{type(self).__name__}({len(self.params)} params, {hyper}, step={self.step_count})"


class SGD(_Optimizer):
    """Stochastic gradient descent with momentum, torch.optim.SGD exactly.

    d = g (negated when ``maximize``); d += weight_decay * p; with momentum mu,
    b = d on the first step, else mu b + (1 - dampening) d, then d = d + mu b (nesterov) or b;
    finally p -= lr * d.

    Parameters
    ----------
    params : ndarray or list of ndarray (or PyTorch CPU tensors)
        float32, float64, bfloat16 (ml_dtypes.bfloat16, torch.bfloat16: zero copy) or float16,
        C-contiguous, writeable; updated in place.  ``opt.params`` is this
        list of the caller's objects; each step updates the memory a param has at that step
        (a tensor whose ``.data`` was replaced is followed) and refuses a param whose shape or
        dtype changed since the optimizer was made.
    lr, momentum, dampening, weight_decay, nesterov, maximize
        As in torch.optim.SGD; attributes of the same names may be changed between steps.
    max_grad_norm : float, optional
        Clip all gradients together to this global L2 norm first (like torch's
        ``clip_grad_norm_``, without modifying the gradient arrays).
    skip_nonfinite : bool, optional
        If any gradient holds NaN or Inf, change nothing and return ``applied=False``.
    master_weights : bool, optional
        Keep float32 master copies of bfloat16/float16 params (Note [16-bit optimizers]).
    state_dtype : {None, "float32", "bfloat16"}, optional
        The dtype of the state buffers (None: float32, or float64 for float64 params).
    stochastic_rounding : bool, optional
        Round the bfloat16 values a step stores stochastically, seeded by ``seed`` (an
        integer in [0, 2**64)); reproducible and independent of the thread count.

    Examples
    --------
    >>> import numpy as np, mlmath_native as mn
    >>> w = np.array([1.0, 2.0])
    >>> opt = mn.optim.SGD(w, lr=0.1)
    >>> opt.step(np.array([1.0, -1.0])).applied
    True
    >>> w
    array([0.9, 2.1])
    """

    _name = "SGD"

    def __init__(
        self,
        params: _Arrays,
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        maximize: bool = False,
        *,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        master_weights: bool = False,
        state_dtype: str | None = None,
        stochastic_rounding: bool = False,
        seed: int = 0,
    ) -> None:
        self.lr, self.momentum, self.dampening = lr, momentum, dampening
        self.nesterov, self.weight_decay, self.maximize = nesterov, weight_decay, maximize
        self._check_hyper(self._name, self._hyper_values())
        super().__init__(
            params,
            max_grad_norm=max_grad_norm,
            skip_nonfinite=skip_nonfinite,
            master_weights=master_weights,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            seed=seed,
        )
        self._momentum_started = False

    def _state_names(self) -> list[str]:
        return ["momentum_buffer"]

    def _hyper_names(self) -> list[str]:
        return ["lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize"]

    @classmethod
    def _check_hyper(cls, fn: str, values: Mapping[str, Any]) -> dict[str, Any]:
        h = dict(
            lr=_real(fn, "lr", values["lr"], low=0, low_open=True),
            momentum=_real(fn, "momentum", values["momentum"], low=0),
            dampening=_real(fn, "dampening", values["dampening"]),
            weight_decay=_real(fn, "weight_decay", values["weight_decay"], low=0),
            nesterov=_flag(fn, "nesterov", values["nesterov"]),
            maximize=_flag(fn, "maximize", values["maximize"]),
        )
        if h["nesterov"] and (h["momentum"] <= 0 or h["dampening"] != 0):
            raise ValueError(
                f"{fn}: nesterov needs momentum > 0 and dampening == 0 (got momentum="
                f"{h['momentum']}, dampening={h['dampening']})"
            )
        return h

    def _step_state(self, hyper: dict[str, Any]) -> list[str]:
        return ["momentum_buffer"] if hyper["momentum"] != 0 else []

    def _required_state(self, step: int, hyper: dict[str, Any]) -> list[str]:
        return []  # a momentum buffer exists only after a step with momentum

    def _after_load(self, buffers: dict[tuple[str, int], NDArray[Any]]) -> None:
        self._momentum_started = any(name == "momentum_buffer" for name, _ in buffers)

    def state_dict(self) -> _StateDict:
        d = super().state_dict()
        if not self._momentum_started:
            d = {
                k: v
                for k, v in d.items()
                if not k.startswith(("momentum_buffer.", "momentum_buffer_absmax."))
            }
        return d

    def _update(
        self,
        params: list[NDArray[Any]],
        grads: list[NDArray[Any]],
        states: dict[str, list[NDArray[Any]]],
        h: dict[str, Any],
        scale: float,
        masters: list[NDArray[Any]] | None,
        sr_seed: int | None,
    ) -> None:
        _core.sgd_step(
            params,
            grads,
            states.get("momentum_buffer"),  # there when momentum != 0
            h["lr"],
            h["momentum"],
            h["dampening"],
            h["weight_decay"],
            h["nesterov"],
            not self._momentum_started,
            scale,
            masters,
            sr_seed,
            self.step_count + 1,
            self._scales(states, ["momentum_buffer"]) if "momentum_buffer" in states else None,
        )

    def _after_step(self, hyper: dict[str, Any]) -> None:
        if hyper["momentum"] != 0:
            self._momentum_started = True


class Adam(_Optimizer):
    """Adam, torch.optim.Adam exactly (L2 weight decay added to the gradient).

    d = g (negated when ``maximize``) + weight_decay * p;  m = beta1 m + (1 - beta1) d;
    v = beta2 v + (1 - beta2) d^2;  (amsgrad: vmax = max(vmax, v), used instead of v);
    p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps),  t = 1, 2, ...

    Parameters as torch.optim.Adam, plus ``max_grad_norm``, ``skip_nonfinite``,
    ``master_weights``, ``state_dtype``, ``stochastic_rounding`` and ``seed`` (see :class:`SGD`
    and Note [16-bit optimizers]).  ``lr``, ``betas``, ``eps``, ``weight_decay``, ``amsgrad``
    and ``maximize`` are attributes that may change between steps.

    Examples
    --------
    >>> import numpy as np, mlmath_native as mn
    >>> w = np.zeros(3, np.float32)
    >>> opt = mn.optim.Adam(w, lr=0.1)
    >>> _ = opt.step(np.array([1.0, -2.0, 0.5], np.float32))
    >>> np.round(w, 4)
    array([-0.1,  0.1, -0.1], dtype=float32)
    """

    _name = "Adam"
    _decoupled = False

    def __init__(
        self,
        params: _Arrays,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        maximize: bool = False,
        *,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        master_weights: bool = False,
        state_dtype: str | None = None,
        stochastic_rounding: bool = False,
        seed: int = 0,
    ) -> None:
        self.lr, self.betas, self.eps = lr, betas, eps
        self.weight_decay, self.amsgrad, self.maximize = weight_decay, amsgrad, maximize
        self._check_hyper(self._name, self._hyper_values())
        super().__init__(
            params,
            max_grad_norm=max_grad_norm,
            skip_nonfinite=skip_nonfinite,
            master_weights=master_weights,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            seed=seed,
        )
        if not amsgrad:
            for name in self._with_scales(["max_exp_avg_sq"]):
                self.state[name] = [None] * len(self.params)

    def _state_names(self) -> list[str]:
        return ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]

    def _hyper_names(self) -> list[str]:
        return ["lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"]

    @classmethod
    def _check_hyper(cls, fn: str, values: Mapping[str, Any]) -> dict[str, Any]:
        betas = values["betas"]
        try:
            beta1, beta2 = betas
        except (TypeError, ValueError):
            raise TypeError(f"{fn}: betas must be a pair (got {betas!r})") from None
        return dict(
            lr=_real(fn, "lr", values["lr"], low=0, low_open=True),
            beta1=_real(fn, "betas[0]", beta1, low=0, high=1, high_open=True),
            beta2=_real(fn, "betas[1]", beta2, low=0, high=1, high_open=True),
            eps=_real(fn, "eps", values["eps"], low=0, low_open=True),
            weight_decay=_real(fn, "weight_decay", values["weight_decay"], low=0),
            amsgrad=_flag(fn, "amsgrad", values["amsgrad"]),
            maximize=_flag(fn, "maximize", values["maximize"]),
        )

    def _step_state(self, hyper: dict[str, Any]) -> list[str]:
        return ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if hyper["amsgrad"] else [])

    def _required_state(self, step: int, hyper: dict[str, Any]) -> list[str]:
        return self._step_state(hyper) if step > 0 else []

    def _update(
        self,
        params: list[NDArray[Any]],
        grads: list[NDArray[Any]],
        states: dict[str, list[NDArray[Any]]],
        h: dict[str, Any],
        scale: float,
        masters: list[NDArray[Any]] | None,
        sr_seed: int | None,
    ) -> None:
        _core.adam_step(
            params,
            grads,
            states["exp_avg"],
            states["exp_avg_sq"],
            states.get("max_exp_avg_sq"),  # there when amsgrad
            self.step_count + 1,
            h["lr"],
            h["beta1"],
            h["beta2"],
            h["eps"],
            h["weight_decay"],
            self._decoupled,
            scale,
            masters,
            sr_seed,
            self._scales(states, self._step_state(h)),
        )


class AdamW(Adam):
    """AdamW, torch.optim.AdamW exactly: Adam with decoupled weight decay,
    ``p *= 1 - lr * weight_decay`` before the Adam update (default weight_decay 1e-2).

    Examples
    --------
    >>> import numpy as np, mlmath_native as mn
    >>> w = np.ones(2)
    >>> opt = mn.optim.AdamW(w, lr=0.1, weight_decay=0.5)
    >>> _ = opt.step(np.zeros(2))  # a zero gradient: only the decay acts
    >>> w
    array([0.95, 0.95])
    """

    _name = "AdamW"
    _decoupled = True

    def __init__(
        self,
        params: _Arrays,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        maximize: bool = False,
        *,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        master_weights: bool = False,
        state_dtype: str | None = None,
        stochastic_rounding: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            maximize,
            max_grad_norm=max_grad_norm,
            skip_nonfinite=skip_nonfinite,
            master_weights=master_weights,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            seed=seed,
        )


# -- functional kernels ------------------------------------------------------------------------


def sgd_step(
    param: NDArray[Any],
    grad: NDArray[Any],
    momentum_buffer: NDArray[Any] | None = None,
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    maximize: bool = False,
    first_step: bool = False,
) -> NDArray[Any]:
    """One SGD step on one array, in place (torch.optim.SGD's update; see :class:`SGD`).

    ``momentum_buffer`` (needed when momentum != 0) is updated in place; ``first_step=True``
    initialises it to the (decayed) gradient, as torch does when the buffer does not exist yet.
    bfloat16/float16 params compute in float32 and round to nearest even; their buffer may be
    float32 or bfloat16 (Note [16-bit optimizers]).  Returns ``param``.

    Examples
    --------
    >>> import numpy as np, mlmath_native as mn
    >>> p, b = np.array([1.0]), np.zeros(1)
    >>> mn.optim.sgd_step(p, np.array([2.0]), b, lr=0.5, momentum=0.9, first_step=True)
    array([0.])
    """
    fn = "sgd_step"
    p = _param_array(fn, "param", param)
    g = _grad_array(fn, "grad", grad, p)
    values = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov)
    h = SGD._check_hyper(fn, values | dict(weight_decay=weight_decay, maximize=maximize))
    first_step = _flag(fn, "first_step", first_step)
    written = [("param", p)]
    if h["momentum"] != 0:
        if momentum_buffer is None:
            raise ValueError(f"{fn}: momentum_buffer is required when momentum != 0")
        buf = _check_functional_state(fn, "momentum_buffer", momentum_buffer, p)
        written.append(("momentum_buffer", buf))
    (g,) = _reads_apart_from_writes(fn, written, [g])
    _core.sgd_step(
        [p],
        [g],
        [written[1][1]] if len(written) > 1 else None,
        h["lr"],
        h["momentum"],
        h["dampening"],
        h["weight_decay"],
        h["nesterov"],
        first_step,
        -1.0 if h["maximize"] else 1.0,
    )
    return param


def adam_step(
    param: NDArray[Any],
    grad: NDArray[Any],
    exp_avg: NDArray[Any],
    exp_avg_sq: NDArray[Any],
    *,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    max_exp_avg_sq: NDArray[Any] | None = None,
) -> NDArray[Any]:
    """One Adam (or AdamW, ``decoupled_weight_decay=True``) step on one array, in place.

    ``step`` is the step number t >= 1 of this update (1 on the first); ``exp_avg`` and
    ``exp_avg_sq`` (and ``max_exp_avg_sq``, which turns on amsgrad) are updated in place.
    bfloat16/float16 params compute in float32 and round to nearest even; their state may be
    float32 or bfloat16 (Note [16-bit optimizers]).  Returns ``param``.

    Examples
    --------
    >>> import numpy as np, mlmath_native as mn
    >>> p, m, v = np.zeros(2), np.zeros(2), np.zeros(2)
    >>> mn.optim.adam_step(p, np.array([3.0, -3.0]), m, v, step=1, lr=0.01)
    array([-0.01,  0.01])
    """
    fn = "adam_step"
    p = _param_array(fn, "param", param)
    g = _grad_array(fn, "grad", grad, p)
    written = [("param", p)] + [
        (name, _check_functional_state(fn, name, buf, p))
        for name, buf in (
            ("exp_avg", exp_avg),
            ("exp_avg_sq", exp_avg_sq),
            ("max_exp_avg_sq", max_exp_avg_sq),
        )
        if buf is not None or name != "max_exp_avg_sq"
    ]
    try:
        step = operator.index(step)
    except TypeError:
        raise TypeError(f"{fn}: step must be an integer (got {step!r})") from None
    if step < 1:
        raise ValueError(f"{fn}: step must be >= 1 (got {step})")
    values = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize)
    h = Adam._check_hyper(fn, values | dict(amsgrad=False))
    decoupled_weight_decay = _flag(fn, "decoupled_weight_decay", decoupled_weight_decay)
    (g,) = _reads_apart_from_writes(fn, written, [g])
    _core.adam_step(
        [p],
        [g],
        [written[1][1]],
        [written[2][1]],
        [written[3][1]] if len(written) > 3 else None,
        step,
        h["lr"],
        h["beta1"],
        h["beta2"],
        h["eps"],
        h["weight_decay"],
        decoupled_weight_decay,
        -1.0 if h["maximize"] else 1.0,
    )
    return param


# -- the minimizer -----------------------------------------------------------------------------


@dataclass
class GradientDescentResult:
    """x: the final point; steps: updates made; history: per step, the objective value when
    grad_fn returns (value, grad), else ||grad||; converged: whether ||grad|| <= tol stopped it."""

    x: NDArray[Any]
    steps: int
    history: NDArray[Any] = field(repr=False)
    converged: bool = False


_OPTIMIZERS: dict[str, type[SGD] | type[Adam]] = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def _returned_gradient(grad: object, x: NDArray[Any]) -> NDArray[Any]:
    """What grad_fn returned, as an array of x's shape and dtype, or a clear error."""
    fn = "gradient_descent"
    try:
        arr = np.asarray(grad)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{fn}: grad_fn returned something that is not an array ({exc})") from None
    if arr.dtype.kind not in "biuf":
        raise TypeError(
            f"{fn}: grad_fn returned a gradient of dtype {arr.dtype} (expected real numbers)"
        )
    if arr.shape != x.shape:  # exactly: no reshaping, no broadcasting
        raise ValueError(
            f"{fn}: grad_fn returned a gradient of shape {arr.shape} (expected x0's shape "
            f"{x.shape})"
        )
    return arr.astype(x.dtype, copy=False)


def _returned_value(value: object) -> float:
    """The objective value grad_fn returned beside the gradient, as a float."""
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError):
        arr = np.asarray(None)
    if arr.dtype.kind not in "biuf" or arr.size != 1:
        raise TypeError(
            f"gradient_descent: grad_fn returned a value that is not a real number (got "
            f"{value!r}, expected grad_fn(x) to return a gradient or a pair (value, gradient))"
        )
    return float(arr.reshape(()))


def _evaluate(grad_fn: Callable[..., Any], x: NDArray[Any]) -> tuple[float | None, NDArray[Any]]:
    """grad_fn(x) as (value or None, gradient), or a clear error."""
    out = grad_fn(x)
    if not isinstance(out, tuple):
        return None, _returned_gradient(out, x)
    if len(out) != 2:
        raise ValueError(
            f"gradient_descent: grad_fn returned a tuple of {len(out)} items (expected a "
            "gradient or a pair (value, gradient))"
        )
    return _returned_value(out[0]), _returned_gradient(out[1], x)


def _make_optimizer(
    cls: type[_Optimizer], x: NDArray[Any], lr: float, options: dict[str, Any]
) -> _Optimizer:
    """cls(x, lr=lr, **options), its errors told as gradient_descent's."""
    fn = "gradient_descent"
    signature = inspect.signature(cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in signature.values()):
        accepted = [n for n in signature if n not in ("params", "lr")]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise TypeError(
                f"{fn}: options has {', '.join(unknown)}, which {cls.__name__} does not take "
                f"(expected some of {', '.join(accepted)})"
            )
    try:
        return cast("Callable[..., _Optimizer]", cls)(x, lr=lr, **options)
    except (TypeError, ValueError) as exc:
        prefix = f"{cls._name}: "
        message = str(exc)
        if not message.startswith(prefix):
            raise
        raise type(exc)(f"{fn}: {message[len(prefix) :]}") from None


def gradient_descent(
    grad_fn: Callable[[NDArray[Any]], ArrayLike | tuple[float, ArrayLike]],
    x0: ArrayLike,
    *,
    lr: float,
    steps: int = 1000,
    tol: float | None = None,
    optimizer: Literal["sgd", "adam", "adamw"] | type[SGD] | type[Adam] = "sgd",
    callback: Callable[[int, NDArray[Any], float], bool | None] | None = None,
    progress: bool = False,
    **options: Any,
) -> GradientDescentResult:
    """Minimise J by the seed's  theta_{t+1} = theta_t - lr * grad J(theta_t)  (or by Adam).

    Parameters
    ----------
    grad_fn : callable
        ``grad_fn(x)`` returns grad J(x), or ``(J(x), grad J(x))``; the gradient must have
        exactly x0's shape (it is neither reshaped nor broadcast).
    x0 : array_like
        The start; copied (float32 stays float32, other dtypes become float64).
    lr : float
        The learning rate eta.
    steps : int
        At most this many updates.
    tol : float, optional
        Stop as soon as ||grad J|| <= tol (checked before each update).
    optimizer : {"sgd", "adam", "adamw"} or an optimizer class
        The update rule; ``**options`` go to it (e.g. ``momentum=0.9``).
    callback : callable, optional
        ``callback(step, x, value)`` after each update, value being the history entry; return
        True to stop.
    progress : bool
        Print a progress line to stderr about 20 times during the run.

    Returns
    -------
    GradientDescentResult

    Examples
    --------
    >>> import numpy as np, mlmath_native as mn
    >>> res = mn.optim.gradient_descent(lambda x: 2 * (x - 3.0), np.zeros(2), lr=0.1, tol=1e-8)
    >>> np.round(res.x, 6), res.converged
    (array([3., 3.]), True)
    """
    fn = "gradient_descent"
    if not callable(grad_fn):
        raise TypeError(f"{fn}: grad_fn must be callable")
    try:
        steps = operator.index(steps)
    except TypeError:
        raise TypeError(f"{fn}: steps must be an integer (got {steps!r})") from None
    if steps < 0:
        raise ValueError(f"{fn}: steps must be >= 0 (got {steps})")
    if tol is not None:
        tol = _real(fn, "tol", tol, low=0)
    cls = _OPTIMIZERS.get(optimizer) if isinstance(optimizer, str) else optimizer
    if cls is None or not (isinstance(cls, type) and issubclass(cls, _Optimizer)):
        raise ValueError(
            f"{fn}: optimizer is invalid (got {optimizer!r}, expected one of "
            f"{sorted(_OPTIMIZERS)} or an optimizer class)"
        )
    if callback is not None and not callable(callback):
        raise TypeError(f"{fn}: callback must be callable or None (got {callback!r})")
    progress = _flag(fn, "progress", progress)
    x0 = as_float_array(x0, "gradient_descent", "x0")
    x = np.array(x0, order="C")
    opt = _make_optimizer(cls, x, lr, options)
    history, converged, done = [], False, 0
    for t in range(steps):
        value, grad = _evaluate(grad_fn, x)
        norm = float(np.linalg.norm(grad))
        if tol is not None and norm <= tol:
            converged = True
            break
        opt.step(grad)
        done = t + 1
        entry = norm if value is None else float(value)
        history.append(entry)
        if progress and (done % max(1, steps // 20) == 0 or done == steps):
            print(
                f"{fn}: step {done}/{steps}  value {entry:.6g}  |grad| {norm:.3g}", file=sys.stderr
            )
        if callback is not None and callback(done, x, entry):
            break
    else:
        if tol is not None and steps:
            grad = _evaluate(grad_fn, x)[1]
            converged = float(np.linalg.norm(grad.astype(np.float64, copy=False))) <= tol
    return GradientDescentResult(x=x, steps=done, history=np.asarray(history), converged=converged)
