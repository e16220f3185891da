"""What the benchmarks that run each measurement in a child process of its own share
(``optim_peers``, ``linear_ce``; Note [one process per row] in optim_peers.py): the children's
environment, running one child and reading its JSON line, why a child failed, and whether a
row's peer library is installed."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any


def log(msg: str) -> None:
    """Progress goes to stderr so that stdout holds only the table."""
    print(msg, file=sys.stderr, flush=True)


def child_env(threads: int) -> dict[str, str]:
    """The children's environment: every OpenMP and BLAS runtime (ours, torch's, the peers')
    limited to `threads`."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    return env


def failure(done: subprocess.CompletedProcess[str]) -> str:
    """Why a child failed: the last line of its stderr, or the signal that ended it."""
    if done.returncode < 0:
        sig = signal.Signals(-done.returncode).name
        hint = " (out of memory?)" if sig == "SIGKILL" else ""
        return f"killed by {sig}{hint}"
    err = [ln.strip() for ln in done.stderr.strip().splitlines() if ln.strip()]
    return (err[-1] if err else f"exit status {done.returncode}")[:300]


def run_child(module: str, args: Sequence[str], threads: int, timeout_s: float) -> dict[str, Any]:
    """``python -m module *args`` with `threads` threads: the JSON object on the last line of
    its stdout, or {"error": reason} when it fails or runs past `timeout_s`."""
    cmd = [sys.executable, "-m", module, *args]
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, env=child_env(threads), timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:g} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    return {"error": failure(done)}


def missing_module(requires: Sequence[str]) -> str | None:
    """The first of `requires` that cannot be imported here, or None."""
    for mod in requires:
        try:
            found = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return mod
    return None
