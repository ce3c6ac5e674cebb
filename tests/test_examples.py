"""The examples run as a user runs them (subprocesses, real workers)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*cmd, env=None):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, cwd=ROOT,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.timeout(160)
def test_map_style_example():
    out = run(sys.executable, "examples/map_style.py")
    assert "Compute saved" in out
    acc = float(out.rsplit("accuracy on all 4000 samples:", 1)[1])
    assert acc > 0.9


@pytest.mark.timeout(160)
def test_streaming_example():
    out = run(sys.executable, "examples/streaming.py")
    assert "Compute saved" in out and "epoch 4: trained on" in out


@pytest.mark.timeout(160)
def test_torchrun_ddp_example(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = run(torchrun, "--standalone", "--nproc_per_node=2", "examples/ddp_torchrun.py",
              env={"GEKO_OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1"})
    lines = [l for l in out.splitlines() if l.startswith("[rank")]
    assert len(lines) == 2 and lines[0].split("]", 1)[1] == lines[1].split("]", 1)[1]  # ranks agree
