"""geko_data.integrations.accelerate: a GEKO loader in a user's own accelerate loop, 2 processes on gloo."""

import json
import os
import subprocess
import sys
import types

import pytest
import torch
from torch.utils.data import DataLoader

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import tiny  # noqa: E402

from geko_data import GEKOSampler  # noqa: E402
from geko_data.integrations.accelerate import prepare_loader  # noqa: E402


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("acc")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", os.path.join(HERE, "accelerate_job.py"),
                           str(out)], capture_output=True, text=True, timeout=140,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.load(open(out / "result.json"))


@pytest.mark.timeout(150)
def test_accelerate_prepare_alone_trains_half_of_each_ranks_share(result):
    # Why prepare_loader exists: accelerate keeps every other batch of a sampler that already gave this rank
    # its share. If accelerate stops doing that, this fails and prepare_loader can go.
    for epoch, plan in result["prepare"]["plans"].items():
        trained = sum(len(ids) for ids in result["prepare"]["ids"][epoch])
        assert trained <= sum(plan) // 2 + 2 * 8, (trained, sum(plan))


@pytest.mark.timeout(150)
@pytest.mark.parametrize("how", ["sampler", "steps"])
def test_prepare_loader_trains_every_draw_of_the_plan(result, how):
    run = result[how]
    assert sum(run["plans"]["1"]) < sum(run["plans"]["0"])  # the second epoch skipped samples
    if how == "steps":  # ... in smaller batches, which accelerate's wrapper dropped but the last
        assert max(run["sizes"]["1"]) < 8
    for epoch, plan in run["plans"].items():
        a, b = run["ids"][epoch]
        assert len(a) == len(b)  # each rank its equal half
        tiny.assert_trains_plan(plan, a + b, world=2)


@pytest.mark.timeout(30)
def test_prepare_loader_refuses_a_loader_without_a_geko_sampler():
    class One:
        num_processes, process_index = 1, 0

        def prepare(self, loader):
            return loader

    with pytest.raises(ValueError, match=r"`loader` must draw from a GEKOSampler .*got sampler SequentialSampler"):
        prepare_loader(One(), DataLoader(list(range(4)), batch_size=2))
    with pytest.raises(TypeError, match=r"`loader` must be a torch DataLoader, got list"):
        prepare_loader(One(), [1, 2])
    sampler = GEKOSampler(4, total_epochs=1)
    loader = DataLoader(sampler.wrap([{"x": torch.tensor(0.0)}] * 4), batch_size=2, sampler=sampler)
    assert prepare_loader(One(), loader) is loader  # one process: nothing to undo
    # A sampler of another world, passed through unsharded, would have every rank train everything it gives.
    other = GEKOSampler(4, total_epochs=1, num_replicas=2, rank=1)
    with pytest.raises(ValueError, match=r"the GEKOSampler is for rank 1 of 2, the accelerator's process is 0 of 1"):
        prepare_loader(One(), DataLoader(other.wrap([{"x": torch.tensor(0.0)}] * 4), batch_size=2, sampler=other))


@pytest.mark.timeout(60)
def test_unshard_turns_split_batches_off():
    # With accelerate's split_batches=True the passthrough (batch_size None) raised TypeError at the first batch.
    from accelerate.data_loader import BatchSamplerShard

    from geko_data.batches import GEKOBatchSampler
    from geko_data.integrations.accelerate import unshard

    sampler = GEKOSampler(24, total_epochs=1, num_replicas=2, rank=0)
    batches = GEKOBatchSampler(sampler, batch_size=4)
    # What accelerate.prepare returns holds the shard as its batch_sampler (a DataLoader refuses the assignment).
    prepared = types.SimpleNamespace(
        batch_sampler=BatchSamplerShard(batches, num_processes=2, process_index=0, split_batches=True))
    ids = [i for b in unshard(prepared, sampler, world_size=2).batch_sampler for i in b]
    assert sorted(ids) == sorted(sampler)  # this rank's whole share


@pytest.mark.timeout(60)
def test_a_resumed_epoch_stays_the_epoch_the_loop_set(tmp_path):
    # accelerate's loader calls set_epoch(its count of finished passes) at every iter(): 0 in a resumed
    # process, which took the sampler back to epoch 0's plan and trained it instead of the epoch's rest.
    from accelerate import Accelerator

    from geko_data.state import SampleState

    data = [{"x": torch.tensor(float(i))} for i in range(30)]

    def make():
        sampler = GEKOSampler(30, total_epochs=3, seed=1)
        return sampler, prepare_loader(Accelerator(cpu=True), DataLoader(sampler.wrap(data), batch_size=4,
                                                                         sampler=sampler))

    sampler, loader = make()
    for epoch in range(3):
        sampler.set_epoch(epoch)
        ids = [i for b in loader for i in b["__index__"].tolist()]
        if epoch == 1:  # a checkpoint after two batches of epoch 1
            sampler.report(torch.tensor(ids[:8]), torch.ones(8))
            sd = sampler.state_dict(consumed=8)
            sampler.state.save(tmp_path / "state.arrow")
            sampler.report(torch.tensor(ids[8:]), torch.ones(len(ids) - 8))
            rest = ids[8:]
        else:
            sampler.report(torch.tensor(ids), torch.ones(len(ids)))
    resumed, loader = make()
    resumed.use_state(SampleState.load(tmp_path / "state.arrow"))
    resumed.load_state_dict(sd)
    resumed.set_epoch(1)
    assert [i for b in loader for i in b["__index__"].tolist()] == rest and resumed.epoch == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("batches", ["torch", "geko"])
def test_unshard_keeps_total_batch_size(batches):
    # After the passthrough (batch_size None), accelerate's total_batch_size raised TypeError (None * 1).
    from accelerate.data_loader import BatchSamplerShard, DataLoaderShard
    from torch.utils.data import BatchSampler

    from geko_data.batches import GEKOBatchSampler
    from geko_data.integrations.accelerate import unshard

    sampler = GEKOSampler(24, total_epochs=1, num_replicas=2, rank=0)
    inner = BatchSampler(sampler, 4, False) if batches == "torch" else GEKOBatchSampler(sampler, batch_size=4)
    data = [{"x": torch.tensor(float(i))} for i in range(24)]
    loader = DataLoaderShard(sampler.wrap(data), batch_sampler=BatchSamplerShard(inner, num_processes=2,
                                                                                 process_index=0))
    assert loader.total_batch_size == 8
    prepared = unshard(loader, sampler, world_size=2)
    assert prepared.total_batch_size == 8 and isinstance(prepared, DataLoaderShard)
    assert sorted(i for b in prepared for i in b["__index__"].tolist()) == sorted(sampler)
    other = unshard(DataLoaderShard(sampler.wrap(data), batch_sampler=BatchSamplerShard(
        BatchSampler(sampler, 2, False), num_processes=2, process_index=0)), sampler, world_size=2)
    assert other.total_batch_size == 4 and prepared.total_batch_size == 8  # one subclass per loader
