"""The replication pipeline end to end, with a handful of steps (make replicate runs the real one)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_replicate_smoke(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "replicate" / "run.py"), "--out", str(tmp_path), "--smoke"],
                   check=True, capture_output=True)
    summary = json.loads((tmp_path / "results.json").read_text())
    runs = {"baseline", "no_leffa", "leffa", "leffa_per_head", "leffa_no_upsample", "leffa_all_timesteps"}
    assert set(summary["results"]) == runs
    for name in runs:
        result = summary["results"][name][0]
        assert 0 < result["epe_px"] < 100 and result["warp_l2"] > 0 and result["denoise"] > 0
    report = (tmp_path / "report.md").read_text()
    assert all(f"| {name} |" in report for name in runs)
    assert (tmp_path / "figures" / "flow_leffa.png").stat().st_size > 0
