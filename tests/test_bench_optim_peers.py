"""The optimizer peers benchmark's plumbing at a tiny size (no timing is asserted)."""

from __future__ import annotations

import json

import pytest

from mlmath_native.bench import optim_peers

TINY = "4K"
QUICK = ["--repeat", "1", "--threads", "1", "--copy-mib", "16"]


def table_rows(out: str) -> list[list[str]]:
    """The cells of the markdown table's body rows."""
    lines = [ln for ln in out.splitlines() if ln.startswith("|")]
    assert lines[0] == optim_peers.HEADER
    assert set(lines[1]) <= set("|-")
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]


def test_our_rows_at_a_tiny_size_fill_every_column(capsys, tmp_path):
    pytest.importorskip("ml_dtypes")  # the bfloat16 row
    ours = [r for r in optim_peers.ROWS if r.name.startswith("ours")]
    path = tmp_path / "peers.json"
    argv = ["--sizes", TINY, *QUICK, "--json", str(path)]
    assert optim_peers.main(argv, rows=ours) == 0
    rows = table_rows(capsys.readouterr().out)
    columns = optim_peers.HEADER.count("|") - 1
    # the int8 row is listed only once state_dtype="int8" is accepted
    assert 2 <= len(rows) <= len(ours)
    for cells in rows:
        assert len(cells) == columns and all(cells)
        assert cells[1] == TINY
        assert float(cells[3]) >= float(cells[4]) > 0  # median ms >= best ms
    labels = [cells[0] for cells in rows]
    assert labels[:2] == [ours[0].label, ours[1].label]
    assert [float(c[2]) for c in rows[:2]] == [28, 14]
    saved = json.loads(path.read_text())
    assert [r["row"] for r in saved["rows"]][:2] == ["ours-fp32", "ours-bf16-sr"]
    assert all(r["n"] == 4096 and r["median_s"] > 0 for r in saved["rows"])


def test_a_missing_peer_is_a_row_saying_so(capsys):
    missing = optim_peers.Row("nope", "a peer that is absent", 28.0, requires=("no_such_mod_xyz",))
    argv = ["--sizes", TINY, *QUICK]
    assert optim_peers.main(argv, rows=[missing]) == 0
    (cells,) = table_rows(capsys.readouterr().out)
    assert cells[0] == "a peer that is absent"
    assert "not installed" in cells[3] and "no_such_mod_xyz" in cells[3]


def test_bytes_per_param_and_sizes():
    by_name = {r.name: r.bytes_per_param for r in optim_peers.ROWS}
    assert by_name["ours-fp32"] == by_name["torch-fused"] == by_name["deepspeed"] == 28
    assert by_name["ours-bf16-sr"] == 14
    assert by_name["ours-int8"] == by_name["bnb-8bit"] == 16 + 16 / 256
    assert optim_peers.parse_size("16M") == 16 << 20
    assert optim_peers.size_label(256 << 20) == "256M"
    with pytest.raises(ValueError, match="size"):
        optim_peers.parse_size("16Q")
    with pytest.raises(ValueError, match="unknown"):
        optim_peers.select("ours-fp32,nope")


def test_an_optional_row_that_does_not_run_is_left_out(capsys):
    """A format ours may not have yet (ours-int8 before state_dtype="int8" lands) is not
    listed; a peer is always listed, with the reason it does not run."""
    optional = optim_peers.Row("later", "a format to come", 16.0, ("no_such_mod_xyz",), True)
    missing = optim_peers.Row("absent", "a peer that is absent", 28.0, ("no_such_mod_xyz",))
    assert optim_peers.main(["--sizes", TINY, *QUICK], rows=[optional, missing]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert [cells[0] for cells in rows] == ["a peer that is absent"]
