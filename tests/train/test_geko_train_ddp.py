"""examples/ddp_torchrun.py says where it writes and labels rank 0's per-epoch figures as rank 0's."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.timeout(160)
def test_torchrun_example_names_its_output_dir_and_per_rank_figures(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {k: v for k, v in os.environ.items() if k != "GEKO_OUT"}
    env.update({"TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"})  # the default output dir lands in tmp_path
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "examples/ddp_torchrun.py"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    default = os.path.join(str(tmp_path), "geko-ddp-example")
    where = [line for line in out.splitlines() if line.startswith("[ddp example]")]
    assert len(where) == 1 and default in where[0] and "set GEKO_OUT" in where[0]  # rank 0 says it, once
    assert os.path.exists(os.path.join(default, "state.arrow"))
    epochs = [line for line in out.splitlines() if line.startswith("[Epoch ")]
    assert len(epochs) == 4 and all("on rank 0 (2 ranks share the epoch)" in line for line in epochs)
