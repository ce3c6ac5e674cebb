"""SampleState: the per-sample learning state as one numpy array per column.

It is the only stateful piece of GEKO: the feedback API scatters reported
losses into it (with the update rules of ``policy``), ``repartition`` re-buckets
it, and ``save``/``load`` keep it in one Arrow IPC file (``statefile``) that
pyarrow, pandas, polars or DuckDB open offline.

Memory: 32 bytes per sample (gekolib keeps a Python object per sample, about
1.1 KB). ``frozen_epochs`` is a saturating uint8 and ``last_step`` an int32 to
stay at that budget. A state loaded with ``memory_map=True`` is a view of its
file: a numeric column costs no memory until it is first written, and writing
one copies that column only (the two boolean columns are unpacked from Arrow's
bitmaps when first read, 1 byte a sample each).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from geko_data import policy
from geko_data.config import GEKOConfig
from geko_data.plan import EpochPlan
from geko_data.statefile import (BUCKET_TYPE, COLUMNS, FORMAT_VERSION, OPTIONAL_COLUMNS, PLAN_COLUMNS,
                                 FingerprintError, PartitionStats, StateFileError, StoredState, check_fingerprint,
                                 column_values, fingerprint_of, is_unset, read_table, unset_column)

# The file format's names are re-exported: code written against ``geko_data.state`` keeps working.
__all__ = ["BUCKET_TYPE", "COLUMNS", "FORMAT_VERSION", "PLAN_COLUMNS", "FingerprintError", "PartitionStats",
           "SampleState", "StateFileError", "check_fingerprint", "check_ids", "fingerprint_of", "prepare_report",
           "read_table", "to_numpy"]

_NAMES = tuple(c[0] for c in COLUMNS)
#: Samples per step of the chunked passes over the columns (``repartition``): temporaries of a few MB.
_STEP = 1 << 20
#: A report of at least this many ids is applied by blocks of ``_ROWS`` ids (rows of about 8 MB over the
#: columns, within the CPU cache); smaller ones, a training loop's batches, in one go.
_BLOCKED_REPORT = 1 << 16
_ROWS = 1 << 18
#: Kept for readers that imported it from here (``geko_data.cli``, ``geko_data.plot``).
_values = column_values


def to_numpy(x: Any, name: str) -> np.ndarray:
    """A 1-D numpy view of a numpy array, torch tensor (any device, detached) or list."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach()
        if x.dtype.is_floating_point and x.element_size() < 4:  # bf16/fp16: numpy lacks bf16
            x = x.float()
        x = x.cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"`{name}` must be 1-D, got shape {arr.shape}")
    return arr


class SampleState(StoredState):
    """Per-sample learning state of ``num_samples`` samples with dense ids ``0..num_samples-1``.

    Args:
        num_samples: number of samples (> 0).
        config: the policy. Defaults to ``GEKOConfig()``.
        fingerprint: shard-index fingerprint stored in saved files. Defaults to ``None``.
    """

    def __init__(self, num_samples: int, *, config: GEKOConfig | None = None,
                 fingerprint: str | None = None) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
            raise ValueError(f"`num_samples` must be a positive int, got {num_samples!r}")
        if config is not None and not isinstance(config, GEKOConfig):
            raise TypeError(f"`config` must be a GEKOConfig, got {type(config).__name__}")
        if fingerprint is not None and not isinstance(fingerprint, str):
            raise TypeError(f"`fingerprint` must be a str or None, got {type(fingerprint).__name__}")
        self.num_samples = int(num_samples)
        self.config = config if config is not None else GEKOConfig()
        self.fingerprint = fingerprint
        self.epoch = -1  # epoch of the last repartition
        self.step = 0  # optimizer step of the last report (or set by the loop)
        self.num_nonfinite = 0
        self.history: list[dict[str, Any]] = []
        #: The plan of the current epoch (set by the sampler / stream at ``set_epoch``), saved with the state.
        self.plan: EpochPlan | None = None
        for name, dtype, init in COLUMNS:
            setattr(self, name, unset_column(self.num_samples, dtype, init) if name in OPTIONAL_COLUMNS
                    else np.full(self.num_samples, init, dtype=dtype))

    # Declared for readers and type checkers; set in __init__ / _from_table.
    loss: np.ndarray
    loss_ema: np.ndarray
    loss_var: np.ndarray
    confidence: np.ndarray
    correct: np.ndarray
    q: np.ndarray
    bucket: np.ndarray
    times_seen: np.ndarray
    frozen_epochs: np.ndarray
    forgets: np.ndarray
    pruned: np.ndarray
    last_step: np.ndarray
    answer: np.ndarray

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return (f"SampleState(num_samples={self.num_samples}, epoch={self.epoch}, step={self.step}, "
                f"mode={self.config.mode!r})")

    @property
    def nbytes(self) -> int:
        """Bytes held by the per-sample arrays (an optional column no report has set holds none)."""
        return sum(0 if is_unset(a) else a.nbytes for a in (getattr(self, n) for n in _NAMES))

    @property
    def seen(self) -> np.ndarray:
        return np.isfinite(self.loss)

    def _writable(self, *names: str) -> None:
        # Columns loaded memory-mapped are read-only views of the file: copy each one just before its first
        # write, and only that one, so a loaded state costs memory only for the columns training changes.
        for name in names:
            arr = getattr(self, name)
            if not arr.flags.writeable:
                setattr(self, name, arr.copy())

    @property
    def mapped_columns(self) -> tuple[str, ...]:
        """Columns still read-only views of the file they were loaded from (nothing written to them yet)."""
        packed = self.__dict__.get("_packed") or {}  # booleans not yet unpacked are read from the file too
        return tuple(n for n in _NAMES if n in packed
                     or not (getattr(self, n).flags.writeable or is_unset(getattr(self, n))))

    # ------------------------------------------------------------------ feedback
    def report(self, ids: Any, losses: Any, *, correct: Any = None, confidence: Any = None,
               answer: Any = None, step: int | None = None) -> int:
        """Scatter one batch of per-sample results into the state; returns how many were applied.

        ``confidence`` defaults to ``exp(-loss)`` (the target's probability under cross-entropy) and
        ``correct`` to ``confidence >= 0.5``. ``answer``: an integer in [0, 2**32) per sample naming its answer
        (a classifier's label, ``signals.answer_hash`` of an LM's target tokens), so that the plan can keep
        every answer's share of the training (``GEKOConfig.answer_weight_cap``); without it the column keeps
        what it holds. ``step`` is the loop's optimizer step; without it each report
        counts as one step after the last (``step`` and ``last_step`` then count reports). Ids may repeat: the
        last occurrence wins for loss, confidence and correctness, and every occurrence counts in
        ``times_seen``. Non-finite losses are not applied and are counted in ``num_nonfinite``.
        """
        return self.apply(*self.prepare(ids, losses, correct=correct, confidence=confidence, answer=answer),
                          step=step)

    def prepare(self, ids: Any, losses: Any, *, correct: Any = None, confidence: Any = None,
                answer: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """Validate one report and fill its defaults: ``(ids int64, loss f32, correct bool, confidence f32,
        answer uint32 or None)``.

        Raises ValueError naming the argument at fault. ``Feedback`` calls this on every rank before it
        all-gathers, so that bad input fails on every rank instead of hanging the others.
        """
        return prepare_report(ids, losses, correct=correct, confidence=confidence, answer=answer,
                              num_samples=self.num_samples)

    def _check_ids(self, ids: Any) -> np.ndarray:
        return check_ids(ids, self.num_samples)

    def apply(self, ids: np.ndarray, loss: np.ndarray, correct: np.ndarray, confidence: np.ndarray,
              answer: np.ndarray | None = None, *, step: int | None = None) -> int:
        """Scatter arrays already checked by ``prepare`` (the fast path ``Feedback`` uses after a gather)."""
        if step is not None:
            if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
                raise ValueError(f"`step` must be a non-negative int, got {step!r}")
            self.step = int(step)
        else:  # a loop that passes no step: each report counts as one (so last_step orders the reports)
            self.step += 1
        finite = np.isfinite(loss)
        n = loss.shape[0]
        self.num_nonfinite += int(n - finite.sum())
        if not finite.any():
            return 0
        if not finite.all():
            ids, loss, correct, confidence = ids[finite], loss[finite], correct[finite], confidence[finite]
            answer = None if answer is None else answer[finite]

        # Last occurrence of each id wins; every occurrence is a pass.
        m = ids.shape[0]
        uniq, last, passes = _last_occurrences(ids, self.num_samples)
        loss_u, conf_u, correct_u = loss[last], confidence[last], correct[last]
        if answer is not None:
            self._writable("answer")
            self.answer[uniq] = answer[last]

        self._writable("loss", "loss_ema", "loss_var", "q", "confidence", "correct", "times_seen", "last_step")
        step = min(self.step, 2**31 - 1)
        if m < _BLOCKED_REPORT:
            self._apply_rows(uniq, loss_u, conf_u, correct_u, passes, step)
            return m
        # A large report goes by blocks of ids (``uniq`` is ascending): each block's rows of the columns stay
        # in the CPU cache between their gather and their scatter, so a column is read from memory once, not
        # once for the gather and once more for the scatter (5M ids among 100M touch nearly every cache line).
        edges = [0, *np.searchsorted(uniq, np.arange(_ROWS, self.num_samples, _ROWS)).tolist(), uniq.shape[0]]
        for a, b in zip(edges[:-1], edges[1:]):
            if a < b:
                self._apply_rows(uniq[a:b], loss_u[a:b], conf_u[a:b], correct_u[a:b], passes[a:b], step)
        return m

    def _apply_rows(self, uniq: np.ndarray, loss_u: np.ndarray, conf_u: np.ndarray, correct_u: np.ndarray,
                    passes: np.ndarray, step: int) -> None:
        """The update rules on the rows ``uniq`` (distinct ids) given their reported values: every row is
        gathered before any is written, and no row depends on another."""
        cfg = self.config
        prev_seen = np.isfinite(self.loss[uniq])
        ema, var = policy.loss_ema_update(self.loss_ema[uniq], self.loss_var[uniq], loss_u, prev_seen=prev_seen,
                                          beta=cfg.loss_ema)
        q = policy.q_update(self.q[uniq], loss_u, lr=cfg.q_value_lr, loss_scale=cfg.q_value_loss_scale)
        forgot = prev_seen & self.correct[uniq] & ~correct_u
        thawed = policy.thaw(self.bucket[uniq], correct=correct_u, confidence=conf_u, pruned=self.pruned[uniq],
                             config=cfg)
        self.loss_ema[uniq], self.loss_var[uniq], self.q[uniq] = ema, var, q
        if forgot.any():
            self._writable("forgets")
            self.forgets[uniq[forgot]] = np.minimum(self.forgets[uniq[forgot]].astype(np.int64) + 1, 65535)
        if thawed is not None:  # a FREEZE sample that turns wrong leaves FREEZE now, not at the next repartition
            self._writable("bucket", "frozen_epochs")
            which, codes = thawed
            self.bucket[uniq[which]] = codes
            self.frozen_epochs[uniq[which]] = 0
        self.loss[uniq] = loss_u
        self.confidence[uniq] = conf_u
        self.correct[uniq] = correct_u
        self.times_seen[uniq] = np.minimum(self.times_seen[uniq].astype(np.int64) + passes, 65535)
        self.last_step[uniq] = step

    # ------------------------------------------------------------------ policy
    def repartition(self, progress: float, *, epoch: int | None = None, phase: str | None = None,
                    config: GEKOConfig | None = None) -> PartitionStats:
        """Re-bucket every unpruned sample from its last reported state; prune; append to ``history``.
        ``phase``: the curriculum phase to record (default: the phase of ``progress``; ``""`` for a run that
        follows no curriculum). ``config``: the run's planning config (``GEKOConfig.planning``; default the
        state's own)."""
        self._writable("bucket", "frozen_epochs", "pruned")
        cfg = self.config if config is None else config
        seen = self.seen
        bucket = policy.classify(seen=seen, correct=self.correct, confidence=self.confidence, q=self.q,
                                 loss_var=self.loss_var, config=cfg, loss=self.loss, last_step=self.last_step)
        # Samples per code after the repartition (0-3 the buckets of the unpruned, 4 pruned) and the newly
        # pruned, counted as each step is written: one pass over the columns, a step at a time in cache.
        per_code = np.zeros(5, dtype=np.int64)
        newly_pruned = 0
        for a in range(0, self.num_samples, _STEP):
            part = slice(a, a + _STEP)
            alive = ~self.pruned[part]
            codes = self.bucket[part]
            np.copyto(codes, bucket[part], where=alive)
            is_frozen = alive & (codes == policy.FREEZE)
            # frozen_epochs + 1 (saturating at 255) where frozen, 0 elsewhere, in place in uint8
            fe = self.frozen_epochs[part]
            np.add(fe, is_frozen & (fe < 255), out=fe, casting="unsafe")
            np.multiply(fe, is_frozen, out=fe, casting="unsafe")
            new_pruned = policy.prune_mask(fe, cfg) & alive
            if new_pruned.any():  # the usual step prunes nothing: no masked write, no three passes
                self.pruned[part] |= new_pruned
                codes[new_pruned] = policy.FREEZE
                newly_pruned += int(np.count_nonzero(new_pruned))
                alive &= ~new_pruned
            # counted per code in cache (bincount widens to int64); the pruned as code 4 by byte arithmetic (a
            # bucket is at most 3), 8x faster than np.where
            coded = np.maximum(codes, np.multiply(~alive, np.uint8(4), dtype=np.uint8))
            per_code += [np.count_nonzero(coded == code) for code in range(5)]
        del bucket
        self.epoch = self.epoch + 1 if epoch is None else int(epoch)
        stats = _partition_stats(self, progress, seen, per_code, newly_pruned,
                                 policy.phase_name(progress) if phase is None else phase)
        self.history.append(stats.to_dict())
        return stats

    def sampling_weights(self, *, epoch: int, total_epochs: int, epoch_length: int | None = None) -> np.ndarray:
        """Expected draws of every sample in ``epoch`` of ``total_epochs`` (float64, (N,)); 0 = never drawn.

        The same numbers the epoch plan draws from (``policy.epoch_expected``), annealing included.
        """
        return self._expected(epoch, total_epochs, epoch_length)[0]

    def loss_weights(self, ids: Any, *, epoch: int | None = None, total_epochs: int | None = None,
                     epoch_length: int | None = None) -> np.ndarray:
        """Loss weight of ``ids`` (float32): in the current epoch's plan, or in ``epoch`` of ``total_epochs``.

        Without ``epoch``: the current plan's weights (ValueError when the state has no plan yet). With
        ``epoch``: the policy's weights before the plan's balance of the answers (``answer_weight_cap``),
        which scales them by the draws the plan made.
        """
        ids_a = self._check_ids(ids)
        if epoch is None:
            if self.plan is None:
                raise ValueError("`epoch` and `total_epochs` are needed: this state has no epoch plan yet")
            return self.plan.loss_weight[ids_a]
        if total_epochs is None:
            raise ValueError(f"`total_epochs` is needed with `epoch` ({epoch!r})")
        return self._expected(epoch, total_epochs, epoch_length)[1][ids_a]

    def _expected(self, epoch: int, total_epochs: int, epoch_length: int | None) -> tuple[np.ndarray, np.ndarray]:
        return policy.epoch_expected(bucket=self.bucket, pruned=self.pruned, times_seen=self.times_seen,
                                     loss=self.loss, epoch=epoch, total_epochs=total_epochs, config=self.config,
                                     epoch_length=epoch_length)

    @property
    def frozen_share(self) -> float:
        """Share of samples that are FREEZE or pruned (what ``early_stop_frozen`` compares against)."""
        return float(np.count_nonzero((self.bucket == policy.FREEZE) | self.pruned)) / self.num_samples

    @property
    def should_stop(self) -> bool:
        """True once ``frozen_share`` reaches ``config.early_stop_frozen`` after at least one repartition
        (never when it is 1.0: the config's way to say "do not stop early")."""
        limit = self.config.early_stop_frozen
        return limit < 1.0 and self.epoch >= 0 and self.frozen_share >= limit


def _column_arg(x: Any, name: str, n: int, kinds: str, dtype: Any, what: str) -> np.ndarray:
    """``x`` as a 1-D ``dtype`` array of length ``n``, or ValueError naming ``name``: the one check of a
    report's per-sample arguments."""
    arr = to_numpy(x, name)
    if arr.shape[0] != n:
        raise ValueError(f"`{name}` must have the length of `ids` ({n}), got {arr.shape[0]}")
    if arr.dtype.kind not in kinds:
        raise ValueError(f"`{name}` must be {what}, got dtype {arr.dtype}")
    return arr.astype(dtype, copy=False)


def _last_occurrences(ids: np.ndarray, num_samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(uniq, last, passes)``: the distinct ids ascending, the position of each one's last occurrence and
    its number of occurrences (what ``np.unique(ids[::-1], return_index=True, return_counts=True)`` gives).

    One sort of ``id * m + position`` keys instead of np.unique's stable argsort: 5-10x faster on a report
    of millions of ids, and the sort keeps the positions of an id in order, so the group's last is its last.
    """
    m = ids.shape[0]
    if m == 0 or num_samples * m >= 2**62:  # keys would overflow int64 (over ~4.6e18 id-positions)
        uniq, first_in_reversed, passes = np.unique(ids[::-1], return_index=True, return_counts=True)
        return uniq, m - 1 - first_in_reversed, passes
    key = ids.astype(np.int64) * m + np.arange(m, dtype=np.int64)
    key.sort()
    sid = key // m
    pos = key - sid * m
    ends = np.empty(m, dtype=bool)  # the last key of each id's group
    ends[-1] = True
    np.not_equal(sid[1:], sid[:-1], out=ends[:-1])
    if ends.all():  # no id repeats (the usual report)
        return sid, pos, np.ones(m, dtype=np.int64)
    at = np.flatnonzero(ends)
    return sid[at], pos[at], np.diff(at, prepend=-1)


def prepare_report(ids: Any, losses: Any, *, correct: Any, confidence: Any, num_samples: int,
                   answer: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """One report validated, its defaults filled (``SampleState.prepare``)."""
    ids_a = check_ids(ids, num_samples)
    n = ids_a.shape[0]
    args = ((losses, "losses"), (correct, "correct"), (confidence, "confidence"), (answer, "answer"))
    if n == 0:  # an empty report is a no-op whatever the (numpy-typed-as-float) empty lists hold
        if any(to_numpy(x, name).shape[0] for x, name in args if x is not None):
            raise ValueError("`losses`, `correct`, `confidence` and `answer` must have the length of `ids` (0)")
        return ids_a, np.zeros(0, np.float32), np.zeros(0, bool), np.zeros(0, np.float32), None
    loss_a = _column_arg(losses, "losses", n, "fiu", np.float32, "numbers")
    finite = np.isfinite(loss_a)
    if confidence is None:
        with np.errstate(over="ignore", invalid="ignore"):
            # A negative loss (some objectives have them) would give a "probability" above 1.
            conf_a = np.minimum(np.exp(-loss_a), np.float32(1.0))
    else:
        conf_a = _column_arg(confidence, "confidence", n, "fiu", np.float32, "numbers")
        c = conf_a[finite]
        in_range = (c >= 0.0) & (c <= 1.0)
        if not in_range.all():
            raise ValueError(f"`confidence` must be in [0, 1], got {float(c[~in_range][0])}")
    if correct is None:
        correct_a = conf_a >= 0.5
    else:
        correct_a = _column_arg(correct, "correct", n, "biu", bool, "booleans")
    answer_a = None
    if answer is not None:
        arr = to_numpy(answer, "answer")
        # labels read as floats (a CSV, a float tensor) are the usual mistake: say how to pass them
        raw = _column_arg(arr, "answer", n, "iu", arr.dtype, "integers (labels as floats: pass `.long()` / "
                          "`.astype(int)`)")
        bad = (raw < 0) | (raw >= 2**32) if raw.dtype.kind == "i" else raw >= 2**32
        if bad.any():
            raise ValueError(f"`answer` must be integers in [0, 2**32), got {int(raw[bad][0])}")
        answer_a = raw.astype(np.uint32)
    return ids_a.astype(np.int64, copy=False), loss_a, correct_a, conf_a, answer_a


def check_ids(ids: Any, num_samples: int) -> np.ndarray:
    """``ids`` as int64, or ValueError naming the argument: 1-D integers in [0, num_samples)."""
    ids_a = to_numpy(ids, "ids")
    if ids_a.size == 0:  # an empty report (e.g. `[]`, which numpy types as float) is a no-op
        ids_a = ids_a.astype(np.int64)
    if ids_a.dtype.kind not in "iu":
        raise ValueError(f"`ids` must be integers, got dtype {ids_a.dtype}")
    if ids_a.size and (ids_a.min() < 0 or ids_a.max() >= num_samples):
        bad = ids_a[(ids_a < 0) | (ids_a >= num_samples)][0]
        raise ValueError(f"`ids` must be in [0, {num_samples}), got {int(bad)}")
    return ids_a.astype(np.int64, copy=False)


def _partition_stats(state: SampleState, progress: float, seen: np.ndarray, per_code: np.ndarray,
                     newly_pruned: int, phase: str) -> PartitionStats:
    """The counts of a repartition that has just run (``SampleState.repartition``): ``per_code`` holds the
    unpruned samples of each bucket code and, at 4, the pruned ones."""
    counts = [int(c) for c in per_code]
    n_seen = int(np.count_nonzero(seen))
    # The mean of the seen losses (unseen ones are NaN) without np.nanmean's copy of the column.
    mean_loss = float(np.add.reduce(state.loss, where=seen, dtype=np.float64) / n_seen) if n_seen else math.nan
    return PartitionStats(
        epoch=state.epoch, progress=float(progress), phase=phase, step=state.step,
        freeze=counts[policy.FREEZE], light=counts[policy.LIGHT], focus=counts[policy.FOCUS],
        hard=counts[policy.HARD], pruned=counts[4], newly_pruned=newly_pruned,
        active=counts[policy.LIGHT] + counts[policy.FOCUS] + counts[policy.HARD], seen=n_seen,
        forgets=int(state.forgets.sum(dtype=np.int64)), mean_loss=mean_loss)
