"""The optimizer formats demo (``python -m mlmath_native.demo optim_formats``): the quick run
prints its tables and plot; bfloat16 params rounded to nearest stall at a tiny learning rate
where stochastic rounding keeps them moving; a format the optimizer refuses is listed as
skipped (so int8 joins the table once ``mn.AdamW`` accepts it).

Only the MLP's rows need torch: the test checks them when torch is installed.
"""

from __future__ import annotations

import numpy as np
import pytest

import mlmath_native as mn
from mlmath_native import demo
from mlmath_native.demo import optim_formats, transformer
from mlmath_native.demo.optim_formats import FORMATS, OURS_FP32, Format


@pytest.fixture
def one_thread(threads):
    """Results are bitwise the same for any thread count; one thread keeps these small runs
    from waiting on a busy machine's second core (restored afterwards)."""
    mn.set_num_threads(1)


def _torch_or_none():
    try:
        import torch
    except ImportError:
        return None
    return torch


def test_quick_run_prints_the_tables_matches_fp32_and_writes_png(tmp_path, capsys, one_thread):
    """Every row is printed (trained, or skipped with its reason); the formats that round
    nothing a float32 run keeps (torch's AdamW, master weights) and the stochastically
    rounded ones land within the margin of our float32 AdamW on the transformer."""
    pytest.importorskip("sklearn")  # the digits of the MLP
    pytest.importorskip("matplotlib")
    png = tmp_path / "formats.png"
    res = demo.run_optim_formats(quick=True, out=str(png), progress=False)
    out = capsys.readouterr().out
    for fmt in FORMATS:
        assert f"  {fmt.name} " in out, fmt.name
    assert "within = |diff| <= " in out and "baseline" in out
    assert "stall: transformer at a constant lr" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert res["plot"] == str(png)
    assert ("mlp: final loss" in out) == (_torch_or_none() is not None)

    tr = res["transformer"]
    rows = {r["format"]: r for r in tr["rows"]}
    assert tr["margin"] > 0
    assert rows[OURS_FP32]["diff"] == 0
    for name in ("bf16 state, SR", "bf16 params, fp32 master", "bf16 params, SR"):
        assert rows[name]["within"], rows[name]
    base = tr["curves"][OURS_FP32][0]
    assert base[-5:].mean() < base[:5].mean() - 0.3  # it learns
    if _torch_or_none() is not None:
        assert abs(rows["torch.optim.AdamW fp32"]["diff"]) < 1e-3  # the same AdamW


def test_cli_runs_one_model(capsys, one_thread):
    argv = ["optim_formats", "--quick", "--no-progress", "--out", "", "--models", "transformer"]
    assert demo.main([*argv, "--steps", "8", "--seeds", "2", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    assert "seeds [5, 6]" in out and "8 steps" in out
    assert "transformer: final loss" in out and "mlp" not in out


def test_bf16_params_round_to_nearest_stall_and_stochastic_rounding_moves(one_thread):
    """At lr 1e-5, below half an ulp of most bfloat16 weights, round to nearest leaves the
    weights (all but the zero-initialised biases and the smallest) bitwise unchanged; with
    stochastic rounding they move as far along float32's path as float32 does, on average."""
    pytest.importorskip("ml_dtypes")  # bfloat16 NumPy arrays
    cfg = transformer.quick_config(block=16, d_model=16)
    res = optim_formats.stall_run(cfg, steps=60, lr=1e-5, seed=0)
    fp32, rne, sr = (res[f.name] for f in optim_formats.STALL_FORMATS)
    assert fp32["moved"] == 1.0 and fp32["progress"] == 1.0
    assert fp32["losses"][-10:].mean() < fp32["losses"][:10].mean()  # it learns, slowly
    assert rne["moved"] < 0.15
    assert rne["progress"] < 0.3
    assert sr["moved"] > 3 * rne["moved"]
    assert 0.6 < sr["progress"] < 1.5
    again = optim_formats.stall_run(cfg, steps=60, lr=1e-5, seed=0)  # seeded: repeatable
    for name, r in res.items():
        np.testing.assert_array_equal(again[name]["losses"], r["losses"])


def test_a_format_the_optimizer_refuses_is_skipped(monkeypatch, capsys, one_thread):
    bogus = Format("int3 state", options={"state_dtype": "int3"})
    assert "not in this build" in optim_formats.skip_reason(bogus)
    assert optim_formats.skip_reason(Format(OURS_FP32)) is None
    monkeypatch.setattr(optim_formats, "FORMATS", (*FORMATS[1:3], bogus))
    res = demo.run_optim_formats(
        quick=True, out=None, progress=False, models=("transformer",), stall_steps=4
    )
    rows = {r["format"]: r for r in res["transformer"]["rows"]}
    assert "state_dtype" in rows["int3 state"]["skip"]
    assert "  int3 state                 skipped: not in this build" in capsys.readouterr().out


def test_compare_margin_is_the_baseline_seed_spread():
    curves = {
        "base": [np.array([5.0, 1.0]), np.array([5.0, 3.0])],  # finals 1 and 3: std sqrt(2)
        "near": [np.array([5.0, 2.5]), np.array([5.0, 4.0])],  # mean 3.25, diff 1.25
        "far": [np.array([5.0, 5.0]), np.array([5.0, 5.0])],  # diff 3
    }
    rows, margin = optim_formats.compare(curves, "base", tail=1, sigmas=2.0)
    assert margin == pytest.approx(2 * np.sqrt(2))
    got = {r["format"]: (r["diff"], r["within"]) for r in rows}
    assert got == {"base": (0.0, True), "near": (1.25, True), "far": (3.0, False)}


def test_cli_help_lists_the_demo(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--help"])
    assert "optim_formats" in capsys.readouterr().out
