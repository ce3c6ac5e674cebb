"""GEKOCallback in real Lightning fits: one process, and 2 processes under torchrun with Lightning's defaults."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lightning")

import lightning_job  # noqa: E402
import tiny  # noqa: E402
from geko_data.integrations.lightning import GEKOCallback  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    return lightning_job.run(str(tmp_path_factory.mktemp("fit")), "callback")


@pytest.mark.timeout(90)
def test_callback_trains_the_plan_and_logs_geko_metrics(fitted):
    trainer, module, geko = fitted
    assert sorted(module.ids[0]) == list(range(64))  # epoch 0: every sample once
    last = max(module.ids)
    tiny.assert_trains_plan(geko.sampler.plan.counts.tolist(), module.ids[last])
    assert len(module.ids[last]) < 64  # samples froze
    m = trainer.logged_metrics
    assert float(m["geko/sample_passes"]) == sum(len(v) for v in module.ids.values())
    for key in ("geko/freeze_share", "geko/hard_share", "geko/passes_saved", "geko/forgetting_events"):
        assert key in m


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


@pytest.mark.timeout(120)
def test_fit_resumed_from_a_lightning_checkpoint_continues_exactly(tmp_path, fitted):
    _, full_module, full_geko = fitted  # 3 epochs uninterrupted
    lightning_job.run(str(tmp_path), "callback", epochs=2, checkpoint=True, total_epochs=3)  # stops early
    (ckpt,) = (tmp_path / "checkpoints").iterdir()  # saved at the end of epoch 1
    # Same planned epochs (3) as the full run, continued from the checkpoint.
    trainer, module, geko = lightning_job.run(str(tmp_path), "callback", epochs=3, ckpt_path=str(ckpt))
    assert sorted(module.ids) == [2] and module.ids[2] == full_module.ids[2]
    assert tiny.state_digest(geko.sampler.state) == tiny.state_digest(full_geko.sampler.state)


@pytest.mark.timeout(60)
def test_dataloader_before_setup_says_where_to_call_it():
    geko = GEKOCallback(lightning_job.dataset())
    with pytest.raises(RuntimeError, match="inside `train_dataloader\\(\\)`"):
        geko.dataloader(batch_size=4)


def _torchrun(tmp_path, mode):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", os.path.join(HERE, "lightning_job.py"),
                           str(tmp_path), mode], capture_output=True, text=True, timeout=140,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.timeout(150)
def test_ddp_with_lightning_defaults_each_rank_trains_its_share(tmp_path):
    proc = _torchrun(tmp_path, "callback")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # every rank holds the same state: no advice to reduce the geko/ metrics across ranks (one per metric)
    assert "self.log('geko/" not in proc.stderr, proc.stderr[-3000:]
    r0, r1 = (json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1))
    assert r0["world"] == 2 and r0["state"] == r1["state"]
    assert sorted(r0["ids"]["0"] + r1["ids"]["0"]) == list(range(64))  # not half of it
    for epoch in r0["ids"]:
        assert len(r0["ids"][epoch]) == len(r1["ids"][epoch])
    last = max(r0["ids"], key=int)
    tiny.assert_trains_plan(r0["plan"], r0["ids"][last] + r1["ids"][last], world=2)


@pytest.mark.timeout(150)
def test_ddp_plain_geko_sampler_wrapped_by_lightning_is_refused_with_the_fix(tmp_path):
    proc = _torchrun(tmp_path, "plain")
    assert proc.returncode != 0
    assert "DistributedSamplerWrapper" in proc.stderr and "use_distributed_sampler=False" in proc.stderr


@pytest.mark.timeout(60)
def test_a_mid_epoch_checkpoint_is_refused_with_the_fix(fitted):
    # Lightning keeps the resumed epoch's shorter loader length for every later epoch, which would cut
    # them short silently: a checkpoint saved mid-epoch is refused instead.
    trainer, _, geko = fitted
    sd = geko.state_dict()
    sd["sampler"] = geko.sampler.state_dict(consumed=8)  # one batch into the epoch
    again = GEKOCallback(lightning_job.dataset(), config=lightning_job.EASY, seed=2)
    again.load_state_dict(sd)
    with pytest.raises(RuntimeError, match="middle of epoch .* epoch's end"):
        again.setup(trainer, None, "fit")
