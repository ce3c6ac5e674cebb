"""GEKOTrainer / GEKOSFTTrainer: real transformers and TRL trainers on a tiny Llama built from a config."""

import gc
import json
import math
import multiprocessing
import os
import subprocess
import sys
import time
import warnings
import weakref

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import tiny  # noqa: E402
from servers import s3_server  # noqa: E402,F401 - fixture
from geko_data import GEKOConfig  # noqa: E402
from geko_data.batches import epoch_batch_size  # noqa: E402
from geko_data.integrations.hf import GEKOTrainer  # noqa: E402
from geko_data.train.collate import pad_collate  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# Thresholds a tiny model reaches in a few epochs: samples freeze and the epochs really shrink.
EASY = GEKOConfig(freeze_confidence=0.6, freeze_quality=0.5, log_bucket_stats=False)


def make_args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=1,
                save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=1)
    base.update(kw)
    return TrainingArguments(**base)


def _shrinking(out, **kw):
    trainer = tiny.recording_trainer(GEKOTrainer)(
        model=tiny.tiny_llama(), args=make_args(out, num_train_epochs=5, gradient_accumulation_steps=2,
                                                warmup_steps=3),
        train_dataset=tiny.hf_dataset(96, extra_column=True), data_collator=pad_collate,
        geko_config=EASY.replace(freeze_confidence=None), **kw)
    assert trainer.args.remove_unused_columns  # the default, which dropped __index__ before
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def shrinking_run(tmp_path_factory):
    """5 epochs of 96 rows, accumulation 2, warmup, the default remove_unused_columns=True and a column the
    model does not take: epochs shrink as samples freeze (the default freeze rule, the easiest half of the right
    answers: with flat weights in 5-epoch runs an epoch is shorter only by what froze)."""
    return _shrinking(tmp_path_factory.mktemp("shrink"))


@pytest.mark.timeout(120)
def test_every_epoch_trains_exactly_its_plan(shrinking_run):
    t = shrinking_run
    assert sorted(t.ids_by_epoch) == [0, 1, 2, 3, 4]
    lengths = []
    for epoch, ids in t.ids_by_epoch.items():
        tiny.assert_trains_plan(t.plans[epoch], ids)
        lengths.append(len(ids))
    assert min(lengths) < 96, lengths  # samples froze: later epochs are shorter than the first


def _assert_schedule_ends_with_training(t, expected_steps):
    assert t.state.global_step == expected_steps == len(t.lrs)
    assert t.lrs[-1] == 0.0  # linear decay reaches its final value at the last step, not before or after
    assert t.lrs[-2] > 0.0
    after_warmup = t.lrs[3:]
    assert all(a >= b for a, b in zip(after_warmup, after_warmup[1:]))
    assert t.lrs[0] < t.lrs[1] < t.lrs[2]  # warmup in steps


@pytest.mark.timeout(120)
def test_shrunk_epochs_keep_a_full_epochs_steps_in_smaller_batches(shrinking_run):
    t = shrinking_run
    for epoch, sizes in t.batch_sizes.items():
        size = epoch_batch_size(len(t.ids_by_epoch[epoch]), steps=12, batch_size=8, min_batch=4)
        assert sizes[:-1] == [size] * (len(sizes) - 1) and 0 < sizes[-1] <= size
    assert min(s[0] for s in t.batch_sizes.values()) < 8  # an epoch that shrank trained smaller batches
    # about 12 batches an epoch (fewer when whole batch sizes do not divide it), accumulation 2: about 6
    # optimizer steps an epoch, whatever froze
    _assert_schedule_ends_with_training(t, sum(math.ceil(len(s) / 2) for s in t.batch_sizes.values()))
    # every batch of the cut trained: ceil(n / batch size) of them (12 at most; 10 for 49 samples in 5s)
    for epoch, sizes in t.batch_sizes.items():
        assert len(sizes) == -(-len(t.ids_by_epoch[epoch]) // sizes[0]) <= 12


@pytest.mark.timeout(180)
def test_fixed_batches_size_each_epoch_from_its_own_length(tmp_path):
    t = _shrinking(tmp_path, geko_batches="fixed")
    assert all(sizes[:-1] == [8] * (len(sizes) - 1) for sizes in t.batch_sizes.values())
    # Each epoch's optimizer steps from its own length (the Trainer sized every epoch like the first).
    expected = sum(math.ceil(math.ceil(len(ids) / 8) / 2) for ids in t.ids_by_epoch.values())
    assert expected < 5 * 6
    _assert_schedule_ends_with_training(t, expected)
    with pytest.raises(ValueError, match="`geko_batches` must be one of steps, fixed, got 'none'"):
        GEKOTrainer(model=tiny.tiny_llama(), args=make_args(tmp_path), train_dataset=tiny.hf_dataset(8),
                    data_collator=pad_collate, geko_batches="none")


@pytest.mark.timeout(120)
def test_log_history_carries_geko_metrics_per_epoch(shrinking_run):
    logs = [h for h in shrinking_run.state.log_history if "geko/freeze_share" in h]
    assert [h["epoch"] for h in logs] == [1.0, 2.0, 3.0, 4.0, 5.0]
    last = logs[-1]
    for key in ("geko/light_share", "geko/focus_share", "geko/hard_share", "geko/pruned_share",
                "geko/passes_saved", "geko/forgetting_events", "geko/sample_passes", "geko/uniform_passes"):
        assert key in last
    assert last["geko/uniform_passes"] == 5 * 96
    assert last["geko/sample_passes"] == sum(len(v) for v in shrinking_run.ids_by_epoch.values())
    assert last["geko/passes_saved"] == pytest.approx(1 - last["geko/sample_passes"] / (5 * 96))


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True


def _run(out, *, stop=None, resume=None, workers=0, batch=4, batches="steps", epochs=3, accumulation=2,
         fingerprint=None):
    loader = {"dataloader_num_workers": workers, "dataloader_persistent_workers": True} if workers else {}
    args = make_args(out, num_train_epochs=epochs, per_device_train_batch_size=batch,
                     gradient_accumulation_steps=accumulation,
                     warmup_steps=2, save_strategy="no", **loader)
    # With dropout, training draws from torch's RNG: a resume must restore it where the cut run stood (it was
    # restored at the epoch's start, before the DataLoader drew its seed, and the weights differed mid-epoch).
    trainer = tiny.recording_trainer(GEKOTrainer)(
        model=tiny.tiny_llama(dropout=0.1), args=args, train_dataset=tiny.hf_dataset(40), data_collator=pad_collate,
        geko_config=EASY, callbacks=[StopAt(stop)] if stop else None, geko_batches=batches,
        geko_fingerprint=fingerprint)
    trainer.train(resume_from_checkpoint=resume)
    ids = [i for e in sorted(trainer.ids_by_epoch) for i in trainer.ids_by_epoch[e]]
    return trainer, ids


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("full"))


@pytest.mark.timeout(150)
@pytest.mark.parametrize("stop", [7, 5])  # 7: mid epoch 1; 5: the end of epoch 0 (5 steps of 8 samples)
def test_stop_and_resume_from_checkpoint_continues_exactly(tmp_path, full_run, stop):
    full, full_ids = full_run
    first, first_ids = _run(tmp_path / "cut", stop=stop)
    assert first.state.global_step == stop
    ckpt = tmp_path / "cut" / f"checkpoint-{stop}"
    assert (ckpt / "geko_state.arrow").exists() and (ckpt / "geko_sampler.json").exists()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        resumed, rest_ids = _run(tmp_path / "cut", resume=str(ckpt))
    assert not [w for w in record if "GEKO epoch" in str(w.message)]  # no false coverage alarm on resume
    assert first_ids + rest_ids == full_ids  # the same sample ids in the same order
    assert tiny.state_digest(resumed.geko_state) == tiny.state_digest(full.geko_state)
    assert resumed.state.global_step == full.state.global_step
    assert resumed.lrs[-1] == full.lrs[-1] == 0.0
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


@pytest.mark.timeout(180)
def test_an_end_of_epoch_resume_with_persistent_workers_continues_exactly(tmp_path):
    # The uninterrupted run keeps its worker iterator across epochs and draws no new base seed at the
    # epoch's end; the resumed process makes its first iterator after the RNG restore, which shifted every
    # later dropout mask (22 other draws in epoch 2, weights apart) until the restore was deferred.
    full, full_ids = _run(tmp_path / "full", workers=2)
    first, first_ids = _run(tmp_path / "cut", stop=5, workers=2)
    resumed, rest_ids = _run(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-5"), workers=2)
    assert first_ids + rest_ids == full_ids
    assert tiny.state_digest(resumed.geko_state) == tiny.state_digest(full.geko_state)
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def _persistent_workers_teardown(cls, out, **kw):
    """Train ``cls`` with 2 persistent DataLoader workers and drop it: (whether reference counting alone freed
    the trainer, the seconds until ``del`` + ``gc.collect()`` had stopped its workers)."""
    before = set(multiprocessing.active_children())
    trainer = cls(model=tiny.tiny_llama(), args=make_args(out, num_train_epochs=2, per_device_train_batch_size=4,
                                                          dataloader_num_workers=2,
                                                          dataloader_persistent_workers=True),
                  train_dataset=tiny.hf_dataset(16), data_collator=pad_collate, **kw)
    trainer.train()
    workers = [p for p in multiprocessing.active_children() if p not in before]
    assert len(workers) == 2 and all(p.is_alive() for p in workers)  # kept alive across the epochs
    freed = weakref.ref(trainer)
    gc.collect()  # earlier garbage, not this trainer's
    start = time.perf_counter()
    gc.disable()
    try:
        del trainer
        by_refcount = freed() is None
    finally:
        gc.enable()
    gc.collect()
    seconds = time.perf_counter() - start
    assert not any(p.is_alive() for p in workers)  # torch's shutdown joins (or kills) them
    return by_refcount, seconds


@pytest.mark.timeout(90)
def test_persistent_workers_stop_at_once_when_the_trainer_goes(tmp_path):
    # The LR schedule's closure held the trainer (trainer -> lr_scheduler -> trainer), so only the cyclic GC
    # freed it, and that ran the finalizers of the workers' index queues (ending their feeder threads) before
    # the DataLoader iterator's __del__ sent the workers their stop signal: it never reached them, each worker
    # join waited out torch's 5 s timeout before the worker was killed, 10.4 s for 2 workers against 0.3 s for
    # a plain Trainer (and a later test paid it for every trainer whenever the GC ran).
    from torch.utils.data._utils import MP_STATUS_CHECK_INTERVAL

    plain, plain_seconds = _persistent_workers_teardown(Trainer, tmp_path / "plain")
    assert plain  # the control: a plain Trainer is freed as soon as it is dropped
    by_refcount, seconds = _persistent_workers_teardown(GEKOTrainer, tmp_path / "geko", geko_config=EASY)
    assert by_refcount, "the GEKOTrainer is in a reference cycle: only the cyclic GC frees it and its workers"
    # A worker that missed its stop signal costs one join timeout, whatever the machine's speed.
    assert seconds < MP_STATUS_CHECK_INTERVAL, (seconds, plain_seconds)


@pytest.mark.timeout(60)
def test_resume_from_a_checkpoint_without_geko_state_is_refused(tmp_path):
    _, _ = _run(tmp_path / "cut", stop=2)
    ckpt = tmp_path / "cut" / "checkpoint-2"
    os.remove(ckpt / "geko_state.arrow")
    with pytest.raises(FileNotFoundError, match="geko_state.arrow"):
        _run(tmp_path / "cut", resume=str(ckpt))


@pytest.mark.timeout(90)
def test_a_resume_on_other_data_is_refused_by_geko_fingerprint(tmp_path):
    # Without geko_fingerprint= a checkpoint of other data of the same size resumed silently, its per-sample
    # state applied to samples it was never measured on.
    from geko_data.state import FingerprintError

    _run(tmp_path / "cut", stop=3, fingerprint="rows-v1")
    ckpt = str(tmp_path / "cut" / "checkpoint-3")
    with pytest.raises(FingerprintError, match=r"resume_from_checkpoint '.*checkpoint-3' holds GEKO state written for "
                                              r"other data \(its fingerprint is 'rows-v1', this run's `geko_fingerprint` "
                                              r"is 'rows-v2'\)"):
        _run(tmp_path / "cut", resume=ckpt, fingerprint="rows-v2")
    resumed, _ = _run(tmp_path / "cut", resume=ckpt, fingerprint="rows-v1")
    assert resumed.geko_state.fingerprint == "rows-v1"
    with pytest.raises(ValueError, match=r"`geko_fingerprint` must be a non-empty str or None, got 3"):
        _run(tmp_path / "bad", fingerprint=3)


@pytest.mark.timeout(90)
def test_a_resume_that_cuts_epochs_otherwise_or_extends_the_run_is_refused_naming_both_values(tmp_path):
    # It ran, training other samples than the run that wrote the checkpoint (another batch size) or another
    # plan (fixed batches instead of steps kept).
    _run(tmp_path / "cut", stop=3)
    ckpt = str(tmp_path / "cut" / "checkpoint-3")
    with pytest.raises(ValueError, match=r"`per_device_train_batch_size` 2 \(the checkpoint's: 4\)"):
        _run(tmp_path / "cut", resume=ckpt, batch=2)
    with pytest.raises(ValueError, match=r"`geko_batches` 'fixed' \(the checkpoint's: 'steps'\)"):
        _run(tmp_path / "cut", resume=ckpt, batches="fixed")
    with pytest.raises(ValueError, match=r"`gradient_accumulation_steps` 1 \(the checkpoint's: 2\)"):
        _run(tmp_path / "cut", resume=ckpt, accumulation=1)  # it took other steps (68 of 108 in a trial)
    for epochs in (4, 2):
        with pytest.raises(ValueError, match=rf"planned for 3 epochs.*`num_train_epochs` {epochs}.*cannot change "
                                             rf"its length"):
            _run(tmp_path / "cut", resume=ckpt, epochs=epochs)


@pytest.mark.timeout(60)
def test_an_iterable_dataset_is_refused_naming_what_geko_needs(tmp_path):
    import datasets

    stream = tiny.hf_dataset(8).to_iterable_dataset()
    assert isinstance(stream, datasets.IterableDataset)
    with pytest.raises(TypeError, match=r"`train_dataset` must be a map-style dataset .*got IterableDataset.*ShardDataset"):
        GEKOTrainer(model=tiny.tiny_llama(), args=make_args(tmp_path), train_dataset=stream,
                    data_collator=pad_collate)


@pytest.mark.timeout(60)
def test_max_steps_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="`max_steps` must be -1.*num_train_epochs"):
        GEKOTrainer(model=tiny.tiny_llama(), args=make_args(tmp_path, max_steps=10),
                    train_dataset=tiny.hf_dataset(8), data_collator=pad_collate)
    with pytest.raises(ValueError, match="`num_train_epochs` must be a whole number"):
        GEKOTrainer(model=tiny.tiny_llama(), args=make_args(tmp_path, num_train_epochs=2.5),
                    train_dataset=tiny.hf_dataset(8), data_collator=pad_collate)
    with pytest.raises(ValueError, match="`geko_epoch_length` must be None or an int >= 1, got 0"):
        GEKOTrainer(model=tiny.tiny_llama(), args=make_args(tmp_path), train_dataset=tiny.hf_dataset(8),
                    data_collator=pad_collate, geko_epoch_length=0)


@pytest.mark.timeout(60)
def test_forward_only_rechecks_skip_backward(tmp_path):
    """A state where every sample is frozen: the epoch is re-checks at weight 0, run without a backward."""
    trainer = GEKOTrainer(model=tiny.tiny_llama(), args=make_args(tmp_path, num_train_epochs=1),
                          train_dataset=tiny.hf_dataset(16), data_collator=pad_collate,
                          geko_config=GEKOConfig(recheck_frozen=1.0, anneal=0.0, log_bucket_stats=False,
                                                     short_run_keep=None))
    calls = []
    original = trainer.accelerator.backward
    trainer.accelerator.backward = lambda loss, **kw: (calls.append(1), original(loss, **kw))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    loader = trainer.get_train_dataloader()
    sampler = trainer.geko_sampler
    import numpy as np

    from geko_data import policy
    sampler.set_epoch(0)
    sampler.state.bucket[:] = policy.FREEZE  # as if every sample had been mastered
    sampler.state.plan = None
    sampler.set_epoch(0)  # re-plan epoch 0 from those buckets: re-checks only
    for batch in loader:
        trainer.training_step(trainer.model, batch)
    assert sampler.plan.loss_weight.max() == 0.0 and int(sampler.plan.counts.sum()) > 0
    assert calls == []  # no backward pass
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert int(np.sum(sampler.state.times_seen)) == int(sampler.plan.counts.sum())  # all reported


@pytest.mark.timeout(120)
def test_sft_trainer_builds_the_sampler_after_trl_drops_rows(tmp_path):
    pytest.importorskip("trl")
    import datasets
    from trl import SFTConfig

    from geko_data.integrations.hf import GEKOSFTTrainer

    tok = tiny.tiny_tokenizer()
    words = ["cat", "dog", "rain", "sun", "tax", "cake", "mud", "gold"] * 3
    raw = [{"prompt": f"is {w} good?", "completion": " yes" if i % 3 else " no"} for i, w in enumerate(words)]
    raw += [{"prompt": "x" * 60, "completion": " yes"}] * 3  # longer than max_length: TRL drops these rows
    args = SFTConfig(output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=8,
                     learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                     disable_tqdm=True, max_length=40)
    trainer = tiny.recording_trainer(GEKOSFTTrainer)(
        model=tiny.tiny_llama(vocab=len(tok)), args=args, train_dataset=datasets.Dataset.from_list(raw),
        processing_class=tok, geko_config=EASY)
    trainer.train()
    assert len(trainer.train_dataset) == 24 and trainer.geko_sampler.num_samples == 24
    assert sorted(trainer.ids_by_epoch[0]) == list(range(24))  # TRL's collator kept __index__
    answers = trainer.geko_sampler.state.answer  # causal_lm's hash of each completion's tokens
    yes = np.array([row["completion"] == " yes" for row in raw[:24]])
    assert len(set(answers[yes].tolist())) == 1 and len(set(answers[~yes].tolist())) == 1
    assert answers[yes][0] != answers[~yes][0]
    assert sum(1 for h in trainer.state.log_history if "geko/passes_saved" in h) == 2
    assert trainer.lrs[-1] == 0.0


@pytest.mark.timeout(60)
def test_sft_trainer_with_every_row_dropped_by_truncation_says_so(tmp_path):
    pytest.importorskip("trl")
    import datasets
    from trl import SFTConfig

    from geko_data.integrations.hf import GEKOSFTTrainer

    tok = tiny.tiny_tokenizer()
    raw = [{"prompt": "x" * 60, "completion": " yes"}] * 4  # every row longer than max_length
    args = SFTConfig(output_dir=str(tmp_path), num_train_epochs=1, per_device_train_batch_size=2, save_strategy="no",
                     report_to=[], use_cpu=True, disable_tqdm=True, max_length=40)
    trainer = GEKOSFTTrainer(model=tiny.tiny_llama(vocab=len(tok)), args=args,
                             train_dataset=datasets.Dataset.from_list(raw), processing_class=tok)
    # The sampler's own error named its argument: `data_source` must hold at least 1 sample, got 0.
    with pytest.raises(ValueError, match=r"`train_dataset` has no rows left to train on \(TRL drops.*max_length"):
        trainer.train()


def _hf_ddp(out, *extra):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", os.path.join(HERE, "hf_ddp_job.py"),
                           str(out), *extra], capture_output=True, text=True, timeout=140,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.load(open(out / f"rank{r}.json")) for r in (0, 1)]


@pytest.fixture(scope="module")
def hf_ddp(tmp_path_factory):
    return _hf_ddp(tmp_path_factory.mktemp("hf_ddp"))


@pytest.mark.timeout(150)
def test_torchrun_ddp_each_rank_trains_its_full_share(hf_ddp):
    r0, r1 = hf_ddp
    assert r0["world"] == 2 and r0["state"] == r1["state"] and r0["steps"] == r1["steps"]
    assert r0["lrs"] == r1["lrs"] and r0["lrs"][-1] == 0.0
    assert sorted(r0["ids"]) == ["0", "1", "2"]
    # An epoch kept its steps in batches smaller than 8 (accelerate's wrapper dropped such batches but the
    # last: most of the epoch went untrained).
    assert any(min(sizes[:-1], default=8) < 8 for sizes in r0["batch_sizes"].values()), r0["batch_sizes"]
    for epoch, plan in r0["plans"].items():
        assert r1["plans"][epoch] == plan
        a, b = r0["ids"][epoch], r1["ids"][epoch]
        assert len(a) == len(b) == -(-sum(plan) // 2)  # each rank its equal half (accelerate took half of it)
        tiny.assert_trains_plan(plan, a + b, world=2)  # every draw of the plan, exactly once


@pytest.mark.timeout(180)
def test_trainer_reads_shards_from_s3_through_a_shard_dataset(s3_server, tmp_path):
    # Shards in an object store, read by the Trainer's DataLoader workers through ShardDataset: every draw of
    # every epoch's plan is trained, and the state knows the data by the index's fingerprint (no argument).
    import uuid

    from geko_data.dataset import ShardDataset
    from geko_data.remote_index import index_remote
    from geko_data.shards import write_shards
    from geko_data.train.collate import decode_json

    rows = tiny.rows(64)
    folder = tmp_path / "shards"
    folder.mkdir()
    write_shards([{"__key__": f"{i:05d}", "json": json.dumps(r)} for i, r in enumerate(rows)],
                 str(folder / "shard-%03d.tar"), maxcount=20)
    prefix, fs = f"geko/{uuid.uuid4().hex[:8]}", s3_server.filesystem()
    for p in sorted(folder.glob("*.tar")):
        fs.put_file(str(p), f"{prefix}/{p.name}")
    url = f"s3://{prefix}/"
    index_remote([url], output=url + "index.arrow", storage_options=s3_server.storage_options, progress=False)
    data = ShardDataset(url, decode=decode_json, storage_options=s3_server.storage_options)
    trainer = tiny.recording_trainer(GEKOTrainer)(
        model=tiny.tiny_llama(), args=make_args(tmp_path / "out", num_train_epochs=5, dataloader_num_workers=2),
        train_dataset=data, data_collator=pad_collate, geko_config=EASY.replace(freeze_confidence=None))
    trainer.train()
    assert sorted(trainer.plans) == [0, 1, 2, 3, 4] and sum(trainer.plans[4]) < 64  # samples froze: epochs shrank
    for epoch, plan in trainer.plans.items():
        tiny.assert_trains_plan(plan, trainer.ids_by_epoch[epoch])
    assert trainer.geko_sampler.state.fingerprint == data.fingerprint


@pytest.mark.timeout(60)
def test_sft_trainer_given_shards_says_to_use_gekotrainer(shards):
    # TRL's own refusal named the type only: "`train_dataset` must be a `Dataset` or `IterableDataset`, got
    # `ShardDataset`."
    from trl import SFTConfig

    from geko_data.dataset import ShardDataset
    from geko_data.integrations.hf import GEKOSFTTrainer

    args = SFTConfig(output_dir=str(shards / "out"), report_to=[], use_cpu=True)
    with pytest.raises(TypeError, match=r"Hugging Face `datasets.Dataset` for TRL's SFTTrainer .*got ShardDataset; "
                                        r"for WebDataset shards use GEKOTrainer"):
        GEKOSFTTrainer(model=tiny.tiny_llama(), args=args, train_dataset=ShardDataset(str(shards)))


@pytest.mark.timeout(150)
def test_torchrun_ddp_over_shards_trains_what_the_same_rows_in_memory_train(hf_ddp, tmp_path):
    # The same 160 rows as json shards, read through ShardDataset by one DataLoader worker a rank: the same ids
    # per rank and epoch, steps and final state as the run over the rows in memory.
    from geko_data.shards import write_shards

    write_shards([{"__key__": f"{i:05d}", "json": json.dumps(r)} for i, r in enumerate(tiny.rows(160))],
                 str(tmp_path / "shards" / "shard-%03d.tar"), maxcount=50)
    r0, r1 = _hf_ddp(tmp_path, str(tmp_path / "shards"))
    m0, m1 = hf_ddp
    assert (r0["ids"], r1["ids"], r0["steps"]) == (m0["ids"], m1["ids"], m0["steps"])
    assert r0["state"] == r1["state"] == m0["state"]
