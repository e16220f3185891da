"""The linear cross-entropy benchmark's plumbing at a tiny size (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from mlmath_native.bench import linear_ce

TINY = "64x16x100"
QUICK = ["--repeat", "1", "--threads", "1", "--quick-machine"]
OURS = [r for r in linear_ce.ROWS if r.name in ("ours-fused", "ours-unfused")]


def table_rows(out: str) -> dict[str, list[str]]:
    """The cells of the markdown table's body rows, by their first cell."""
    lines = [ln for ln in out.splitlines() if ln.startswith("|")]
    assert lines[0] == linear_ce.HEADER
    assert set(lines[1]) <= set("|-")
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    assert all(len(c) == linear_ce.HEADER.count("|") - 1 for c in cells)
    return {c[0]: c for c in cells}


def test_our_rows_at_a_tiny_size_fill_every_column(capsys, tmp_path):
    path = tmp_path / "lce.json"
    assert linear_ce.main(["--sizes", TINY, *QUICK, "--json", str(path)], rows=OURS) == 0
    out = capsys.readouterr().out
    assert "ISA" in out and "machine:" in out
    rows = table_rows(out)
    assert list(rows) == ["ours fused", "ours unfused"]
    for cells in rows.values():
        assert all(cells) and cells[1] == TINY and cells[-1] == "ok"
        assert float(cells[2]) >= float(cells[3]) > 0  # median s >= best s
        assert cells[4] == "-"  # no torch row asked for
        assert float(cells[6]) > 0  # peak RSS
        assert float(cells[8]) == pytest.approx(64 * 100 * 4 / 2**20, abs=0.5)
    assert rows["ours unfused"][5] == "1.00"
    saved = json.loads(path.read_text())
    assert saved["build_info"]["isa"] and saved["machine"]["copy_gbs"] > 0
    by_row = {r["row"]: r for r in saved["rows"]}
    assert set(by_row) == {"ours-fused", "ours-unfused"}
    fused, unfused = by_row["ours-fused"], by_row["ours-unfused"]
    assert fused["shape"] == TINY and fused["median_s"] > 0
    assert fused["loss"] == pytest.approx(unfused["loss"], rel=1e-4)


def test_torch_row_against_ours(capsys):
    pytest.importorskip("torch")
    assert linear_ce.main(["--sizes", TINY, *QUICK], rows=linear_ce.ROWS) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows["torch eager"][-1] == "ok" and rows["torch eager"][4] == "1.00"
    assert float(rows["ours fused"][4]) > 0


def test_a_missing_torch_is_a_row_saying_so(capsys, monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "torch" else real(name, *args, **kwargs)

    monkeypatch.setattr(linear_ce.importlib.util, "find_spec", find_spec)
    assert linear_ce.main(["--sizes", TINY, *QUICK], rows=linear_ce.ROWS) == 0
    rows = table_rows(capsys.readouterr().out)
    assert "not installed" in rows["torch eager"][-1] and "torch" in rows["torch eager"][-1]
    assert rows["ours fused"][4] == "-" and rows["ours fused"][-1] == "ok"


def test_max_rss_skips_the_rows_predicted_not_to_fit(capsys):
    shape = linear_ce.parse_shape(TINY)
    fused, unfused = OURS
    # between the fused row's prediction and the materialising row's
    limit = (linear_ce.predicted_peak(fused, shape) + linear_ce.predicted_peak(unfused, shape)) / 2
    argv = ["--sizes", TINY, *QUICK, "--max-rss", str(limit / linear_ce.GIB)]
    assert linear_ce.main(argv, rows=OURS) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows["ours fused"][-1] == "ok"
    assert rows["ours unfused"][-1].startswith("skipped: predicted peak")
    assert rows["ours unfused"][2] == "-"


def test_shapes_and_predictions():
    shape = linear_ce.parse_shape("8192x256x131072")
    assert (shape.n, shape.d, shape.v) == (8192, 256, 131072)
    assert shape.logits_bytes == 4 << 30
    fused, unfused, torch_row = linear_ce.ROWS[:3]
    extra = linear_ce.predicted_peak(torch_row, shape) - linear_ce.predicted_peak(unfused, shape)
    assert extra == pytest.approx(linear_ce.RSS_MARGIN * shape.logits_bytes)  # its log-softmax
    gap = linear_ce.predicted_peak(unfused, shape) - linear_ce.predicted_peak(fused, shape)
    assert gap == pytest.approx(linear_ce.RSS_MARGIN * 2 * shape.logits_bytes)
    for bad in ("64x16", "64x16xq", "0x16x100"):
        with pytest.raises(ValueError, match="size"):
            linear_ce.parse_shape(bad)
    with pytest.raises(ValueError, match="unknown"):
        linear_ce.select("ours-fused,nope")
