import json

import pytest

from geko_data.config import (GEKO_AGGRESSIVE, GEKO_BALANCED, GEKO_CONSERVATIVE, GEKOLIB_DEFAULTS, MODES, MOUNTAIN,
                              PRESETS, GEKOConfig)


def test_gekolib_defaults():
    c = GEKOLIB_DEFAULTS
    assert (c.freeze_confidence, c.freeze_quality, c.focus_confidence) == (0.85, 0.80, 0.60)
    assert c.bucket_weights == (3.0, 1.0, 0.0)
    assert c.use_curriculum and c.log_bucket_stats
    assert (c.q_value_lr, c.min_q_for_freeze, c.q_value_loss_scale) == (0.1, 0.8, 10.0)
    assert (c.repartition_every, c.max_times_seen, c.prune_frozen_after) == (1, 50, 0)


def test_presets_have_gekolib_values():
    assert (GEKO_AGGRESSIVE.freeze_confidence, GEKO_AGGRESSIVE.freeze_quality) == (0.90, 0.85)
    assert GEKO_AGGRESSIVE.bucket_weights == (5.0, 2.0, 0.0)
    assert (GEKO_BALANCED.freeze_confidence, GEKO_BALANCED.freeze_quality) == (0.85, 0.80)
    assert GEKO_BALANCED.bucket_weights == (3.0, 2.0, 1.0)
    assert (GEKO_CONSERVATIVE.freeze_confidence, GEKO_CONSERVATIVE.freeze_quality) == (0.80, 0.75)
    assert GEKO_CONSERVATIVE.bucket_weights == (2.0, 2.0, 1.0)


def test_round_trip_through_json():
    c = GEKOConfig(mode="unbiased", keep_frozen=0.2, bucket_weights=(5, 2, 1), anneal=0.25)
    assert GEKOConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_anneal_defaults_per_mode():
    assert GEKOConfig(mode="geko").anneal_fraction == 0.125
    assert GEKOConfig(mode="uniform").anneal_fraction == 0.0
    assert GEKOConfig(mode="unbiased").anneal_fraction == 0.125
    assert GEKOConfig(mode="infobatch").anneal_fraction == 0.125
    assert GEKOConfig(mode="unbiased", anneal=0.0).anneal_fraction == 0.0


BAD = [
    ("freeze_confidence", 1.5), ("freeze_confidence", -0.1), ("freeze_confidence", float("nan")),
    ("freeze_quality", 2), ("focus_confidence", "high"), ("bucket_weights", (1, 2)),
    ("bucket_weights", (1, -2, 0)), ("use_curriculum", 1), ("q_value_lr", 0.0), ("q_value_lr", 1.5),
    ("min_q_for_freeze", 1.1), ("q_value_loss_scale", 0), ("repartition_every", 0),
    ("repartition_every", 1.5), ("log_bucket_stats", "yes"), ("max_times_seen", -1),
    ("max_times_seen", 70000), ("prune_frozen_after", -1), ("prune_frozen_after", 300),
    ("mode", "fast"), ("keep_frozen", 0.0), ("keep_frozen", 1.2), ("recheck_frozen", -0.1),
    ("early_stop_frozen", 0.0), ("anneal", 1.5), ("loss_ema", 1.0), ("max_repeats", 0),
    ("subset_fraction", 0.0), ("prune_ratio", 1.0), ("prune_ratio", True),
    ("curriculum_min_epochs", 0), ("curriculum_min_epochs", 2.5), ("curriculum_min_epochs", True),
    ("phase_weights", ((1, 2, 3),) * 4), ("phase_weights", "mountain"),
    ("short_run_keep", 0.0), ("short_run_keep", 1.5), ("short_run_keep", "half"),
    ("anneal_keep", 0.0), ("anneal_keep", 1.5), ("anneal_keep", "half"), ("anneal_keep", float("nan")),
]


@pytest.mark.parametrize("field,value", BAD)
def test_bad_values_name_field_and_value(field, value):
    with pytest.raises(ValueError) as err:
        GEKOConfig(**{field: value})
    assert field in str(err.value)
    assert repr(value)[:6] in str(err.value) or str(value)[:6] in str(err.value)


def test_unknown_field_in_from_dict():
    with pytest.raises(ValueError, match="bogus"):
        GEKOConfig.from_dict({"bogus": 1})


def test_modes_are_all_constructible():
    for mode in MODES:
        assert GEKOConfig(mode=mode).mode == mode


def test_freeze_confidence_none_is_relative_and_quantile_is_checked():
    assert GEKOConfig(freeze_confidence=None).freeze_confidence is None
    with pytest.raises(ValueError, match=r"`freeze_quantile` must be a number in \[0.0, 1.0\], got 1.5"):
        GEKOConfig(freeze_quantile=1.5)
    c = GEKOConfig(freeze_confidence=None, freeze_quantile=0.8)
    assert GEKOConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_default_freeze_threshold_is_read_from_the_task():
    assert GEKOConfig().freeze_confidence is None and GEKOConfig().freeze_quantile == 0.9
    assert GEKOLIB_DEFAULTS.freeze_confidence == 0.85  # gekolib's absolute value stays reachable


def test_config_and_train_args_are_keyword_only():
    # A positional call would bind values to fields by declaration order, which silently changes meaning
    # whenever a field is added.
    from geko_data.train.args import TrainArgs

    with pytest.raises(TypeError):
        GEKOConfig(0.9)  # type: ignore[misc]
    with pytest.raises(TypeError):
        TrainArgs("./out")  # type: ignore[misc]


def test_default_freezes_the_easiest_half_and_presets_keep_their_rules():
    assert GEKOConfig().freeze_share == 0.5 and GEKOConfig().freeze_confidence is None
    # presets with an absolute threshold keep gekolib's rule (freeze_share is not used with one)
    for preset in (GEKOLIB_DEFAULTS, GEKO_AGGRESSIVE, GEKO_BALANCED, GEKO_CONSERVATIVE):
        assert preset.freeze_confidence is not None
    with pytest.raises(ValueError, match=r"`freeze_share` must be a number in \(0.0, 1.0\], got 0.0"):
        GEKOConfig(freeze_share=0.0)
    c = GEKOConfig(freeze_share=None)
    assert GEKOConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_phase_weights_are_checked_per_phase_and_round_trip():
    bad = ((1, 2, 3), (2, 3, 1), (3, -2, 1), (2, 3, 1), (1, 2, 3))
    with pytest.raises(ValueError, match=r"`phase_weights` must be 3 finite numbers >= 0 .*\(3, -2, 1\)"):
        GEKOConfig(phase_weights=bad)
    with pytest.raises(ValueError, match="phase_weights"):
        GEKOConfig(phase_weights=((1, 2, 3),) * 4 + ((1, 2, float("nan")),))
    # a JSON list of lists (a state file, bench_value's --variant) becomes the same tuple of tuples
    c = GEKOConfig(phase_weights=[[1, 1, 1], [2, 3, 1], [3, 2, 1], [2, 3, 1], [1, 1, 1]], curriculum_min_epochs=5)
    assert c.phase_weights[2] == (3.0, 2.0, 1.0)
    assert GEKOConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_gekolib_presets_keep_the_mountain_table():
    from geko_data.config import MOUNTAIN

    for preset in (GEKOLIB_DEFAULTS, GEKO_AGGRESSIVE, GEKO_BALANCED, GEKO_CONSERVATIVE):
        assert preset.phase_weights == MOUNTAIN and preset.curriculum_min_epochs == 1
    assert MOUNTAIN[2] == (5.0, 2.0, 0.0)  # PEAK: LIGHT weight 0
    assert GEKOLIB_DEFAULTS.bucket_weights == (3.0, 1.0, 0.0)


def test_default_short_runs_sample_without_the_curriculum():
    c = GEKOConfig()
    assert c.curriculum_min_epochs == 5 and c.bucket_weights == (1.0, 1.0, 1.0) and c.use_curriculum
    assert c.short_run_keep == 0.5 and GEKOConfig(short_run_keep=None).short_run_keep is None


def test_a_config_stored_before_curriculum_min_epochs_keeps_the_curriculum_in_short_runs():
    old = GEKOConfig().to_dict()
    del old["curriculum_min_epochs"], old["phase_weights"]  # what a state file written before held
    assert GEKOConfig.from_dict(old).curriculum_min_epochs == 1


def test_a_config_stored_before_short_run_keep_keeps_dropping_frozen_samples():
    old = GEKOConfig().to_dict()
    del old["short_run_keep"]
    assert GEKOConfig.from_dict(old).short_run_keep is None
    assert GEKOConfig.from_dict(GEKOConfig().to_dict()) == GEKOConfig()


def test_long_runs_anneal_a_quarter_of_freeze_and_the_presets_all_of_it():
    assert GEKOConfig().anneal_keep == 0.25
    for preset in (GEKOLIB_DEFAULTS, GEKO_AGGRESSIVE, GEKO_BALANCED, GEKO_CONSERVATIVE):
        assert preset.anneal_keep is None, preset.name  # gekolib's rule, unchanged
    old = GEKOConfig().to_dict()
    del old["anneal_keep"]  # a state file written before the field: its annealing epochs stay on all data
    assert GEKOConfig.from_dict(old).anneal_keep is None


def test_short_run_keep_steps_is_validated_planned_and_old_states_keep_their_share():
    with pytest.raises(ValueError, match="short_run_keep_steps"):
        GEKOConfig(short_run_keep_steps=0.0)
    c = GEKOConfig()
    assert c.short_run_keep == 0.5 and c.short_run_keep_steps is None
    assert c.planning(keeps_steps=False) is c
    assert c.planning(keeps_steps=True).short_run_keep is None
    assert c.planning(keeps_steps=True).bucket_weights == (0.5, 2.0, 1.0) == c.short_run_weights_steps
    assert c.planning(keeps_steps=False).bucket_weights == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="short_run_weights_steps"):
        GEKOConfig(short_run_weights_steps=(1.0, -1.0, 1.0))
    assert GEKOConfig.from_dict(c.to_dict()) == c
    old = {k: v for k, v in c.to_dict().items() if not k.endswith("_steps")}  # a state file before the fields
    assert GEKOConfig.from_dict(old).short_run_keep_steps == 0.5
    assert GEKOConfig.from_dict(old).short_run_weights_steps == (1.0, 1.0, 1.0)


def test_long_run_freeze_share_steps_plans_long_runs_that_keep_their_steps_only():
    with pytest.raises(ValueError, match="long_run_freeze_share_steps"):
        GEKOConfig(long_run_freeze_share_steps=1.5)
    c = GEKOConfig()
    long = c.planning(keeps_steps=True, total_epochs=5)
    assert long.freeze_share == 0.6 and long.phase_weights == ((0.5, 1.0, 1.0),) * 5
    assert long.bucket_weights == (0.5, 2.0, 1.0)  # short runs' weights: not what a long run draws by
    assert GEKOConfig(long_run_weights_steps=[1, 1, 1]).planning(
        keeps_steps=True, total_epochs=8).phase_weights == ((1.0, 1.0, 1.0),) * 5
    with pytest.raises(ValueError, match="long_run_weights_steps"):
        GEKOConfig(long_run_weights_steps=(1.0, -1.0, 1.0))
    assert long.anneal == pytest.approx(0.2)  # the last of 5 epochs anneals, with anneal_keep of FREEZE
    assert c.planning(keeps_steps=True, total_epochs=8).anneal == pytest.approx(0.125)
    assert c.planning(keeps_steps=True, total_epochs=3).freeze_share == 0.5  # a short run: its own rule
    assert c.planning(keeps_steps=False, total_epochs=5) is c
    assert GEKOConfig(anneal=0.0).planning(keeps_steps=True, total_epochs=5).anneal == 0.0  # set: kept
    for other in (GEKOConfig(long_run_freeze_share_steps=None), GEKOConfig(phase_weights=MOUNTAIN),
                  GEKOConfig(mode="unbiased")):
        planned = other.planning(keeps_steps=True, total_epochs=5)
        assert planned.freeze_share == 0.5 and planned.anneal == other.anneal
    old = {k: v for k, v in c.to_dict().items() if k != "long_run_freeze_share_steps"}
    assert GEKOConfig.from_dict(old).long_run_freeze_share_steps is None  # a resumed run keeps its rule
    # written before long_run_weights_steps: its long runs drew by short_run_weights_steps, and still do
    old = {k: v for k, v in GEKOConfig(short_run_weights_steps=(0.5, 3.0, 1.0)).to_dict().items()
           if k != "long_run_weights_steps"}
    assert GEKOConfig.from_dict(old).planning(keeps_steps=True, total_epochs=5).phase_weights == ((0.5, 3.0, 1.0),) * 5


def test_answers_are_balanced_by_default_and_not_by_gekolibs_presets_or_older_states():
    assert GEKOConfig().answer_weight_cap == 4.0
    for preset in PRESETS.values():
        assert preset.answer_weight_cap is None, preset.name  # gekolib had no such rule
    old = GEKOConfig().to_dict()
    del old["answer_weight_cap"]  # a state written before the field: resumed with the rule it ran with
    assert GEKOConfig.from_dict(old).answer_weight_cap is None
    assert GEKOConfig.from_dict(GEKOConfig().to_dict()) == GEKOConfig()
    for bad in (0.5, -1.0, float("nan"), "4"):
        with pytest.raises(ValueError, match="answer_weight_cap"):
            GEKOConfig(answer_weight_cap=bad)
