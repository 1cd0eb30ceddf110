"""The benchmark table and one benchmark script end to end (make bench runs them all, full size)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.table import compared, markdown, row

ROOT = Path(__file__).resolve().parents[1]


def test_compared_divides_by_the_reference_row_and_markdown_shows_every_row():
    rows = compared([row("step", "s", "base", 100.0, "ms", 10.0), row("step", "s", "leffa", 125.0, "ms", 15.0),
                     row("step", "s", "no memory", 50.0, "ms")], "base")
    assert rows[0]["ratio"] is None and rows[0]["vs"] == ""
    assert rows[1]["ratio"] == 1.25 and rows[1]["mem_ratio"] == 1.5 and rows[1]["vs"] == "base"
    assert rows[2]["ratio"] == 0.5 and rows[2]["mem_ratio"] is None
    lines = markdown(rows).splitlines()
    assert len(lines) == 2 + 3
    assert "| step | s | leffa | 125.0 ms | 15.0 MiB | base | 1.25x | 1.50x |" in lines


@pytest.mark.slow
def test_sampling_benchmark_emits_rows_measured_side_by_side():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sampling_speed.py"), "--json", "--height", "32",
                          "--width", "32", "--batch", "1", "--steps", "2", "--repeat", "1"],
                         check=True, capture_output=True, text=True, cwd=ROOT).stdout
    rows = json.loads(out.strip().splitlines()[-1])
    assert [r["variant"] for r in rows] == ["reference at every step", "reference once (t=500)"]
    assert all(r["value"] > 0 and r["unit"] == "ms" for r in rows)
    assert rows[1]["ratio"] == rows[1]["value"] / rows[0]["value"]
