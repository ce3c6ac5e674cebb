"""Hostile inputs and invariants under random use (hypothesis): nothing is lost, nothing unexpected is read."""

import dataclasses
import errno
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from geko_data import plan, policy
from geko_data.config import GEKOConfig
from geko_data.shards import index_shards
from geko_data.state import SampleState
from geko_data.stream import GEKOStream
from geko_data.world import World
from geko_data.train import TrainArgs


def test_disk_full_while_saving_keeps_the_previous_state(tmp_path, monkeypatch):
    s = SampleState(1000)
    s.report(np.arange(10), np.ones(10))
    path = tmp_path / "state.arrow"
    s.save(path)
    before = path.read_bytes()
    real = pa.OSFile

    class FullDisk:
        def __init__(self, name, mode="rb"):
            self.f = real(name, mode)

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(pa, "OSFile", FullDisk)
    s.report(np.arange(10), np.zeros(10))
    with pytest.raises(OSError):
        s.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["state.arrow"]
    assert SampleState.load(path).loss[0] == 1.0


def test_member_names_are_never_used_as_paths(tmp_path, monkeypatch):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tf:
        for name in ("../../escape.txt", "/abs/olute.txt", "ok.txt"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tf.addfile(info, io.BytesIO(b"hi"))
    idx = index_shards([path], output=tmp_path / "index.arrow")
    assert list(idx.keys) == ["../../escape", "/abs/olute", "ok"]
    monkeypatch.chdir(tmp_path)
    got = [s["__key__"] for s in GEKOStream(tmp_path, total_epochs=1, shuffle=False,
                                             config=GEKOConfig(log_bucket_stats=False))]
    assert got == ["../../escape", "/abs/olute", "ok"]
    assert sorted(os.listdir(tmp_path)) == ["evil.tar", "index.arrow"]  # nothing written anywhere
    assert not os.path.exists(tmp_path.parent.parent / "escape.txt")


finite_or_not = st.one_of(st.floats(0, 12, width=32), st.sampled_from([float("nan"), float("inf"), 1e19]))
report_st = st.lists(st.tuples(st.integers(0, 39), finite_or_not, st.booleans()), min_size=0, max_size=80)
FROZEN_DRAWN = []  # (re-checks seen, frozen-and-drawn) per example: the companion test asserts they happen
# Every sample right at a spread of losses for three epochs: the easier half freezes and some of it is drawn
# as re-checks. Written out because the generated examples differ with what the session has imported
# (hypothesis mixes constants found in loaded modules into its draws), and in a full run none of them
# happened to draw a FROZEN sample.
ALL_RIGHT_3_EPOCHS = [[(i, i * 0.02, True) for i in range(40)]] * 3


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.lists(report_st, min_size=1, max_size=6), st.sampled_from(["geko", "unbiased"]), st.integers(1, 4),
       st.integers(0, 3))
@example(ALL_RIGHT_3_EPOCHS, "geko", 2, 0)
def test_state_and_plan_invariants(reports, mode, world, seed):
    # Per-sample losses and correctness, so samples spread over all buckets; prune after 2 FREEZE
    # repartitions, so FREEZE samples exist and are drawn (as re-checks) before they are pruned.
    cfg = GEKOConfig(mode=mode, q_value_lr=0.9, min_q_for_freeze=0.5, prune_frozen_after=2, recheck_frozen=0.5,
                     anneal=0.0, log_bucket_stats=False, short_run_keep=None)
    s = SampleState(40, config=cfg)
    pruned_before = np.zeros(40, bool)
    for epoch, rows in enumerate(reports):
        ids = [r[0] for r in rows]
        losses = [r[1] for r in rows]
        correct = [r[2] and np.isfinite(r[1]) and r[1] < 1 for r in rows]
        s.report(ids, losses, correct=correct)
        s.repartition(min(1.0, (epoch + 0.5) / len(reports)), epoch=epoch)
        assert (s.pruned >= pruned_before).all()  # pruned never comes back
        pruned_before = s.pruned.copy()
        seen = s.seen
        assert np.isfinite(s.loss[seen]).all() and np.isfinite(s.q).all() and np.isfinite(s.loss_var).all()
        p = plan.epoch_plan(s, seed=seed, epoch=epoch, total_epochs=len(reports))
        assert (p.counts[s.pruned] == 0).all()
        frozen = s.bucket == policy.FREEZE
        if mode == "geko":  # FREEZE is only ever drawn as a forward-only re-check
            assert (p.loss_weight[frozen & (p.counts > 0)] == 0).all()
            FROZEN_DRAWN.append(int((frozen & ~s.pruned & (p.counts > 0)).sum()))
        order = plan.global_order(p.counts, seed=seed, epoch=epoch)
        parts = [plan.rank_slice(order, rank=r, world_size=world) for r in range(world)]
        assert len({len(x) for x in parts}) == 1
        got = np.bincount(np.concatenate(parts).astype(np.int64), minlength=40)
        assert (got >= p.counts).all() and (got - p.counts).sum() < world


def test_the_invariant_test_draws_frozen_samples():
    # The invariants above only mean something if FREEZE samples were really drawn in some example.
    if not FROZEN_DRAWN:
        test_state_and_plan_invariants()
    assert sum(FROZEN_DRAWN) > 0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=60), st.integers(1, 3), st.integers(1, 3),
       st.integers(1, 5), st.integers(0, 5))
def test_stream_order_covers_every_rank_and_worker(counts_list, world, workers, batch, seed):
    n = len(counts_list)
    counts = np.array(counts_list, dtype=np.int32)
    index = _fake_index(n)
    layout = plan.ShardLayout(sample_shard=index.shard, num_shards=len(index.shards), shuffle_buffer=7)
    everything = []
    lengths = set()
    for rank in range(world):
        # what each DataLoader worker reads: batch j goes to worker j % workers
        parts = [plan.partition(counts, world=World(rank=rank, world_size=world, worker=w, num_workers=workers),
                                seed=seed, epoch=1, shards=layout, batch_size=batch) for w in range(workers)]
        lengths.add(sum(map(len, parts)))
        for part in parts:
            everything += part.tolist()
    assert len(lengths) == 1
    got = np.bincount(np.array(everything, dtype=np.int64), minlength=n)
    assert (got >= counts).all() and (got - counts).sum() < world


def _fake_index(n):
    from geko_data.shards import ShardIndex

    shard = (np.arange(n) * 3 // max(n, 1)).astype(np.int32)
    return ShardIndex(shards=("a", "b", "c"), sizes=(0, 0, 0), keys=np.array([f"k{i}" for i in range(n)], object),
                      shard=shard, offset=np.arange(n, dtype=np.int64) * 512,
                      length=np.full(n, 512, np.int64), fingerprint="x")


# ---------------------------------------------------------------- every field of TrainArgs and GEKOConfig
# At least one invalid value per field. The tests below take the field list from dataclasses.fields, so
# a field added without a case here fails them.
BAD_TRAIN_ARGS = {
    "output_dir": ["", 3], "num_epochs": [0, 2.5, True], "batch_size": [0, "8"],
    "learning_rate": [0.0, float("nan"), 11],
    "weight_decay": [-0.1, float("inf")], "warmup_steps": [-1, 1.5], "warmup_ratio": [-0.1, 1.5],
    "logging_steps": [0], "save_steps": [-1],
    "eval_steps": [-1, None], "max_grad_norm": [-1.0, "1"], "gradient_accumulation_steps": [0, False],
    "seed": [-1, 1.0], "save_at_end": ["yes", 1], "bf16": [1], "fp16": ["no"], "gradient_checkpointing": [None],
    "compile_model": [0], "use_8bit_optimizer": ["true"], "dataloader_num_workers": [-2, True, 2.0],
    "dataloader_persistent_workers": [1], "dataloader_prefetch_factor": [0], "lr_schedule": ["linear", None], "batches": ["auto", None],
    "save_total_limit": [0], "eval_batch_size": [0, "32"], "correct_threshold": [1.5, -0.1],
    "progress": ["no"], "device": ["tpu", None],
}
BAD_CONFIG = {
    "freeze_confidence": [1.5, float("nan")], "freeze_quantile": [1.5, "high"], "freeze_share": [0.0, 1.5, "half"],
    "freeze_quality": [2],
    "focus_confidence": ["high"],
    "bucket_weights": [(1, 2), (1, -2, 0)], "use_curriculum": [1], "q_value_lr": [0.0], "min_q_for_freeze": [1.1],
    "q_value_loss_scale": [0], "repartition_every": [0], "log_bucket_stats": ["yes"], "max_times_seen": [-1],
    "prune_frozen_after": [300], "mode": ["fast"], "keep_frozen": [0.0], "recheck_frozen": [-0.1],
    "early_stop_frozen": [0.0], "anneal": [1.5], "anneal_keep": [0.0, 1.5], "loss_ema": [1.0], "max_repeats": [0], "subset_fraction": [0.0],
    "prune_ratio": [1.0], "name": [3, None], "curriculum_min_epochs": [0, True], "short_run_keep": [0.0, 1.5], "short_run_keep_steps": [0.0, 1.5, "0.5"], "short_run_weights_steps": [(1, 2), (1, -1, 1)], "long_run_weights_steps": [(1, 2), (1, -1, 1)], "long_run_freeze_share_steps": [0.0, 1.5, "0.6"], "answer_weight_cap": [0.5, 0.0, "4"], "phase_weights": [((1, 2, 3),) * 4],
}


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(TrainArgs)])
def test_every_train_args_field_rejects_a_bad_value_naming_it(field):
    assert BAD_TRAIN_ARGS.get(field), f"TrainArgs.{field} has no invalid value in BAD_TRAIN_ARGS: add one"
    for value in BAD_TRAIN_ARGS[field]:
        with pytest.raises(ValueError, match=f"`{field}`") as err:
            TrainArgs(**{field: value})
        assert repr(value) in str(err.value)
        with pytest.raises(ValueError, match=f"`{field}`"):  # and through the dict an args file gives
            TrainArgs.from_dict({**TrainArgs().to_dict(), field: value})


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(GEKOConfig)])
def test_every_config_field_rejects_a_bad_value_naming_it(field):
    assert BAD_CONFIG.get(field), f"GEKOConfig.{field} has no invalid value in BAD_CONFIG: add one"
    for value in BAD_CONFIG[field]:
        with pytest.raises(ValueError, match=f"`{field}`") as err:
            GEKOConfig(**{field: value})
        assert repr(value)[:6] in str(err.value)


def test_the_bad_value_tables_name_only_real_fields():
    assert set(BAD_TRAIN_ARGS) == {f.name for f in dataclasses.fields(TrainArgs)}
    assert set(BAD_CONFIG) == {f.name for f in dataclasses.fields(GEKOConfig)}


# ---------------------------------------------------------------- output dir not writable, for real
_UNWRITABLE = """
import json, os, sys
import torch
from geko_data.state import SampleState
from geko_data.train import TrainArgs, train
from geko_data.train.checkpoint import save_checkpoint

m = torch.nn.Linear(2, 2)
opt = torch.optim.AdamW(m.parameters())  # (its first use imports more of the standard library)
# Drop root here, after Python and the modules started: the interpreter may live where nobody can read.
if os.geteuid() == 0:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
results = [{"euid": os.geteuid()}]
for out in sys.argv[1:]:
    for what in ("save_checkpoint", "train"):
        try:
            if what == "train":
                train(torch.nn.Linear(2, 2), [{"x": [0.0, 1.0], "labels": 0}] * 4, log=lambda _m: None,
                      args=TrainArgs(output_dir=out, num_epochs=1, batch_size=2, progress=False,
                                     dataloader_num_workers=0))
            else:
                save_checkpoint(out, step=1, model=m, optimizer=opt, trainer_state={}, data_state={},
                                state=SampleState(4))
            results.append({"out": out, "what": what, "error": None})
        except Exception as e:
            results.append({"out": out, "what": what, "error": type(e).__name__, "message": str(e),
                            "oserror": isinstance(e, OSError)})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def unwritable_results():
    """As an unprivileged user (a child process drops root with setuid: root ignores permissions), call
    save_checkpoint() and train() with an existing read-only output_dir, one to be made inside a
    read-only folder, and one below a regular file. Returns what each call raised."""
    root = tempfile.mkdtemp(prefix="geko-unwritable-")  # not under pytest's 0700 tmp dir: nobody must reach it
    try:
        os.chmod(root, 0o755)
        ro = os.path.join(root, "ro")
        os.mkdir(ro)
        os.chmod(ro, 0o555)
        plain = os.path.join(root, "file")
        with open(plain, "w") as f:
            f.write("x")
        os.chmod(plain, 0o444)
        outs = [ro, os.path.join(ro, "out"), os.path.join(plain, "out")]
        proc = subprocess.run([sys.executable, "-c", _UNWRITABLE, *outs], capture_output=True, text=True,
                              check=False, timeout=100, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        who, *results = json.loads(proc.stdout.strip().splitlines()[-1])
        assert who["euid"] != 0 and len(results) == 2 * len(outs)
        assert sorted(os.listdir(root)) == ["file", "ro"] and os.listdir(ro) == []  # nothing was written
        return results
    finally:
        os.chmod(os.path.join(root, "ro"), 0o755)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("what", ["save_checkpoint", "train"])
def test_output_dir_not_writable_even_for_root(unwritable_results, what):
    # each fails before any work with an OSError (PermissionError, NotADirectoryError) naming `output_dir`
    mine = [r for r in unwritable_results if r["what"] == what]
    bad = [r for r in mine if not (r["error"] and r["oserror"] and "`output_dir`" in r["message"])]
    assert not bad, f"no clear error naming `output_dir`: {bad}"


# ---------------------------------------------------------------- no pickle on any checkpoint load path
class _Payload:
    """Unpickling this creates a directory: the proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _tiny_checkpoint(out):
    import torch

    from geko_data.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()  # an optimizer state with tensors in it
    state = SampleState(6)
    state.report(np.arange(6), np.linspace(0.1, 2, 6))
    return save_checkpoint(str(out), step=1, model=model, optimizer=opt, trainer_state={"step": 1},
                           data_state={"epoch": 0, "position": 0}, state=state), model, opt


@pytest.mark.parametrize("victim", ["optimizer.pt", "model.safetensors", "rng.safetensors", "state.arrow",
                                    "trainer_state.json", "data_state.json"])
def test_a_pickle_payload_in_any_checkpoint_file_is_refused_and_never_runs(tmp_path, victim):
    import torch

    from geko_data.train.checkpoint import CheckpointError, load_checkpoint

    ckpt, model, opt = _tiny_checkpoint(tmp_path / "out")
    marker = tmp_path / "PAYLOAD-RAN"
    evil = {"state": {}, "param_groups": [], "x": _Payload(str(marker))}
    control = tmp_path / "control.pt"
    torch.save(evil, control)  # a torch zip file with the pickle inside
    torch.load(control, weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.exists()
    marker.rmdir()
    path = os.path.join(ckpt, victim)
    shutil.copyfile(control, path)  # now under the victim's name
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=f"{victim}.*refused|refused.*{victim}"):
        load_checkpoint(ckpt, model=model, optimizer=opt)
    assert not marker.exists(), "the pickle payload ran"
    # refused before anything changed: the model keeps its weights
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the same payload as a bare pickle stream (no zip around it)
    with open(path, "wb") as f:
        pickle.dump(evil, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(ckpt, model=model, optimizer=opt)
    assert not marker.exists(), "the pickle payload ran"


# ---------------------------------------------------------------- resume checks at the loop level
def _trained_checkpoint(out, data):
    """Run the reference loop one short epoch on ``data`` (rows or a shard folder), checkpointing every 2
    steps; return its TrainArgs."""
    from crash_job import CFG, model

    from geko_data.train import train

    args = TrainArgs(output_dir=str(out), num_epochs=1, batch_size=4, learning_rate=1e-3, warmup_steps=0,
                     logging_steps=1, save_steps=2, eval_steps=0, progress=False, dataloader_num_workers=0)
    train(model(), data, args=args, config=CFG, log=lambda _m: None)
    return args


def _write_rows(folder, rows, *, prefix="r", maxcount=5):
    from geko_data.shards import write_shards

    write_shards(({"__key__": f"{prefix}{i:03d}", "json": json.dumps(r).encode()} for i, r in enumerate(rows)),
                 str(folder / "s-%03d.tar"), maxcount=maxcount)
    return folder


def test_resume_with_a_state_file_of_other_shards_is_refused(tmp_path):
    from crash_job import CFG, model, rows

    from geko_data.train import train
    from geko_data.train.checkpoint import find_latest

    mine = _write_rows(tmp_path / "mine", rows(12, seed=0))
    other = _write_rows(tmp_path / "other", rows(12, seed=1), prefix="o", maxcount=4)  # as many, other ones
    args = _trained_checkpoint(tmp_path / "out", str(mine))
    assert SampleState.load(os.path.join(find_latest(args.output_dir), "state.arrow")).fingerprint
    with pytest.raises(ValueError, match="other shards|fingerprint"):
        train(model(), str(other), args=args, config=CFG, resume_from=args.output_dir, log=lambda _m: None)


@pytest.mark.parametrize("field,value", [("world_size", 2), ("num_samples", 13), ("seed", 7)])
def test_resume_with_another_world_size_is_refused(tmp_path, field, value):
    # A checkpoint a 2-rank run wrote (its data_state says so) is refused by a 1-process resume, naming
    # the field and both values; so are another data size and another seed.
    from crash_job import CFG, model, rows

    from geko_data.train import train
    from geko_data.train.checkpoint import find_latest, write_manifest

    args = _trained_checkpoint(tmp_path / "out", rows(12))
    ds_path = os.path.join(find_latest(args.output_dir), "data_state.json")
    with open(ds_path) as f:
        data_state = json.load(f)
    data_state[field] = value
    with open(ds_path, "w") as f:
        json.dump(data_state, f)
    # re-seal the manifest (it refuses any edited file, test_checkpoint.py): the data-level check is tested here
    with open(os.path.join(os.path.dirname(ds_path), "manifest.json")) as f:
        manifest = json.load(f)
    write_manifest(os.path.dirname(ds_path), **{k: manifest[k] for k in ("step", "seed", "fingerprint")})
    with pytest.raises(ValueError, match=field) as err:
        train(model(), rows(12), args=args, config=CFG, resume_from=args.output_dir, log=lambda _m: None)
    assert str(value) in str(err.value)
