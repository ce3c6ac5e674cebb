"""benchmarks/soak_resume.py finds the crash tests it repeats (it is not run by the suite: 20 kills take minutes)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.timeout(60)
def test_soak_script_imports_the_crash_tests():
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "soak_resume.py"), "--help"],
                         capture_output=True, text=True, timeout=50, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "--kills" in run.stdout
