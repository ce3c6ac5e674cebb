"""EpochDriver: what GEKOSampler and GEKOStream share: the state, feedback, and moving from epoch to epoch.

``set_epoch`` is the one entry point that moves an epoch forward: it
re-buckets the state (every ``repartition_every`` epochs) and fixes the
epoch's plan; both front-ends then turn that plan into indices or samples.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from geko_data import policy
from geko_data.config import GEKOConfig
from geko_data.efficiency import efficiency_report, format_efficiency_report
from geko_data.feedback import Feedback
from geko_data.plan import EpochPlan, epoch_plan
from geko_data.state import SampleState, check_fingerprint
from geko_data.validate import check_instance, check_int
from geko_data.world import World

# check_int is re-exported for the integrations that import it from here.
__all__ = ["EpochDriver", "check_int"]

STATE_DICT_VERSION = 1

# An epoch whose reports cover less than this share of its planned draws is almost certainly a misuse.
COVERAGE_WARN_BELOW = 0.75


class EpochDriver:
    """Base of the sampler and the stream: the state, feedback, seed and ranks, and moving between epochs.

    Args:
        num_samples: samples in the data (the state's length).
        total_epochs: planned epochs (sets the curriculum's progress).
        config: the policy. Defaults to ``state.config``, or ``GEKOConfig()`` for a fresh state; with a
            ``state`` it must equal ``state.config`` (a state keeps the policy it was built or loaded
            with; the caller's state is never changed behind its back).
        seed: seed of every random choice.
        state: an existing ``SampleState`` of ``num_samples`` samples. Defaults to a fresh one.
        world: the ranks (its DataLoader worker fields are filled in where the data is read).
        epoch_length: draws per epoch over all ranks (``None``: the active count).
        fingerprint: a name of the data, checked against the state's; a state without one is given it
            so its files name their data. Defaults to ``None``.
        data_name: how messages name the data (``"`data_source` has"``, ``"the shards hold"``).
    """

    def __init__(self, *, num_samples: int, total_epochs: int, config: GEKOConfig | None, seed: int,
                 state: SampleState | None, world: World, epoch_length: int | None,
                 fingerprint: str | None = None, data_name: str = "the data has") -> None:
        check_int("total_epochs", total_epochs, 1)
        check_int("seed", seed, 0)
        check_int("epoch_length", epoch_length, 1, optional=True)
        check_instance("config", config, GEKOConfig)
        check_instance("world", world, World, optional=False)
        check_instance("state", state, SampleState)
        if state is None:
            state = SampleState(num_samples, config=config, fingerprint=fingerprint)
        else:
            if len(state) != num_samples:
                raise ValueError(f"`state` holds {len(state)} samples but {data_name} {num_samples}")
            check_fingerprint(state.fingerprint, fingerprint, where="`state`")
            if config is not None and config != state.config:
                raise ValueError(f"`config` {config!r} differs from the policy of `state` {state.config!r}: pass "
                                 f"config=None to keep the state's, or load the state with the new one "
                                 f"(SampleState.load(path, config=...))")
            if state.fingerprint is None:
                state.fingerprint = fingerprint  # names the data in the state's files from now on
        self.state = state
        self.feedback = Feedback(state)
        self.world = world
        self.seed = int(seed)
        self.total_epochs = int(total_epochs)
        self.epoch_length = epoch_length
        self.epoch = -1
    # (epoch, feedback rows before it, its planned draws) of the current epoch; rows None: a resumed epoch,
    # whose reports before the checkpoint this process never saw, is not watched.
    _coverage: tuple[int, int | None, int] | None = None
    _coverage_resumed = False
    _coverage_warned = False
    _warned_past_end = False
    #: Whether the epochs are cut into a full epoch's steps (a ``GEKOBatchSampler`` sets it on its sampler;
    #: a stream's ``batches="steps"`` says it): the run is then repartitioned and planned with
    #: ``config.planning(keeps_steps=True, ...)``.
    keeps_steps = False

    def planning_config(self) -> GEKOConfig:
        """The config this run is repartitioned and planned with (``GEKOConfig.planning``): the state's
        policy with the rules of epochs that keep their steps when they do."""
        return self.config.planning(keeps_steps=self.keeps_steps, total_epochs=self.total_epochs)

    @staticmethod
    def log(message: str) -> None:
        """Where the partition table goes (rank 0 only); set ``obj.log = my_logger`` to redirect it."""
        print(message, flush=True)

    @property
    def config(self) -> GEKOConfig:
        return self.state.config

    @property
    def progress(self) -> float:
        """Curriculum progress of the current epoch (its midpoint)."""
        return policy.epoch_progress(max(self.epoch, 0), self.total_epochs)

    @property
    def follows_curriculum(self) -> bool:
        """Whether this run samples by the curriculum's phases (``policy.uses_curriculum``: a run shorter
        than ``config.curriculum_min_epochs`` does not)."""
        return policy.uses_curriculum(self.total_epochs, self.config)

    @property
    def phase(self) -> str:
        """The curriculum phase of the current epoch, or ``""`` when the run follows no curriculum."""
        return self._phase_of(self.progress)

    def _phase_of(self, progress: float) -> str:
        return policy.phase_name(progress) if self.follows_curriculum else ""

    @property
    def lr_multiplier(self) -> float:
        """The Mountain LR multiplier of the current epoch (1.0 when the run follows no curriculum)."""
        return policy.lr_multiplier(self.progress) if self.follows_curriculum else 1.0

    @property
    def should_stop(self) -> bool:
        """True when the FREEZE share has reached ``config.early_stop_frozen``."""
        return self.state.should_stop

    @property
    def plan(self) -> EpochPlan:
        """The current epoch's plan (counts and loss weights per sample); the state keeps and saves it."""
        raise NotImplementedError

    def _advance(self, epoch: Any,
                 out: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None) -> EpochPlan:
        """Validate ``epoch``, repartition when due, and return the epoch's plan.

        An epoch's plan is fixed the first time the epoch starts and kept in the state (and its file): a
        resumed epoch takes that plan, since reports made during the epoch have changed its inputs. ``out``
        gives the (counts, loss weight) arrays a new plan is written into (``epoch_plan(out=)``); it is called
        only when a plan is made, after the state has let go of its plan, whose arrays they may be.
        """
        check_int("epoch", epoch, 0)
        epoch = int(epoch)
        if epoch >= self.total_epochs and not self._warned_past_end:
            # Not refused: a framework may touch the epoch after the last one. Planned as the run's end.
            self._warned_past_end = True
            warnings.warn(f"set_epoch({epoch}) is past the planned run (total_epochs={self.total_epochs}: epochs "
                          f"0-{self.total_epochs - 1}); it is planned as the run's last epoch. For a longer run, "
                          f"make the sampler or stream with a larger total_epochs", RuntimeWarning, stacklevel=3)
        self._check_coverage(epoch)
        progress = policy.epoch_progress(epoch, self.total_epochs)
        kept = self.state.plan
        if kept is not None and kept.matches(epoch=epoch, progress=progress, seed=self.seed,
                                             epoch_length=self.epoch_length, num_samples=self.state.num_samples):
            self.epoch = epoch
            self._watch(kept)
            return kept
        config = self.planning_config()
        # A resumed epoch was repartitioned before its checkpoint: the state file holds that.
        if self.state.epoch < epoch and epoch % self.config.repartition_every == 0:
            stats = self.state.repartition(progress, epoch=epoch, phase=self._phase_of(progress), config=config)
            if self.config.log_bucket_stats and self.world.is_main:
                self.log(stats.format())
        self.epoch = epoch
        self.state.plan = None
        plan = epoch_plan(self.state, seed=self.seed, epoch=epoch, total_epochs=self.total_epochs,
                          config=config,
                          epoch_length=self.epoch_length, out=None if out is None else out())
        self.state.plan = plan
        self._watch(plan)
        return plan

    def _watch(self, plan: EpochPlan) -> None:
        if self._coverage is None or self._coverage[0] != plan.epoch:
            resumed, self._coverage_resumed = self._coverage_resumed, False
            rows = None if resumed else self.feedback.num_rows
            self._coverage = (plan.epoch, rows, int(plan.counts.sum()))

    def _check_coverage(self, epoch: int) -> None:
        """Warn once when the epoch that is ending was reported well under its plan: GEKO learns only from
        reports, so a framework that re-sharded the sampler or a loop that never reports goes unnoticed."""
        if self._coverage is None or self._coverage[0] == epoch or self._coverage_warned:
            return
        ended, rows_before, draws = self._coverage
        if rows_before is None:
            return
        reported = self.feedback.num_rows - rows_before
        if draws > 0 and reported < COVERAGE_WARN_BELOW * draws:
            self._coverage_warned = True
            warnings.warn(
                f"GEKO epoch {ended} planned {draws} draws (over all ranks) but the loop reported {reported} "
                f"per-sample results ({reported / draws:.0%}). Likely causes: a framework re-sharded the sampler, "
                f"which already yields this rank's share (accelerate's prepare(), Lightning's "
                f"use_distributed_sampler=True, a DistributedSampler around it), so each rank trains a fraction "
                f"of its share; or `report(batch['__index__'], losses)` is not called for every batch. Fix: use "
                f"geko_data.integrations (GEKOTrainer, GEKOSFTTrainer, GEKOCallback; in your own accelerate "
                f"loop, integrations.accelerate.prepare_loader instead of accelerator.prepare(loader)) or hand "
                f"the sampler to the DataLoader unwrapped, and report every batch", RuntimeWarning, stacklevel=4)

    def use_state(self, state: SampleState) -> None:
        """Continue from ``state`` (e.g. ``SampleState.load`` of a checkpoint's file); call before
        ``load_state_dict``. This object's policy and fingerprint are kept; a state of other data (another
        fingerprint) raises FingerprintError."""
        if not isinstance(state, SampleState):
            raise TypeError(f"`state` must be a SampleState, got {type(state).__name__}")
        if len(state) != len(self.state):
            raise ValueError(f"`state` holds {len(state)} samples, this data has {len(self.state)}")
        mine, theirs = self.state.fingerprint, state.fingerprint
        check_fingerprint(theirs, mine, where="`state`")
        state.config = self.state.config
        state.fingerprint = mine or theirs
        self.state = state
        self.feedback = Feedback(state)
        self._coverage, self._coverage_resumed = None, True

    def report(self, ids: Any, losses: Any, *, correct: Any = None, confidence: Any = None,
               answer: Any = None, step: int | None = None) -> int:
        """Feed per-sample results back (all-gathered under torch.distributed); see ``Feedback.report``."""
        return self.feedback.report(ids, losses, correct=correct, confidence=confidence, answer=answer,
                                   step=step)

    def _check_consumed(self, consumed: int | None, what: str) -> None:
        """``state_dict``'s ``consumed`` counts the epoch from its start: in an epoch resumed at ``position`` it
        is at least that (a count restarted at 0 after the resume saved a position before it, and the next
        resume trained the samples between again)."""
        check_int("consumed", consumed, 0, optional=True)
        start = self.position  # type: ignore[attr-defined]  # both front ends have it
        if consumed is not None and consumed < start:
            raise ValueError(f"`consumed` ({consumed}) counts this epoch's samples from its start, and this epoch "
                             f"resumed at position {start}: start the loop's count at `{what}.position` "
                             f"(then add each batch's length)")

    def _base_state_dict(self, kind: str, position: int) -> dict[str, Any]:
        return {"version": STATE_DICT_VERSION, "kind": kind, "seed": self.seed, "epoch": self.epoch,
                "position": int(position), "num_samples": self.state.num_samples,
                "world_size": self.world.world_size, "total_epochs": self.total_epochs,
                "epoch_length": self.epoch_length, "config": self.config.to_dict(),
                "fingerprint": self.state.fingerprint, "state_passes": self._state_passes()}

    def _state_passes(self) -> int:
        """Sample passes the state has counted: ties a position to the state it was saved with."""
        return int(self.state.times_seen.sum(dtype=np.int64))

    def _check_state_dict(self, sd: Any, mine: dict[str, Any], what: str) -> tuple[int, int]:
        """Validate a state_dict against this object's values; return its (epoch, position).

        Besides ``mine`` (the front-end's own fields), everything the epoch plan depends on must agree:
        seed, total_epochs, epoch_length, world size and the config's mode.
        """
        if not isinstance(sd, dict):
            raise TypeError(f"`state_dict` must be a dict, got {type(sd).__name__}")
        version = sd.get("version")
        if not isinstance(version, int) or version > STATE_DICT_VERSION:
            raise ValueError(f"state_dict version {version!r} is not supported (this reads <= {STATE_DICT_VERSION})")
        mine = {"seed": self.seed, "total_epochs": self.total_epochs, "epoch_length": self.epoch_length,
                "world_size": self.world.world_size, "fingerprint": self.state.fingerprint, **mine}
        # Other data is one error type wherever it is found (the state file, use_state, the state_dict).
        check_fingerprint(sd.get("fingerprint"), mine.pop("fingerprint"), where="state_dict")
        for key, value in mine.items():
            theirs = sd.get(key, value)  # fields added later default to ours
            if theirs != value:
                hint = ""
                if key == "total_epochs":  # the plan of every epoch depends on the run's length
                    hint = (f": the saved run was planned for {theirs} epochs, and a run cannot change its length "
                            f"on resume; resume with total_epochs={theirs}, or start a new {what} with "
                            f"`use_state(SampleState.load(path))` and no load_state_dict (its epoch 0 then "
                            f"plans from what the state learnt)")
                elif key == "world_size":  # each rank's share of an epoch, and so a position, depends on it
                    hint = (f": the saved run had {theirs} process(es) and this one has {value}; a position in an "
                            f"epoch names samples of one split of the data over the processes, so resume with "
                            f"{theirs} process(es) (the run can change its process count only by starting anew "
                            f"from the saved SampleState, without the position)")
                raise ValueError(f"state_dict {key} {theirs!r} does not match this {what}'s {key} {value!r}{hint}")
        theirs_mode = (sd.get("config") or {}).get("mode", self.config.mode)
        if theirs_mode != self.config.mode:
            raise ValueError(f"state_dict config mode {theirs_mode!r} does not match this {what}'s mode "
                             f"{self.config.mode!r}")
        passes = sd.get("state_passes")
        if passes is not None and passes != self._state_passes():
            # A position alone (e.g. only StatefulDataLoader's state_dict) would replay another epoch's plan.
            raise ValueError(
                f"state_dict was saved with a SampleState of {passes} sample passes, but this {what}'s state "
                f"has {self._state_passes()}: restore the state saved with it first, "
                f"`{what}.use_state(SampleState.load(path))`, then `load_state_dict`")
        epoch, position = int(sd["epoch"]), int(sd.get("position", 0))
        if position < 0:
            raise ValueError(f"state_dict position must be >= 0, got {position}")
        return epoch, position

    def efficiency_report(self, *, epochs_done: int | None = None) -> dict[str, Any]:
        """Samples, mastered, pruned, passes done vs a uniform run of the same epochs, partition history.

        ``epochs_done``: epochs the loop finished (default: up to and including the current one; when the
        current one's reports cover only part of its plan, a run cut short by ``max_steps`` say, the uniform
        run compared with is cut at the same share of that epoch).
        """
        done, share = (self.epoch + 1, self._reported_share()) if epochs_done is None else (epochs_done, 1.0)
        return efficiency_report(self.state, epochs_done=done, total_epochs=self.total_epochs,
                                 config=self.planning_config(), last_epoch_share=share)

    def _reported_share(self) -> float:
        """The share of the current epoch's planned draws (over all ranks) reported so far; 1.0 when it is
        not known (an epoch resumed in this process: its reports before the checkpoint are not counted)."""
        if self._coverage is None or self._coverage[0] != self.epoch or self._coverage[1] is None:
            return 1.0
        _, rows_before, draws = self._coverage
        done = self.feedback.num_rows - rows_before + self._draws_not_reportable()
        return min(1.0, done / draws) if draws else 1.0

    def _draws_not_reportable(self) -> int:
        """Draws of the current epoch no loop could report (a stream's unreadable samples): done all the same."""
        return 0

    def format_efficiency_report(self, *, epochs_done: int | None = None) -> str:
        return format_efficiency_report(self.efficiency_report(epochs_done=epochs_done))
