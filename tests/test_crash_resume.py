"""Crash anywhere and resume exactly: SIGKILL real training processes and compare with uninterrupted runs."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.torch import load_file

from crash_job import rows
from geko_data.shards import write_shards
from geko_data.state import COLUMNS, SampleState
from geko_data.train.checkpoint import find_latest, list_checkpoints

HERE = os.path.dirname(os.path.abspath(__file__))


def job(out, data, kind, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, os.path.join(HERE, "crash_job.py"), str(out), str(data), kind, *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]


def steps_logged(out):
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    steps = [json.loads(line).get("step", 0) for line in open(path) if line.strip().endswith("}")]
    return max(steps, default=0)


def kill_at_step(proc, out, step, timeout=120):
    """SIGKILL ``proc`` once it has logged optimizer step ``step`` (and a checkpoint exists)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the job finished before step {step}: {proc.stderr.read()[-2000:]}")
        if steps_logged(out) >= step and list_checkpoints(out):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("timed out waiting for the job")


def compare(reference, resumed):
    ids_ref = np.load(os.path.join(reference, "result-ids.npy"))
    ids_res = np.load(os.path.join(resumed, "result-ids.npy"))
    assert 0 < len(ids_res) < len(ids_ref)
    assert np.array_equal(ids_ref[-len(ids_res):], ids_res), "sample order after the checkpoint differs"
    a, b = SampleState.load(os.path.join(reference, "state.arrow")), SampleState.load(os.path.join(resumed, "state.arrow"))
    for name, _, _ in COLUMNS:
        assert np.array_equal(getattr(a, name), getattr(b, name), equal_nan=True), name
    wa = load_file(os.path.join(reference, "result-weights.safetensors"))
    wb = load_file(os.path.join(resumed, "result-weights.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(np.allclose(wa[k].numpy(), wb[k].numpy(), atol=1e-5) for k in wa)


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("crash") / "shards"
    write_shards(({"__key__": f"r{i:03d}", "json": json.dumps(r).encode()} for i, r in enumerate(rows())),
                 str(folder / "s-%03d.tar"), maxcount=25)
    return folder


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind,kill_step", [("stream", 7), ("stream", 16), ("map", 11)])
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, shard_folder, kind, kill_step):
    reference = tmp_path / "reference"
    finish(job(reference, shard_folder, kind))
    crashed = tmp_path / "crashed"
    kill_at_step(job(crashed, shard_folder, kind), str(crashed), kill_step)
    assert not (crashed / "result-ids.npy").exists()  # it really died mid-run
    finish(job(crashed, shard_folder, kind, "--resume"))
    compare(str(reference), str(crashed))


_SAVER = """
import sys, numpy as np
from geko_data.state import SampleState
s = SampleState(2_000_000)
v = 0
while True:
    v += 1
    s.step = v
    s.loss[:] = v
    s.save(sys.argv[1])
    print(v, flush=True)
"""


@pytest.mark.timeout(120)
def test_kill_during_state_save_never_leaves_a_broken_file(tmp_path):
    path = tmp_path / "state.arrow"
    rng = np.random.default_rng(0)
    for trial in range(4):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(path)], stdout=subprocess.PIPE, text=True)
        first = proc.stdout.readline()  # one complete save exists
        assert first.strip() == "1"
        time.sleep(float(rng.uniform(0.0, 0.6)))  # then die anywhere, often mid-write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        s = SampleState.load(path)  # always a whole file
        assert s.step >= 1 and float(s.loss[0]) == s.step and float(s.loss[-1]) == s.step
        leftovers = [p for p in os.listdir(tmp_path) if p != "state.arrow"]
        for p in leftovers:  # a killed save may leave its temp file; it is never the state
            assert p.startswith(".state.arrow.") and p.endswith(".tmp")
            os.remove(tmp_path / p)


@pytest.mark.timeout(200)
def test_kill_during_checkpoint_save_resumes_from_newest_complete(tmp_path, shard_folder):
    out = tmp_path / "run"
    proc = job(out, shard_folder, "map")
    kill_at_step(proc, str(out), 8)
    # a half-written checkpoint (as a kill inside atomic_dir leaves it) must never be picked
    os.makedirs(out / ".checkpoint-99.zzz.tmp")
    (out / ".checkpoint-99.zzz.tmp" / "trainer_state.json").write_text("{}")
    os.makedirs(out / "checkpoint-98")  # and a directory with the right name but missing files
    latest = find_latest(str(out))
    assert os.path.basename(latest) != "checkpoint-98"
    finish(job(out, shard_folder, "map", "--resume"))
    assert json.load(open(out / "result.json"))["step"] > int(os.path.basename(latest).split("-")[1])
