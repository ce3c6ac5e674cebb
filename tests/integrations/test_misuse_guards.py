"""Silent misuse made loud: an epoch reported well under its plan, a position restored without its state."""

import itertools
import warnings

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader

from geko_data import GEKOConfig, GEKOSampler
from geko_data.state import SampleState

QUIET = GEKOConfig(log_bucket_stats=False)


def rows(n):
    return [{"x": torch.tensor([float(i)])} for i in range(n)]


def train_epoch(sampler, loader, batches=None):
    """Report every batch of the epoch (or its first ``batches``) as a loop would."""
    for batch in itertools.islice(loader, batches):
        sampler.report(batch["__index__"], torch.rand(len(batch["__index__"])))


def coverage_warnings(record):
    return [w for w in record if issubclass(w.category, RuntimeWarning) and "GEKO epoch" in str(w.message)]


@pytest.mark.timeout(60)
def test_a_resharded_sampler_warns_once_with_the_causes_and_the_fix():
    from accelerate.data_loader import BatchSamplerShard

    data = rows(40)
    sampler = GEKOSampler(data, total_epochs=4, config=QUIET, num_replicas=1, rank=0)
    # What accelerate's prepare() does to a DataLoader under 2 processes: rank 0 keeps every other batch.
    shard = BatchSamplerShard(BatchSampler(sampler, batch_size=4, drop_last=False), num_processes=2, process_index=0)
    loader = DataLoader(sampler.wrap(data), batch_sampler=shard)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for epoch in range(3):
            sampler.set_epoch(epoch)
            train_epoch(sampler, loader)
    found = coverage_warnings(record)
    assert len(found) == 1  # once, not every epoch
    message = str(found[0].message)
    assert "planned 40 draws" in message and "reported 20" in message
    assert "use_distributed_sampler" in message and "geko_data.integrations" in message


@pytest.mark.timeout(60)
def test_a_loop_that_never_reports_warns():
    sampler = GEKOSampler(24, total_epochs=2, config=QUIET)
    sampler.set_epoch(0)
    list(sampler)
    with pytest.warns(RuntimeWarning, match="reported 0 per-sample results"):
        sampler.set_epoch(1)


@pytest.mark.timeout(60)
def test_full_reports_and_a_mid_epoch_resume_do_not_warn(tmp_path):
    data = rows(30)
    sampler = GEKOSampler(data, total_epochs=3, config=QUIET, seed=4)
    loader = DataLoader(sampler.wrap(data), batch_size=4, sampler=sampler)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for epoch, batches in ((0, None), (1, 3)):
            sampler.set_epoch(epoch)
            train_epoch(sampler, loader, batches)
        sd = sampler.state_dict(consumed=12)
        sampler.state.save(tmp_path / "state.arrow")
        resumed = GEKOSampler(data, total_epochs=3, config=QUIET, seed=4)
        resumed.set_epoch(0)  # e.g. a framework asking len() before the resume: no false alarm later
        resumed.use_state(SampleState.load(tmp_path / "state.arrow"))
        resumed.load_state_dict(sd)
        loader = DataLoader(resumed.wrap(data), batch_size=4, sampler=resumed)
        train_epoch(resumed, loader)  # the rest of epoch 1 only
        resumed.set_epoch(2)
        train_epoch(resumed, loader)
        resumed.set_epoch(2)  # the same epoch again is no epoch change
    assert coverage_warnings(record) == []


@pytest.mark.timeout(60)
def test_a_stateful_dataloader_position_without_its_state_is_refused(tmp_path):
    tdl = pytest.importorskip("torchdata.stateful_dataloader")
    data = rows(32)

    def make():
        s = GEKOSampler(data, total_epochs=3, config=QUIET, seed=1)
        return s, tdl.StatefulDataLoader(s.wrap(data), batch_size=4, sampler=s)

    sampler, loader = make()
    for epoch, batches in ((0, None), (1, 2)):
        sampler.set_epoch(epoch)
        train_epoch(sampler, loader, batches)
    sd = loader.state_dict()  # holds the sampler's position, not its 32-sample learning state
    sampler.state.save(tmp_path / "state.arrow")

    fresh, fresh_loader = make()
    fresh_loader.load_state_dict(sd)
    with pytest.raises(ValueError, match=r"use_state\(SampleState.load\(path\)\)"):
        next(iter(fresh_loader))  # the loader hands the position to the sampler here
    # With the state restored first, the same position loads and continues the running plan.
    restored, restored_loader = make()
    restored.use_state(SampleState.load(tmp_path / "state.arrow"))
    restored_loader.load_state_dict(sd)
    rest = [i for b in restored_loader for i in b["__index__"].tolist()]
    assert len(rest) == len(sampler._order) - 8 and restored.epoch == 1


@pytest.mark.timeout(60)
def test_a_resumed_epoch_set_again_by_the_loop_does_not_warn(tmp_path):
    """A framework restores the position (set_epoch inside load_state_dict), then sets the epoch again."""
    data = rows(24)
    sampler = GEKOSampler(data, total_epochs=3, config=QUIET, seed=4)
    loader = DataLoader(sampler.wrap(data), batch_size=4, sampler=sampler)
    sampler.set_epoch(0)
    train_epoch(sampler, loader, 4)
    sd = sampler.state_dict(consumed=16)
    sampler.state.save(tmp_path / "state.arrow")
    resumed = GEKOSampler(data, total_epochs=3, config=QUIET, seed=4)
    resumed.use_state(SampleState.load(tmp_path / "state.arrow"))
    resumed.load_state_dict(sd)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        resumed.set_epoch(0)
        train_epoch(resumed, DataLoader(resumed.wrap(data), batch_size=4, sampler=resumed))  # 8 of 24 left
        resumed.set_epoch(1)
    assert coverage_warnings(record) == []
