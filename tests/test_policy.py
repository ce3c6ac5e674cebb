import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from geko_data import policy
from geko_data.config import GEKOLIB_DEFAULTS, MOUNTAIN, GEKOConfig
from geko_data.policy import FOCUS, FREEZE, HARD, LIGHT

CFG = GEKOLIB_DEFAULTS  # gekolib's bucket table, with its thresholds


def classify1(correct, confidence, q=0.9, loss_var=0.0, seen=True, config=CFG):
    return int(policy.classify(seen=np.array([seen]), correct=np.array([correct]),
                               confidence=np.array([confidence], dtype=np.float32), q=np.array([q], np.float32),
                               loss_var=np.array([loss_var], np.float32), config=config)[0])


def test_bucket_table():
    assert classify1(True, 0.95) == FREEZE
    assert classify1(True, 0.85) == LIGHT  # confidence must exceed freeze_confidence strictly
    assert classify1(True, 0.95, q=0.79) == LIGHT  # q below min_q_for_freeze
    assert classify1(True, 0.95, q=0.80) == FREEZE  # q >= min_q_for_freeze
    assert classify1(True, 0.95, loss_var=0.09) == LIGHT  # stability 0.7 <= freeze_quality
    assert classify1(True, 0.10) == LIGHT
    assert classify1(False, 0.61) == HARD
    assert classify1(False, 0.60) == FOCUS  # HARD needs confidence > focus_confidence
    assert classify1(False, 0.99, q=1.0) == HARD  # confidently wrong is never frozen
    assert classify1(True, 0.99, seen=False) == FOCUS  # unseen samples are FOCUS


def test_stability():
    np.testing.assert_allclose(policy.stability(np.array([0.0, 0.04, 1.0, 4.0])), [1.0, 0.8, 0.0, 0.0], atol=1e-6)


def test_q_update():
    q = policy.q_update(np.array([0.5, 0.5, 0.5], np.float32), np.array([0.0, 5.0, 50.0]), lr=0.1, loss_scale=10.0)
    np.testing.assert_allclose(q, [0.55, 0.5, 0.45], atol=1e-6)


@pytest.mark.parametrize("progress,phase,weights,lr", [
    (0.0, "WARMUP", (1, 2, 3), 0.5), (0.149, "WARMUP", (1, 2, 3), None), (0.15, "ASCENT", (2, 3, 1), None),
    (0.25, "ASCENT", (2, 3, 1), 0.8), (0.35, "PEAK", (5, 2, 0), None), (0.5, "PEAK", (5, 2, 0), 1.0),
    (0.65, "DESCENT", (2, 3, 1), None), (0.75, "DESCENT", (2, 3, 1), 0.8), (0.85, "CONSOLIDATE", (1, 2, 3), None),
    (1.0, "CONSOLIDATE", (1, 2, 3), 0.3)])
def test_mountain_table(progress, phase, weights, lr):
    assert policy.phase_name(progress) == phase
    table = policy.bucket_weight_table(progress, CFG)
    assert table[FREEZE] == 0
    assert (table[HARD], table[FOCUS], table[LIGHT]) == weights
    if lr is not None:
        assert policy.lr_multiplier(progress) == pytest.approx(lr)


def test_lr_is_smooth_and_warmup_takes_effect():
    xs = np.linspace(0, 1, 201)
    ys = np.array([policy.lr_multiplier(x) for x in xs])
    assert ys[0] == pytest.approx(0.5)  # gekolib never applies WARMUP's 0.5
    assert np.abs(np.diff(ys)).max() < 0.05  # no jumps at phase changes


def test_epoch_midpoint_reaches_peak_in_three_epochs():
    phases = [policy.phase_name(policy.epoch_progress(e, 3)) for e in range(3)]
    assert "PEAK" in phases  # gekolib's epoch-start progress gives WARMUP, ASCENT, DESCENT


def test_curriculum_off_uses_bucket_weights():
    table = policy.bucket_weight_table(0.5, GEKOConfig(use_curriculum=False, bucket_weights=(4, 2, 1)))
    assert list(table) == [0, 1, 2, 4]


def run_tables(total_epochs, config):
    """(HARD, FOCUS, LIGHT) weights each epoch of a run of ``total_epochs`` samples by."""
    return [tuple(policy.bucket_weight_table(policy.epoch_progress(e, total_epochs), config,
                                             total_epochs=total_epochs)[[HARD, FOCUS, LIGHT]])
            for e in range(total_epochs)]


def test_short_runs_never_starve_light_by_default():
    # A 3-epoch run spends its 2nd epoch in PEAK: with gekolib's (5, 2, 0) the right answers that did not
    # freeze got weight 0 while the model was still learning from them (MNIST dev: -1.37 points at 69%).
    for epochs in (1, 2, 3, 4):
        assert run_tables(epochs, GEKOConfig()) == [(1, 1, 1)] * epochs
    # 5+ epochs: flat too (FLAT phase weights; with 10% changed MNIST labels the Mountain's PEAK trained mostly
    # the changed ones, dev accuracy fell to 53%); gekolib's Mountain table is a setting away
    assert run_tables(8, GEKOConfig()) == [(1, 1, 1)] * 8
    assert run_tables(8, GEKOConfig(phase_weights=MOUNTAIN)) == run_tables(8, GEKOLIB_DEFAULTS)
    assert run_tables(5, GEKOConfig(phase_weights=MOUNTAIN))[2] == (5, 2, 0)
    # the previous default and gekolib keep the curriculum in short runs
    mountain_everywhere = GEKOConfig(curriculum_min_epochs=1, phase_weights=MOUNTAIN)
    assert run_tables(3, mountain_everywhere) == [(2, 3, 1), (5, 2, 0), (2, 3, 1)]
    assert run_tables(3, GEKOLIB_DEFAULTS) == [(2, 3, 1), (5, 2, 0), (2, 3, 1)]


def test_peak_epoch_of_a_short_run_trains_the_unfrozen_right_answers():
    # after epoch 1 of 3: 45 frozen, 45 right but not among the easiest (LIGHT), 10 wrong (HARD)
    bucket = np.array([FREEZE] * 45 + [LIGHT] * 45 + [HARD] * 10, np.uint8)
    n = bucket.shape[0]
    e, _ = policy.epoch_expected(bucket=bucket, pruned=np.zeros(n, bool), times_seen=np.ones(n, np.uint16),
                                 loss=np.ones(n, np.float32), epoch=1, total_epochs=3,
                                 config=GEKOConfig(recheck_frozen=0.0, bucket_weights=(3, 2, 1),
                                                   short_run_keep=None))
    assert e[45:90].min() > 0.5  # each LIGHT sample drawn with a fair chance (0 under gekolib's PEAK)
    assert e[90:].max() <= 5.0 and e.sum() == pytest.approx(55.0)  # the epoch keeps its length
    assert e[90] / e[45] == pytest.approx(3.0)


def test_curriculum_min_epochs_turns_the_curriculum_off_in_short_runs():
    cfg = GEKOConfig(curriculum_min_epochs=10, bucket_weights=(4, 0, 1), phase_weights=MOUNTAIN)
    assert run_tables(8, cfg) == [(4, 0, 1)] * 8
    assert run_tables(10, cfg) == run_tables(10, GEKOLIB_DEFAULTS)  # from 10 epochs: the curriculum
    assert policy.uses_curriculum(None, cfg)  # a run of unknown length follows the curriculum
    assert not policy.uses_curriculum(8, cfg.replace(use_curriculum=False))


def test_phase_weights_is_the_curriculum():
    table = ((1, 1, 1), (2, 2, 2), (7, 0, 1), (2, 2, 2), (1, 1, 1))
    assert list(policy.bucket_weight_table(0.5, GEKOConfig(phase_weights=table))) == [0, 1, 0, 7]


def test_prune_rule():
    fe = np.array([0, 1, 2, 3])
    assert not policy.prune_mask(fe, CFG).any()
    assert list(policy.prune_mask(fe, GEKOConfig(prune_frozen_after=2))) == [False, False, True, True]
    assert not policy.prune_mask(fe, GEKOConfig(prune_frozen_after=2, mode="uniform")).any()


def expected(bucket, config, progress=0.5, pruned=None, times_seen=None, loss=None, anneal=False):
    n = len(bucket)
    return policy.expected_counts(bucket=np.array(bucket, np.uint8),
                                  pruned=np.zeros(n, bool) if pruned is None else np.array(pruned),
                                  times_seen=np.zeros(n, np.uint16) if times_seen is None else np.array(times_seen),
                                  loss=np.full(n, np.nan, np.float32) if loss is None else np.array(loss, np.float32),
                                  progress=progress, config=config, anneal=anneal)


def test_geko_epoch_length_is_active_count_and_freeze_is_recheck_only():
    e, w = expected([FREEZE, FREEZE, LIGHT, FOCUS, HARD, HARD], GEKOConfig(recheck_frozen=0.1, phase_weights=MOUNTAIN),
                    progress=0.25)
    active = e[2:]
    assert active.sum() == pytest.approx(4.0)  # epoch length = active samples, not N
    assert e[4] / e[3] == pytest.approx(2 / 3)  # ASCENT: HARD 2, FOCUS 3
    assert list(e[:2]) == [0.1, 0.1] and list(w[:2]) == [0.0, 0.0]  # re-checks are forward-only
    assert (w[2:] == 1).all()


def test_max_times_seen_and_pruned_get_nothing():
    e, _ = expected([FOCUS, FOCUS, FOCUS], GEKOConfig(max_times_seen=3), times_seen=[3, 0, 0], pruned=[False, True, False])
    assert e[0] == 0 and e[1] == 0 and e[2] > 0


def test_max_times_seen_holds_in_the_fallback_and_when_annealing():
    cfg = GEKOConfig(max_times_seen=3)
    # PEAK: LIGHT weighs 0, the FOCUS sample is capped: the fallback must not bring it back
    e, _ = expected([FOCUS, LIGHT], cfg, progress=0.5, times_seen=[3, 0])
    assert list(e) == [0.0, 1.0]
    e, w = expected([FOCUS, LIGHT, FREEZE], cfg, anneal=True, times_seen=[3, 0, 0])
    assert list(e) == [0.0, 1.0, 1.0] and (w == 1).all()
    e, _ = expected([FOCUS, LIGHT], GEKOConfig(max_times_seen=3, mode="uniform"), times_seen=[3, 0])
    assert list(e) == [1.0, 1.0]  # the baselines ignore GEKO's cap

def test_all_zero_weight_falls_back_to_uniform_over_active():
    e, _ = expected([LIGHT, LIGHT], GEKOConfig(), progress=0.5)  # PEAK gives LIGHT weight 0
    assert list(e) == [1.0, 1.0]


def test_max_repeats_caps_multiplicity():
    e, _ = expected([HARD] + [LIGHT] * 99, GEKOConfig(max_repeats=5, phase_weights=MOUNTAIN), progress=0.5)
    assert e[0] == 5.0


def test_what_a_capped_sample_cannot_take_goes_to_the_others():
    # PEAK: HARD 5, FOCUS 2. 2 HARD + 18 FOCUS over 20 draws: HARD would get 50/46 each, under the cap
    cfg = GEKOConfig(max_repeats=2, anneal=0.0, phase_weights=MOUNTAIN)
    e, _ = expected([HARD] * 2 + [FOCUS] * 18, cfg, progress=0.5)
    assert e.sum() == pytest.approx(20.0)  # the epoch keeps its length
    assert (e[:2] <= 2.0).all() and np.allclose(e[2:], e[2])
    e, _ = expected([HARD] + [FOCUS] * 11, cfg, progress=0.5)  # HARD would get 12 * 5 / 27 = 2.22
    assert e[0] == 2.0 and e.sum() == pytest.approx(12.0)
    assert np.allclose(e[1:], 10 / 11)  # the rest of the epoch spread over the others


def test_annealing_follows_infobatch_epoch_rule():
    cfg = GEKOConfig()  # anneal None -> 0.125 in geko mode
    assert [policy.annealing(e, 8, cfg) for e in range(8)] == [False] * 7 + [True]
    assert not any(policy.annealing(e, 4, cfg) for e in range(4))  # under 8 epochs: none
    assert [policy.annealing(e, 4, GEKOConfig(anneal=0.25)) for e in range(4)] == [False] * 3 + [True]
    assert not any(policy.annealing(e, 8, GEKOConfig(anneal=0.0)) for e in range(8))
    assert not any(policy.annealing(e, 8, GEKOConfig(mode="random_subset")) for e in range(8))


def test_a_long_geko_run_anneals_at_least_its_last_epoch():
    # 0.125 anneals no epoch of a 5-7 epoch run, which then never trains its FREEZE samples again: with 10%
    # changed MNIST labels in 5 epochs (dev, 5 seeds) the last epoch on all data took the loss against
    # uniform from 1.90 to 0.54 points
    for total in (5, 6, 7, 8, 12):
        assert [policy.annealing(e, total, GEKOConfig()) for e in range(total)] == [False] * (total - 1) + [True]
    assert [policy.annealing(e, 16, GEKOConfig()) for e in range(16)] == [False] * 14 + [True] * 2  # 0.125
    for cfg in (GEKOConfig(), GEKOConfig(mode="infobatch"), GEKOConfig(mode="unbiased")):
        assert not any(policy.annealing(e, 4, cfg) for e in range(4))  # short runs: the short-run rule
    # an explicit anneal, InfoBatch's rule, and a run without the curriculum keep the fraction as given
    for cfg in (GEKOConfig(anneal=0.0), GEKOConfig(anneal=0.125), GEKOConfig(mode="infobatch"),
                GEKOConfig(mode="unbiased"), GEKOConfig(use_curriculum=False), GEKOConfig(curriculum_min_epochs=6)):
        assert not any(policy.annealing(e, 5, cfg) for e in range(5)), cfg
    # the last epoch of 5 trains every unpruned sample once at weight 1, FREEZE included
    n = 6
    args = dict(bucket=np.array([FREEZE, FREEZE, LIGHT, FOCUS, HARD, HARD], np.uint8), pruned=np.zeros(n, bool),
                times_seen=np.ones(n, np.uint16), loss=np.ones(n, np.float32), total_epochs=5, config=GEKOConfig())
    e, w = policy.epoch_expected(**args, epoch=4)
    assert (e == 1).all() and (w == 1).all()
    e, w = policy.epoch_expected(**args, epoch=3)
    assert np.allclose(e[:2], GEKOConfig().recheck_frozen) and (w[:2] == 0).all() and np.allclose(e[2:], 1.0)

def test_anneal_keep_draws_a_share_of_freeze_in_the_last_epoch_at_rescaled_weights():
    # 4 FREEZE, 1 LIGHT, 1 FOCUS, 1 HARD, 1 pruned: the last epoch of a long run draws every trainable sample
    # once and FREEZE at anneal_keep; loss weights c / expected keep the epoch's gradient unbiased
    bucket = np.array([FREEZE] * 4 + [LIGHT, FOCUS, HARD, LIGHT], np.uint8)
    pruned = np.array([False] * 7 + [True])
    n = bucket.shape[0]
    args = dict(bucket=bucket, pruned=pruned, times_seen=np.ones(n, np.uint16), loss=np.ones(n, np.float32))
    cfg = GEKOConfig(anneal_keep=0.25)
    e, w = policy.epoch_expected(**args, epoch=7, total_epochs=8, config=cfg)
    assert list(e) == [0.25] * 4 + [1.0, 1.0, 1.0, 0.0]
    c = (4 * 0.25 + 3) / 7  # the mean expected count of the 7 unpruned samples
    assert w[:4] == pytest.approx([c / 0.25] * 4) and w[4:7] == pytest.approx([c] * 3) and w[7] == 0
    assert np.allclose(e[:7] * w[:7], c)  # every unpruned sample the same expected share of the gradient
    # epoch_length does not stretch an annealing epoch into repeats
    e2, _ = policy.epoch_expected(**args, epoch=7, total_epochs=8, config=cfg, epoch_length=20)
    assert list(e2) == list(e)
    # the Mountain table's last phase (LIGHT 3) does not weigh the annealing epoch either: flat, once each
    e3, _ = policy.epoch_expected(**args, epoch=7, total_epochs=8, config=cfg.replace(phase_weights=MOUNTAIN))
    assert list(e3) == list(e)
    # both annealing epochs of 16 keep the share; the last epoch that a 5-7 epoch run gets although 0.125
    # anneals none of it trains everything at weight 1
    assert policy.anneal_share(16, cfg) == 0.25 and policy.anneal_share(5, cfg) is None
    for total in (5, 6, 7):
        e, w = policy.epoch_expected(**args, epoch=total - 1, total_epochs=total, config=cfg)
        assert list(e) == [1.0] * 7 + [0.0] and (w[:7] == 1).all()
    assert policy.anneal_share(5, cfg.replace(anneal=0.2)) == 0.25  # 0.2 anneals the last of 5 by itself
    # the epochs before it are unchanged: FREEZE re-checked forward only
    e, w = policy.epoch_expected(**args, epoch=6, total_epochs=8, config=cfg)
    assert np.allclose(e[:4], cfg.recheck_frozen) and (w[:4] == 0).all()
    # anneal_keep=None (InfoBatch's annealing): every unpruned sample once at weight 1
    e, w = policy.epoch_expected(**args, epoch=7, total_epochs=8, config=cfg.replace(anneal_keep=None))
    assert list(e) == [1.0] * 7 + [0.0] and (w[:7] == 1).all()
    # short runs, other modes: anneal_keep does not apply (an explicit anneal trains everything)
    assert policy.anneal_share(3, cfg) is None and policy.anneal_share(8, cfg) == 0.25
    assert policy.anneal_share(8, cfg.replace(mode="unbiased")) is None
    for other in (cfg.replace(anneal=0.34), cfg.replace(mode="unbiased", anneal=0.34),
                  cfg.replace(mode="infobatch", anneal=0.34)):
        e, w = policy.epoch_expected(**args, epoch=2, total_epochs=3, config=other)
        assert list(e) == [1.0] * 7 + [0.0] and (w[:7] == 1).all(), other


def test_uniform_random_subset_and_anneal():
    e, w = expected([FREEZE, LIGHT, HARD], GEKOConfig(mode="uniform"), pruned=[False, False, True])
    assert list(e) == [1, 1, 0] and list(w) == [1, 1, 0]  # pruned: never drawn, weight 0
    e, _ = expected([FREEZE, LIGHT, HARD], GEKOConfig(mode="random_subset", subset_fraction=0.3))
    assert list(e) == pytest.approx([0.3, 0.3, 0.3])
    e, w = expected([FREEZE, LIGHT], GEKOConfig(mode="unbiased"), progress=0.95, anneal=True)  # all at weight 1
    assert list(e) == [1, 1] and (w == 1).all()


def test_infobatch_rule():
    cfg = GEKOConfig(mode="infobatch", prune_ratio=0.5)
    e, w = expected([FOCUS] * 4, cfg, progress=0.3, loss=[0.1, 0.2, 3.0, np.nan])
    assert list(e) == [0.5, 0.5, 1.0, 1.0]  # below-mean losses kept with prob 1 - r; unseen kept
    assert list(w) == [2.0, 2.0, 1.0, 1.0]  # and rescaled by 1 / (1 - r)


def test_infobatch_defaults_and_annealing():
    cfg = GEKOConfig(mode="infobatch")
    assert cfg.prune_ratio == 0.5 and cfg.anneal_fraction == 0.125  # the paper's r and 1 - delta
    e, w = expected([FOCUS] * 3, cfg, loss=[0.1, 0.2, 3.0], anneal=True)
    assert list(e) == [1.0, 1.0, 1.0] and (w == 1).all()  # the final epochs train on everything
    e, w = expected([FOCUS] * 3, cfg.replace(prune_ratio=0.8), loss=[0.1, 0.2, 3.0])
    assert list(e) == pytest.approx([0.2, 0.2, 1.0]) and list(w) == pytest.approx([5.0, 5.0, 1.0])


buckets = st.lists(st.sampled_from([FREEZE, LIGHT, FOCUS, HARD]), min_size=1, max_size=60)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(buckets, st.floats(0, 1), st.sampled_from(["geko", "unbiased", "uniform", "random_subset", "infobatch"]),
       st.data())
def test_properties(bucket, progress, mode, data):
    n = len(bucket)
    pruned = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    loss = data.draw(st.lists(st.floats(0, 20), min_size=n, max_size=n))
    cfg = GEKOConfig(mode=mode)
    e, w = expected(bucket, cfg, progress=progress, pruned=pruned, loss=loss)
    e2, w2 = expected(bucket, cfg, progress=progress, pruned=pruned, loss=loss)
    assert np.array_equal(e, e2) and np.array_equal(w, w2)  # same inputs, same outputs
    assert np.isfinite(e).all() and np.isfinite(w).all() and (e >= 0).all() and (w >= 0).all()
    assert (e[np.array(pruned)] == 0).all()  # pruned never comes back
    b = np.array(bucket)
    if mode == "geko" and progress < 1 - cfg.anneal_fraction:
        frozen = b == FREEZE
        assert (w[frozen] == 0).all()  # FREEZE never trained, only re-checked (annealing trains all)
        no_anneal = GEKOConfig(mode=mode, anneal=0.0)
        e0, w0 = expected(bucket, no_anneal, progress=progress, pruned=pruned, loss=loss)
        assert (w0[frozen] == 0).all()  # with anneal=0, at any progress
    if mode == "unbiased" and progress < 1 - cfg.anneal_fraction:
        alive = ~np.array(pruned)
        prod = e[alive] * w[alive]  # expected weighted count is equal for every alive sample
        assert np.allclose(prod, prod[0] if prod.size else 0, rtol=1e-5)


def _three_class_head(n_wrong=40, n_right=60, seed=0):
    """Confidences as a 3-class head gives them: mistakes around 0.4-0.6, right answers 0.5-0.8."""
    rng = np.random.default_rng(seed)
    conf = np.concatenate([rng.uniform(0.38, 0.6, n_wrong), rng.uniform(0.5, 0.8, n_right)]).astype(np.float32)
    correct = np.arange(n_wrong + n_right) >= n_wrong
    return conf, correct


def _classify_all(conf, correct, config):
    n = conf.shape[0]
    return policy.classify(seen=np.ones(n, bool), correct=correct, confidence=conf, q=np.ones(n, np.float32),
                           loss_var=np.zeros(n, np.float32), loss=-np.log(conf), last_step=np.zeros(n, np.int32),
                           config=config)


def test_relative_freeze_threshold_reads_the_task_scale():
    conf, correct = _three_class_head()
    rel = GEKOConfig(freeze_confidence=None, freeze_share=None)
    thr = policy.freeze_threshold(seen=np.ones(100, bool), correct=correct, confidence=conf, config=rel)
    wrong = conf[~correct]
    assert thr in wrong and (wrong <= thr).mean() >= 0.9 and (wrong < thr).mean() <= 0.9  # the 90% quantile
    frozen = _classify_all(conf, correct, rel) == FREEZE
    assert frozen.any() and (conf[frozen] > thr).all() and correct[frozen].all()
    # the absolute 0.85 of gekolib freezes nothing on this task
    assert not (_classify_all(conf, correct, GEKOConfig(freeze_confidence=0.85)) == FREEZE).any()
    # an explicit value is used as it is
    assert policy.freeze_threshold(seen=np.ones(100, bool), correct=correct, confidence=conf,
                                   config=GEKOConfig(freeze_confidence=0.3)) == 0.3


def test_relative_freeze_depends_on_ranks_only():
    conf, correct = _three_class_head(seed=1)
    rel = GEKOConfig(freeze_confidence=None, freeze_share=None)
    base = _classify_all(conf, correct, rel) == FREEZE
    assert 0 < base.sum() < correct.sum()
    for rescale in (np.sqrt, lambda c: c ** 3, lambda c: 0.2 + 0.5 * c):  # (HARD vs FOCUS stays absolute)
        np.testing.assert_array_equal(_classify_all(rescale(conf).astype(np.float32), correct, rel) == FREEZE, base)


def test_relative_freeze_with_few_mistakes_uses_the_median_of_right_answers():
    conf = np.array([0.2, 0.5, 0.6, 0.7, 0.8, 0.9], np.float32)
    correct = np.array([False, True, True, True, True, True])
    rel = GEKOConfig(freeze_confidence=None, freeze_share=None)
    assert 0.6 < policy.freeze_threshold(seen=np.ones(6, bool), correct=correct, confidence=conf, config=rel) < 0.7
    assert list(_classify_all(conf, correct, rel) == FREEZE) == [False, False, False, True, True, True]  # >= median
    # every answer right and equally sure: all may freeze (the median itself is not excluded)
    same = np.full(6, 0.99, np.float32)
    assert (_classify_all(same, np.ones(6, bool), rel) == FREEZE).all()
    # unseen samples do not count; nothing seen right: nothing may freeze
    assert policy.freeze_threshold(seen=np.zeros(6, bool), correct=correct, confidence=conf, config=rel) == 1.0


def test_freeze_share_freezes_the_right_answers_among_the_easiest_share():
    rng = np.random.default_rng(2)
    n = 100
    loss = rng.uniform(0.0, 2.0, n).astype(np.float32)
    correct = loss < 1.2  # 60 or so right answers, the easier ones
    correct[np.argsort(loss)[:5]] = False  # a few of the easiest are wrong all the same: they never freeze
    conf = np.exp(-loss).astype(np.float32)
    # loss_var and q as one pass leaves them for a sample still being learnt: the rank alone decides
    kw = dict(seen=np.ones(n, bool), correct=correct, confidence=conf, q=np.full(n, 0.5, np.float32),
              loss_var=np.full(n, 0.5, np.float32), loss=loss, last_step=np.zeros(n, np.int32))
    for share in (0.3, 0.5):
        frozen = policy.classify(**kw, config=GEKOConfig(freeze_share=share)) == FREEZE
        easiest = np.argsort(loss)[:round(share * n)]
        assert set(np.flatnonzero(frozen)) == set(easiest[correct[easiest]])
        # ranks only: any increasing rescaling of the loss freezes the same samples
        again = policy.classify(**{**kw, "loss": loss ** 3 + 7}, config=GEKOConfig(freeze_share=share)) == FREEZE
        np.testing.assert_array_equal(again, frozen)
    # the absolute threshold and freeze_share=None keep gekolib's stability and Q conditions: nothing freezes
    assert not (policy.classify(**kw, config=GEKOConfig(freeze_share=0.5, freeze_confidence=0.1)) == FREEZE).any()
    assert not (policy.classify(**kw, config=GEKOConfig(freeze_share=None)) == FREEZE).any()
    # without a loss column the rank is by confidence: the same order for a classifier's right answers
    no_loss = {k: v for k, v in kw.items() if k != "loss"}
    np.testing.assert_array_equal(policy.classify(**no_loss, config=GEKOConfig(freeze_share=0.5)) == FREEZE,
                                  policy.classify(**kw, config=GEKOConfig(freeze_share=0.5)) == FREEZE)


def test_easiest_share_is_taken_among_samples_reported_at_the_same_time():
    # A first epoch: the model improves while it reports, so a sample's loss says as much about when it was
    # measured as about the sample. Each sample's difficulty d is what matters.
    rng = np.random.default_rng(3)
    n = 1024
    step = np.arange(n) // 16  # 64 reports of 16 samples
    d = rng.uniform(0.0, 1.0, n)
    loss = (d + 2.0 * (1.0 - step / step.max())).astype(np.float32)  # the same sample costs less later
    seen = np.ones(n, bool)
    got = policy.easiest_in_windows(seen=seen, loss=loss, last_step=step, share=0.5)
    assert got.sum() == n // 2
    # every span of report time gives its easier half, early ones too
    for span in np.array_split(np.arange(n), policy.RANK_WINDOWS):
        assert got[span].sum() == len(span) // 2
        truly_easier = d[span] <= np.median(d[span])  # the model still improves inside a span: nearly
        assert (got[span] == truly_easier).mean() > 0.9
    # ranked all together, the first eighth of the epoch would freeze nothing however easy
    together = policy.easiest_in_windows(seen=seen, loss=loss, last_step=np.zeros(n, np.int32), share=0.5)
    assert together[: n // 8].sum() < 8 and got[: n // 8].sum() == n // 16
    # small data: fewer, larger spans (each at least MIN_WINDOW samples); unseen samples never count
    small = policy.easiest_in_windows(seen=np.arange(100) < 90, loss=np.arange(100, dtype=np.float32),
                                      last_step=np.arange(100), share=0.5)
    assert small[90:].sum() == 0 and small.sum() == 45
    assert not policy.easiest_in_windows(seen=np.zeros(4, bool), loss=np.ones(4, np.float32),
                                         last_step=np.zeros(4, np.int32), share=0.5).any()


def test_freeze_share_ignores_unseen_and_wrong_answers_and_ties_freeze():
    loss = np.array([0.01, 0.01, 1.6, 1.2, 0.1, 0.05], np.float32)
    correct = np.array([False, True, True, True, True, True])
    seen = np.array([True, False, True, True, True, True])
    cfg = GEKOConfig(freeze_share=0.5)
    out = policy.classify(seen=seen, correct=correct, confidence=np.exp(-loss), q=np.zeros(6, np.float32),
                          loss_var=np.zeros(6, np.float32), loss=loss, last_step=np.zeros(6, np.int32), config=cfg)
    # seen: 0.01 (wrong), 1.6, 1.2, 0.1, 0.05 -> the easiest half is 0.01, 0.05 (and 0.1 at the cut)
    assert list(out == FREEZE) == [False, False, False, False, True, True]
    same = np.full(4, 0.7, np.float32)
    assert (_classify_all(same, np.ones(4, bool), cfg) == FREEZE).all()


def test_a_sampler_skips_the_easier_half_after_one_pass_from_every_part_of_the_epoch():
    # The whole path: GEKOSampler -> SampleState.report -> repartition -> classify with the state's loss and
    # last_step. The model improves during epoch 0, so early reports carry higher losses for the same sample.
    from geko_data.sampler import GEKOSampler

    n, batch = 1024, 32
    sampler = GEKOSampler(n, total_epochs=3, config=GEKOConfig(log_bucket_stats=False, recheck_frozen=0.0,
                                                                 short_run_keep=None), seed=0)
    sampler.set_epoch(0)
    order = np.array(list(sampler))
    d = np.random.default_rng(4).uniform(0.0, 1.0, n)  # each sample's difficulty
    for k, lo in enumerate(range(0, n, batch)):
        ids = order[lo:lo + batch]
        loss = d[ids] + 2.0 * (1.0 - k / (n // batch - 1))
        sampler.report(ids, loss, correct=np.ones(len(ids), bool), confidence=np.exp(-loss))
    sampler.set_epoch(1)
    frozen = sampler.state.bucket == FREEZE
    assert abs(int(frozen.sum()) - n // 2) <= batch and len(list(sampler)) == n - int(frozen.sum())
    position = np.empty(n, int)
    position[order] = np.arange(n)
    first_quarter = position < n // 4
    assert frozen[first_quarter].mean() > 0.4  # ranked all together, none of these would freeze
    assert d[frozen].mean() < 0.3 < d[~frozen].mean()  # and the frozen ones are the easy ones


def test_short_geko_runs_keep_half_the_frozen_at_rescaled_weights():
    # SFT task, 3 epochs, 5 seeds: dropping every frozen sample for an epoch cost 7.4 points on test,
    # keeping half of them with rescaled weights 0.3 (the frozen hold the answers' prior)
    bucket = np.array([FREEZE] * 40 + [LIGHT] * 40 + [FOCUS] * 10 + [HARD] * 10, np.uint8)
    n = bucket.shape[0]
    pruned = np.zeros(n, bool)
    pruned[0] = True
    args = dict(bucket=bucket, pruned=pruned, times_seen=np.ones(n, np.uint16), loss=np.ones(n, np.float32),
                epoch=1)
    e, w = policy.epoch_expected(**args, total_epochs=3, config=GEKOConfig())
    assert e[0] == 0 and w[0] == 0
    assert np.allclose(e[1:40], 0.5) and np.allclose(e[40:], 1.0)
    # unbiased: every unpruned sample's expected share of the gradient is the same
    assert np.allclose(e[1:] * w[1:], (e[1:] * w[1:]).mean())
    assert w[1] > 1.5 and w[50] < 1.0
    assert policy.rescales(3, GEKOConfig()) and not policy.rescales(8, GEKOConfig())
    # 5+ epochs: the curriculum, FREEZE re-checked forward only (GEKO's rule)
    e, w = policy.epoch_expected(**args, total_epochs=8, config=GEKOConfig())
    assert np.allclose(e[1:40], GEKOConfig().recheck_frozen) and (w[:40] == 0).all()
    # short_run_keep=None: the rule before, frozen samples re-checked only
    e, w = policy.epoch_expected(**args, total_epochs=3, config=GEKOConfig(short_run_keep=None))
    assert np.allclose(e[1:40], GEKOConfig().recheck_frozen) and (w[:40] == 0).all()
    assert not policy.rescales(3, GEKOConfig(short_run_keep=None))


def test_kept_steps_short_runs_draw_sure_wrong_answers_least_and_unsure_ones_most():
    # After epoch 1 of 3 with steps kept: a classifier's HARD (wrong and sure) samples are where its wrong labels
    # gather, so they are drawn half as often as a right answer; FOCUS (wrong, unsure) twice as often. With
    # (3, 2, 1), the rule before, 10% changed MNIST labels cost 3.12 points on dev (30 seeds), (0.5, 2, 1) 0.41.
    bucket = np.array([FREEZE] * 40 + [LIGHT] * 30 + [FOCUS] * 20 + [HARD] * 10, np.uint8)
    n = bucket.shape[0]
    e, _ = policy.epoch_expected(bucket=bucket, pruned=np.zeros(n, bool), times_seen=np.ones(n, np.uint16),
                                 loss=np.ones(n, np.float32), epoch=1, total_epochs=3,
                                 config=GEKOConfig(recheck_frozen=0.0).planning(keeps_steps=True))
    assert e[:40].sum() == 0 and e.sum() == pytest.approx(60.0)  # FREEZE dropped, the epoch keeps its length
    light, focus, hard = e[40], e[70], e[90]
    assert hard / light == pytest.approx(0.5) and focus / light == pytest.approx(2.0)


# ---------------------------------------------------------------------- answers' balance
def _masses(counts, weight, answer):
    return {int(a): float((counts * weight)[answer == a].sum()) for a in np.unique(answer)}


def test_balance_answers_gives_each_answer_its_data_share_of_the_trained_weight():
    # 3 answers of 100 samples; answer 0's samples mostly frozen (count 0), the others all drawn
    answer = np.repeat(np.array([5, 6, 7], np.uint32), 100)
    counts = np.ones(300, np.int32)
    counts[:80] = 0
    counts[100:150] = 2  # half of answer 6 drawn twice (a FOCUS weight)
    weight = np.ones(300, np.float32)
    before = float((counts * weight).sum())
    factor = policy.balance_answers(counts, weight, answer, pruned=np.zeros(300, bool), cap=10.0)
    m = _masses(counts, weight, answer)
    assert factor is not None
    assert m[5] == pytest.approx(m[6], rel=1e-5) == pytest.approx(m[7], rel=1e-5)
    assert sum(m.values()) == pytest.approx(before, rel=1e-5)  # the epoch's total weight is unchanged
    assert weight[80] > 1.0 > weight[100]  # the few left of answer 5 weigh more, answer 6 less


def test_balance_answers_caps_the_factor_then_keeps_the_total():
    answer = np.repeat(np.array([0, 1], np.uint32), 100)
    counts = np.ones(200, np.int32)
    counts[:95] = 0  # 5 of answer 0's 100 samples left: a factor of ~20 uncapped
    weight = np.ones(200, np.float32)
    policy.balance_answers(counts, weight, answer, pruned=np.zeros(200, bool), cap=2.0)
    # answer 0 held at the cap (2); answer 1 carries the rest of the epoch's weight: (105 - 5 * 2) / 100
    assert weight[95] == pytest.approx(2.0) and weight[100] == pytest.approx(0.95, rel=1e-5)
    assert float((counts * weight).sum()) == pytest.approx(105.0, rel=1e-5)


def test_balance_answers_pools_rare_answers_and_leaves_one_pool_alone():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 3, 1000).astype(np.int32)
    # every answer its own (an open-ended generative task): one pool, nothing changes
    weight = np.ones(1000, np.float32)
    assert policy.balance_answers(counts, weight, np.arange(1000, dtype=np.uint32),
                                  pruned=np.zeros(1000, bool), cap=4.0) is None
    assert (weight == 1.0).all()
    # nothing reported (every answer 0): nothing changes, without sorting
    assert policy.balance_answers(counts, weight, np.zeros(1000, np.uint32), pruned=np.zeros(1000, bool),
                                  cap=4.0) is None
    # one common answer (500 samples) and 500 rare ones: two pools, balanced against each other
    answer = np.where(np.arange(1000) < 500, 7, np.arange(1000)).astype(np.uint32)
    counts[:500] = 0
    counts[:100] = 1
    factor = policy.balance_answers(counts, weight, answer, pruned=np.zeros(1000, bool), cap=100.0)
    assert factor is not None and factor.shape == (2,)  # answer 7's pool, then the rare answers' pool
    m = float((counts * weight)[:500].sum()), float((counts * weight)[500:].sum())
    assert m[0] == pytest.approx(m[1], rel=1e-5)


def test_balance_answers_counts_only_unpruned_samples_in_the_shares():
    answer = np.repeat(np.array([0, 1], np.uint32), 100)
    pruned = np.zeros(200, bool)
    pruned[:50] = True  # answer 0 has 50 unpruned samples, answer 1 has 100
    counts = np.where(pruned, 0, 1).astype(np.int32)
    weight = np.ones(200, np.float32)
    assert policy.balance_answers(counts, weight, answer, pruned=pruned, cap=4.0) is not None
    m = _masses(counts, weight, answer)
    assert m[1] == pytest.approx(2 * m[0], rel=1e-5)  # as drawn: already the unpruned shares
    assert np.allclose(weight[50:], 1.0)


def test_balance_answers_keeps_the_total_when_one_answer_sits_at_each_bound():
    """Review case: a mostly frozen answer at the upper bound must not drag the other to the lower bound
    (an earlier water-filling held both bounds and lost 57% of the epoch's weight)."""
    answer = np.r_[np.zeros(800, np.uint32), np.ones(200, np.uint32)]
    counts = np.r_[np.zeros(780), np.ones(20), np.ones(200)].astype(np.int32)
    weight = np.r_[np.ones(800), np.full(200, 2.0)].astype(np.float32)
    before = float((counts * weight).sum())
    factor = policy.balance_answers(counts, weight, answer, pruned=np.zeros(1000, bool), cap=4.0)
    assert factor[0] == pytest.approx(4.0) and 0.25 < factor[1] < 1.0
    assert float((counts * weight).sum()) == pytest.approx(before, rel=1e-5)


def test_balance_answers_gives_every_free_answer_the_same_ratio_to_its_data_share():
    """The one-scale solution: answers whose factor is inside (1/cap, cap) all end at the same ratio of
    trained-weight share to data share; an answer held at the cap ends below that ratio, one at 1/cap above
    it; the epoch's total is kept."""
    rng = np.random.default_rng(7)
    for trial in range(200):
        k = int(rng.integers(2, 7))
        answer = rng.integers(0, k, 600).astype(np.uint32)
        counts = (rng.random(600) < rng.random(k)[answer]).astype(np.int32) * rng.integers(1, 3, 600).astype(np.int32)
        weight = rng.choice([0.5, 1.0, 2.0], 600).astype(np.float32)
        total = float((counts * weight).sum())
        factor = policy.balance_answers(counts, weight, answer, pruned=np.zeros(600, bool), cap=2.0)
        if factor is None:
            continue
        factor = factor[:k]  # every answer here is common: the last pool, the rare ones', is empty
        data = np.bincount(answer, minlength=k) / 600
        mass = np.bincount(answer, weights=counts * weight.astype(np.float64), minlength=k)
        ratio = mass / mass.sum() / data
        drawn = mass > 0
        free = drawn & (factor > 0.5 + 1e-6) & (factor < 2.0 - 1e-6)
        if free.any():
            r = ratio[free].mean()
            assert np.allclose(ratio[free], r, rtol=1e-4), trial
            assert (ratio[drawn & (factor >= 2.0 - 1e-6)] <= r * (1 + 1e-4)).all(), trial
            assert (ratio[drawn & (factor <= 0.5 + 1e-6)] >= r * (1 - 1e-4)).all(), trial
        assert float((counts * weight).sum()) == pytest.approx(total, rel=1e-5)


def test_balance_answers_leaves_unreported_samples_out():
    """Samples not yet reported carry answer 0 (the column's initial value): they must neither count as
    answer 0 nor be scaled by its factor."""
    answer = np.zeros(600, np.uint32)
    labels = np.arange(600) % 3
    answer[:300] = labels[:300]  # only the first 300 reported
    seen = np.arange(600) < 300
    counts = np.ones(600, np.int32)
    counts[:300][labels[:300] == 0] = 0
    counts[:100] = 1  # some of label 0 drawn
    weight = np.ones(600, np.float32)
    policy.balance_answers(counts, weight, answer, pruned=np.zeros(600, bool), cap=4.0, seen=seen)
    assert (weight[300:] == 1.0).all()
    m = [float((counts * weight)[:300][labels[:300] == a].sum()) for a in range(3)]
    assert m[0] == pytest.approx(m[1], rel=1e-5) == pytest.approx(m[2], rel=1e-5)


def test_balance_answers_in_steps_finds_the_same_pools_as_in_one(monkeypatch):
    """The common answers are found a step at a time: with steps of 97 samples the factors and weights are
    those of one step over all, including an answer common overall but spread thinly over the steps."""
    rng = np.random.default_rng(3)
    n = 2000
    answer = rng.choice(np.array([5, 9, 11, 40], np.uint32), n, p=[0.5, 0.3, 0.17, 0.03])
    answer[::50] = np.arange(1000, 1000 + n // 50, dtype=np.uint32)  # rare answers, one sample each
    counts = rng.integers(0, 3, n).astype(np.uint16)
    pruned = rng.random(n) < 0.05
    seen = rng.random(n) < 0.9
    base = rng.choice([0.5, 1.0], n).astype(np.float32)
    one, steps = base.copy(), base.copy()
    f_one = policy.balance_answers(counts, one, answer, pruned=pruned, seen=seen, cap=4.0)
    monkeypatch.setattr(policy, "_STEP", 97)
    f_steps = policy.balance_answers(counts, steps, answer, pruned=pruned, seen=seen, cap=4.0)
    assert f_one.shape == (5,)  # 5, 9, 11, 40 (3% of the samples: common), then the rare pool
    np.testing.assert_allclose(f_steps, f_one, rtol=1e-12)
    np.testing.assert_array_equal(steps, one)
