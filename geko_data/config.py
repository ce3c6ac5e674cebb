"""GEKOConfig: every knob of the GEKO policy in one frozen, validated dataclass.

Field names and defaults follow gekolib 0.3.1's ``GEKOConfig`` so that a
gekolib user finds what they know; the fields after ``prune_frozen_after`` are
geko_data's additions (unbiased mode, forgetting re-checks, annealing, and the
baseline policies used by ``benchmarks/bench_value.py``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from geko_data.validate import check_int, check_number

__all__ = [
    "GEKOConfig",
    "GEKO_AGGRESSIVE",
    "GEKO_BALANCED",
    "GEKO_CONSERVATIVE",
    "GEKOLIB_DEFAULTS",
    "MODES",
    "FLAT",
    "MOUNTAIN",
    "PRESETS",
]

#: Sampling policies. ``geko`` and ``unbiased`` are GEKO; the others are the
#: baselines a user compares against on their own data.
MODES = ("geko", "unbiased", "uniform", "random_subset", "infobatch")

MOUNTAIN = ((1.0, 2.0, 3.0), (2.0, 3.0, 1.0), (5.0, 2.0, 0.0), (2.0, 3.0, 1.0), (1.0, 2.0, 3.0))
"""gekolib's Mountain curriculum: (HARD, FOCUS, LIGHT) sampling weights in its phases WARMUP, ASCENT, PEAK,
DESCENT and CONSOLIDATE (``policy.PHASES``); the ``gekolib`` presets' ``phase_weights``."""
FLAT = ((1.0, 1.0, 1.0),) * 5
"""The default ``phase_weights``: every sample that did not freeze drawn once in every phase."""


# A config is written to state files as JSON as it is: Python numbers only, no numpy scalars.
_check_range = partial(check_number, numpy=False)
_check_int = partial(check_int, numpy=False)


@dataclass(frozen=True, kw_only=True)
class GEKOConfig:
    """The GEKO policy. All fields are keyword-only and validated at construction.

    Args:
        freeze_confidence: confidence a correct sample must exceed to enter FREEZE (then ``freeze_share`` is
            not used); ``None`` reads the rule from the task: ``freeze_share`` or, with ``freeze_share=None``,
            at every repartition (``policy.freeze_threshold``) the ``freeze_quantile`` quantile of the
            confidences of the samples the model currently gets wrong, so a sample freezes when it is more
            confident than nearly every mistake (an absolute 0.85 means little to a 3-class head that is
            rarely over 0.85, and everything to an MNIST CNN that is over 0.99 on most digits). Defaults to
            ``None`` (gekolib: 0.85, the ``gekolib`` preset).
        freeze_quantile: with ``freeze_confidence=None``: the share of wrong samples' confidences a sample
            must exceed to freeze. Defaults to ``0.9``.
        freeze_share: with ``freeze_confidence=None``: at each repartition the easiest ``freeze_share`` of
            the seen samples (lowest last loss, ranked against the samples reported at about the same time)
            freeze if they are right, after a single pass (``policy.easiest_in_windows``); ``None`` uses the
            threshold rule instead (``freeze_quantile``, stability, Q). The value benchmark chose 0.5 on its
            dev splits (0.6 and 0.7 lost 1.3 and 0.7 points on MNIST in 3 epochs). Defaults to ``0.5``.
        freeze_quality: stability (``1 - min(sqrt(loss_var), 1)``) a sample must exceed to enter FREEZE.
            Defaults to ``0.80``.
        focus_confidence: confidence above which a wrong sample is HARD rather than FOCUS. Defaults to ``0.60``.
        bucket_weights: sampling weights (HARD, FOCUS, LIGHT) when the curriculum is off, as in runs shorter
            than ``curriculum_min_epochs``; FREEZE is 0 (or ``short_run_keep``). Defaults to ``(1, 1, 1)``:
            every sample that did not freeze once an epoch, the short-run rule measured with
            ``short_run_keep`` (``(3, 2, 1)`` before it; gekolib: ``(3, 1, 0)``).
        use_curriculum: follow the curriculum's per-phase weights (``phase_weights``) in runs of
            ``curriculum_min_epochs`` or more (the long-run rule: FREEZE samples are only re-checked, and
            with ``anneal=None`` the last epoch trains everything, or in runs of 8+ epochs ``anneal_keep``
            of FREEZE); ``False``: the short-run rule in every
            epoch. Defaults to ``True``.
        curriculum_min_epochs: runs of fewer epochs than this sample by ``bucket_weights`` instead of the
            curriculum's phase weights (``policy.uses_curriculum``; the LR multiplier is not affected). With
            the Mountain table a run of 3 or 4 epochs spends a whole epoch or two in PEAK, where LIGHT weighs 0
            and the right answers that did not freeze are not trained while the model still learns from them:
            on MNIST's dev split (3 epochs, 16 seeds) the curriculum ended 1.16 points under uniform,
            ``bucket_weights`` (3, 2, 1) 0.62, at the same 69% of the passes (on test, 8 seeds: 1.33 and
            1.13). Defaults to ``5`` (``1``: every run follows the curriculum, the rule before; a state file
            written before this field existed loads with ``1``).
        short_run_keep: in ``geko`` mode, in runs shorter than ``curriculum_min_epochs``: the share of FREEZE
            samples still drawn each epoch, with every sample's loss weight rescaled as in ``unbiased`` mode
            (``c / expected``), so the epoch's gradient stays an unbiased estimate of the full-data one
            (``policy.rescales``): with a share f frozen, a frozen sample weighs 2 - f, the others 1 - f/2.
            Frozen samples are the model's surest right answers, and a short fine-tune still learns from
            them: on the SFT task (3 epochs, cosine LR, 5 seeds) dropping all of them for an epoch, with
            ``(3, 2, 1)``, cost 4.7 points on dev and 7.4 on test; keeping half of them with ``(1, 1, 1)``
            gained 1.9 on dev and cost 0.3 on test, at 89% of uniform's passes. ``None``: FREEZE samples
            get ``recheck_frozen`` forward-only draws, as in long runs. This share is for epochs cut into
            fixed batches, which lose steps as they shrink; see ``short_run_keep_steps``. Defaults to ``0.5``.
        short_run_keep_steps: ``short_run_keep`` for epochs that keep a full epoch's optimizer steps in
            smaller batches (``GEKOBatchSampler``, ``GEKOStream(batches="steps")``, the integrations'
            default). The cost ``short_run_keep`` avoids was the steps: with them kept, dropping every frozen
            sample for the epoch (with ``short_run_weights_steps`` (3, 2, 1)) trained 69% of uniform's passes
            on MNIST's dev splits (3 epochs, 21 seeds) at +0.13 points on average, and 78% on the SFT task's
            (3 seeds) at +3.11, though a re-run over 6 seeds with the benchmark's ``--batches steps`` gave
            -4.11 on dev and -2.11 on test, where ``0.5`` was level with uniform (+0.22, -0.44) at 89%; on the
            unseen ``length`` task ``0.5`` lost 0.87 on test where ``None`` gained 1.60. Defaults to ``None``
            (FREEZE only re-checked; a state file written before this field keeps its ``short_run_keep``).
        short_run_weights_steps: ``bucket_weights`` of those runs, (HARD, FOCUS, LIGHT). HARD is a wrong
            answer the model is sure of (confidence above ``focus_confidence``); after an epoch that is where
            a classifier's wrong labels gather, and drawing them three times pulled the model toward them:
            with 10% of MNIST's training labels changed (dev, 3 epochs, 30 seeds) (3, 2, 1) ended 3.12
            points under uniform, (0.5, 2, 1) 0.41 under (20 seeds), and on clean labels +0.06 and +0.04.
            FOCUS, the unsure wrong answers, drawn twice as often as LIGHT did better than once on the SFT
            task's dev split (+3.11 against +0.89, 3 seeds); an LLM's wrong answer is never HARD with
            ``causal_lm``'s defaults (its least likely answer token is under 0.5), so there (0.5, 2, 1)
            plans as (3, 2, 1) did. Defaults to ``(0.5, 2, 1)`` (a state file written before this field
            keeps its ``bucket_weights``).
        long_run_freeze_share_steps: the rule of a ``geko`` run that follows the ``FLAT`` curriculum (5+
            epochs) and keeps a full epoch's steps (``GEKOConfig.planning``): the easiest
            ``long_run_freeze_share_steps`` of the right answers freeze (``freeze_share`` otherwise),
            HARD:FOCUS:LIGHT are drawn by ``long_run_weights_steps`` in every phase, and with ``anneal=None``
            the last epoch trains ``anneal_keep`` of FREEZE and every other sample once, at rescaled loss
            weights, instead of every sample. With steps kept a shrunk epoch loses no optimizer step, and
            a run can skip more: on MNIST's dev splits (5 epochs,
            20 seeds) the rule before trained 72% of uniform's passes at +0.49 points (clean labels) and
            +0.38 (10% changed), this one 57% at +0.46 and 58% at -0.30 (on MiniLM's tweets, not chosen
            on, 3 seeds, test: 56% at -0.07, the rule before 70% at -0.22). Freezing 60% alone lost 1.1 points
            with changed labels: the wrong labels then take a larger share of every step, which drawing
            HARD half as often (a sure wrong answer: where they gather; ``long_run_weights_steps``) and the
            quarter of FREEZE in the last epoch give back (those figures with HARD:FOCUS:LIGHT 0.5:2:1).
            ``None``: the fixed-batch rule in those runs too (a state file written before this field keeps
            it). Defaults to ``0.6``.
        long_run_weights_steps: the (HARD, FOCUS, LIGHT) weights of every phase of those long runs. FOCUS,
            the unsure wrong answers, drawn as often as LIGHT: with 60% of the right answers frozen every
            later epoch is mostly wrong answers already, and drawing them twice as often cost the SFT
            task 1.9 points on dev against (0.5, 1, 1) (5 epochs, 12 seeds: -1.67 against +0.28 points
            vs uniform) for the same passes, where on MNIST's dev splits (20 seeds) the two were within
            0.2 points (+0.46 / -0.30 with (0.5, 2, 1), +0.29 / -0.23 with (0.5, 1, 1), clean / 10% of the
            labels changed). HARD stays at 0.5: with changed labels that is where they gather. Defaults to
            ``(0.5, 1, 1)`` (a state file written before this field keeps its ``short_run_weights_steps``).
        answer_weight_cap: in ``geko`` runs shorter than ``curriculum_min_epochs``, keep every answer's share
            of an epoch's training at its share of the data: the plan's loss weights of each answer's samples
            are scaled (by at most this factor either way; the draws do not change) so that the answers the
            model gets right, whose samples freeze, still weigh as much as in a uniform epoch
            (``policy.balance_answers``). Needs the answers reported (``report(answer=)``;
            ``signals.causal_lm`` and ``signals.classification`` give them). A model near chance gets mostly
            its favoured answer right, so freezing those trained the others and the model swung between
            answers: on the SFT task (3 epochs, steps kept, 6 seeds) the balance took the default from -2.11
            to -0.44 points vs uniform on test (dev -4.11 to -2.56) at the same 78% of the passes; over five
            3-epoch tasks the mean moved from -0.49 to -0.16 (test) and -0.69 to -0.19 (dev). In 5-epoch
            runs it was no help (five tasks: dev -0.19 to -0.12, test -0.20 to -0.97), so longer runs do
            not balance (``policy.balances_answers``). ``None``: no scaling. Defaults to ``4`` (set before any
            run, not tuned; ``None`` in the ``gekolib`` presets and in state files written before the field).
        phase_weights: the curriculum: (HARD, FOCUS, LIGHT) sampling weights for each of the five phases
            WARMUP, ASCENT, PEAK, DESCENT, CONSOLIDATE. Defaults to ``FLAT``, (1, 1, 1) in every phase.
            gekolib's Mountain table (``MOUNTAIN``, the ``gekolib`` presets) gives PEAK (5, 2, 0): the wrong
            answers drawn up to ``max_repeats`` times and the right ones that did not freeze not at all. With
            10% of MNIST's training labels changed (dev split, 8 epochs, 5 seeds) the wrong answers are
            mostly the changed labels, and accuracy fell to 53% in PEAK and ended 0.78 points under uniform;
            ``FLAT`` ended 0.20 under at 64% of the passes (clean labels: 0.10 under at 57% and 0.07 at 63%).
        q_value_lr: EMA rate of the Q-value update. Defaults to ``0.5`` (gekolib: 0.1, with which a sample
            needs 9+ passes before it may freeze, so nothing freezes in a 3-5 epoch fine-tune).
        min_q_for_freeze: Q-value a sample needs before it may enter FREEZE. Defaults to ``0.7``
            (gekolib: 0.8).
        q_value_loss_scale: loss that maps to a Q target of 0. Defaults to ``10.0``.
        repartition_every: re-bucket every N epochs. Defaults to ``1``.
        log_bucket_stats: print the partition table at each repartition. Defaults to ``True``.
        max_times_seen: passes after which a sample gets sampling weight 0 (0 disables). Defaults to ``50``.
        prune_frozen_after: prune a sample for good after N consecutive FREEZE repartitions (0 disables).
            Defaults to ``0``.
        mode: one of ``geko``, ``unbiased``, ``uniform``, ``random_subset``, ``infobatch``. Defaults to ``"geko"``.
        keep_frozen: unbiased mode: fraction of FREEZE samples kept each epoch, at loss weight
            ``1/keep_frozen``. Defaults to ``0.1``.
        recheck_frozen: geko mode: fraction of FREEZE samples re-measured each epoch (loss weight 0,
            forward only) so that forgetting is caught. Defaults to ``0.05``.
        early_stop_frozen: FREEZE (plus pruned) share at which training may stop (1.0 disables).
            Defaults to ``0.95``.
        anneal: final fraction of training run on all unpruned data at weight 1 (InfoBatch's
            ``1 - delta``): epoch ``e`` anneals when ``e >= (1 - anneal) * total_epochs``, so FREEZE samples
            are trained in it (in a ``geko`` run of 8+ epochs, ``anneal_keep`` of them). ``None`` means 0.125
            for ``geko``, ``unbiased`` and ``infobatch`` (the last epoch of an 8-epoch run; none of a run under
            8 epochs), 0 otherwise; and for ``geko`` in a run
            that follows the curriculum (``policy.uses_curriculum``) at least its last epoch
            (``policy.annealing``): that run never trains its FREEZE samples otherwise, and on MNIST with 10%
            changed labels in 5 epochs (dev, 5 seeds) the last epoch on all data took the loss against uniform
            from 1.90 to 0.54 points. The value benchmark measured that this final pass buys back the accuracy
            GEKO's emphasis costs. ``anneal=0`` keeps GEKO's rule that a FREEZE sample is never trained.
            Defaults to ``None``.
        anneal_keep: in a ``geko`` run that follows the curriculum and whose ``anneal`` fraction anneals at
            least one epoch by itself (8+ epochs at 0.125; ``policy.anneal_share``): the share of FREEZE
            samples drawn in an annealing epoch, every other trainable sample once, with loss weights rescaled
            as in the short-run rule (``c / expected``), instead of every sample once at weight 1. The last
            epoch ``anneal=None`` adds to a run of 5-7 epochs trains everything with fixed batches (a quarter
            of FREEZE with steps kept: ``long_run_freeze_share_steps``). On the value benchmark's
            dev splits (8 epochs, 5 seeds) 0.25 trained 59% of uniform's backward passes at -0.28 ± 0.19
            points on MNIST and -0.36 ± 1.04 with 10% changed labels (all of FREEZE: 63-64%, -0.08 and -0.20);
            in 5-epoch runs a quarter or a half of FREEZE in the last epoch lost more than all of it with
            changed labels (-1.12 and -0.88 against -0.54, at 64-67% of the passes against 72%). ``None``:
            InfoBatch's annealing, every sample at weight 1 (the presets).
            Defaults to ``0.25``.
        loss_ema: decay of the loss EMA and of the squared-deviation EMA behind stability. Defaults to ``0.7``.
        max_repeats: cap on one sample's multiplicity in an epoch. Defaults to ``5``.
        subset_fraction: ``random_subset`` mode: fraction of the data drawn each epoch. Defaults to ``0.5``.
        prune_ratio: ``infobatch`` mode: fraction r of below-mean-loss samples dropped each epoch.
            Defaults to ``0.5``.
        name: a label carried into state files and reports (presets set it); not a policy knob and not
            compared by ``==``. Defaults to ``"custom"``.
    """

    freeze_confidence: float | None = None
    freeze_quantile: float = 0.9
    freeze_share: float | None = 0.5
    freeze_quality: float = 0.80
    focus_confidence: float = 0.60
    bucket_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    use_curriculum: bool = True
    curriculum_min_epochs: int = 5
    short_run_keep: float | None = 0.5
    short_run_keep_steps: float | None = None
    short_run_weights_steps: tuple[float, float, float] = (0.5, 2.0, 1.0)
    long_run_freeze_share_steps: float | None = 0.6
    long_run_weights_steps: tuple[float, float, float] = (0.5, 1.0, 1.0)
    answer_weight_cap: float | None = 4.0
    phase_weights: tuple[tuple[float, float, float], ...] = FLAT
    q_value_lr: float = 0.5
    min_q_for_freeze: float = 0.7
    q_value_loss_scale: float = 10.0
    repartition_every: int = 1
    log_bucket_stats: bool = True
    max_times_seen: int = 50
    prune_frozen_after: int = 0
    mode: str = "geko"
    keep_frozen: float = 0.1
    recheck_frozen: float = 0.05
    early_stop_frozen: float = 0.95
    anneal: float | None = None
    anneal_keep: float | None = 0.25
    loss_ema: float = 0.7
    max_repeats: int = 5
    subset_fraction: float = 0.5
    prune_ratio: float = 0.5
    # Not a policy knob: lets presets carry a name into state files and reports.
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if self.freeze_confidence is not None:
            _check_range("freeze_confidence", self.freeze_confidence, 0.0, 1.0)
        _check_range("freeze_quantile", self.freeze_quantile, 0.0, 1.0)
        if self.freeze_share is not None:
            _check_range("freeze_share", self.freeze_share, 0.0, 1.0, lo_open=True)
        _check_range("freeze_quality", self.freeze_quality, 0.0, 1.0)
        _check_range("focus_confidence", self.focus_confidence, 0.0, 1.0)
        object.__setattr__(self, "bucket_weights", _weights("bucket_weights", self.bucket_weights))
        object.__setattr__(self, "short_run_weights_steps",
                           _weights("short_run_weights_steps", self.short_run_weights_steps))
        object.__setattr__(self, "long_run_weights_steps",
                           _weights("long_run_weights_steps", self.long_run_weights_steps))
        pw = self.phase_weights
        if not isinstance(pw, (tuple, list)) or len(pw) != len(MOUNTAIN):
            raise ValueError(f"`phase_weights` must be {len(MOUNTAIN)} (HARD, FOCUS, LIGHT) triples, one per "
                             f"phase (WARMUP, ASCENT, PEAK, DESCENT, CONSOLIDATE), got {pw!r}")
        object.__setattr__(self, "phase_weights", tuple(_weights("phase_weights", w) for w in pw))
        if not isinstance(self.use_curriculum, bool):
            raise ValueError(f"`use_curriculum` must be a bool, got {self.use_curriculum!r}")
        _check_int("curriculum_min_epochs", self.curriculum_min_epochs, 1, 10_000)
        for name in ("short_run_keep", "short_run_keep_steps", "long_run_freeze_share_steps"):
            if getattr(self, name) is not None:
                _check_range(name, getattr(self, name), 0.0, 1.0, lo_open=True)
        if not isinstance(self.log_bucket_stats, bool):
            raise ValueError(f"`log_bucket_stats` must be a bool, got {self.log_bucket_stats!r}")
        if self.answer_weight_cap is not None:
            _check_range("answer_weight_cap", self.answer_weight_cap, 1.0, 1e6)
        _check_range("q_value_lr", self.q_value_lr, 0.0, 1.0, lo_open=True)
        _check_range("min_q_for_freeze", self.min_q_for_freeze, 0.0, 1.0)
        _check_range("q_value_loss_scale", self.q_value_loss_scale, 0.0, 1e9, lo_open=True)
        _check_int("repartition_every", self.repartition_every, 1, 10_000)
        _check_int("max_times_seen", self.max_times_seen, 0, 65_535)
        # frozen_epochs is a saturating uint8 counter (it keeps the state at 32 bytes/sample).
        _check_int("prune_frozen_after", self.prune_frozen_after, 0, 255)
        if self.mode not in MODES:
            raise ValueError(f"`mode` must be one of {', '.join(MODES)}, got {self.mode!r}")
        _check_range("keep_frozen", self.keep_frozen, 0.0, 1.0, lo_open=True)
        _check_range("recheck_frozen", self.recheck_frozen, 0.0, 1.0)
        _check_range("early_stop_frozen", self.early_stop_frozen, 0.0, 1.0, lo_open=True)
        if self.anneal is not None:
            _check_range("anneal", self.anneal, 0.0, 1.0)
        if self.anneal_keep is not None:
            _check_range("anneal_keep", self.anneal_keep, 0.0, 1.0, lo_open=True)
        _check_range("loss_ema", self.loss_ema, 0.0, 1.0, hi_open=True)
        _check_int("max_repeats", self.max_repeats, 1, 1000)
        _check_range("subset_fraction", self.subset_fraction, 0.0, 1.0, lo_open=True)
        _check_range("prune_ratio", self.prune_ratio, 0.0, 1.0, hi_open=True)
        if not isinstance(self.name, str):
            raise ValueError(f"`name` must be a string, got {self.name!r}")

    @property
    def anneal_fraction(self) -> float:
        """The effective ``anneal`` (``None`` resolved per mode)."""
        if self.anneal is not None:
            return float(self.anneal)
        return 0.125 if self.mode in ("geko", "unbiased", "infobatch") else 0.0

    def planning(self, *, keeps_steps: bool, total_epochs: int | None = None) -> "GEKOConfig":
        """The config a run of ``total_epochs`` is repartitioned and planned with. When its batches keep a
        full epoch's steps, ``short_run_keep_steps`` and ``short_run_weights_steps`` take ``short_run_keep``'s
        and ``bucket_weights``' places; and a ``geko`` run that follows the ``FLAT`` curriculum
        (``policy.uses_curriculum``) with ``long_run_freeze_share_steps`` set draws
        ``long_run_weights_steps`` in every phase, freezes by that share, and anneals at least its last
        epoch with ``anneal_keep`` of FREEZE (``anneal=None`` only)."""
        if not keeps_steps:
            return self
        changes: dict[str, Any] = {}
        if self.short_run_keep != self.short_run_keep_steps:
            changes["short_run_keep"] = self.short_run_keep_steps
        if self.bucket_weights != self.short_run_weights_steps:
            changes["bucket_weights"] = self.short_run_weights_steps
        if self._long_run_steps(total_epochs):
            changes["phase_weights"] = (self.long_run_weights_steps,) * len(FLAT)
            changes["freeze_share"] = self.long_run_freeze_share_steps
            if self.anneal is None and total_epochs is not None:
                changes["anneal"] = max(self.anneal_fraction, 1.0 / total_epochs)
        return self.replace(**changes) if changes else self

    def follows_curriculum(self, total_epochs: int | None) -> bool:
        """Whether a run of ``total_epochs`` samples by the curriculum's phase weights: ``use_curriculum`` and
        at least ``curriculum_min_epochs`` epochs (``None``: the length is not known, the curriculum applies)."""
        return self.use_curriculum and (total_epochs is None or total_epochs >= self.curriculum_min_epochs)

    def _long_run_steps(self, total_epochs: int | None) -> bool:
        """Whether ``planning`` applies the long-run rule of runs that keep their steps (see there)."""
        return (self.follows_curriculum(total_epochs) and self.mode == "geko" and self.phase_weights == FLAT
                and self.long_run_freeze_share_steps is not None
                and self.freeze_confidence is None and self.freeze_share is not None)

    def replace(self, **changes: Any) -> "GEKOConfig":
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable dict; ``from_dict(to_dict())`` round-trips."""
        d = dataclasses.asdict(self)
        d["bucket_weights"] = list(self.bucket_weights)
        d["short_run_weights_steps"] = list(self.short_run_weights_steps)
        d["long_run_weights_steps"] = list(self.long_run_weights_steps)
        d["phase_weights"] = [list(w) for w in self.phase_weights]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GEKOConfig":
        """Build from ``to_dict()`` output; unknown keys raise ValueError naming them."""
        if not isinstance(d, dict):
            raise ValueError(f"GEKOConfig.from_dict needs a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GEKOConfig field(s) {unknown}; allowed: {sorted(known)}")
        d = dict(d)
        # written before the field existed, when every run followed the curriculum: a resumed run keeps its rule
        d.setdefault("curriculum_min_epochs", 1)
        d.setdefault("short_run_keep", None)
        d.setdefault("short_run_keep_steps", d["short_run_keep"])
        d.setdefault("short_run_weights_steps", d.get("bucket_weights", (1.0, 1.0, 1.0)))
        d.setdefault("anneal_keep", None)
        d.setdefault("long_run_freeze_share_steps", None)
        d.setdefault("long_run_weights_steps", d["short_run_weights_steps"])
        d.setdefault("answer_weight_cap", None)  # written before the answers' balance: the rule it ran with
        return cls(**d)


def _weights(name: str, w: Any) -> tuple[float, float, float]:
    """``w`` as 3 floats (HARD, FOCUS, LIGHT), each finite and >= 0; a list is accepted (JSON gives lists)."""
    if not isinstance(w, (tuple, list)) or len(w) != 3:
        raise ValueError(f"`{name}` must be 3 numbers (HARD, FOCUS, LIGHT), got {w!r}")
    if not all(not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 for x in w):
        raise ValueError(f"`{name}` must be 3 finite numbers >= 0 (HARD, FOCUS, LIGHT), got {w!r}")
    return tuple(float(x) for x in w)


# gekolib's curriculum: the Mountain table in runs of any length, annealing epochs on all data.
_GEKOLIB_CURRICULUM = dict(curriculum_min_epochs=1, phase_weights=MOUNTAIN, anneal_keep=None, answer_weight_cap=None)
#: gekolib 0.3.1's defaults, unchanged (geko_data's defaults differ in freeze_confidence, q_value_lr,
#: min_q_for_freeze, bucket_weights and curriculum_min_epochs).
GEKOLIB_DEFAULTS = GEKOConfig(freeze_confidence=0.85, q_value_lr=0.1, min_q_for_freeze=0.8, anneal=0.0,
                              bucket_weights=(3.0, 1.0, 0.0), **_GEKOLIB_CURRICULUM, name="gekolib")
GEKO_AGGRESSIVE = GEKOConfig(freeze_confidence=0.90, freeze_quality=0.85, bucket_weights=(5.0, 2.0, 0.0),
                             **_GEKOLIB_CURRICULUM, name="aggressive")
GEKO_BALANCED = GEKOConfig(freeze_confidence=0.85, freeze_quality=0.80, bucket_weights=(3.0, 2.0, 1.0),
                           **_GEKOLIB_CURRICULUM, name="balanced")
GEKO_CONSERVATIVE = GEKOConfig(freeze_confidence=0.80, freeze_quality=0.75, bucket_weights=(2.0, 2.0, 1.0),
                               **_GEKOLIB_CURRICULUM, name="conservative")
PRESETS = {c.name: c for c in (GEKOLIB_DEFAULTS, GEKO_AGGRESSIVE, GEKO_BALANCED, GEKO_CONSERVATIVE)}
