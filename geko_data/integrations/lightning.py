"""GEKO in Lightning: a callback that owns the ``GEKOSampler``, reports per-sample losses, logs what GEKO did
and keeps its state in Lightning checkpoints.

Lines a Lightning script changes::

    geko = GEKOCallback(train_set)                                    # GEKO
    trainer = L.Trainer(max_epochs=E, callbacks=[geko])               # GEKO: the callback

    class Module(L.LightningModule):
        def train_dataloader(self):
            return geko.dataloader(batch_size=32, num_workers=2)      # GEKO: instead of DataLoader(...)

        def training_step(self, batch, batch_idx):
            logits = self(batch["x"])
            losses = F.cross_entropy(logits, batch["y"], reduction="none")
            probs = logits.detach().softmax(-1)
            return {"loss": (losses * batch["__weight__"]).mean(),    # GEKO: weight, and hand back
                    "per_sample_loss": losses.detach(),               #       the per-sample losses,
                    "correct": probs.argmax(-1) == batch["y"],        #       right or not
                    "confidence": probs.max(-1).values}               #       and how sure

By default (``batches="steps"``) every epoch takes as many optimizer steps as a full one, its batches
shrinking with its draws (``GEKOBatchSampler``); ``batches="fixed"`` keeps ``batch_size`` and takes fewer steps.

Under DDP Lightning's default ``use_distributed_sampler=True`` wraps a DataLoader's sampler in a
``DistributedSamplerWrapper`` that keeps every world-th index: a GEKO sampler, which already yields this
rank's share, would silently lose half of it. The callback's sampler is a ``DistributedSampler`` to Lightning,
and the loader's ``sampler`` is that sampler in both modes, so Lightning leaves the loader alone; a plain
``GEKOSampler`` that Lightning wrapped anyway is refused at the epoch's start with the fix.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
import warnings
import weakref
from typing import Any

import lightning.pytorch as pl
import numpy as np
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from geko_data.atomic import atomic_write_bytes
from geko_data.batches import BATCHES, GEKOBatchSampler, full_epoch_steps
from geko_data.config import GEKOConfig
from geko_data.epochs import check_int
from geko_data.integrations.metrics import epoch_metrics
from geko_data.sampler import GEKOSampler
from geko_data.state import FingerprintError, SampleState
from geko_data.statefile import fingerprint_source, resume_fingerprint_error
from geko_data.validate import check_fingerprint_arg

__all__ = ["GEKOCallback", "RankAwareGEKOSampler"]

# What Lightning sets max_epochs to when a Trainer is built without it (loops/utilities.py: _parse_loop_limits).
_LIGHTNING_DEFAULT_MAX_EPOCHS = 1000


class RankAwareGEKOSampler(GEKOSampler, DistributedSampler):
    """A ``GEKOSampler`` that frameworks checking ``isinstance(sampler, DistributedSampler)`` (Lightning)
    recognise as already sharded by rank, so they do not shard it again. Everything else is GEKOSampler's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        GEKOSampler.__init__(self, *args, **kwargs)  # not DistributedSampler's: it would read the process group
        self.num_replicas, self.rank, self.drop_last = self.world.world_size, self.world.rank, False


class _EpochBatches(GEKOBatchSampler):
    """A ``GEKOBatchSampler`` whose length is the most batches an epoch takes: a full epoch's (``steps``).

    Lightning reads a train loader's length once, when the loader is made, and ends every epoch at that many
    batches, counting those done before a resume. The batches left in the epoch at hand (``GEKOBatchSampler``'s
    length) would cut a resumed epoch short by the batches already done, and every later epoch to the
    resumed one's rest; an epoch with fewer batches than this length ends when they run out.
    """

    def __len__(self) -> int:
        return max(self.steps, self.epoch_batches())

    def epoch_batches(self) -> int:
        """The batches this epoch takes from its start (a resumed epoch's done ones included)."""
        draws, size, _ = self._epoch()
        return -(-draws // size)


class _FirstBatchIterator:
    """A DataLoader's iterator made at its first batch rather than at ``iter()``.

    With workers, a DataLoader's iterator hands the workers their first indices as soon as it is made. On a
    resume Lightning makes the train loader's iterator before it sets the sampler's epoch (and keeps that
    iterator for the resumed epoch), so the workers would load the epoch the checkpoint restored, not the one
    Lightning goes on with. Made at the first batch, the iterator draws the epoch Lightning set, as a loader
    without workers does."""

    def __init__(self, loader: DataLoader) -> None:
        self._loader = loader
        self._iterator: Any = None

    def __iter__(self) -> _FirstBatchIterator:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = DataLoader.__iter__(self._loader)
        return next(self._iterator)


class _EpochLoader(DataLoader):
    """A DataLoader whose iterators draw from the sampler only at their first batch (``_FirstBatchIterator``)."""

    def __iter__(self) -> Any:  # type: ignore[override]
        return _FirstBatchIterator(self)


class _FixedLoader(_EpochLoader):
    """An ``_EpochLoader`` of fixed batches whose length is the most batches an epoch takes: a full epoch's.

    Lightning reads a train loader's length once, when the loader is made, and ends every epoch at that many
    batches. After a resume the epoch at hand may be shorter than a later one (the last epochs train more
    samples again), which its length would cut short; an epoch with fewer batches ends when they run out.
    """

    def __len__(self) -> int:
        sampler = self.sampler
        full = full_epoch_steps(sampler.epoch_length or sampler.num_samples, world_size=sampler.world.world_size,
                                batch_size=self.batch_size or 1)  # None: unbatched samples
        return max(full, super().__len__())

    def epoch_batches(self) -> int:
        """The batches this epoch takes from its start (a resumed epoch's done ones included)."""
        sampler = self.sampler
        return -(-(sampler.position + len(sampler)) // (self.batch_size or 1))


class _StepsLoader(_EpochLoader):
    """A DataLoader over an ``_EpochBatches`` whose ``sampler`` is the GEKO sampler the batches come from.

    A DataLoader given ``batch_sampler=`` reports as its ``sampler`` a ``SequentialSampler`` it never draws
    from. Lightning reads that attribute to decide whether to shard the loader (``use_distributed_sampler``):
    it would put a ``DistributedSampler`` over the whole dataset in the batch sampler's place, and every rank
    would train its own slice of every sample instead of its GEKO share. Here ``sampler`` is the rank-aware
    GEKO sampler, which Lightning takes as already sharded, so it leaves the loader as it is.
    """

    @property  # type: ignore[override]
    def sampler(self) -> Any:
        return self.batch_sampler.sampler

    @sampler.setter
    def sampler(self, value: Any) -> None:
        # DataLoader.__init__ assigns its unused SequentialSampler here (the batch sampler makes the batches);
        # DataLoader itself refuses any later assignment.
        pass

    def state_dict(self) -> dict[str, Any]:
        """Empty: the position travels in the callback's state. Lightning counts a train loader with a
        ``state_dict`` as resumable mid-epoch (and warns that a resume there is unreliable otherwise)."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to load: ``GEKOCallback`` restored the sampler's position before the loader was made."""


def _wrapped_geko(sampler: Any) -> GEKOSampler | None:
    """The GEKOSampler inside a Lightning ``DistributedSamplerWrapper``, if that is what ``sampler`` is."""
    inner = getattr(getattr(sampler, "dataset", None), "_sampler", None)
    return inner if isinstance(inner, GEKOSampler) and not isinstance(sampler, GEKOSampler) else None


def _batches_of_this_epoch(trainer: pl.Trainer, loaders: list[Any]) -> None:
    """Tell Lightning how many batches this epoch has. It reads the loader's length once, at the first epoch,
    and validates at an epoch's end only when the epoch took that many batches: GEKO's epochs that took
    fewer (fixed batches, or steps kept with a step or two fewer) went unvalidated, and whatever watches a
    validation metric (EarlyStopping, a monitored ModelCheckpoint) saw some epochs only. Here the count and
    the batch validation follows are set from this epoch's loader, as Lightning's ``setup_data`` sets them."""
    loop = trainer.fit_loop
    interval = trainer.val_check_interval
    ours = [dl for dl in loaders if isinstance(dl, (_FixedLoader, _StepsLoader))]
    if (len(ours) != 1 or len(loaders) != 1 or trainer.check_val_every_n_epoch is None or isinstance(interval, int)
            or getattr(trainer, "_val_check_time_interval", None) is not None or not hasattr(loop, "max_batches")):
        return  # validation every N batches, or by time: Lightning counts those itself
    loader = ours[0]
    batches = (loader.batch_sampler if isinstance(loader, _StepsLoader) else loader).epoch_batches()
    if batches:
        loop.max_batches = batches
        trainer.val_check_batch = max(1, int(batches * interval))


def _batch_ids(batch: Any) -> Any:
    """The sample ids of a batch of ``GEKOCallback.dataloader()``: its ``__index__`` for dict items, the
    next-to-last entry for tuple items (``x, y, index, weight``: ``GEKOSampler.wrap`` appends index and
    weight to a tuple)."""
    if isinstance(batch, dict) and "__index__" in batch:
        return batch["__index__"]
    if isinstance(batch, (list, tuple)) and len(batch) >= 3:
        ids = batch[-2]
        if getattr(ids, "ndim", None) == 1 and not getattr(ids, "is_floating_point", lambda: True)():
            return ids
    raise ValueError("the batch has no sample ids: `__index__` for dict items, or the next-to-last entry of a "
                     "tuple batch (x, y, index, weight); build the train loader with `GEKOCallback.dataloader()` "
                     "and hand `training_step` the batch as the loader gives it")


def _fits_in_children(trainer: pl.Trainer) -> bool:
    """Whether the fit runs in processes the main one started and waits for (``ddp_spawn``, ``ddp_fork``,
    ``ddp_notebook``), whose callbacks are copies: what they hold is lost with them unless handed back."""
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    return isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher)


def _own_folder(path: str) -> bool:
    """``path`` is a folder (not a link to one) of this user that only this user can write."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def _remove_handover(path: str, owner: int) -> None:
    if os.getpid() == owner and _own_folder(path):  # never from a forked child: the parent reads it
        shutil.rmtree(path, ignore_errors=True)


class GEKOCallback(pl.Callback):
    """Owns a ``GEKOSampler`` over ``dataset`` for ``trainer.fit``.

    Args:
        dataset: the map-style train dataset.
        total_epochs: planned epochs. Defaults to the trainer's ``max_epochs``.
        config: the GEKO policy. Defaults to ``GEKOConfig()``.
        seed: seed of GEKO's plans. Defaults to ``0``.
        epoch_length: draws per epoch over all ranks. Defaults to the number of active samples.
        log_prefix: prefix of the metrics logged at each epoch's end. Defaults to ``"geko/"``.
        batches: how ``dataloader(batch_size=B)`` cuts an epoch: ``"steps"``: as many optimizer steps as a
            full epoch at ``B``, in smaller batches (``GEKOBatchSampler``, down to half of ``B``); ``"fixed"``:
            batches of ``B``, fewer steps. Defaults to ``"steps"``.
        fingerprint: a name of the data (e.g. ``geko_data.fingerprint_of(keys)`` of its sample keys in index
            order), kept in the state: a fit resumed from a checkpoint of other data (another fingerprint)
            raises ``FingerprintError`` instead of training on per-sample state that belongs to other samples.
            Defaults to ``None`` (only the size is checked).

    ``training_step`` returns ``{"loss": ..., "per_sample_loss": (B,) losses}`` and may add ``"correct"``
    and ``"confidence"`` (both (B,)); the callback reports them with the batch's ``__index__``. Without them
    the report takes ``exp(-loss)`` as the confidence and a sample as right when that is at least 0.5.
    """

    def __init__(self, dataset: Any, *, total_epochs: int | None = None, config: GEKOConfig | None = None,
                 seed: int = 0, epoch_length: int | None = None, log_prefix: str = "geko/",
                 batches: str = "steps", fingerprint: str | None = None) -> None:
        if (not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__")
                or isinstance(dataset, IterableDataset)):  # a GEKOStream has a length and torch's __getitem__ stub
            raise TypeError(f"`dataset` must be a map-style dataset (with __len__ and __getitem__), got "
                            f"{type(dataset).__name__}; GEKOCallback samples a dataset it can index: for WebDataset "
                            f"shards (local or s3://, gs://, ...), pass geko_data.ShardDataset(folder_or_url)")
        check_int("total_epochs", total_epochs, 1, optional=True)
        check_int("seed", seed, 0)
        check_int("epoch_length", epoch_length, 1, optional=True)
        if config is not None and not isinstance(config, GEKOConfig):
            raise TypeError(f"`config` must be a GEKOConfig, got {type(config).__name__}")
        if batches not in BATCHES:
            raise ValueError(f"`batches` must be one of {', '.join(BATCHES)}, got {batches!r}")
        check_fingerprint_arg("fingerprint", fingerprint)
        self.fingerprint = fingerprint
        self.dataset = dataset
        self.total_epochs = total_epochs
        self.config = config
        self.seed = seed
        self.epoch_length = epoch_length
        self.log_prefix = log_prefix
        self.batches = batches
        self._sampler: RankAwareGEKOSampler | None = None
        self._consumed = 0  # this rank's indices of the current epoch reported so far
        self._pending: dict[str, Any] | None = None  # a checkpoint's state, loaded before setup
        self._resumed_epoch: int | None = None  # the epoch a restored position belongs to
        self._warned_fixed = False  # a mid-epoch checkpoint with fixed batches was said to be unresumable
        self._trainer: pl.Trainer | None = None  # the fit's, from setup
        # Under a strategy that fits in child processes (ddp_spawn, ddp_fork, ddp_notebook) this object is only
        # copied into them: rank 0 hands the run's state back through a private folder under this name (made by
        # the child, mode 0700; nothing is made unless such a fit runs), read at the next `sampler` access here.
        self._owner_pid = os.getpid()
        self._set_up_here = False  # whether setup() ran in this process (the fit ran here, not in children)
        self._handover = os.path.join(tempfile.gettempdir(), f"geko-callback-{secrets.token_hex(16)}")
        weakref.finalize(self, _remove_handover, self._handover, self._owner_pid)

    @property
    def sampler(self) -> RankAwareGEKOSampler | None:
        """The fit's ``GEKOSampler`` (its ``state``, ``efficiency_report()``); ``None`` before a fit. After a fit
        that ran in child processes (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``), a copy of rank 0's."""
        if not self._set_up_here and os.getpid() == self._owner_pid:
            self._take_handover()
        return self._sampler

    @sampler.setter
    def sampler(self, value: RankAwareGEKOSampler | None) -> None:
        self._sampler = value

    # ------------------------------------------------------------------ setup and data
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        epochs = self.total_epochs or trainer.max_epochs
        if epochs is None or epochs < 1:
            raise ValueError(f"GEKOCallback needs the planned epochs: pass `total_epochs=` or set the trainer's "
                             f"`max_epochs` (got {trainer.max_epochs!r})")
        # Lightning turns an unset max_epochs into 1000 (it only warns): GEKO would plan a 1000-epoch run, whose
        # annealing epochs (the frozen samples trained again) start at epoch 875 and are never reached.
        if self.total_epochs is None and epochs == _LIGHTNING_DEFAULT_MAX_EPOCHS:
            raise ValueError(f"GEKOCallback plans the run from the trainer's `max_epochs`, which is "
                             f"{_LIGHTNING_DEFAULT_MAX_EPOCHS}: Lightning's value when it is not set. Set "
                             f"`max_epochs` to the epochs you will train (with EarlyStopping: the most you allow), "
                             f"or, to plan {_LIGHTNING_DEFAULT_MAX_EPOCHS} epochs (set or not), pass "
                             f"`GEKOCallback(total_epochs={_LIGHTNING_DEFAULT_MAX_EPOCHS})`")
        # GEKO plans whole epochs: a run that max_steps cuts short trains part of an epoch's plan, and the
        # efficiency report would count the draws cut off as compute saved. Stopping early on purpose (to
        # resume later) says so by planning the run: total_epochs=.
        if getattr(trainer, "fast_dev_run", False):  # it sets max_steps and limits the batches itself
            raise ValueError(f"`fast_dev_run` must be False with GEKOCallback (it runs {trainer.fast_dev_run!r} "
                             f"batch(es), not GEKO's epochs): check the module without the callback, or run a "
                             f"short planned run (max_epochs=1)")
        if trainer.max_steps not in (-1, None) and self.total_epochs is None:
            raise ValueError(f"`max_steps` must be -1 with GEKOCallback unless the run is planned with "
                             f"`GEKOCallback(total_epochs=...)` (GEKO plans whole epochs; a run cut short counts "
                             f"what it did not train as saved), got {trainer.max_steps}; set `max_epochs` instead, "
                             f"or pass total_epochs= to stop early and resume")
        if getattr(trainer, "overfit_batches", 0):
            raise ValueError(f"`overfit_batches` must be 0 with GEKOCallback (it trains the same few batches "
                             f"every epoch, not GEKO's plan), got {trainer.overfit_batches!r}")
        limit = trainer.limit_train_batches
        # An int is a number of batches to Lightning (1 is one batch an epoch; fast_dev_run sets one too).
        if limit is not None and (limit != 1.0 or (isinstance(limit, int) and not isinstance(limit, bool))):
            raise ValueError(f"`limit_train_batches` must be 1.0 with GEKOCallback (every draw of an epoch's plan "
                             f"is trained), got {limit!r}")
        self._set_up_here = True
        if os.getpid() == self._owner_pid:  # a fit here: what an earlier fit in child processes left is older
            _remove_handover(self._handover, self._owner_pid)
        self.sampler = self._new_sampler(int(epochs), world_size=trainer.world_size, rank=trainer.global_rank)
        self._trainer = trainer  # its ckpt_path (set when a resume starts) is named by a restore's errors
        if self._pending is not None:
            self._restore(self._pending)
            self._pending = None

    def _new_sampler(self, epochs: int, *, world_size: int, rank: int) -> RankAwareGEKOSampler:
        sampler = RankAwareGEKOSampler(self.dataset, total_epochs=epochs, config=self.config, seed=self.seed,
                                       num_replicas=world_size, rank=rank, epoch_length=self.epoch_length,
                                       fingerprint=self.fingerprint)
        # Set before a checkpoint's epoch is restored and planned (a GEKOBatchSampler would set it only when
        # train_dataloader() runs): the plan's short-run rule depends on it.
        sampler.keeps_steps = self.batches == "steps"
        return sampler

    def dataloader(self, **kwargs: Any) -> DataLoader:
        """The train DataLoader over the wrapped dataset (``DataLoader``'s keyword args, but no sampler); call it
        in ``train_dataloader()``. ``batches="steps"`` cuts every epoch into a full epoch's batches of at most
        ``batch_size``, ``"fixed"`` into batches of ``batch_size``."""
        if self.sampler is None:
            raise RuntimeError("GEKOCallback.dataloader() was called before the trainer set the callback up: "
                               "call it inside `train_dataloader()` (Lightning runs that after setup, when the "
                               "ranks are known), and pass the callback to the Trainer")
        for name in ("sampler", "batch_sampler", "shuffle"):
            if name in kwargs:
                raise ValueError(f"GEKOCallback.dataloader() sets the sampler itself; remove `{name}=` "
                                 f"(got {kwargs[name]!r})")
        if kwargs.get("drop_last"):
            raise ValueError("`drop_last` must be False with GEKO: every draw of the plan is trained")
        dataset = self.sampler.wrap(self.dataset)
        if self.batches == "fixed":
            return _FixedLoader(dataset, sampler=self.sampler, **kwargs)
        batch_size = kwargs.pop("batch_size", 1)
        if batch_size is None:
            raise ValueError("`batch_size` must be an int >= 1 with batches='steps' (GEKO cuts the epochs into "
                             "batches), got None")
        return _StepsLoader(dataset, batch_sampler=_EpochBatches(self.sampler, batch_size=batch_size), **kwargs)

    # ------------------------------------------------------------------ epochs and feedback
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = trainer.train_dataloader
        loaders = loader if isinstance(loader, (list, tuple)) else (
            list(loader.values()) if isinstance(loader, dict) else [loader])
        for dl in loaders:
            for sampler in (getattr(dl, "sampler", None), getattr(getattr(dl, "batch_sampler", None), "sampler", None)):
                if _wrapped_geko(sampler) is not None:
                    raise RuntimeError(
                        "Lightning wrapped a GEKOSampler in a DistributedSamplerWrapper (use_distributed_sampler="
                        "True): each rank would train only half of its GEKO share, silently, and that sampler is "
                        "not GEKOCallback's, which reports, logs and checkpoints only its own. With GEKOCallback, "
                        "return `geko.dataloader(...)` (the callback's loader) from `train_dataloader()`; "
                        "`use_distributed_sampler=False` on the Trainer is the fix only for a plain GEKOSampler "
                        "used without GEKOCallback")
        if self.sampler is not None:
            self.sampler.set_epoch(trainer.current_epoch)  # Lightning calls it too; the second call is a no-op
            start = self._consumed if self._resumed_epoch == trainer.current_epoch else 0
            self._consumed, self._resumed_epoch = start, None
            _batches_of_this_epoch(trainer, loaders)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.sampler is None:
            return
        if not isinstance(outputs, dict) or "per_sample_loss" not in outputs:
            # Lightning hands this hook a returned loss tensor as {'loss': tensor}: name the keys, not the type.
            got = (f"a dict with keys {sorted(map(str, outputs))}" if isinstance(outputs, dict)
                   else "None" if outputs is None else type(outputs).__name__)
            if isinstance(outputs, dict) and list(outputs) == ["loss"]:
                got += ", which is how Lightning passes on a bare loss tensor returned by `training_step`"
            raise ValueError("with GEKOCallback, `training_step` must return a dict with the per-sample losses: "
                             "`return {'loss': (losses * batch['__weight__']).mean(), 'per_sample_loss': "
                             f"losses.detach()}}` (got {got})")
        ids = _batch_ids(batch)
        losses = outputs["per_sample_loss"]
        shape = tuple(np.shape(losses))  # a tensor's own shape; () for a float
        if shape != (len(ids),):  # the sampler's error would name its own argument, `losses`
            raise ValueError(f"`per_sample_loss` must hold one loss per sample of the batch, shape ({len(ids)},), "
                             f"got {type(losses).__name__} of shape {shape}: compute the loss with "
                             f"reduction='none'")
        self.sampler.report(ids, losses, correct=outputs.get("correct"), confidence=outputs.get("confidence"),
                            answer=outputs.get("answer"), step=trainer.global_step)
        self._consumed += len(ids)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.sampler is not None:
            metrics = epoch_metrics(self.sampler, epochs_done=trainer.current_epoch + 1, prefix=self.log_prefix)
            # Every rank holds the same state: Lightning's advice to reduce epoch metrics across ranks does not
            # apply. It is given when the epoch's metrics are read, after this hook returns, so a filter scoped
            # to this call missed it (one warning per metric under DDP); this one names only our metrics.
            ours = re.escape(self.log_prefix)
            warnings.filterwarnings("ignore", message=rf"It is recommended to use `self\.log\('{ours}")
            pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=False)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and os.getpid() == self._owner_pid:
            self._set_up_here = False  # a later fit may run in child processes: `sampler` then looks for it

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (self._sampler is not None and trainer.global_rank == 0 and os.getpid() != self._owner_pid
                and _fits_in_children(trainer)):
            self._give_handover(trainer)

    # ------------------------------------------------------------------ the state of a fit run in children
    def _give_handover(self, trainer: pl.Trainer) -> None:
        """Rank 0 of a fit in child processes: the state and the sampler's position, for the parent's copy."""
        assert self._sampler is not None
        try:
            os.mkdir(self._handover, 0o700)
        except FileExistsError:  # a second fit before the parent read the first one's: replaced below
            if not _own_folder(self._handover):
                raise RuntimeError(f"GEKOCallback: {self._handover!r} exists and is not a folder of this user; "
                                   f"the fit's state is not handed back to the main process") from None
            with contextlib.suppress(FileNotFoundError):  # written last: marks a complete handover
                os.unlink(os.path.join(self._handover, "sampler.json"))
        self._sampler.state.save(os.path.join(self._handover, "state.arrow"))
        meta = {"sampler": self._sampler.state_dict(consumed=self._consumed),
                "total_epochs": self._sampler.total_epochs, "world_size": trainer.world_size}
        atomic_write_bytes(os.path.join(self._handover, "sampler.json"), json.dumps(meta).encode())

    def _take_handover(self) -> None:
        """In the process that made this callback: the state a fit in child processes handed back, if any."""
        meta_path = os.path.join(self._handover, "sampler.json")
        if not _own_folder(self._handover) or not os.path.isfile(meta_path):
            return
        with open(meta_path, "rb") as f:
            meta = json.loads(f.read())
        state = SampleState.load(os.path.join(self._handover, "state.arrow"), memory_map=False)
        sampler = self._new_sampler(int(meta["total_epochs"]), world_size=int(meta["world_size"]), rank=0)
        sampler.use_state(state)
        sampler.load_state_dict(meta["sampler"])
        self._sampler, self._consumed = sampler, int(meta["sampler"]["position"])
        shutil.rmtree(self._handover, ignore_errors=True)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self.sampler is None:
            return {}
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "state.arrow")
            self.sampler.state.save(path)
            with open(path, "rb") as f:
                blob = f.read()
        if (self.batches == "fixed" and not self._warned_fixed
                and 0 < self._consumed < self.sampler.position + len(self.sampler)):
            # Refused only at the resume otherwise: said when the checkpoint is written, once a fit.
            self._warned_fixed = True
            warnings.warn(f"GEKOCallback: a checkpoint written in the middle of epoch {self.sampler.epoch} with "
                          f"batches='fixed' cannot be resumed (only one written at an epoch's end can): save at "
                          f"epochs' ends (ModelCheckpoint(every_n_epochs=1, save_on_train_epoch_end=True)), or "
                          f"train with GEKOCallback(batches='steps'), whose loader resumes mid-epoch",
                          RuntimeWarning, stacklevel=2)
        # The Arrow file travels inside the checkpoint as bytes: no pickled objects.
        return {"sampler": self.sampler.state_dict(consumed=self._consumed), "state_arrow": blob}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if "state_arrow" not in state_dict or "sampler" not in state_dict:
            raise ValueError("GEKOCallback checkpoint state lacks the SampleState or the sampler position: "
                             f"keys {sorted(state_dict)}")
        if self.sampler is None:
            self._pending = state_dict  # Lightning may restore callbacks before setup()
        else:
            self._restore(state_dict)

    def _restore(self, state_dict: dict[str, Any]) -> None:
        assert self.sampler is not None
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "state.arrow")
            with open(path, "wb") as f:
                f.write(state_dict["state_arrow"])
            state = SampleState.load(path, memory_map=False)
        try:
            self.sampler.use_state(state)
        except FingerprintError:
            ckpt = getattr(self._trainer, "ckpt_path", None)
            raise resume_fingerprint_error(f"checkpoint {ckpt!r}", state.fingerprint, self.sampler.state.fingerprint,
                                           run=fingerprint_source(self.fingerprint, "this fit's `fingerprint=`"),
                                           fresh="fit this data from the start (without `ckpt_path`)") from None
        sd = dict(state_dict["sampler"])
        self.sampler.load_state_dict(sd)
        if len(self.sampler) > 0 and int(sd["position"]) > 0 and self.batches == "fixed":
            # Fixed batches resume only at an epoch's end: their loader has no state for Lightning, which
            # counts it as not resumable mid-epoch.
            raise RuntimeError(
                f"GEKOCallback: this checkpoint was saved in the middle of epoch {sd['epoch']} (after "
                f"{sd['position']} draws), and with batches='fixed' a fit resumes only from an epoch's end. "
                f"Resume from a checkpoint saved at an epoch's end (ModelCheckpoint's default, or "
                f"`ModelCheckpoint(every_n_epochs=1, save_on_train_epoch_end=True)`), or train with "
                f"GEKOCallback(batches='steps'), whose loader resumes mid-epoch")
        # A position at the epoch's end stays there: Lightning goes on with the next epoch (and sets it on the
        # sampler before the loader's first batch) or, when the epoch took fewer batches than the loader's length
        # and Lightning could not tell its last batch from a middle one, resumes the spent epoch, whose rest is
        # then empty. Neither loader is ever empty (both are a full epoch long), so the fit goes on.
        self._consumed = int(sd["position"])
        self._resumed_epoch = int(sd["epoch"])
