"""GEKO inside ``transformers.Trainer`` and TRL's ``SFTTrainer``.

Swap the class and keep the rest of the script::

    from geko_data.integrations.hf import GEKOTrainer          # or GEKOSFTTrainer for TRL
    trainer = GEKOTrainer(model=model, args=args, train_dataset=ds, data_collator=collator)
    trainer.train()

What the mixin does where the Trainer would get GEKO wrong:

- builds the ``GEKOSampler`` lazily from the train dataset the Trainer finally holds (after TRL's
  preprocessing, which may drop rows), wraps it, and keeps ``__index__`` / ``__weight__`` through any
  collator and through ``remove_unused_columns``;
- computes per-sample losses on target tokens (``geko_data.signals``), weights them, reports them, and runs
  batches of forward-only re-checks without a backward pass (one process);
- cuts every epoch into as many optimizer steps as a full one, the batches shrinking with the epoch
  (``GEKOBatchSampler``; ``geko_batches="fixed"`` keeps ``per_device_train_batch_size`` and takes fewer
  steps), sizes every epoch from GEKO's plan and drives the LR schedule by the run's progress, so the
  schedule ends where training ends;
- saves the ``SampleState`` and the sampler's position in every checkpoint and restores them on
  ``resume_from_checkpoint``: the continuation is exact;
- under torchrun / accelerate DDP stops accelerate from re-sharding the sampler (it already yields this
  rank's equal share), so no rank silently trains half its data;
- logs bucket shares, passes saved and forgetting events per epoch through ``Trainer.log`` (so
  ``report_to`` TensorBoard / W&B get them).
"""

from __future__ import annotations

import json
import math
import os
import warnings
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, seed_worker

from geko_data import signals as signals_mod
from geko_data.atomic import atomic_write_bytes
from geko_data.batches import BATCHES, GEKOBatchSampler
from geko_data.config import GEKOConfig
from geko_data.dataset import ShardDataset
from geko_data.epochs import check_int
from geko_data.integrations.accelerate import unshard
from geko_data.integrations.metrics import epoch_metrics
from geko_data.sampler import GEKOSampler
from geko_data.state import FingerprintError, SampleState
from geko_data.statefile import fingerprint_source, resume_fingerprint_error
from geko_data.validate import check_fingerprint_arg

__all__ = ["GEKOTrainer", "GEKOTrainerMixin", "GEKOSFTTrainer", "KeepGEKOKeys", "default_signals",
           "STATE_FILE", "SAMPLER_FILE"]

#: Files the mixin adds to every ``checkpoint-N`` directory.
STATE_FILE, SAMPLER_FILE = "geko_state.arrow", "geko_sampler.json"

# The LR shape is read from the Trainer's own scheduler functions at this resolution of the run's progress.
_SHAPE_RESOLUTION = 1_000_000


def default_signals(outputs: Any, labels: torch.Tensor) -> signals_mod.Signals:
    """Per-sample signals from a model's outputs: causal-LM logits (B, T, V) or classifier logits (B, C)."""
    logits = outputs["logits"] if isinstance(outputs, dict) or hasattr(outputs, "keys") else outputs[0]
    if logits.dim() == 3:
        return signals_mod.causal_lm(logits, labels)
    if logits.dim() == 2:
        return signals_mod.classification(logits, labels)
    raise ValueError(f"default_signals handles logits of shape (B, T, V) or (B, C), got {tuple(logits.shape)}; "
                     f"pass `geko_signals=` to the trainer")


class KeepGEKOKeys:
    """A collator wrapper: takes ``__index__`` / ``__weight__`` off every item, collates the rest with
    ``collate`` (which may drop keys it does not know, as TRL's does), and puts them back as tensors."""

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        ids, weights, rest = [], [], []
        for f in features:
            f = dict(f)
            ids.append(int(f.pop("__index__")))
            weights.append(float(f.pop("__weight__")))
            rest.append(f)
        batch = self.collate(rest)
        batch["__index__"] = torch.tensor(ids, dtype=torch.int64)
        batch["__weight__"] = torch.tensor(weights, dtype=torch.float32)
        return batch


def _schedule_shape(name: Any, kwargs: dict[str, Any] | None, lr: float) -> Callable[[float], float] | None:
    """The Trainer's LR schedule ``name`` without warmup, as a function of progress in [0, 1]; None when the
    schedule is not a function of the step (e.g. reduce_lr_on_plateau)."""
    from transformers import get_scheduler

    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    try:
        sched = get_scheduler(name, optimizer=dummy, num_warmup_steps=0, num_training_steps=_SHAPE_RESOLUTION,
                              scheduler_specific_kwargs=kwargs or {})
    except (ValueError, TypeError, ZeroDivisionError):
        return None
    if not isinstance(sched, torch.optim.lr_scheduler.LambdaLR) or len(sched.lr_lambdas) != 1:
        return None
    fn = sched.lr_lambdas[0]
    return lambda p: float(fn(round(min(max(p, 0.0), 1.0) * _SHAPE_RESOLUTION)))


class GEKOTrainerMixin:
    """Put before ``transformers.Trainer`` (or a subclass such as TRL's ``SFTTrainer``) in the bases.

    Keyword args (besides the Trainer's):
        geko_config: the GEKO policy. Defaults to ``GEKOConfig()``.
        geko_seed: seed of GEKO's plans. Defaults to ``args.seed``.
        geko_epoch_length: draws per epoch over all ranks. Defaults to the number of active samples.
        geko_signals: ``fn(outputs, labels) -> Signals`` per sample. Defaults to ``default_signals``
            (causal LM on target tokens, or classification).
        geko_batches: ``"steps"``: an epoch that skips samples takes as many optimizer steps as a full one,
            in smaller batches (``GEKOBatchSampler``, down to half of ``per_device_train_batch_size``);
            ``"fixed"``: batches of ``per_device_train_batch_size``, fewer steps. Defaults to ``"steps"``.
        geko_fingerprint: a name of the data (e.g. ``geko_data.fingerprint_of(keys)`` of its sample keys in
            index order), kept in the state: training resumed from a checkpoint of other data (another
            fingerprint) raises ``FingerprintError`` instead of using per-sample state that belongs to other
            samples. Defaults to ``None`` (only the size is checked).

    ``trainer.geko_sampler`` is the ``GEKOSampler`` (built when training starts), ``trainer.geko_state`` its
    ``SampleState``. Train with ``num_train_epochs`` (GEKO plans whole epochs), not ``max_steps``.
    """

    def __init__(self, *args: Any, geko_config: GEKOConfig | None = None, geko_seed: int | None = None,
                 geko_epoch_length: int | None = None,
                 geko_signals: Callable[[Any, torch.Tensor], signals_mod.Signals] | None = None,
                 geko_batches: str = "steps", geko_fingerprint: str | None = None, **kwargs: Any) -> None:
        if geko_config is not None and not isinstance(geko_config, GEKOConfig):
            raise TypeError(f"`geko_config` must be a GEKOConfig, got {type(geko_config).__name__}")
        check_int("geko_seed", geko_seed, 0, optional=True)
        check_int("geko_epoch_length", geko_epoch_length, 1, optional=True)
        if geko_signals is not None and not callable(geko_signals):
            raise TypeError(f"`geko_signals` must be callable, got {type(geko_signals).__name__}")
        if geko_batches not in BATCHES:
            raise ValueError(f"`geko_batches` must be one of {', '.join(BATCHES)}, got {geko_batches!r}")
        check_fingerprint_arg("geko_fingerprint", geko_fingerprint)
        # Before the Trainer's own check, which asks for max_steps (which GEKO then refuses).
        train_dataset = kwargs.get("train_dataset", args[3] if len(args) > 3 else None)
        if isinstance(train_dataset, torch.utils.data.IterableDataset) or (
                type(train_dataset).__name__ == "IterableDataset"):  # datasets' (not a torch one)
            raise TypeError(f"`train_dataset` must be a map-style dataset (len and indexing: GEKO picks the "
                            f"samples of each epoch), got {type(train_dataset).__name__}; for WebDataset shards "
                            f"(local or s3://, gs://, ...), pass geko_data.ShardDataset(folder_or_url)")
        trl = any(c.__name__ == "SFTTrainer" for c in type(self).__mro__)
        if trl and isinstance(train_dataset, ShardDataset):
            # TRL's own check names the type but not what to do
            raise TypeError("`train_dataset` must be a Hugging Face `datasets.Dataset` for TRL's SFTTrainer (it "
                            "tokenizes and formats the rows itself), got ShardDataset; for WebDataset shards use "
                            "GEKOTrainer with shards of token ids (or a collator that tokenizes), as in the README's "
                            "ShardDataset section")
        super().__init__(*args, **kwargs)
        self._geko_check_args()  # at construction, not minutes later at train()
        self.geko_config = geko_config
        self.geko_seed = geko_seed
        self.geko_fingerprint = geko_fingerprint
        self.geko_epoch_length = geko_epoch_length
        self.geko_signals = geko_signals or default_signals
        self.geko_batches = geko_batches
        self.geko_sampler: GEKOSampler | None = None
        self._geko_batch_sampler: GEKOBatchSampler | None = None
        # compute_loss returns the weighted mean over the micro-batch: the Trainer must divide it by the
        # accumulation steps (it would not when the model takes loss kwargs).
        self.loss_is_scaled_for_ga = False
        self._geko_consumed = 0  # this rank's indices of the current epoch used by the loop
        self._geko_epoch_total = 1  # this rank's draws in the current epoch
        self._geko_resume: tuple[int, int] | None = None  # (epoch, position) restored from a checkpoint
        self._geko_rng_checkpoint: str | None = None  # a mid-epoch resume's RNG state, loaded at its first batch

    @property
    def geko_state(self) -> SampleState | None:
        return None if self.geko_sampler is None else self.geko_sampler.state

    # ------------------------------------------------------------------ data
    def _geko_check_args(self) -> int:
        args = self.args
        if args.max_steps is not None and args.max_steps > 0:
            raise ValueError(f"`max_steps` must be -1 with GEKO (it plans whole epochs and sizes the run from "
                             f"them), got {args.max_steps}; set `num_train_epochs` instead")
        epochs = args.num_train_epochs
        if epochs != int(epochs) or epochs < 1:
            raise ValueError(f"`num_train_epochs` must be a whole number >= 1 with GEKO, got {epochs}")
        if args.dataloader_drop_last:
            raise ValueError("`dataloader_drop_last` must be False with GEKO: every draw of the plan is trained "
                             "(each rank already gets an equal share)")
        for name in ("packing", "padding_free"):
            if getattr(args, name, False):
                raise ValueError(f"`{name}=True` merges samples into one row, so per-sample losses cannot be "
                                 f"measured; GEKO needs `{name}=False`")
        return int(epochs)

    def get_train_dataloader(self) -> DataLoader:
        """The train DataLoader over the GEKO-wrapped dataset, with the GEKO sampler, not re-sharded."""
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        epochs = self._geko_check_args()
        dataset = self.train_dataset
        try:
            import datasets
            if isinstance(dataset, datasets.Dataset):
                dataset = self._remove_unused_columns(dataset, description="training")
        except ImportError:  # pragma: no cover - datasets comes with the hf extra
            pass
        args = self.args
        if len(dataset) == 0:  # the sampler would name its own argument (`data_source`)
            raise ValueError("`train_dataset` has no rows left to train on (TRL drops the rows that truncation "
                             "leaves without completion tokens: check `max_length` against your prompts)")
        # Built here, from the dataset the Trainer finally trains on (TRL may have dropped rows before).
        self.geko_sampler = sampler = GEKOSampler(
            dataset, total_epochs=epochs, config=self.geko_config,
            seed=args.seed if self.geko_seed is None else self.geko_seed, num_replicas=args.world_size,
            rank=args.process_index, epoch_length=self.geko_epoch_length, fingerprint=self.geko_fingerprint)
        collate = KeepGEKOKeys(self._get_collator_with_removed_columns(self.data_collator, description="training"))
        if self.geko_batches == "steps":
            self._geko_batch_sampler = GEKOBatchSampler(sampler, batch_size=self._train_batch_size)
            batching: dict[str, Any] = {"batch_sampler": self._geko_batch_sampler}
        else:
            batching = {"batch_size": self._train_batch_size, "sampler": sampler, "drop_last": False}
        params: dict[str, Any] = {
            **batching, "collate_fn": collate,
            "num_workers": args.dataloader_num_workers, "pin_memory": args.dataloader_pin_memory,
            "persistent_workers": args.dataloader_persistent_workers,
            "multiprocessing_context": args.dataloader_multiprocessing_context,
            "prefetch_factor": args.dataloader_prefetch_factor, "in_order": args.dataloader_in_order,
            "worker_init_fn": partial(seed_worker, num_workers=args.dataloader_num_workers,
                                      rank=args.process_index),
        }
        # accelerate would shard the batches over the processes: GEKO's sampler already gives this rank
        # its share (integrations.accelerate says what that lost).
        return unshard(self.accelerator.prepare(DataLoader(sampler.wrap(dataset), **params)), sampler,
                       world_size=args.world_size)

    # ------------------------------------------------------------------ epochs, steps, schedule
    def _geko_steps(self, draws: int, batches: int | None = None) -> tuple[int, int]:
        """(micro-batches, optimizer steps) for ``draws`` indices on this rank (``batches``: the micro-batches
        when known, the batch sampler's)."""
        if batches is None:
            batches = math.ceil(draws / self._train_batch_size)
        return batches, math.ceil(batches / self.args.gradient_accumulation_steps)

    def _geko_bound_steps(self) -> int:
        """Optimizer steps of the longest epoch GEKO can plan (every sample, or ``geko_epoch_length``)."""
        sampler = self.geko_sampler
        assert sampler is not None
        draws = sampler.epoch_length or sampler.num_samples
        return self._geko_steps(math.ceil(draws / sampler.world.world_size))[1]

    def set_initial_training_values(self, args: Any, dataloader: DataLoader) -> tuple:
        values = list(super().set_initial_training_values(args, dataloader))
        if self.geko_sampler is not None:
            # (num_train_epochs, ..., max_steps): the run's epochs are GEKO's; max_steps is an upper bound that
            # each epoch refines (see _run_epoch), so the Trainer never stops inside a planned epoch.
            values[0] = self.geko_sampler.total_epochs
            values[-1] = self.geko_sampler.total_epochs * self._geko_bound_steps()
        return tuple(values)

    def geko_progress(self) -> float:
        """Fraction of the run done, in sample draws of the planned epochs (1.0 after the last one)."""
        sampler = self.geko_sampler
        if sampler is None:
            return 0.0
        epoch = max(sampler.epoch, 0)
        return min(1.0, (epoch + self._geko_consumed / max(self._geko_epoch_total, 1)) / sampler.total_epochs)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
        """The Trainer's ``lr_scheduler_type`` driven by the run's progress, with the warmup in steps.

        GEKO's epochs shrink as samples freeze, so the step count is unknown when the schedule is made; a
        schedule over the run's progress ends exactly at the last step, whatever the epochs' lengths.
        """
        if self.lr_scheduler is not None or self.geko_sampler is None:
            return super().create_scheduler(num_training_steps, optimizer)
        shape = _schedule_shape(self.args.lr_scheduler_type, self.args.lr_scheduler_kwargs,
                                self.args.learning_rate)
        if shape is None:
            warnings.warn(f"lr_scheduler_type {self.args.lr_scheduler_type!r} is not a function of the step: "
                          f"it runs as the Trainer makes it, sized for an upper bound of {num_training_steps} "
                          f"steps", stacklevel=2)
            return super().create_scheduler(num_training_steps, optimizer)
        warmup = self.args.get_warmup_steps(num_training_steps)
        # A weak reference: a closure over `self` made trainer -> lr_scheduler -> factor -> trainer a reference
        # cycle, so the trainer (and its train DataLoader) was freed only by the cyclic GC, which runs the
        # finalizers of the persistent workers' index queues (closing their feeder threads) before the
        # iterator's __del__ sends the workers their stop signal: it never reached them, and each worker join
        # waited out torch's 5 s timeout (10.4 s with 2 workers, against 0.3 s for a plain Trainer).
        trainer = weakref.ref(self)

        def factor(step: int) -> float:
            warm = step / max(1, warmup) if step < warmup else 1.0
            this = trainer()
            return warm * shape(1.0 if this is None else this.geko_progress())

        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def _run_epoch(self, *, model: Any, epoch: int, train_dataloader: Any, steps_in_epoch: int,
                   num_update_steps_per_epoch: int, **kwargs: Any) -> None:
        sampler = self.geko_sampler
        if sampler is None:
            return super()._run_epoch(model=model, epoch=epoch, train_dataloader=train_dataloader,
                                      steps_in_epoch=steps_in_epoch,
                                      num_update_steps_per_epoch=num_update_steps_per_epoch, **kwargs)
        sampler.set_epoch(epoch)
        start = self._geko_resume[1] if self._geko_resume is not None and self._geko_resume[0] == epoch else 0
        remaining = len(sampler)
        self._geko_consumed, self._geko_epoch_total = start, start + remaining
        cut = self._geko_batch_sampler
        batches, updates = self._geko_steps(remaining, None if cut is None else len(cut))
        # This epoch's steps exactly, the later ones bounded: the Trainer stops at max_steps.
        self.state.max_steps = (self.state.global_step + updates
                                + (sampler.total_epochs - epoch - 1) * self._geko_bound_steps())
        if remaining > 0:
            super()._run_epoch(model=model, epoch=epoch, train_dataloader=train_dataloader, steps_in_epoch=batches,
                               num_update_steps_per_epoch=updates, **kwargs)
        self.log(epoch_metrics(sampler, epochs_done=epoch + 1))

    # ------------------------------------------------------------------ loss and feedback
    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if "__index__" not in inputs or self.geko_sampler is None:  # evaluation batches
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        ids = inputs.pop("__index__")
        weight = inputs.pop("__weight__").float()
        labels = inputs.pop("labels", None)
        if labels is None:
            raw = (" (a ShardDataset without `decode=` gives raw shard members, which the Trainer drops as "
                   "columns the model does not take: decode them into the model's inputs, e.g. decode_json)"
                   if isinstance(self.train_dataset, ShardDataset) else "")
            raise ValueError("GEKO measures per-sample losses against `labels`; the batch has none (keys: "
                             f"{sorted(inputs)}); use a collator that adds labels{raw}")
        outputs = model(**inputs)
        sig = self.geko_signals(outputs, labels)
        per_sample = sig.loss.float()
        finite = torch.isfinite(per_sample)
        # A sample without target tokens has loss NaN: reported (and skipped by the state), not trained.
        loss = (torch.where(finite, per_sample, 0.0) * weight.to(per_sample.device)).sum() / max(len(weight), 1)
        answer = getattr(sig, "answer", None)  # a user's signals function may return a Signals without it
        self.geko_sampler.report(ids.cpu(), per_sample.detach().cpu(), correct=sig.correct.cpu(),
                                 confidence=sig.confidence.cpu(),
                                 answer=answer.cpu() if isinstance(answer, torch.Tensor) else answer,
                                 step=self.state.global_step)
        self._geko_consumed += len(ids)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        weight = inputs.get("__weight__")
        # A batch of forward-only re-checks (all weights 0) needs no backward. Under DDP every rank must take
        # part in the gradient all-reduce, so there it runs the normal (zero-weighted) step.
        if weight is not None and self.args.world_size == 1 and not bool((weight != 0).any()):
            model.train()
            with torch.no_grad(), self.compute_loss_context_manager():
                self.compute_loss(model, self._prepare_inputs(inputs))
            return torch.zeros((), device=self.args.device)
        return super().training_step(model, inputs, num_items_in_batch)

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        sampler = self.geko_sampler
        if sampler is not None and self.args.should_save:
            # Written before the Trainer's files: a checkpoint with a trainer_state.json always has GEKO's.
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            sampler.state.save(os.path.join(folder, STATE_FILE))
            sd = sampler.state_dict(consumed=self._geko_consumed)
            sd["trainer"] = self._geko_batching()
            atomic_write_bytes(os.path.join(folder, SAMPLER_FILE), json.dumps(sd, indent=1).encode())
        super()._save_checkpoint(model, trial)

    def _init_training_state(self, max_steps: int, num_update_steps_per_epoch: int, num_train_epochs: int,
                             resume_from_checkpoint: str | None, trial: Any) -> tuple[int, int]:
        epochs_trained, skip = super()._init_training_state(max_steps, num_update_steps_per_epoch,
                                                            num_train_epochs, resume_from_checkpoint, trial)
        self._geko_resume = None
        sampler = self.geko_sampler
        if resume_from_checkpoint is None or sampler is None:
            return epochs_trained, skip
        state_path = os.path.join(resume_from_checkpoint, STATE_FILE)
        sd_path = os.path.join(resume_from_checkpoint, SAMPLER_FILE)
        for path in (state_path, sd_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"resume_from_checkpoint {resume_from_checkpoint!r} has no {os.path.basename(path)}: "
                                        f"it was not written by a GEKO trainer, and resuming without GEKO's state "
                                        f"would replay a different data order")
        with open(sd_path, "rb") as f:
            sd = json.loads(f.read().decode())
        self._geko_check_batching(sd.pop("trainer", None), resume_from_checkpoint)
        planned = sd.get("total_epochs")
        if isinstance(planned, int) and planned != sampler.total_epochs:
            raise ValueError(f"resume_from_checkpoint {resume_from_checkpoint!r} was written by a run planned for "
                             f"{planned} epochs, and this one has `num_train_epochs` {sampler.total_epochs}: GEKO "
                             f"plans the whole run, so a run cannot change its length on resume; resume with "
                             f"num_train_epochs={planned}, or start a new run")
        state = SampleState.load(state_path, memory_map=False)
        try:
            sampler.use_state(state)
        except FingerprintError:
            raise resume_fingerprint_error(
                f"resume_from_checkpoint {resume_from_checkpoint!r}", state.fingerprint, sampler.state.fingerprint,
                run=fingerprint_source(self.geko_fingerprint, "this run's `geko_fingerprint`"),
                fresh="train this data from the start (without `resume_from_checkpoint`)") from None
        sampler.load_state_dict(sd)
        epoch, position = int(sd["epoch"]), int(sd["position"])
        if len(sampler) == 0:  # saved at the epoch's end: the next epoch starts fresh
            epoch, position = epoch + 1, 0
        self._geko_resume = (epoch, position)
        # Mid-epoch, the Trainer would restore the RNG at the epoch's start, before the DataLoader's iterator
        # draws its base seed: dropout then drew other masks than the uninterrupted run (GPT-2's 0.1 dropout
        # moved the final losses by up to 0.67). Restored after the first batch is fetched instead, as the
        # Trainer itself does when it skips batches.
        # Persistent workers: the uninterrupted run kept its iterator at the epoch's end and drew no base seed
        # there, while the resumed process makes its first iterator after the restore and would draw one from
        # the restored RNG (measured: epoch 2 of a resume from epoch 0's end trained 22 other draws). So an
        # end-of-epoch resume defers the restore too, when the workers persist.
        persistent = bool(self.args.dataloader_persistent_workers and self.args.dataloader_num_workers > 0)
        self._geko_rng_checkpoint = resume_from_checkpoint if position > 0 or persistent else None
        # The sampler skips what was trained itself; the Trainer must not skip batches on top of that.
        return epoch, 0

    def _geko_batching(self) -> dict[str, Any]:
        """What cuts this run's epochs into batches, kept with a checkpoint: a resume must cut them alike."""
        return {"geko_batches": self.geko_batches, "per_device_train_batch_size": self._train_batch_size,
                "gradient_accumulation_steps": self.args.gradient_accumulation_steps}

    def _geko_check_batching(self, saved: dict[str, Any] | None, checkpoint: str) -> None:
        """Refuse a resume whose batching differs from the checkpoint's (a checkpoint written before it was
        kept is taken as is): another ``geko_batches`` plans other epochs, another batch size cuts them into
        other batches, and either trains other samples than the run that wrote the checkpoint; other
        accumulation takes other optimizer steps over the same samples."""
        if saved is None:
            return
        changed = {k: (v, saved[k]) for k, v in self._geko_batching().items() if k in saved and saved[k] != v}
        if changed:
            what = ", ".join(f"`{k}` {now!r} (the checkpoint's: {then!r})" for k, (now, then) in changed.items())
            raise ValueError(f"resume_from_checkpoint {checkpoint!r} was written by a run that batched its "
                             f"epochs differently: {what}; resume with the checkpoint's values, or start a new run")

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is not None and checkpoint == self._geko_rng_checkpoint:
            return  # deferred to the first batch (get_batch_samples)
        super()._load_rng_state(checkpoint)

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        batches = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self._geko_rng_checkpoint is not None:
            checkpoint, self._geko_rng_checkpoint = self._geko_rng_checkpoint, None
            super()._load_rng_state(checkpoint)
        return batches


class GEKOTrainer(GEKOTrainerMixin, Trainer):
    """``transformers.Trainer`` with GEKO's sampler, per-sample feedback, schedule and checkpoints."""


def __getattr__(name: str) -> Any:
    # TRL is optional: GEKOSFTTrainer is made on first use.
    if name == "GEKOSFTTrainer":
        from trl import SFTTrainer

        cls = type("GEKOSFTTrainer", (GEKOTrainerMixin, SFTTrainer), {
            "__doc__": "TRL's ``SFTTrainer`` with GEKO; the sampler is built after TRL's preprocessing.",
            "__module__": __name__})
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
