"""EpochDriver: the constructor the sampler and the stream share."""

import numpy as np
import pytest

from geko_data.config import GEKOConfig
from geko_data.sampler import GEKOSampler
from geko_data.state import SampleState
from geko_data.stream import GEKOStream
from geko_data.world import World

QUIET = GEKOConfig(log_bucket_stats=False, recheck_frozen=0.0)


def _front_ends(shards):
    return {"sampler": lambda **kw: GEKOSampler(43, total_epochs=2, **kw),
            "stream": lambda **kw: GEKOStream(shards, total_epochs=2, **kw)}


@pytest.mark.parametrize("kind", ["sampler", "stream"])
def test_a_given_state_is_not_changed_by_the_constructor(shards, kind):
    state = SampleState(43, config=QUIET)
    make = _front_ends(shards)[kind]
    with pytest.raises(ValueError, match=r"`config` .* differs from the policy of `state`"):
        make(state=state, config=QUIET.replace(freeze_quantile=0.5))
    assert state.config == QUIET  # it used to take the constructor's config: the caller's state changed
    driver = make(state=state, config=QUIET)  # the same policy is fine
    assert driver.state is state and driver.config == QUIET
    assert make(state=state).config == QUIET  # config=None keeps the state's


@pytest.mark.parametrize("kind", ["sampler", "stream"])
@pytest.mark.parametrize("kw,match", [
    ({"total_epochs": 0}, "`total_epochs` must be an int >= 1, got 0"),
    ({"seed": -1}, "`seed` must be an int >= 0, got -1"),
    ({"epoch_length": 0}, "`epoch_length` must be None or an int >= 1, got 0"),
    ({"config": "fast"}, "`config` must be a GEKOConfig or None, got str"),
    ({"state": np.zeros(43)}, "`state` must be a SampleState or None, got ndarray"),
])
def test_shared_arguments_are_checked_alike(shards, kind, kw, match):
    make = {"sampler": lambda **k: GEKOSampler(43, **{"total_epochs": 2, **k}),
            "stream": lambda **k: GEKOStream(shards, **{"total_epochs": 2, **k})}[kind]
    with pytest.raises((ValueError, TypeError), match=match):
        make(**kw)


@pytest.mark.parametrize("kind", ["sampler", "stream"])
def test_a_state_of_another_length_is_refused(shards, kind):
    with pytest.raises(ValueError, match="`state` holds 40 samples but"):
        _front_ends(shards)[kind](state=SampleState(40))


def test_the_sampler_takes_a_world_like_the_stream(shards):
    a = GEKOSampler(43, total_epochs=2, config=QUIET, world=World(rank=1, world_size=3))
    b = GEKOSampler(43, total_epochs=2, config=QUIET, num_replicas=3, rank=1)
    assert list(a) == list(b) and len(a) == 15
    assert a.world == World(rank=1, world_size=3)
    with pytest.raises(ValueError, match="either `world`.*or `num_replicas`/`rank`"):
        GEKOSampler(43, total_epochs=2, world=World(), rank=0)
    with pytest.raises(TypeError, match="`world` must be a World"):
        GEKOSampler(43, total_epochs=2, world=(0, 1))
    with pytest.raises(ValueError, match=r"`rank` must be an int in \[0, 1\], got 2"):
        GEKOSampler(43, total_epochs=2, num_replicas=2, rank=2)


@pytest.mark.parametrize("total_epochs,follows", [(3, False), (8, True)])
def test_phase_and_mountain_lr_only_in_runs_that_follow_the_curriculum(total_epochs, follows):
    # The default samples a run under curriculum_min_epochs (5) by bucket_weights: its log, history and
    # LR must not name a Mountain phase it does not sample by.
    logged = []
    sampler = GEKOSampler(43, total_epochs=total_epochs, config=GEKOConfig(recheck_frozen=0.0))
    sampler.log = logged.append  # what train() does to route the partition table
    sampler.set_epoch(0)
    sampler.report(np.arange(43), np.linspace(0.0, 1.0, 43), correct=np.ones(43, bool))
    sampler.set_epoch(total_epochs // 2)
    assert sampler.follows_curriculum is follows
    assert (sampler.phase != "") is follows
    assert (sampler.state.history[-1]["phase"] != "") is follows
    assert logged[-1].startswith(f"[GEKO] Epoch {total_epochs // 2} (") is follows
    assert (sampler.lr_multiplier == 1.0) is not follows
