"""SharedPlan (geko_data/shared.py): the epoch's plan in shared memory for DataLoader workers."""

import numpy as np
import pytest
import torch

from geko_data.plan import EpochPlan
from geko_data.shared import SharedPlan


def _plan(epoch, counts, weights):
    return EpochPlan(epoch=epoch, progress=0.1 * epoch, counts=np.asarray(counts, np.int32),
                     loss_weight=np.asarray(weights, np.float32))


def test_publish_returns_the_plan_as_read_only_views_that_follow_the_next_publish():
    shared = SharedPlan(4)
    first = shared.publish(_plan(0, [1, 0, 2, 1], [1.0, 0.0, 0.5, 1.0]))
    assert first.counts.tolist() == [1, 0, 2, 1] and first.loss_weight.tolist() == [1.0, 0.0, 0.5, 1.0]
    assert not first.counts.flags.writeable and not first.loss_weight.flags.writeable
    assert first.epoch == 0 and shared.epoch == 0 and shared.version == 1
    assert shared.publish(first).counts.tolist() == [1, 0, 2, 1] and shared.version == 2  # already in place
    shared.publish(_plan(1, [0, 3, 0, 1], [0.0, 2.0, 0.0, 1.0]))
    # the views are the shared memory: the next epoch shows through, as it does in the workers
    assert first.counts.tolist() == [0, 3, 0, 1] and shared.weights().tolist() == [0.0, 2.0, 0.0, 1.0]
    kept = shared.read()  # a copy: a later publish cannot change it mid-epoch
    shared.publish(_plan(2, [1, 1, 1, 1], [1.0] * 4))
    assert kept.counts.tolist() == [0, 3, 0, 1] and kept.epoch == 1


def test_publish_refuses_a_plan_of_another_length_and_read_needs_a_plan():
    shared = SharedPlan(3)
    with pytest.raises(RuntimeError, match="set_epoch"):
        shared.read()
    with pytest.raises(ValueError, match="plan has 2 samples, expected 3"):
        shared.publish(_plan(0, [1, 1], [1.0, 1.0]))
    with pytest.raises(ValueError, match="`num_samples` must be >= 1, got 0"):
        SharedPlan(0)
    assert isinstance(shared._weight, torch.Tensor) and shared._weight.is_shared()


def test_a_plan_written_in_place_is_withdrawn_until_published():
    """``writable`` hands out the shared arrays for the next plan to be written into (uint16 counts, as the
    state file's) and withdraws the published one, so a half-written plan is never read as the last epoch's;
    publishing it copies nothing."""
    shared = SharedPlan(4)
    shared.publish(_plan(0, [1, 0, 2, 1], [1.0, 0.0, 0.5, 1.0]))
    counts, weight = shared.writable()
    assert counts.dtype == np.uint16 and weight.dtype == np.float32 and counts.flags.writeable
    with pytest.raises(RuntimeError, match="no epoch plan published"):
        shared.view()
    counts[:], weight[:] = [3, 0, 0, 1000], [2.0, 0.0, 0.0, 1.0]
    published = shared.publish(EpochPlan(epoch=1, progress=0.5, counts=counts, loss_weight=weight))
    assert np.shares_memory(published.counts, counts) and shared.view().counts.tolist() == [3, 0, 0, 1000]
    assert shared.epoch == 1 and shared.read().loss_weight.tolist() == [2.0, 0.0, 0.0, 1.0]
