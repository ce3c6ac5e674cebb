"""Feedback under real multi-process torch.distributed (gloo on CPU)."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from geko_data.config import GEKOConfig
from geko_data.feedback import Feedback
from geko_data.sampler import GEKOSampler
from geko_data.state import COLUMNS, SampleState

N = 50
CFG = GEKOConfig(q_value_lr=0.6, min_q_for_freeze=0.6, log_bucket_stats=False, answer_weight_cap=3.0)


def rank_reports(rank):
    rng = np.random.default_rng(100 + rank)
    for step in range(3):
        n = 5 + rank + step  # uneven lengths per rank
        ids = rng.integers(0, N, n)
        losses = rng.exponential(1.0, n).astype(np.float32)
        if rank == 1 and step == 1:
            losses[0] = np.nan  # non-finite rows are counted on every rank
        yield ids, losses, step, ids % 3 + 2**31  # answers (uint32 range) travel with the rows


def _worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        sampler = GEKOSampler(N, total_epochs=2, config=CFG, seed=3)
        assert sampler.world.world_size == world and sampler.world.rank == rank
        sampler.set_epoch(0)
        for ids, losses, step, answers in rank_reports(rank):
            sampler.report(torch.from_numpy(ids), torch.from_numpy(losses), answer=torch.from_numpy(answers),
                           step=step)
        sampler.set_epoch(1)
        sampler.state.save(f"{out_dir}/state-{rank}.arrow")
        np.save(f"{out_dir}/order-{rank}.npy", np.array(list(sampler)))
        np.save(f"{out_dir}/counts-{rank}.npy", sampler.plan.counts)
        np.save(f"{out_dir}/weights-{rank}.npy", sampler.plan.loss_weight)
        with pytest.raises(ValueError, match="`answer` on some ranks and not on others"):
            sampler.report([rank], [1.0], answer=[1] if rank == 0 else None)
        with pytest.raises(ValueError, match="ids|bad input on rank"):  # bad input on one rank fails on every rank, no hang
            if rank == 0:
                sampler.report([N + 5], [1.0])
            else:
                sampler.report([0], [1.0])
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 3])
def test_all_ranks_hold_identical_state(tmp_path, free_port, world):
    mp.start_processes(_worker, args=(world, free_port, str(tmp_path)), nprocs=world, start_method="spawn")
    states = [SampleState.load(tmp_path / f"state-{r}.arrow") for r in range(world)]
    single = SampleState(N, config=CFG)  # one process given the same feedback, in rank order
    fb = Feedback(single)
    per_rank = [list(rank_reports(r)) for r in range(world)]
    for step in range(3):  # one report per step holding every rank's rows, in rank order
        fb.report(np.concatenate([per_rank[r][step][0] for r in range(world)]),
                  np.concatenate([per_rank[r][step][1] for r in range(world)]),
                  answer=np.concatenate([per_rank[r][step][3] for r in range(world)]), step=step)
    single.repartition(0.75, epoch=1)
    for s in states:
        for name, _, _ in COLUMNS:
            assert np.array_equal(getattr(s, name), getattr(single, name), equal_nan=True), name
        assert s.num_nonfinite == single.num_nonfinite == 1
    orders = [np.load(tmp_path / f"order-{r}.npy") for r in range(world)]
    assert len({len(o) for o in orders}) == 1  # equal per-rank lengths
    counts = [np.load(tmp_path / f"counts-{r}.npy") for r in range(world)]
    assert all(np.array_equal(c, counts[0]) for c in counts)  # same plan everywhere, nothing broadcast
    weights = [np.load(tmp_path / f"weights-{r}.npy") for r in range(world)]
    assert all(np.array_equal(w, weights[0]) for w in weights)  # the answers' balance too
    assert len(np.unique(weights[0][counts[0] > 0])) > 1  # ... which did scale some answers' weights
    got = np.bincount(np.concatenate(orders), minlength=N)
    assert (got >= counts[0]).all() and (got - counts[0]).sum() < world  # exact cover up to padding


def test_single_process_feedback_counts():
    s = SampleState(5)
    fb = Feedback(s)
    assert fb.report([0, 1], [0.5, float("nan")]) == 1
    assert fb.num_reports == 1 and fb.num_rows == 1 and s.num_nonfinite == 1
