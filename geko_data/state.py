"""SampleState: the per-sample learning state as one numpy array per column.

It is the only stateful piece of GEKO: the feedback API scatters reported
losses into it, ``repartition`` re-buckets it, and ``save``/``load`` keep it
in one Arrow IPC file that pyarrow, pandas, polars or DuckDB open offline.
A file is trusted only after ``read_table`` has checked it whole: structure,
value ranges and a checksum of its columns and metadata.

Memory: 32 bytes per sample (gekolib keeps a Python object per sample, about
1.1 KB). ``frozen_epochs`` is a saturating uint8 and ``last_step`` an int32 to
stay at that budget.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import xxhash

from geko_data import policy
from geko_data.atomic import atomic_path
from geko_data.config import GEKOConfig
from geko_data.plan import EpochPlan

__all__ = ["BUCKET_TYPE", "COLUMNS", "FORMAT_VERSION", "PLAN_COLUMNS", "FingerprintError", "PartitionStats", "SampleState",
           "StateFileError", "check_fingerprint", "fingerprint_of", "read_table", "to_numpy"]

#: 2: the metadata carries a checksum of the columns and of itself (format 1 files, without it, still load).
#: 3: ``bucket`` is a dictionary column (its names, not codes, in pandas, polars and DuckDB) and an ``id``
#: column holds the sample id. Format 1 and 2 files (``bucket`` as uint8 codes, no ``id``) still load.
FORMAT_VERSION = 3
_META_KEY = b"geko_data"

#: (column, numpy dtype, initial value), in file order.
COLUMNS: tuple[tuple[str, str, Any], ...] = (
    ("loss", "float32", math.nan),
    ("loss_ema", "float32", math.nan),
    ("loss_var", "float32", 0.0),
    ("confidence", "float32", math.nan),
    ("correct", "bool", False),
    ("q", "float32", 0.5),
    ("bucket", "uint8", policy.FOCUS),
    ("times_seen", "uint16", 0),
    ("frozen_epochs", "uint8", 0),
    ("forgets", "uint16", 0),
    ("pruned", "bool", False),
    ("last_step", "int32", -1),
)
_NAMES = tuple(c[0] for c in COLUMNS)
#: The file's ``bucket`` type: int8 codes 0-3 (the same bytes as the uint8 column in memory) into the names.
BUCKET_TYPE = pa.dictionary(pa.int8(), pa.string())
_BUCKET_DICT = pa.array(policy.BUCKET_NAMES, pa.string())
#: Optional columns: the current epoch's plan (draws and loss weight per sample), when the state has one.
PLAN_COLUMNS = (("plan_count", "uint16"), ("plan_weight", "float32"))


class StateFileError(ValueError):
    """A state file that cannot be used: truncated, corrupted, foreign, too new, or for other data."""


class FingerprintError(StateFileError):
    """A state written for other data (its fingerprint differs from the data's), wherever it is checked."""


def check_fingerprint(stored: str | None, expected: str | None, *, where: str) -> None:
    """Raise FingerprintError naming ``where`` and both fingerprints unless they agree (None agrees with all)."""
    if stored is not None and expected is not None and stored != expected:
        raise FingerprintError(f"{where}: state was written for other data (other shards or samples: its "
                               f"fingerprint is {stored!r}, the data here has {expected!r}); point at the data it was "
                               f"written for, or start a new state for this data")


def fingerprint_of(keys: Any) -> str:
    """A fingerprint of a map-style dataset from its sample keys in index order (ids, paths, hashes...).

    Pass it as ``GEKOSampler(..., fingerprint=)``: a state saved for other data of the same length is then
    refused on resume. Each key is hashed as its ``str``; order matters, as ids index the state.
    """
    h = xxhash.xxh3_128()
    n = 0
    for key in keys:
        text = str(key).encode("utf-8", "surrogatepass")
        # Length-prefixed, so that ("ab", "c") and ("a", "bc") differ.
        h.update(len(text).to_bytes(8, "little"))
        h.update(text)
        n += 1
    if n == 0:
        raise ValueError("`keys` must hold at least one key, got none")
    return f"keys-{n}-{h.hexdigest()[:32]}"


@dataclass(frozen=True)
class PartitionStats:
    """Counts of one repartition. ``active`` = unpruned and not FREEZE; bucket counts exclude pruned."""

    epoch: int
    progress: float
    phase: str
    step: int
    freeze: int
    light: int
    focus: int
    hard: int
    pruned: int
    newly_pruned: int
    active: int
    seen: int
    forgets: int
    mean_loss: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean_loss"] = None if math.isnan(self.mean_loss) else self.mean_loss
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PartitionStats":
        d = dict(d)
        d["mean_loss"] = math.nan if d.get("mean_loss") is None else d["mean_loss"]
        return cls(**d)

    def format(self) -> str:
        """One line as gekolib prints it, with pruned and active counts added."""
        total = self.freeze + self.light + self.focus + self.hard + self.pruned
        parts = []
        for name, n in (("FREEZE", self.freeze), ("LIGHT", self.light), ("FOCUS", self.focus),
                        ("HARD", self.hard), ("PRUNED", self.pruned)):
            parts.append(f"{name}: {n:>6} ({100.0 * n / max(total, 1):5.1f}%)")
        return f"[GEKO] Epoch {self.epoch} ({self.phase}) Partition: " + " | ".join(parts)


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


class SampleState:
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
            setattr(self, name, np.full(self.num_samples, init, dtype=dtype))

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

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return (f"SampleState(num_samples={self.num_samples}, epoch={self.epoch}, step={self.step}, "
                f"mode={self.config.mode!r})")

    @property
    def nbytes(self) -> int:
        """Bytes held by the per-sample arrays."""
        return sum(getattr(self, n).nbytes for n in _NAMES)

    @property
    def seen(self) -> np.ndarray:
        return np.isfinite(self.loss)

    def _make_writable(self) -> None:
        # Arrays memory-mapped from a file are read-only; copy once before the first mutation.
        for name in _NAMES:
            arr = getattr(self, name)
            if not arr.flags.writeable:
                setattr(self, name, arr.copy())

    # ------------------------------------------------------------------ feedback
    def report(self, ids: Any, losses: Any, *, correct: Any = None, confidence: Any = None,
               step: int | None = None) -> int:
        """Scatter one batch of per-sample results into the state; returns how many were applied.

        ``confidence`` defaults to ``exp(-loss)`` (the target's probability under cross-entropy) and
        ``correct`` to ``confidence >= 0.5``. ``step`` is the loop's optimizer step; without it each report
        counts as one step after the last (``step`` and ``last_step`` then count reports). Ids may repeat: the last occurrence wins for loss,
        confidence and correctness, and every occurrence counts in ``times_seen``. Non-finite losses are
        not applied and are counted in ``num_nonfinite``.
        """
        return self.apply(*self.prepare(ids, losses, correct=correct, confidence=confidence), step=step)

    def prepare(self, ids: Any, losses: Any, *, correct: Any = None,
                confidence: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Validate one report and fill its defaults: ``(ids int64, loss f32, correct bool, confidence f32)``.

        Raises ValueError naming the argument at fault. ``Feedback`` calls this on every rank before it
        all-gathers, so that bad input fails on every rank instead of hanging the others.
        """
        ids_a = self._check_ids(ids)
        n = ids_a.shape[0]
        if n == 0:  # an empty report is a no-op whatever the (numpy-typed-as-float) empty lists hold
            if any(to_numpy(x, name).shape[0] for x, name in ((losses, "losses"), (correct, "correct"),
                                                               (confidence, "confidence")) if x is not None):
                raise ValueError("`losses`, `correct` and `confidence` must have the length of `ids` (0)")
            return ids_a, np.zeros(0, np.float32), np.zeros(0, bool), np.zeros(0, np.float32)
        loss_a = to_numpy(losses, "losses")
        if loss_a.shape[0] != n:
            raise ValueError(f"`losses` must have the length of `ids` ({n}), got {loss_a.shape[0]}")
        if loss_a.dtype.kind not in "fiu":
            raise ValueError(f"`losses` must be numbers, got dtype {loss_a.dtype}")
        loss_a = loss_a.astype(np.float32, copy=False)
        finite = np.isfinite(loss_a)
        if confidence is None:
            with np.errstate(over="ignore", invalid="ignore"):
                # A negative loss (some objectives have them) would give a "probability" above 1.
                conf_a = np.minimum(np.exp(-loss_a), np.float32(1.0))
        else:
            conf_a = to_numpy(confidence, "confidence")
            if conf_a.shape[0] != n:
                raise ValueError(f"`confidence` must have the length of `ids` ({n}), got {conf_a.shape[0]}")
            if conf_a.dtype.kind not in "fiu":
                raise ValueError(f"`confidence` must be numbers, got dtype {conf_a.dtype}")
            conf_a = conf_a.astype(np.float32, copy=False)
            c = conf_a[finite]
            in_range = (c >= 0.0) & (c <= 1.0)
            if not in_range.all():
                raise ValueError(f"`confidence` must be in [0, 1], got {float(c[~in_range][0])}")
        if correct is None:
            correct_a = conf_a >= 0.5
        else:
            correct_a = to_numpy(correct, "correct")
            if correct_a.shape[0] != n:
                raise ValueError(f"`correct` must have the length of `ids` ({n}), got {correct_a.shape[0]}")
            if correct_a.dtype.kind not in "biu":
                raise ValueError(f"`correct` must be booleans, got dtype {correct_a.dtype}")
            correct_a = correct_a.astype(bool, copy=False)
        return ids_a.astype(np.int64, copy=False), loss_a, correct_a, conf_a

    def _check_ids(self, ids: Any) -> np.ndarray:
        """``ids`` as int64, or ValueError naming the argument: 1-D integers in [0, num_samples)."""
        ids_a = to_numpy(ids, "ids")
        if ids_a.size == 0:  # an empty report (e.g. `[]`, which numpy types as float) is a no-op
            ids_a = ids_a.astype(np.int64)
        if ids_a.dtype.kind not in "iu":
            raise ValueError(f"`ids` must be integers, got dtype {ids_a.dtype}")
        if ids_a.size and (ids_a.min() < 0 or ids_a.max() >= self.num_samples):
            bad = ids_a[(ids_a < 0) | (ids_a >= self.num_samples)][0]
            raise ValueError(f"`ids` must be in [0, {self.num_samples}), got {int(bad)}")
        return ids_a.astype(np.int64, copy=False)

    def apply(self, ids: np.ndarray, loss: np.ndarray, correct: np.ndarray, confidence: np.ndarray, *,
              step: int | None = None) -> int:
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
        self._make_writable()
        if not finite.all():
            ids, loss, correct, confidence = ids[finite], loss[finite], correct[finite], confidence[finite]

        # Last occurrence of each id wins; every occurrence is a pass.
        m = ids.shape[0]
        uniq, first_in_reversed, passes = np.unique(ids[::-1], return_index=True, return_counts=True)
        last = m - 1 - first_in_reversed
        loss_u, conf_u, correct_u = loss[last], confidence[last], correct[last]

        cfg = self.config
        prev_seen = np.isfinite(self.loss[uniq])
        beta = np.float32(cfg.loss_ema)
        ema_old = self.loss_ema[uniq]
        delta = np.where(prev_seen, loss_u.astype(np.float64) - ema_old, 0.0)
        self.loss_ema[uniq] = np.where(prev_seen, ema_old + (1 - beta) * delta, loss_u)
        # Exponentially weighted variance (West 1979): var <- beta * (var + (1 - beta) * delta^2), in float64
        # and capped, so that an absurd but finite loss cannot turn the float32 column into inf.
        var = beta * (self.loss_var[uniq] + (1 - beta) * delta * delta)
        self.loss_var[uniq] = np.where(prev_seen, np.minimum(var, 1e30), 0.0)
        self.q[uniq] = policy.q_update(self.q[uniq], loss_u, lr=cfg.q_value_lr, loss_scale=cfg.q_value_loss_scale)
        forgot = prev_seen & self.correct[uniq] & ~correct_u
        self.forgets[uniq[forgot]] = np.minimum(self.forgets[uniq[forgot]].astype(np.int64) + 1, 65535)
        # A FREEZE sample that turns wrong leaves FREEZE now, not at the next repartition.
        thaw = (self.bucket[uniq] == policy.FREEZE) & ~correct_u & ~self.pruned[uniq]
        if thaw.any():
            self.bucket[uniq[thaw]] = np.where(conf_u[thaw] > cfg.focus_confidence, policy.HARD, policy.FOCUS)
            self.frozen_epochs[uniq[thaw]] = 0
        self.loss[uniq] = loss_u
        self.confidence[uniq] = conf_u
        self.correct[uniq] = correct_u
        self.times_seen[uniq] = np.minimum(self.times_seen[uniq].astype(np.int64) + passes, 65535)
        self.last_step[uniq] = min(self.step, 2**31 - 1)
        return m

    # ------------------------------------------------------------------ policy
    def repartition(self, progress: float, *, epoch: int | None = None) -> PartitionStats:
        """Re-bucket every unpruned sample from its last reported state; prune; append to ``history``."""
        self._make_writable()
        cfg = self.config
        alive = ~self.pruned
        seen = self.seen
        bucket = policy.classify(seen=seen, correct=self.correct, confidence=self.confidence, q=self.q,
                                 loss_var=self.loss_var, config=cfg)
        np.copyto(self.bucket, bucket, where=alive)
        is_frozen = alive & (self.bucket == policy.FREEZE)
        self.frozen_epochs[:] = np.where(is_frozen, np.minimum(self.frozen_epochs.astype(np.int16) + 1, 255), 0)
        new_pruned = policy.prune_mask(self.frozen_epochs, cfg) & alive
        self.pruned |= new_pruned
        self.bucket[new_pruned] = policy.FREEZE
        self.epoch = self.epoch + 1 if epoch is None else int(epoch)
        alive = ~self.pruned
        counts = np.bincount(np.where(alive, self.bucket, np.uint8(4)), minlength=5)  # 4: pruned
        stats = PartitionStats(
            epoch=self.epoch, progress=float(progress), phase=policy.phase_name(progress), step=self.step,
            freeze=int(counts[policy.FREEZE]), light=int(counts[policy.LIGHT]), focus=int(counts[policy.FOCUS]),
            hard=int(counts[policy.HARD]), pruned=int(self.pruned.sum()), newly_pruned=int(new_pruned.sum()),
            active=int(alive.sum() - counts[policy.FREEZE]), seen=int(seen.sum()),
            forgets=int(self.forgets.sum(dtype=np.int64)),
            mean_loss=float(np.nanmean(self.loss)) if seen.any() else math.nan)  # unseen losses are NaN
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

        Without ``epoch``: the current plan's weights (ValueError when the state has no plan yet).
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

    # ------------------------------------------------------------------ files
    def metadata(self) -> dict[str, Any]:
        """The JSON stored in the file's schema metadata."""
        from geko_data import __version__

        plan = self.plan
        return {"format_version": FORMAT_VERSION, "writer": f"geko_data {__version__}",
                "num_samples": self.num_samples, "config": self.config.to_dict(), "epoch": self.epoch,
                "step": self.step, "num_nonfinite": self.num_nonfinite, "fingerprint": self.fingerprint,
                "history": self.history,
                "plan": None if plan is None else {"epoch": plan.epoch, "progress": plan.progress,
                                                   "seed": plan.seed, "epoch_length": plan.epoch_length}}

    def to_arrow(self) -> pa.Table:
        """The state as a pyarrow Table (numeric columns zero-copy) with the metadata attached.

        ``id`` is the sample id (the row number) and ``bucket`` a dictionary column whose values read as
        FREEZE/LIGHT/FOCUS/HARD. With a current plan, two more columns hold it: ``plan_count`` (draws this epoch) and
        ``plan_weight`` (loss weight this epoch). The metadata's ``checksum`` covers the columns and the
        rest of the metadata, so a file changed after writing is refused on load.
        """
        # The sample id first, so a user can join the table with their data (or with the shard index's rows).
        columns = {"id": pa.array(np.arange(self.num_samples, dtype=np.int64))}
        columns.update((name, pa.array(getattr(self, name))) for name in _NAMES)
        columns["bucket"] = pa.DictionaryArray.from_arrays(pa.array(self.bucket.view(np.int8)), _BUCKET_DICT)
        if self.plan is not None:
            # max_repeats <= 1000 keeps a count within uint16.
            columns["plan_count"] = pa.array(self.plan.counts.astype(np.uint16))
            columns["plan_weight"] = pa.array(self.plan.loss_weight.astype(np.float32, copy=False))
        table = pa.table(columns)
        meta = self.metadata()
        meta["checksum"] = _checksum(table, meta)
        return table.replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})

    def save(self, path: str | os.PathLike) -> None:
        """Write one Arrow IPC file atomically: a failed or killed save leaves the previous file whole.

        A symlink at ``path`` is written through (its target is replaced); an existing file keeps its mode.
        """
        table = self.to_arrow()
        with atomic_path(path) as tmp:
            with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)

    @classmethod
    def load(cls, path: str | os.PathLike, *, memory_map: bool = True, expect_fingerprint: str | None = None,
             config: GEKOConfig | None = None, verify: bool = True) -> "SampleState":
        """Read a file written by ``save``.

        With ``memory_map`` the numeric columns are zero-copy views of the file (copied on the first
        mutation). ``expect_fingerprint`` guards against state written for other data (FingerprintError);
        ``config`` replaces the stored policy (default: the stored one). ``verify`` (default True) checks the
        stored checksum, which reads every byte of the file once; pass False only for a quick look at a file
        you trust (the structure and value ranges are checked either way).
        """
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"state file {path!r} does not exist")
        table, meta = read_table(path, memory_map=memory_map, verify=verify)
        check_fingerprint(meta.get("fingerprint"), expect_fingerprint, where=path)
        return cls._from_table(table, meta, config=config, path=path)

    @classmethod
    def _from_table(cls, table: pa.Table, meta: dict[str, Any], *, config: GEKOConfig | None,
                    path: str) -> "SampleState":
        try:
            stored_config = GEKOConfig.from_dict(meta["config"])
        except (KeyError, TypeError, ValueError) as e:
            raise StateFileError(f"{path}: bad config in metadata ({e})") from None
        self = cls.__new__(cls)
        self.num_samples = table.num_rows
        self.config = config if config is not None else stored_config
        self.fingerprint = meta.get("fingerprint")
        self.epoch = int(meta.get("epoch", -1))
        self.step = int(meta.get("step", 0))
        self.num_nonfinite = int(meta.get("num_nonfinite", 0))
        self.history = list(meta.get("history", []))
        for name, dtype, _ in COLUMNS:
            setattr(self, name, _values(table, name))
        self.plan = None
        plan_meta = meta.get("plan")
        if isinstance(plan_meta, dict) and all(n in table.column_names for n, _ in PLAN_COLUMNS):
            try:
                self.plan = EpochPlan(
                    epoch=int(plan_meta["epoch"]), progress=float(plan_meta["progress"]),
                    counts=_values(table, "plan_count").astype(np.int32),
                    loss_weight=_values(table, "plan_weight"),
                    seed=int(plan_meta["seed"]), epoch_length=plan_meta.get("epoch_length"))
            except (KeyError, TypeError, ValueError) as e:
                raise StateFileError(f"{path}: bad plan in metadata ({e})") from None
        return self


def read_table(path: str | os.PathLike, *, memory_map: bool = True, columns: list[str] | None = None,
               verify: bool = True) -> tuple[pa.Table, dict[str, Any]]:
    """Open a state file as ``(table, metadata)``, validating it; ``columns`` reads only those.

    Everything a reader relies on is checked here, so every reader (``SampleState.load``, ``geko-data``)
    refuses the same files: a path that is not a regular file (a FIFO would block the open forever),
    metadata that is not a JSON object (or nested too deep to parse) or has fields of the wrong type, history
    entries that are not partition records, columns missing, of other types or with nulls, Arrow buffers
    inconsistent with their lengths, values out of range (bucket codes outside 0-3, NaN Q, confidence
    outside [0, 1], negative loss variance, ...), no rows, a row count other than the metadata's, and, with
    ``verify`` (the default), a checksum other than the stored one. Format 1 files, written before checksums,
    carry none and load unverified.
    """
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise StateFileError(f"{path}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        raise StateFileError(f"{path}: not a regular file ({_file_kind(mode)}); a state file is a regular file")
    try:
        source = pa.memory_map(path, "r") if memory_map else pa.OSFile(path, "rb")
        reader = pa.ipc.open_file(source)
        raw = (reader.schema.metadata or {}).get(_META_KEY)
        if raw is None:
            raise StateFileError(f"{path}: not a geko_data state file (no {_META_KEY.decode()!r} metadata)")
        meta = json.loads(raw)
        if not isinstance(meta, dict):
            raise StateFileError(f"{path}: not a geko_data state file (its {_META_KEY.decode()!r} metadata is a "
                                 f"JSON {type(meta).__name__}, expected an object)")
        version = meta.get("format_version")
        if not _is_int(version) or version > FORMAT_VERSION:
            raise StateFileError(f"{path}: state file format version {version!r} is newer than this geko_data "
                                 f"reads ({FORMAT_VERSION}); upgrade geko_data")
        missing = [n for n in _NAMES if n not in reader.schema.names]
        if missing:
            raise StateFileError(f"{path}: not a geko_data state file (missing columns {missing})")
        _check_meta(path, meta)
        # All columns are checked (memory-mapped, so unread ones cost nothing): a file bad only in a column
        # one reader does not use is refused by every reader.
        table = reader.read_all()
        # Full validation: buffers consistent with lengths and null counts, before any value is used.
        for column in table.columns:
            # A dictionary's full check (every code within the dictionary) costs 15 ms at 10M rows; the
            # structural one suffices, as _check_columns then requires every code in 0-3 itself.
            if pa.types.is_dictionary(column.type):
                column.validate()
                for chunk in column.chunks:  # the names themselves (4 strings) fully: they are printed
                    chunk.dictionary.validate(full=True)
            else:
                column.validate(full=True)
        _check_columns(path, table)
        if table.num_rows != meta.get("num_samples"):
            raise StateFileError(f"{path}: holds {table.num_rows} rows but its metadata says "
                                 f"{meta.get('num_samples')} samples (truncated?)")
        if verify:
            _verify_checksum(path, table, meta)  # re-encodes the metadata: inside the RecursionError guard
        _check_ranges(path, table)
    except StateFileError:
        raise
    except RecursionError:  # metadata nested thousands of levels deep (json.loads / json.dumps)
        raise StateFileError(f"{path}: not a geko_data state file (its metadata is nested too deep)") from None
    except (pa.ArrowException, OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StateFileError(f"{path}: not a readable geko_data state file "
                             f"(truncated or foreign: {e})") from None
    return (table if columns is None else table.select(columns)), meta


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


_CHECKSUM_ALGORITHM = "xxh3_64"


def _checksum(table: pa.Table, meta: dict[str, Any]) -> str:
    """``xxh3_64:<hex>`` over each known column's name and Arrow data buffer, then the metadata (sans checksum).

    The writer and the reader hash the same Arrow buffers (booleans as their bitmap, unused trailing bits
    masked), so nothing is converted; the metadata goes in as canonical JSON (sorted keys) of its parsed
    form, so both hash the same text whatever the key order or spacing of the stored JSON.
    """
    h = xxhash.xxh3_64()
    for name in table.column_names:
        if name in _TYPES:
            h.update(name.encode() + b"\0")
            for part in _data_bytes(table.column(name)):
                h.update(part)
    body = {k: v for k, v in meta.items() if k != "checksum"}
    h.update(json.dumps(json.loads(json.dumps(body)), sort_keys=True).encode())
    return f"{_CHECKSUM_ALGORITHM}:{h.hexdigest()}"


def _data_bytes(column: pa.ChunkedArray) -> list[Any]:
    """The bytes holding a fixed-width column's values, as zero-copy views (no nulls: checked before)."""
    arr = _chunk(column)
    if pa.types.is_dictionary(arr.type):  # the codes: the dictionary itself is checked to be the bucket names
        arr = arr.indices
    n, data = len(arr), arr.buffers()[1]
    if n == 0 or data is None:
        return []
    if not pa.types.is_boolean(arr.type):
        width = arr.type.bit_width // 8
        return [memoryview(data)[arr.offset * width:(arr.offset + n) * width]]
    if arr.offset % 8:  # not byte-aligned (never in files this writes): repack
        return [np.packbits(arr.to_numpy(zero_copy_only=False), bitorder="little")]
    bits = np.frombuffer(data, np.uint8, (n + 7) // 8, arr.offset // 8)
    if n % 8 == 0:
        return [bits]
    return [bits[:-1], bytes([int(bits[-1]) & ((1 << (n % 8)) - 1)])]


def _verify_checksum(path: str, table: pa.Table, meta: dict[str, Any]) -> None:
    stored = meta.get("checksum")
    if stored is None:
        if meta["format_version"] >= 2:
            raise StateFileError(f"{path}: metadata lacks its checksum (format {meta['format_version']} files "
                                 f"carry one): the file was changed after writing")
        return  # format 1: written before checksums
    if not isinstance(stored, str) or not stored.startswith(_CHECKSUM_ALGORITHM + ":"):
        raise StateFileError(f"{path}: metadata field 'checksum' is {_short(stored)}, expected "
                             f"'{_CHECKSUM_ALGORITHM}:<hex>'")
    got = _checksum(table, meta)
    if got != stored:
        raise StateFileError(f"{path}: checksum mismatch (stored {stored}, computed {got}): the file is "
                             f"corrupted or was changed after writing")


def _chunk(column: pa.ChunkedArray) -> pa.Array:
    # combine_chunks copies even a single chunk (10 ms per 40 MB column): a file this writes has one.
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _values(table: pa.Table, name: str) -> np.ndarray:
    """A column as numpy: zero-copy for numbers (a view of the memory map), one byte per value for booleans.

    A dictionary ``bucket`` gives its int8 codes viewed as uint8 (an older file's column is uint8 already).
    """
    arr = _chunk(table.column(name))
    if pa.types.is_dictionary(arr.type):
        return arr.indices.to_numpy(zero_copy_only=False).view(np.uint8)
    return arr.to_numpy(zero_copy_only=False)


#: Arrow type of every column a state file may hold.
_TYPES: dict[str, pa.DataType] = {name: pa.from_numpy_dtype(np.dtype(dtype))
                                  for name, dtype in [(c[0], c[1]) for c in COLUMNS] + list(PLAN_COLUMNS)}
_TYPES["id"] = pa.int64()
_HISTORY_KEYS = frozenset(PartitionStats.__dataclass_fields__)
_HISTORY_INTS = ("epoch", "step", "freeze", "light", "focus", "hard", "pruned")


_F32_MAX = float(np.finfo(np.float32).max)
#: (column, lowest, highest, NaN allowed, what is allowed) for every value a reader or the policy relies on.
#: NaN marks an unseen sample's loss, EMA and confidence; nothing else may be NaN, and nothing may be inf.
_RANGES: tuple[tuple[str, float, float, bool, str], ...] = (
    ("loss", -_F32_MAX, _F32_MAX, True, "a finite number or NaN (unseen)"),
    ("loss_ema", -_F32_MAX, _F32_MAX, True, "a finite number or NaN (unseen)"),
    ("loss_var", 0.0, _F32_MAX, False, "a finite number >= 0"),
    ("confidence", 0.0, 1.0, True, "a number in [0, 1] or NaN (unseen)"),
    ("q", 0.0, 1.0, False, "a number in [0, 1]"),
    ("last_step", -1, 2**31 - 1, False, "an integer >= -1"),
    ("plan_count", 0, 1000, False, "an integer in [0, 1000] (max_repeats <= 1000)"),
    ("plan_weight", 0.0, _F32_MAX, False, "a finite number >= 0"),
)


def _check_ranges(path: str, table: pa.Table) -> None:
    """Every column's values within what the writer produces; the first bad row named.

    numpy's min and max reductions (NaN-propagating, or NaN-skipping where NaN is allowed) keep this at a
    few milliseconds per column at 10M rows; the row is searched only once a column is known to be bad.
    """
    for name, lo, hi, nan_ok, allowed in _RANGES:
        if name not in table.column_names:
            continue
        v = _values(table, name)
        floats = v.dtype.kind == "f"
        low, high = v.min(), v.max()  # NaN if any is NaN
        if floats and nan_ok and (np.isnan(low) or np.isnan(high)):
            low, high = np.fmin.reduce(v), np.fmax.reduce(v)  # slower; NaN only when all are NaN
            ok = bool(np.isnan(low) or (low >= lo and high <= hi))
        else:
            ok = bool(low >= lo and high <= hi)  # False on NaN
        if ok:
            continue
        bad = (v < lo) | (v > hi)
        if floats and not nan_ok:
            bad |= np.isnan(v)
        rows = np.flatnonzero(bad)
        raise StateFileError(f"{path}: column {name!r} holds {v[rows[0]].item()!r} at row {int(rows[0])} "
                             f"({rows.size:,} bad row{'s' if rows.size != 1 else ''}), expected {allowed}")


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_meta(path: str, meta: dict[str, Any]) -> None:
    """The metadata fields readers use, so a hand-edited file fails here, named, and not in a format()."""
    for key, ok, allowed in (("config", lambda v: isinstance(v, dict), "an object"),
                             ("fingerprint", lambda v: isinstance(v, str), "a string"),
                             ("num_samples", _is_int, "an integer"),
                             ("epoch", _is_int, "an integer"), ("step", _is_int, "an integer"),
                             ("num_nonfinite", _is_int, "an integer")):
        v = meta.get(key)
        if v is not None and not ok(v):
            raise StateFileError(f"{path}: metadata field {key!r} is {_short(v)}, expected {allowed} or null")
    history = meta.get("history", [])
    if not isinstance(history, list):
        raise StateFileError(f"{path}: metadata field 'history' is {_short(history)}, expected a list of "
                             f"partitions")
    for i, h in enumerate(history):
        if not isinstance(h, dict):
            raise StateFileError(f"{path}: history entry {i} is {_short(h)}, expected an object")
        if not _HISTORY_KEYS <= set(h):
            raise StateFileError(f"{path}: history entry {i} is not a partition record (lacks "
                                 f"{sorted(_HISTORY_KEYS - set(h))})")
        for key in _HISTORY_INTS:
            if not _is_int(h.get(key)):
                raise StateFileError(f"{path}: history entry {i} has {key}={_short(h.get(key))}, "
                                     f"expected an integer")
        if not isinstance(h.get("phase"), str):
            raise StateFileError(f"{path}: history entry {i} has phase={_short(h.get('phase'))}, "
                                 f"expected a string")
        loss = h.get("mean_loss")
        if loss is not None and (isinstance(loss, bool) or not isinstance(loss, (int, float))):
            raise StateFileError(f"{path}: history entry {i} has mean_loss={_short(loss)}, "
                                 f"expected a number or null")


def _check_columns(path: str, table: pa.Table) -> None:
    """Types, nulls and bucket codes of every known column; at least one row."""
    if table.num_rows == 0:
        raise StateFileError(f"{path}: holds no samples")
    for name in table.column_names:
        want = _TYPES.get(name)
        if want is None:
            continue
        got = table.schema.field(name).type
        if name == "bucket" and got == BUCKET_TYPE:  # format 3; older files hold uint8 codes
            names = _chunk(table.column(name)).dictionary
            if not names.equals(_BUCKET_DICT):
                raise StateFileError(f"{path}: column 'bucket' has the values {names.to_pylist()}, expected "
                                     f"{list(policy.BUCKET_NAMES)}")
        elif got != want:
            allowed = f"{want} or {BUCKET_TYPE}" if name == "bucket" else str(want)
            raise StateFileError(f"{path}: column {name!r} has type {got}, expected {allowed}")
        nulls = table.column(name).null_count
        if nulls:
            raise StateFileError(f"{path}: column {name!r} has {nulls:,} null values, expected none")
    bucket = _values(table, "bucket")  # a code below 0 in a dictionary column is above 127 here
    if bucket.max() > policy.HARD:
        bad = np.flatnonzero(bucket > policy.HARD)
        codes = ", ".join(f"{i} {n}" for i, n in enumerate(policy.BUCKET_NAMES))
        raise StateFileError(f"{path}: column 'bucket' holds code {int(bucket[bad[0]])} at id {int(bad[0])} "
                             f"({bad.size:,} sample{'s' if bad.size != 1 else ''}), expected 0-3 ({codes})")
