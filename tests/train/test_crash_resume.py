"""Crash anywhere and resume exactly: SIGKILL real training processes and compare with uninterrupted runs.

Every job (tests/crash_job.py) runs in its own process group, and every kill is a SIGKILL of the whole
group (the job and its DataLoader workers). Kill points come from a seeded RNG, not from a hand-picked
list; the resumed job reports the step train() resumed from, and the comparison checks it against the
number of samples the uninterrupted run had used by that step.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from crash_job import KEEP, SAVE_STEPS, model, rows
from safetensors.torch import load_file

from geko_data.shards import write_shards
from geko_data.state import COLUMNS, SampleState
from geko_data.train.checkpoint import find_latest, list_checkpoints, load_checkpoint

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, where crash_job.py lives
SEED = 8  # of every kill point below
KINDS = ("stream", "map")


def job(out, data, kind, *extra):
    """Start tests/crash_job.py in a new session, so that a kill can take its DataLoader workers too."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, os.path.join(HERE, "crash_job.py"), str(out), str(data), kind, *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def kill_group(proc):
    """SIGKILL the job and everything it started; reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def finish(proc, timeout=120):
    """Wait for a job to succeed; on a timeout kill its process group (never leave it running)."""
    try:
        _out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        _out, err = proc.communicate()
        raise AssertionError(f"the job did not finish within {timeout} s and was killed: {err[-2000:]}") from None
    assert proc.returncode == 0, err[-3000:]


def _died(proc, what):
    _out, err = proc.communicate()
    return AssertionError(f"the job exited ({proc.returncode}) before {what}: {err[-2000:]}")


def steps_logged(out):
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        steps = [json.loads(line).get("step", 0) for line in f if line.strip().endswith("}")]
    return max(steps, default=0)


def kill_at_step(proc, out, step, timeout=120):
    """SIGKILL ``proc`` once it has logged optimizer step ``step`` (and a checkpoint exists)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise _died(proc, f"step {step}")
        if steps_logged(out) >= step and list_checkpoints(out):
            kill_group(proc)
            return
        time.sleep(0.01)
    kill_group(proc)
    raise AssertionError(f"timed out waiting for step {step}")


def kill_when_hooked(proc, out, timeout=120):
    """SIGKILL ``proc`` once its ``--hook`` has stopped it inside save_checkpoint; return where it stood."""
    marker = os.path.join(out, "hook-fired.json")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(marker):
            kill_group(proc)
            with open(marker) as f:
                info = json.load(f)
            os.remove(marker)
            return info
        if proc.poll() is not None:
            raise _died(proc, "its hook fired (did save_checkpoint change?)")
        time.sleep(0.01)
    kill_group(proc)
    raise AssertionError("timed out waiting for the hook inside save_checkpoint")


def samples_before(reference, step):
    """Samples the uninterrupted run had trained on when it finished optimizer step ``step``."""
    per_epoch, at = {}, None
    with open(os.path.join(reference, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    for r in records:
        if r.get("event") == "train":  # logging_steps=1: every step, with the samples used in its epoch
            per_epoch[r["epoch"]] = max(per_epoch.get(r["epoch"], 0), r["samples"])
            if r["step"] == step:
                at = (r["epoch"], r["samples"])
    assert at is not None, f"the reference run has no step {step}"
    return sum(n for e, n in per_epoch.items() if e < at[0]) + at[1]


def _json(path):
    with open(path) as f:
        return json.load(f)


def compare(reference, resumed, resumed_from=None):
    """The resumed run equals the uninterrupted one after the checkpoint it resumed from.

    Every check says what differed (the soak script prints it, without pytest's assertion rewriting).
    """
    result = _json(os.path.join(resumed, "result.json"))
    ref_step = _json(os.path.join(reference, "result.json"))["step"]
    got = result["resumed_from"]
    assert isinstance(got, int), "the job did not resume from a checkpoint"
    assert resumed_from is None or got == resumed_from, f"resumed from step {got}, expected {resumed_from}"
    assert result["step"] == ref_step, f"the resumed run ended at step {result['step']}, the reference at {ref_step}"
    ids_ref = np.load(os.path.join(reference, "result-ids.npy"))
    ids_res = np.load(os.path.join(resumed, "result-ids.npy"))
    # exactly the samples after the checkpoint: neither a restart from scratch nor a skip
    expected = len(ids_ref) - samples_before(reference, got)
    assert len(ids_res) == expected, f"{len(ids_res)} samples trained after step {got}, the reference {expected}"
    assert np.array_equal(ids_ref[len(ids_ref) - expected:], ids_res), "sample order after the checkpoint differs"
    a = SampleState.load(os.path.join(reference, "state.arrow"))
    b = SampleState.load(os.path.join(resumed, "state.arrow"))
    for name, _, _ in COLUMNS:
        assert np.array_equal(getattr(a, name), getattr(b, name), equal_nan=True), f"SampleState column {name}"
    for key, value in a.metadata().items():  # step, epoch, history, config, plan settings
        assert b.metadata()[key] == value, f"SampleState {key}: {b.metadata()[key]!r} != {value!r}"
    assert (a.plan is None) == (b.plan is None), "SampleState plan"
    if a.plan is not None:
        assert np.array_equal(a.plan.counts, b.plan.counts), "plan counts"
        assert np.array_equal(a.plan.loss_weight, b.plan.loss_weight), "plan loss weights"
    wa = load_file(os.path.join(reference, "result-weights.safetensors"))
    wb = load_file(os.path.join(resumed, "result-weights.safetensors"))
    assert wa.keys() == wb.keys(), "weight names"
    for k in wa:
        diff = float((wa[k] - wb[k]).abs().max())
        assert np.allclose(wa[k].numpy(), wb[k].numpy(), atol=1e-5), f"weight {k} (max difference {diff:.3g})"


def checkpoint_dirs(out):
    """Every directory under a checkpoint name, complete or not."""
    return sorted(d for d in os.listdir(out) if re.fullmatch(r"checkpoint-\d+", d))


def leftovers(out):
    """Hidden temporary checkpoint directories (a killed write or delete)."""
    return sorted(d for d in os.listdir(out) if d.startswith(".checkpoint-"))


def step_of(path):
    return int(os.path.basename(path).split("-")[1])


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("crash") / "shards"
    write_shards(({"__key__": f"r{i:03d}", "json": json.dumps(r).encode()} for i, r in enumerate(rows())),
                 str(folder / "s-%03d.tar"), maxcount=25)
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shard_folder):
    """reference(kind, *job_args): the uninterrupted run (2 DataLoader workers unless job_args say
    otherwise), made once per module."""
    done = {}

    def get(kind, *extra):
        if (kind, *extra) not in done:
            out = tmp_path_factory.mktemp(f"reference-{kind}")
            finish(job(out, shard_folder, kind, *extra))
            done[(kind, *extra)] = str(out)
        return done[(kind, *extra)]
    return get


@pytest.mark.timeout(200)
@pytest.mark.parametrize("kind,trial,resume_workers", [("stream", 0, None), ("stream", 1, 1),
                                                       ("map", 0, None), ("map", 1, 0)])
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, shard_folder, reference, kind, trial, resume_workers):
    # Both runs read through 2 DataLoader workers; the second trial of each kind resumes with another
    # number of workers, which must not change what the model sees.
    ref = reference(kind)
    total = steps_logged(ref)
    rng = np.random.default_rng([SEED, KINDS.index(kind)])
    kill_step = int(rng.choice(np.arange(4, total), 2, replace=False)[trial])
    crashed = tmp_path / "crashed"
    kill_at_step(job(crashed, shard_folder, kind), str(crashed), kill_step)
    assert not (crashed / "result-ids.npy").exists()  # it really died mid-run
    latest = step_of(find_latest(str(crashed)))
    extra = () if resume_workers is None else ("--workers", str(resume_workers))
    finish(job(crashed, shard_folder, kind, "--resume", *extra))
    compare(ref, str(crashed), resumed_from=latest)


@pytest.mark.timeout(200)
def test_sigkill_then_resume_is_exact_with_dropout(tmp_path, reference):
    # A model that draws random numbers while it trains: the resumed run must continue the torch RNG
    # stream exactly where the checkpoint left it (nothing else may draw from it, e.g. a DataLoader
    # seeding its workers). Map-style with 0 workers, so that only the RNG is at stake here.
    extra = ("--workers", "0", "--dropout", "0.1")
    ref = reference("map", *extra)
    kill_step = int(np.random.default_rng([SEED, 2]).integers(4, steps_logged(ref)))
    crashed = tmp_path / "crashed"
    kill_at_step(job(crashed, "-", "map", *extra), str(crashed), kill_step)
    latest = step_of(find_latest(str(crashed)))
    finish(job(crashed, "-", "map", *extra, "--resume"))
    compare(ref, str(crashed), resumed_from=latest)


def _kill_point(where, total):
    saves = np.arange(SAVE_STEPS, total + 1, SAVE_STEPS)
    if where == "resave":  # the final save lands on the last periodic one
        return int(saves[-1])
    rng = np.random.default_rng([SEED, ("write", "prune").index(where)])
    if where == "write":  # any periodic save but the first
        return int(rng.choice(saves[1:-1]))
    return int(rng.choice(saves[KEEP:-1]))  # prune: a save that deletes the oldest of KEEP checkpoints


@pytest.mark.timeout(200)
@pytest.mark.parametrize("where", ["write", "prune", "resave"])
def test_kill_inside_save_checkpoint_resumes_from_newest_complete(tmp_path, reference, where):
    """SIGKILL inside save_checkpoint: while writing the new checkpoint's files, while deleting an old
    one, and while saving a step whose checkpoint already exists."""
    ref = reference("map")
    total = steps_logged(ref)
    assert total % SAVE_STEPS == 0, "the final save must land on a periodic one for the resave case"
    k = _kill_point(where, total)
    out = tmp_path / "run"
    hook = where if where == "resave" else f"{where}:{k}"
    # 0 workers: these kills are about the files, and map-style data reads the same with any number
    info = kill_when_hooked(job(out, "-", "map", "--workers", "0", "--hook", hook), str(out))
    assert info == {"where": where, "step": k}
    for name in checkpoint_dirs(out):  # whatever is under a checkpoint name is complete...
        assert name in {os.path.basename(p) for p in list_checkpoints(str(out))}, f"{name} is incomplete"
    if where == "write":
        expected = k - SAVE_STEPS  # ...the half-written checkpoint is not one of them
        assert not (out / f"checkpoint-{k}").exists()
        (tmp,) = [d for d in leftovers(out) if d.startswith(f".checkpoint-{k}.")]
        assert (out / tmp / "model.safetensors").exists() and not (out / tmp / "state.arrow").exists()
        assert not (out / tmp / "manifest.json").exists()  # written last, over the files as they ended up
        # the same files under a checkpoint name (a writer without temp + rename) are skipped as well
        shutil.copytree(out / tmp, out / "checkpoint-99")
    elif where == "prune":
        expected = k  # the new checkpoint was in place before the oldest was deleted
        doomed = k - KEEP * SAVE_STEPS
        assert not (out / f"checkpoint-{doomed}").exists()
        (gone,) = [d for d in leftovers(out) if d.startswith(f".checkpoint-{doomed}.")]
        assert not (out / gone / "model.safetensors").exists()  # it was killed half-way through the delete
    else:
        expected = k  # the complete checkpoint of that step survives its re-save
    latest = find_latest(str(out))
    assert step_of(latest) == expected
    m = model()
    trainer_state, _data_state, state = load_checkpoint(str(out), model=m, optimizer=torch.optim.AdamW(m.parameters()))
    assert trainer_state["step"] == expected and len(state) == len(rows())

    finish(job(out, "-", "map", "--workers", "0", "--resume"))
    compare(ref, str(out), resumed_from=expected)
    assert leftovers(out) == []  # the next save cleared what the killed one left behind
    kept = [step_of(p) for p in list_checkpoints(str(out))]
    assert kept == [total - SAVE_STEPS * i for i in range(KEEP)][::-1]


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
        leftover = [p for p in os.listdir(tmp_path) if p != "state.arrow"]
        for p in leftover:  # a killed save may leave its temp file; it is never the state
            assert p.startswith(".state.arrow.") and p.endswith(".tmp")
            os.remove(tmp_path / p)
