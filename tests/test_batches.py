from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from geko_data import policy
from geko_data.batches import GEKOBatchSampler, epoch_batch_size
from geko_data.config import GEKOConfig
from geko_data.sampler import GEKOSampler
from test_sampler import Squares

QUIET = GEKOConfig(log_bucket_stats=False, recheck_frozen=0.0, short_run_keep=None)


@pytest.mark.parametrize("draws", [0, 1, 7, 31, 32, 33, 100, 1000, 1500, 2999, 3000, 3001, 9000])
def test_an_epoch_keeps_a_full_epochs_batches_within_the_size_limits(draws):
    steps, batch, smallest = 47, 64, 32  # a full epoch: 3,000 draws at 64
    size = epoch_batch_size(draws, steps=steps, batch_size=batch, min_batch=smallest)
    assert smallest <= size <= batch
    batches = -(-draws // size)
    if steps * smallest <= draws <= steps * batch:
        assert batches == steps or (batches == steps - 1 and draws < steps * size)  # a full epoch's steps
    if draws < steps * smallest:
        assert size == smallest  # never a handful of samples trained as a whole step
    if draws > steps * batch:
        assert size == batch  # more steps rather than batches over batch_size
    assert epoch_batch_size(3000, steps=steps, batch_size=batch, min_batch=smallest) == batch
    # a full epoch that is no multiple of the batch: a plain DataLoader's batches (9 x 64 + 24), not 10 x 60
    assert epoch_batch_size(600, steps=10, batch_size=64, min_batch=32) == 64
    assert epoch_batch_size(577, steps=10, batch_size=64, min_batch=32) == 64
    assert epoch_batch_size(576, steps=10, batch_size=64, min_batch=32) == 58  # 9 batches at 64: cut finer


def shrink(sampler, frozen):
    sampler.state.bucket[:frozen] = policy.FREEZE
    sampler.state.epoch = 1  # buckets set by hand: no repartition at epoch 1
    sampler.set_epoch(1)


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore:GEKO epoch 0 planned")  # epoch 0 is iterated without reports
def test_a_shrunk_epoch_takes_a_full_epochs_steps_and_every_draw_once():
    sampler = GEKOSampler(300, total_epochs=3, config=QUIET, seed=3)
    batches = GEKOBatchSampler(sampler, batch_size=16)
    sampler.set_epoch(0)
    full = list(batches)
    assert [len(b) for b in full] == [16] * 18 + [12]  # a full epoch: a plain DataLoader's batches
    shrink(sampler, 100)  # a third frozen: 200 draws
    expected = list(sampler)
    got = list(batches)
    assert len(got) == len(batches) == 19  # without it a DataLoader at batch 16 takes 13 steps
    assert [i for b in got for i in b] == expected
    assert [len(b) for b in got] == [11] * 18 + [2]


@pytest.mark.timeout(60)
def test_ranks_take_the_same_number_of_steps():
    per_rank = []
    for rank in range(3):
        sampler = GEKOSampler(101, total_epochs=3, config=QUIET, seed=1, num_replicas=3, rank=rank)
        shrink(sampler, 40)
        batches = list(GEKOBatchSampler(sampler, batch_size=8))
        per_rank.append(batches)
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == 5  # ceil(ceil(101 / 3) / 8)
    ids = Counter(i for batches in per_rank for b in batches for i in b)
    assert set(ids) == set(range(40, 101))  # the unfrozen samples, each at least once (padding repeats)


@pytest.mark.timeout(60)
def test_resume_between_batches_continues_the_same_batches_and_inside_one_is_refused():
    def fresh():
        s = GEKOSampler(300, total_epochs=3, config=QUIET, seed=5)
        shrink(s, 120)
        return s

    sampler = fresh()
    whole = list(GEKOBatchSampler(sampler, batch_size=16))
    done = sum(len(b) for b in whole[:7])
    sd = sampler.state_dict(consumed=done)
    resumed = fresh()
    resumed.load_state_dict(sd)
    rest = GEKOBatchSampler(resumed, batch_size=16)
    assert len(rest) == len(whole) - 7
    assert list(rest) == whole[7:]
    short = GEKOSampler(300, total_epochs=3, config=QUIET, seed=5)
    shrink(short, 125)  # 175 draws in batches of 10: the last holds 5
    sizes = [len(b) for b in GEKOBatchSampler(short, batch_size=16)]
    assert sizes == [10] * 17 + [5]
    end = GEKOSampler(300, total_epochs=3, config=QUIET, seed=5)
    shrink(end, 125)
    end.load_state_dict(short.state_dict(consumed=175))  # saved after the epoch's last, short batch
    assert len(GEKOBatchSampler(end, batch_size=16)) == 0 and list(GEKOBatchSampler(end, batch_size=16)) == []
    bad = fresh()
    bad.load_state_dict(sampler.state_dict(consumed=done + 1))
    with pytest.raises(ValueError, match="inside a batch"):
        list(GEKOBatchSampler(bad, batch_size=16))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_read_the_batches_with_their_weights(context):
    sampler = GEKOSampler(120, total_epochs=3, config=QUIET, seed=2)
    batches = GEKOBatchSampler(sampler, batch_size=8)
    shrink(sampler, 40)
    weights = np.asarray(sampler.plan.loss_weight)
    loader = DataLoader(sampler.wrap(Squares(120)), batch_sampler=batches, num_workers=2,
                        multiprocessing_context=context)
    got = list(loader)
    # 80 draws in a full epoch's 15 steps: batches of 6 (14 of them); a batch size of 8 would take 10
    assert [len(b["__index__"]) for b in got] == [6] * 13 + [2]
    for b in got:
        assert torch.equal(b["y"], b["__index__"] ** 2)
        assert torch.equal(b["__weight__"], torch.from_numpy(weights[b["__index__"].numpy()]))


def test_bad_arguments_are_named():
    sampler = GEKOSampler(10, total_epochs=1, config=QUIET)
    with pytest.raises(ValueError, match="batch_size"):
        GEKOBatchSampler(sampler, batch_size=0)
    with pytest.raises(ValueError, match="min_batch.*8"):
        GEKOBatchSampler(sampler, batch_size=8, min_batch=9)
    with pytest.raises(ValueError, match="steps"):
        GEKOBatchSampler(sampler, batch_size=8, steps=0)
    with pytest.raises(TypeError, match="sampler"):
        GEKOBatchSampler(list(range(10)), batch_size=8)


def test_epochs_that_keep_their_steps_plan_the_short_run_rule_for_kept_steps():
    """A 3-epoch run keeps half of FREEZE at rescaled weights with fixed batches (``short_run_keep``); cut by
    GEKOBatchSampler, it takes ``short_run_keep_steps`` (default: FREEZE only re-checked)."""
    config = GEKOConfig(log_bucket_stats=False, recheck_frozen=0.0)
    fixed, kept = (GEKOSampler(200, total_epochs=3, config=config, seed=4) for _ in range(2))
    GEKOBatchSampler(kept, batch_size=16)
    assert kept.keeps_steps and not fixed.keeps_steps
    for s in (fixed, kept):
        shrink(s, 80)
    assert 20 < int(fixed.plan.counts[:80].sum()) < 60  # about half of the 80 frozen, drawn at random
    assert int(kept.plan.counts[:80].sum()) == 0 and int(kept.plan.counts[80:].sum()) == 120
    assert kept.config == fixed.config == config  # the state keeps the policy it was given
    half = GEKOSampler(200, total_epochs=3, config=config.replace(short_run_keep_steps=0.5), seed=4)
    GEKOBatchSampler(half, batch_size=16)
    shrink(half, 80)
    assert np.array_equal(half.plan.counts, fixed.plan.counts)


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore:GEKO epoch 1 planned")  # the run reports epoch 0 only
def test_long_runs_that_keep_their_steps_freeze_more_and_train_a_quarter_of_freeze_last():
    """A 5-epoch run cut by GEKOBatchSampler freezes the easiest 60% of its right answers (50% with fixed
    batches), draws HARD:FOCUS:LIGHT 0.5:1:1 (``long_run_weights_steps``; short runs 0.5:2:1) and trains a
    quarter of FREEZE in its last epoch, at rescaled loss weights (fixed batches: every sample once at
    weight 1)."""
    config = GEKOConfig(log_bucket_stats=False, recheck_frozen=0.0)
    n = 400
    fixed, kept = (GEKOSampler(n, total_epochs=5, config=config, seed=5) for _ in range(2))
    GEKOBatchSampler(kept, batch_size=16)
    losses = np.linspace(0.01, 2.0, n)
    confidence = np.where(np.arange(n) < 380, 0.9, 0.7)  # the last 20: wrong, 10 of them sure (HARD)
    confidence[390:] = 0.1
    correct = np.arange(n) < 380
    for s in (fixed, kept):
        s.set_epoch(0)
        s.report(np.arange(n), losses, correct=correct, confidence=confidence)
        s.set_epoch(1)
    frozen = {name: int((s.state.bucket == policy.FREEZE).sum()) for name, s in (("fixed", fixed), ("kept", kept))}
    assert frozen == {"fixed": n // 2, "kept": int(0.6 * n)}
    assert [s.efficiency_report()["mastered_freeze"] for s in (fixed, kept)] == [n // 2, int(0.6 * n)]
    e = kept.plan.counts.astype(float)
    light, hard, focus = e[:380][kept.state.bucket[:380] == policy.LIGHT].mean(), e[380:390].mean(), e[390:].mean()
    # 0.5 : 1 : 1 in expectation (about 0.52, 1.03, 1.03 here), rounded stochastically; 0.5:2:1 gives focus 1.94
    assert hard < 0.75 < light < 1.25 and hard < 0.75 < focus < 1.5
    for s in (fixed, kept):  # epochs 2-3 plan as epoch 1; epoch 4, the last, anneals
        s.state.epoch = 4
        s.set_epoch(4)
    frozen_ids = kept.state.bucket == policy.FREEZE
    assert int(fixed.plan.counts.sum()) == n and (fixed.plan.loss_weight == 1).all()
    drawn = int(kept.plan.counts[frozen_ids].sum())
    assert 0.15 * frozen_ids.sum() < drawn < 0.35 * frozen_ids.sum()  # a quarter of FREEZE
    assert kept.plan.loss_weight[frozen_ids].max() > 2.0  # rescaled: c / 0.25
    assert int(kept.plan.counts[~frozen_ids].sum()) == int((~frozen_ids).sum())  # every other sample once
    assert kept.config == config
