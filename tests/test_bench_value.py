"""Smoke run of the value benchmark's whole pipeline (real tasks, tiny sizes): it must finish and report."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(240)
def test_bench_value_quick_tiny(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/bench_value.py", "--quick", "--tiny", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=230, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "value.json").read_text())
    rows = {(r["task"], r["policy"]): r for r in result["rows"]}
    assert {t for t, _ in rows} == {"mnist", "minilm"}
    assert rows[("mnist", "uniform")]["backward_vs_uniform"] == 1.0
    assert rows[("mnist", "random_subset")]["backward"] < rows[("mnist", "uniform")]["backward"]
    assert (tmp_path / "value.md").read_text().count("\n") >= 12
    assert (tmp_path / "value.png").stat().st_size > 10_000
