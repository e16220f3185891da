"""Helpers shared by the demos: a timer for the mlmath_native calls, a progress bar, a
result record and the optional imports (tqdm, matplotlib, scikit-learn are only needed by the
demos, never by ``import mlmath_native``)."""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import mlmath_native as mn


class KernelTimer:
    """Wall time spent inside mlmath_native calls.

    ``kt.conv2d(...)`` calls ``mn.conv2d(...)`` and adds its duration to ``kt.seconds``; any
    public function of ``mlmath_native`` works that way.  ``kt.call(f, ...)`` times any other
    callable, e.g. an optimizer's bound ``step``.  ``with kt.step():`` measures the whole
    training step around them (``kt.step_seconds``), so that :meth:`share` is the fraction of
    the step spent in the kernels.

    >>> import numpy as np
    >>> from mlmath_native.demo import KernelTimer
    >>> kt = KernelTimer()
    >>> with kt.step():
    ...     p = kt.softmax(np.zeros(4))
    >>> p
    array([0.25, 0.25, 0.25, 0.25])
    >>> kt.calls, kt.steps, 0 < kt.share() <= 1
    (1, 1, True)
    """

    def __init__(self) -> None:
        self.seconds = 0.0  # inside mlmath_native calls
        self.calls = 0
        self.step_seconds = 0.0  # inside `with kt.step():` blocks
        self.steps = 0

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1

    def __getattr__(self, name: str) -> Callable[..., Any]:
        fn = getattr(mn, name)  # AttributeError for names mlmath_native does not have
        return functools.partial(self.call, fn)

    def step(self) -> _StepClock:
        return _StepClock(self)

    def share(self) -> float:
        """Kernel time / step time (0 before any step)."""
        return self.seconds / self.step_seconds if self.step_seconds > 0 else 0.0

    def report(self) -> str:
        """e.g. ``"kernels 62% of 3.10 s (420 steps, 11000 kernel calls)"``: the time inside
        mlmath_native calls (their argument checks included) over the time of the steps."""
        return (
            f"kernels {100 * self.share():.0f}% of {self.step_seconds:.2f} s "
            f"({self.steps} steps, {self.calls} mlmath_native calls)"
        )


class _StepClock:
    def __init__(self, timer: KernelTimer) -> None:
        self.timer = timer
        self.t0 = 0.0

    def __enter__(self) -> _StepClock:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timer.step_seconds += time.perf_counter() - self.t0
        self.timer.steps += 1


class Progress:
    """A progress bar with running statistics: tqdm when it is importable, else a one-line
    ``\\r`` bar of our own on stderr.  ``enabled=False`` prints nothing."""

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        enabled: bool = True,
        use_tqdm: bool | None = None,
        file: TextIO | None = None,
    ) -> None:
        self.total, self.desc, self.enabled = total, desc, enabled
        self.file = file if file is not None else sys.stderr
        self.n = 0
        self.stats = ""
        self._bar: Any = None
        self._last = 0.0
        if not enabled:
            return
        if use_tqdm is None or use_tqdm:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                if use_tqdm:
                    raise
            else:
                self._bar = tqdm(total=total, desc=desc, file=self.file, leave=True)

    def update(self, n: int = 1, **stats: float) -> None:
        self.n += n
        if stats:
            self.stats = "  ".join(f"{k} {_fmt(v)}" for k, v in stats.items())
        if not self.enabled:
            return
        if self._bar is not None:
            if stats:
                self._bar.set_postfix_str(self.stats, refresh=False)
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last >= 0.1 or self.n >= self.total:  # at most 10 redraws a second
            self._last = now
            self._draw()

    def _draw(self) -> None:
        width = 30
        done = int(width * self.n / self.total) if self.total else width
        bar = "#" * done + "." * (width - done)
        self.file.write(f"\r{self.desc} [{bar}] {self.n}/{self.total}  {self.stats}")
        self.file.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            self._draw()
            self.file.write("\n")
            self.file.flush()


def _fmt(v: float) -> str:
    if isinstance(v, float):
        return "-" if v != v else f"{v:.4f}"  # NaN: not measured yet
    return str(v)


@dataclass
class DemoResult:
    """What a demo returns.

    final_loss : the training loss at the end (mean of the last few steps for the models);
    accuracy : the demo's headline accuracy (test accuracy for digits and regression, next
        character accuracy on training batches for the transformer);
    history : lists of per-step / per-epoch values (``"loss"``, ``"test_accuracy"``, ...);
    kernel_seconds, step_seconds : time inside mlmath_native calls and inside training steps;
    extra : demo-specific numbers (entropies, comparisons, samples, the plot's path).
    """

    name: str
    final_loss: float
    accuracy: float
    history: dict[str, list[float]] = field(default_factory=dict)
    kernel_seconds: float = 0.0
    step_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kernel_share(self) -> float:
        return self.kernel_seconds / self.step_seconds if self.step_seconds > 0 else 0.0

    def __getitem__(self, key: str) -> Any:  # result["final_loss"] works too
        if key in self.extra:
            return self.extra[key]
        return getattr(self, key)


def require(module: str, extra: str = "demo") -> Any:
    """Import an optional dependency of the demos; the ImportError names what to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = {"sklearn": "scikit-learn"}.get(module.split(".")[0], module.split(".")[0])
        raise ImportError(
            f"this demo needs {package}: pip install {package}  (or pip install "
            f'"mlmath_native[{extra}]")'
        ) from exc


def log(msg: str, *, verbose: bool = True) -> None:
    if verbose:
        print(msg, flush=True)
