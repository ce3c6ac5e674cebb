"""GEKOCallback in real Lightning fits: one process, and 2 processes under torchrun with Lightning's defaults."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lightning")

import lightning_job  # noqa: E402
import tiny  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from geko_data.batches import epoch_batch_size  # noqa: E402
from geko_data.integrations.lightning import GEKOCallback  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 64 // lightning_job.BATCH  # optimizer steps of a full epoch in one process


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """3 epochs uninterrupted, the callback's default: epochs keep their steps; 2 persistent DataLoader workers
    (the runs compared with it have none)."""
    return lightning_job.run(str(tmp_path_factory.mktemp("fit")), "callback", workers=2)


@pytest.fixture(scope="module")
def fitted_fixed(tmp_path_factory):
    return lightning_job.run(str(tmp_path_factory.mktemp("fixed")), "fixed")


@pytest.mark.timeout(90)
def test_callback_trains_the_plan_and_logs_geko_metrics(fitted):
    trainer, module, geko = fitted
    assert sorted(module.ids[0]) == list(range(64))  # epoch 0: every sample once
    for epoch, plan in module.plans.items():
        tiny.assert_trains_plan(plan, module.ids[epoch])
    assert len(module.ids[max(module.ids)]) < 64  # samples froze
    labels = np.array([int(row["y"]) for row in lightning_job.dataset()])  # "answer" reaches the state
    np.testing.assert_array_equal(geko.sampler.state.answer, labels)
    m = trainer.logged_metrics
    assert float(m["geko/sample_passes"]) == sum(len(v) for v in module.ids.values())
    for key in ("geko/freeze_share", "geko/hard_share", "geko/passes_saved", "geko/forgetting_events"):
        assert key in m


@pytest.mark.timeout(60)
def test_steps_epochs_take_a_full_epochs_optimizer_steps_while_their_draws_shrink(fitted):
    trainer, module, geko = fitted
    draws = [sum(module.sizes[e]) for e in sorted(module.sizes)]
    assert draws[0] == 64 and draws[0] > draws[1] > draws[2]  # samples froze and were skipped
    assert [len(module.sizes[e]) for e in sorted(module.sizes)] == [STEPS] * 3  # but no step was lost
    assert trainer.global_step == 3 * STEPS
    for e, sizes in module.sizes.items():
        size = epoch_batch_size(sum(sizes), steps=STEPS, batch_size=lightning_job.BATCH, min_batch=4)
        assert sizes[:-1] == [size] * (len(sizes) - 1) and 0 < sizes[-1] <= size, (e, sizes)
    assert geko.sampler.keeps_steps  # planned with the kept-steps short-run rule from epoch 0


@pytest.mark.timeout(60)
def test_fixed_batches_keep_batch_size_and_take_fewer_steps(fitted_fixed):
    trainer, module, geko = fitted_fixed
    assert not geko.sampler.keeps_steps
    loader = trainer.train_dataloader
    assert loader.batch_size == lightning_job.BATCH and loader.sampler is geko.sampler  # no batch sampler
    for epoch, sizes in module.sizes.items():
        tiny.assert_trains_plan(module.plans[epoch], module.ids[epoch])
        assert sizes[:-1] == [lightning_job.BATCH] * (len(sizes) - 1)  # a DataLoader's batches
    assert len(module.sizes[2]) < STEPS  # the skipped samples took their steps with them


@pytest.mark.timeout(60)
def test_callback_state_round_trips_through_a_checkpoint_dict(fitted):
    trainer, _, geko = fitted
    sd = geko.state_dict()
    assert isinstance(sd["state_arrow"], bytes) and sd["sampler"]["kind"] == "GEKOSampler"
    again = GEKOCallback(lightning_job.dataset(), config=lightning_job.EASY, seed=2)
    again.load_state_dict(sd)  # before setup, as Lightning restores callbacks
    again.setup(trainer, None, "fit")
    assert tiny.state_digest(again.sampler.state) == tiny.state_digest(geko.sampler.state)
    with pytest.raises(ValueError, match="lacks the SampleState"):
        again.load_state_dict({"sampler": sd["sampler"]})


def _assert_resumed_run_equals_the_full_one(module, geko, full_module, full_geko, epochs):
    assert sorted(module.ids) == epochs and all(module.ids[e] == full_module.ids[e] for e in epochs)
    assert tiny.state_digest(geko.sampler.state) == tiny.state_digest(full_geko.sampler.state)
    assert all(torch.equal(a, b) for a, b in zip(module.parameters(), full_module.parameters()))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode,workers", [("callback", 0), ("callback", 2), ("fixed", 0), ("fixed", 2)])
def test_fit_resumed_from_a_lightning_checkpoint_continues_exactly(tmp_path, mode, workers, request):
    _, full_module, full_geko = request.getfixturevalue("fitted" if mode == "callback" else "fitted_fixed")
    lightning_job.run(str(tmp_path), mode, epochs=2, checkpoint=True, total_epochs=3)  # stops early
    (ckpt,) = (tmp_path / "checkpoints").iterdir()  # saved at the end of epoch 1
    # Same planned epochs (3) as the full run, continued from the checkpoint. With workers, Lightning makes the
    # loader's iterator before it moves the sampler to epoch 2: epoch 1's draws must not be loaded again.
    trainer, module, geko = lightning_job.run(str(tmp_path), mode, epochs=3, ckpt_path=str(ckpt), workers=workers)
    _assert_resumed_run_equals_the_full_one(module, geko, full_module, full_geko, [2])


@pytest.mark.timeout(120)
def test_steps_fit_resumed_from_a_step_checkpoint_on_an_epochs_last_batch_continues_exactly(tmp_path, fitted):
    _, full_module, full_geko = fitted
    # A checkpoint every epoch's steps lands on the last batch of epochs 0 and 1 (saved at the batch's end).
    lightning_job.run(str(tmp_path), "callback", checkpoint=STEPS, max_steps=2 * STEPS, total_epochs=3)
    first, second = sorted((tmp_path / "checkpoints").iterdir())  # epoch=0-step=8, epoch=1-step=16
    assert "step=%d" % STEPS in first.name and "step=%d" % (2 * STEPS) in second.name
    for ckpt, epochs in ((first, [1, 2]), (second, [2])):
        _, module, geko = lightning_job.run(str(tmp_path / ckpt.stem), "callback", ckpt_path=str(ckpt), workers=2)
        _assert_resumed_run_equals_the_full_one(module, geko, full_module, full_geko, epochs)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["callback", "fixed"])
def test_fit_resumed_after_an_epoch_that_took_fewer_steps_continues_exactly(tmp_path, mode):
    # An epoch of few draws takes fewer batches than the loader's length (a full epoch's): Lightning cannot tell
    # its last batch from a middle one, and resumes a checkpoint saved there in the middle of that spent epoch.
    # The resumed loader must stay a full epoch long: the last epoch trains every sample again.
    config = lightning_job.EASY_DDP  # freezes enough in one process for epoch 1 to take 7 steps (fixed: 6)
    _, full_module, full_geko = lightning_job.run(str(tmp_path / "full"), mode, epochs=5, config=config)
    cut = STEPS + len(full_module.sizes[1])
    assert cut < 2 * STEPS and len(full_module.sizes[4]) == STEPS
    lightning_job.run(str(tmp_path), mode, epochs=5, checkpoint=cut, max_steps=cut, config=config,
                      total_epochs=5)
    (ckpt,) = (tmp_path / "checkpoints").iterdir()
    _, module, geko = lightning_job.run(str(tmp_path), mode, epochs=5, ckpt_path=str(ckpt), config=config,
                                        workers=2)
    assert 1 not in module.ids  # the spent epoch's rest: nothing
    _assert_resumed_run_equals_the_full_one(module, geko, full_module, full_geko, [2, 3, 4])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2])
def test_steps_fit_resumed_mid_epoch_continues_exactly(tmp_path, fitted, recwarn, workers):
    _, full_module, full_geko = fitted  # 3 epochs uninterrupted
    # Stopped after 11 optimizer steps, 3 batches into epoch 1, with a checkpoint there.
    _, cut, _ = lightning_job.run(str(tmp_path), "callback", checkpoint=11, max_steps=11, total_epochs=3)
    (ckpt,) = (tmp_path / "checkpoints").iterdir()
    saved = torch.load(ckpt, weights_only=True)["callbacks"]["GEKOCallback"]["sampler"]
    # Lightning saves between batches: the position is the 3 batches trained, a batch boundary.
    assert (saved["epoch"], saved["position"]) == (1, sum(full_module.sizes[1][:3]))
    trainer, module, geko = lightning_job.run(str(tmp_path), "callback", ckpt_path=str(ckpt), workers=workers)
    assert cut.ids[1] + module.ids[1] == full_module.ids[1]  # the rest of epoch 1, nothing twice or lost
    assert module.sizes[1] == full_module.sizes[1][3:] and module.ids[2] == full_module.ids[2]
    assert trainer.global_step == 3 * STEPS
    assert tiny.state_digest(geko.sampler.state) == tiny.state_digest(full_geko.sampler.state)
    # The loader counts as resumable: no advice that the resume may be unreliable.
    assert not [w for w in recwarn if "not resumable" in str(w.message)]


@pytest.mark.timeout(60)
def test_a_steps_position_inside_a_batch_is_refused(fitted):
    trainer, _, geko = fitted
    sd = geko.state_dict()
    sd["sampler"] = geko.sampler.state_dict(consumed=3)  # epoch 2's batches hold 5
    again = GEKOCallback(lightning_job.dataset(), config=lightning_job.EASY, seed=2)
    again.load_state_dict(sd)
    again.setup(trainer, None, "fit")
    with pytest.raises(ValueError, match="draw 3 of .* inside a batch"):
        len(again.dataloader(batch_size=lightning_job.BATCH))


@pytest.mark.timeout(60)
def test_a_fixed_mid_epoch_checkpoint_is_refused_with_the_fix(fitted_fixed):
    # Lightning keeps the resumed epoch's shorter loader length for every later epoch, which would cut
    # them short silently: with fixed batches a checkpoint saved mid-epoch is refused instead.
    trainer, _, geko = fitted_fixed
    sd = geko.state_dict()
    sd["sampler"] = geko.sampler.state_dict(consumed=8)  # one batch into the epoch
    again = GEKOCallback(lightning_job.dataset(), config=lightning_job.EASY, seed=2, batches="fixed")
    again.load_state_dict(sd)
    with pytest.raises(RuntimeError, match="middle of epoch .* epoch's end.*batches='steps'"):
        again.setup(trainer, None, "fit")
    # ... and said when such a checkpoint is written (it was only at the resume), once
    geko._consumed, geko._warned_fixed = 8, False
    with pytest.warns(RuntimeWarning, match=r"written in the middle of epoch .* batches='fixed' cannot be resumed"):
        geko.state_dict()
    geko._consumed, geko._warned_fixed = 0, False
    geko.state_dict()  # at an epoch's start: nothing to say


class _BareLoss(lightning_job.Module):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx)["loss"]


@pytest.mark.timeout(60)
def test_a_bare_loss_from_training_step_is_refused_naming_what_lightning_passed_on(tmp_path):
    with pytest.raises(ValueError, match=r"per-sample losses.*got a dict with keys \['loss'\], which is how "
                                         r"Lightning passes on a bare loss tensor"):
        lightning_job.run(str(tmp_path), "callback", epochs=1, module_cls=_BareLoss)


class _MeanLoss(lightning_job.Module):
    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        return {**out, "per_sample_loss": out["per_sample_loss"].mean()}


class _FloatLoss(lightning_job.Module):
    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        return {**out, "per_sample_loss": out["per_sample_loss"].mean().item()}


@pytest.mark.timeout(60)
def test_a_reduced_per_sample_loss_is_refused_naming_it(tmp_path):
    # The sampler's error named its own argument (`losses` must be 1-D), not what the module returned.
    with pytest.raises(ValueError, match=r"`per_sample_loss` must hold one loss per sample of the batch, shape "
                                         r"\(8,\), got Tensor of shape \(\): .*reduction='none'"):
        lightning_job.run(str(tmp_path), "callback", epochs=1, module_cls=_MeanLoss)
    with pytest.raises(ValueError, match=r"got float of shape \(\)"):  # a loss.item(): len() raised TypeError
        lightning_job.run(str(tmp_path), "callback", epochs=1, module_cls=_FloatLoss)


@pytest.mark.timeout(60)
def test_a_run_cut_short_by_max_steps_without_a_planned_run_is_refused(tmp_path):
    # Planned from max_epochs and cut by max_steps, the report counted the draws cut off as compute saved.
    with pytest.raises(ValueError, match=r"`max_steps` must be -1 with GEKOCallback unless .*total_epochs=.*got 5"):
        lightning_job.run(str(tmp_path), "callback", epochs=2, max_steps=5)


@pytest.mark.timeout(120)
def test_a_fit_resumed_on_other_data_is_refused_by_its_fingerprint(tmp_path):
    # Without fingerprint= a checkpoint of other data of the same size resumed silently, its per-sample state
    # (frozen, hard, passes) applied to samples it was never measured on.
    from geko_data.state import FingerprintError

    _, cut, geko = lightning_job.run(str(tmp_path), "callback", checkpoint=11, max_steps=11, total_epochs=3,
                                     fingerprint="tweets-v1")
    assert geko.sampler.state.fingerprint == "tweets-v1"
    (ckpt,) = (tmp_path / "checkpoints").iterdir()
    with pytest.raises(FingerprintError, match=r"checkpoint '.*\.ckpt' holds GEKO state written for other data \(its "
                                              r"fingerprint is 'tweets-v1', this fit's `fingerprint=` is 'tweets-v2'\)"):
        lightning_job.run(str(tmp_path / "other"), "callback", ckpt_path=str(ckpt), fingerprint="tweets-v2")
    trainer, _, _ = lightning_job.run(str(tmp_path / "same"), "callback", ckpt_path=str(ckpt),
                                      fingerprint="tweets-v1")
    assert trainer.global_step == 3 * STEPS
    with pytest.raises(ValueError, match=r"`fingerprint` must be a non-empty str or None, got ''"):
        GEKOCallback(lightning_job.dataset(), fingerprint="")


@pytest.mark.timeout(120)
def test_a_fit_over_shards_resumed_on_other_shards_is_refused_without_a_fingerprint_argument(tmp_path):
    # A ShardDataset names its data by its index: a checkpoint of other shards of the same size is refused
    # without `fingerprint=` (it resumed silently when only the size was checked).
    from geko_data.state import FingerprintError

    data = lightning_job.shard_dataset(str(tmp_path / "a"))
    lightning_job.run(str(tmp_path), "callback", checkpoint=11, max_steps=11, total_epochs=3, data=data)
    (ckpt,) = (tmp_path / "checkpoints").iterdir()
    other = lightning_job.shard_dataset(str(tmp_path / "b"), prefix="b")
    with pytest.raises(FingerprintError, match=rf"its fingerprint is '{data.fingerprint}', the fingerprint of this "
                                               rf"run's shards \(their index, by ShardDataset\) is "
                                               rf"'{other.fingerprint}'"):
        lightning_job.run(str(tmp_path / "other"), "callback", ckpt_path=str(ckpt), data=other)
    trainer, _, _ = lightning_job.run(str(tmp_path / "same"), "callback", ckpt_path=str(ckpt), data=data)
    assert trainer.global_step == 3 * STEPS


@pytest.mark.timeout(60)
def test_an_unset_max_epochs_is_refused_unless_the_run_is_planned(tmp_path):
    # Lightning turns an unset max_epochs into 1000 with a warning; GEKO planned a 1000-epoch run, whose
    # annealing epochs (from epoch 875) a run stopped by hand or by EarlyStopping never reaches.
    with pytest.raises(ValueError, match=r"`max_epochs`, which is 1000: Lightning's value when it is not set.*"
                                         r"GEKOCallback\(total_epochs=1000\)"):
        lightning_job.run(str(tmp_path), "callback", epochs=None)


@pytest.mark.timeout(60)
def test_limit_train_batches_is_refused(tmp_path, monkeypatch):
    real = lightning_job.pl.Trainer

    def limited(*args, **kwargs):
        return real(*args, limit_train_batches=0.5, **kwargs)

    monkeypatch.setattr(lightning_job.pl, "Trainer", limited)
    with pytest.raises(ValueError, match=r"`limit_train_batches` must be 1.0 with GEKOCallback .*got 0.5"):
        lightning_job.run(str(tmp_path), "callback", epochs=1)
    # An int is a number of batches to Lightning: 1 trained one batch an epoch (1 == 1.0 let it through).
    for kwargs, match in (({"limit_train_batches": 1}, r"`limit_train_batches` must be 1.0 .*got 1$"),
                          ({"overfit_batches": 2}, r"`overfit_batches` must be 0 .*got 2")):
        monkeypatch.setattr(lightning_job.pl, "Trainer", lambda *a, kw=kwargs, **k: real(*a, **kw, **k))
        with pytest.raises(ValueError, match=match):
            lightning_job.run(str(tmp_path), "callback", epochs=1)


@pytest.mark.timeout(60)
def test_dataloader_before_setup_says_where_to_call_it():
    geko = GEKOCallback(lightning_job.dataset())
    with pytest.raises(RuntimeError, match="inside `train_dataloader\\(\\)`"):
        geko.dataloader(batch_size=4)


@pytest.mark.timeout(60)
def test_bad_batches_values_are_refused(fitted):
    with pytest.raises(ValueError, match="`batches` must be one of steps, fixed, got 'step'"):
        GEKOCallback(lightning_job.dataset(), batches="step")
    trainer, _, _ = fitted
    geko = GEKOCallback(lightning_job.dataset())
    geko.setup(trainer, None, "fit")
    with pytest.raises(ValueError, match="`batch_size` must be an int >= 1 with batches='steps'.*got None"):
        geko.dataloader(batch_size=None)


def _torchrun(tmp_path, modes):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", os.path.join(HERE, "lightning_job.py"),
                           str(tmp_path), modes], capture_output=True, text=True, timeout=140,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """2 processes: steps with Lightning's defaults, steps with use_distributed_sampler=False, fixed batches."""
    out = tmp_path_factory.mktemp("ddp")
    proc = _torchrun(out, "callback,nodist,fixed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {m: [json.load(open(out / f"rank{r}_{m}.json")) for r in (0, 1)] for m in ("callback", "nodist", "fixed")}
    return proc, runs


def _assert_ranks_train_the_plan_once(r0, r1):
    assert r0["world"] == 2 and r0["state"] == r1["state"]  # both ranks hold the same state
    assert sorted(r0["ids"]["0"] + r1["ids"]["0"]) == list(range(64))  # not half of it
    for epoch, plan in r0["plans"].items():
        assert r1["plans"][epoch] == plan
        tiny.assert_trains_plan(plan, r0["ids"][epoch] + r1["ids"][epoch], world=2)  # every draw once
        assert len(r0["sizes"][epoch]) == len(r1["sizes"][epoch])  # the same steps on both ranks
    assert r0["global_step"] == r1["global_step"]
    # every draw trained is counted, an odd epoch's repeated one too
    trained = sum(len(r["ids"][e]) for r in (r0, r1) for e in r["ids"])
    assert r0["metrics"]["geko/sample_passes"] == r1["metrics"]["geko/sample_passes"] == trained


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["callback", "nodist"])
def test_ddp_steps_each_rank_trains_its_share_in_a_full_epochs_steps(ddp, mode):
    # callback: Lightning's default use_distributed_sampler=True; nodist: use_distributed_sampler=False
    proc, runs = ddp
    r0, r1 = runs[mode]
    _assert_ranks_train_the_plan_once(r0, r1)
    steps = STEPS // 2  # a rank's share of a full epoch at the same batch size
    assert all(len(r["sizes"][e]) == steps for r in (r0, r1) for e in r["sizes"])
    # while the draws shrank, below what batches of BATCH take in as many steps
    assert min(sum(sizes) for sizes in r0["sizes"].values()) <= (steps - 1) * lightning_job.BATCH
    # every rank holds the same state: no advice to reduce the geko/ metrics across ranks (one per metric)
    assert "self.log('geko/" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.timeout(180)
def test_ddp_fixed_batches_each_rank_trains_its_share(ddp):
    _, runs = ddp
    r0, r1 = runs["fixed"]
    _assert_ranks_train_the_plan_once(r0, r1)
    for r in (r0, r1):
        for sizes in r["sizes"].values():
            assert sizes[:-1] == [lightning_job.BATCH] * (len(sizes) - 1)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork"])
def test_a_fit_in_child_processes_hands_its_state_back_to_the_main_process(tmp_path, ddp, strategy):
    # These strategies fit in processes the main one starts; its callback is only copied into them, so its
    # sampler stayed None after the fit and the run's per-sample state was lost with the children.
    trainer, _, geko = lightning_job.run(str(tmp_path), "callback", devices=2, strategy=strategy,
                                         config=lightning_job.EASY_DDP)
    assert trainer.world_size == 2 and geko.sampler is not None
    r0 = ddp[1]["callback"][0]  # the same fit under torchrun: its processes are the ranks
    assert tiny.state_digest(geko.sampler.state) == r0["state"]
    assert geko.sampler.efficiency_report()["sample_passes"] == r0["metrics"]["geko/sample_passes"]
    assert geko.sampler.epoch == 2 and not os.path.exists(geko._handover)  # read once, then removed
    assert GEKOCallback(lightning_job.dataset()).sampler is None  # nothing handed back: nothing there


@pytest.mark.timeout(240)
def test_a_fit_in_child_processes_after_one_in_process_hands_back_the_later_state(tmp_path, ddp):
    # The same callback fitted here, then under ddp_spawn: `sampler` stayed the first fit's (a review found it)
    import lightning as L

    geko = GEKOCallback(lightning_job.dataset(), config=lightning_job.EASY_DDP, seed=2)
    for devices, strategy in ((1, "auto"), (2, "ddp_spawn")):
        torch.manual_seed(0)
        L.Trainer(max_epochs=3, accelerator="cpu", devices=devices, strategy=strategy, callbacks=[geko], logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  default_root_dir=str(tmp_path)).fit(lightning_job.Module(None, geko))
        if devices == 1:
            first = geko.sampler
    assert geko.sampler is not first and geko.sampler.world.world_size == 2
    assert tiny.state_digest(geko.sampler.state) == ddp[1]["callback"][0]["state"]


@pytest.mark.timeout(120)
def test_a_fit_over_shards_trains_what_the_same_rows_in_memory_train(tmp_path, fitted):
    # The shards of the same 64 rows, read by 2 DataLoader workers through ShardDataset: the same draws,
    # batches and state as the fit over the rows in memory.
    data = lightning_job.shard_dataset(str(tmp_path / "shards"))
    _, module, geko = lightning_job.run(str(tmp_path), "callback", workers=2, data=data)
    _, memory, memory_geko = fitted
    assert module.ids == memory.ids and module.sizes == memory.sizes
    assert tiny.state_digest(geko.sampler.state) == tiny.state_digest(memory_geko.sampler.state)


@pytest.mark.timeout(150)
def test_ddp_plain_geko_sampler_wrapped_by_lightning_is_refused_with_the_fix(tmp_path):
    proc = _torchrun(tmp_path, "plain")
    assert proc.returncode != 0
    assert "DistributedSamplerWrapper" in proc.stderr and "return `geko.dataloader(...)`" in proc.stderr
    assert "`use_distributed_sampler=False` on the Trainer is the fix only for a plain GEKOSampler" in proc.stderr


@pytest.mark.timeout(120)
@pytest.mark.parametrize("batches", ["steps", "fixed"])
def test_every_epoch_is_validated_though_geko_epochs_take_fewer_batches(tmp_path, batches):
    # Lightning reads the loader's length once and validated only the epochs that took as many batches as the
    # first: with steps kept 2 of 5 epochs were, so EarlyStopping or a monitored checkpoint saw those only.
    import lightning as L
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    rows = [{"x": x[i], "y": int(x[i, 0] > 0)} for i in range(256)]
    geko = GEKOCallback(rows, batches=batches)
    validated, trained = [], {}

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(4, 2)

        def train_dataloader(self):
            return geko.dataloader(batch_size=16)

        def val_dataloader(self):
            return DataLoader(rows[:32], batch_size=32)

        def training_step(self, batch, batch_idx):
            trained[self.current_epoch] = trained.get(self.current_epoch, 0) + 1
            logits = self.net(batch["x"])
            losses = torch.nn.functional.cross_entropy(logits, batch["y"], reduction="none")
            p = logits.detach().softmax(-1)
            return {"loss": (losses * batch["__weight__"]).mean(), "per_sample_loss": losses.detach(),
                    "correct": p.argmax(-1) == batch["y"], "confidence": p.max(-1).values}

        def validation_step(self, batch, batch_idx):
            validated.append(self.current_epoch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    L.Trainer(max_epochs=5, callbacks=[geko], accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
              default_root_dir=str(tmp_path)).fit(Module())
    assert min(trained.values()) < trained[0]  # some epoch took fewer batches than the first
    assert validated == [0, 1, 2, 3, 4], (validated, trained)


@pytest.mark.timeout(60)
def test_fast_dev_run_and_an_iterable_dataset_say_what_to_do(tmp_path):
    # fast_dev_run was refused as "`max_steps` must be -1 ... got 1", an argument the user never set.
    import lightning as L

    geko = GEKOCallback([{"x": torch.zeros(2)}] * 8)
    trainer = L.Trainer(fast_dev_run=True, callbacks=[geko], accelerator="cpu", logger=False,
                        default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"`fast_dev_run` must be False with GEKOCallback \(it runs True batch"):
        geko.setup(trainer, None, "fit")
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(())

    with pytest.raises(TypeError, match=r"must be a map-style dataset .*got Stream; .*ShardDataset"):
        GEKOCallback(Stream())

    class SizedStream(Stream):  # as a GEKOStream: a length, and torch's __getitem__ that raises
        def __len__(self):
            return 8

    # It was accepted and failed at the first batch: "Subclasses of Dataset should implement __getitem__"
    with pytest.raises(TypeError, match=r"must be a map-style dataset .*got SizedStream; .*ShardDataset"):
        GEKOCallback(SizedStream())
