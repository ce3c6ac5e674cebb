"""The reference training loop: a plain torch loop that uses only geko_data's public API.

Single process::

    python -m geko_data.train --data shards/ --model path/to/model --num_epochs 3

torchrun DDP (CPU gloo or GPU nccl)::

    torchrun --standalone --nproc_per_node=2 -m geko_data.train --data shards/ --model path/to/model

What GEKO needs from a loop is three lines: ``data.set_epoch(epoch)`` before
each epoch, the loss weighted by ``batch["__weight__"]``, and
``data.report(batch["__index__"], per_sample_loss, ...)`` after each
micro-batch. The rest is an ordinary fine-tuning loop: LoRA, bf16/fp16,
gradient checkpointing, torch.compile, 8-bit AdamW, accumulation, clipping,
warmup + Mountain LR, step-based logging / eval / checkpoints, exact resume.
Rank 0 logs and writes; every rank holds the same SampleState.

Read it top to bottom: ``train`` builds a ``_Run`` (every part and every counter of the run in one
object), then calls the steps below it in the order a run takes them: the epochs, each epoch's
micro-batches, the optimizer step and its interval checks, and the end.
"""

from __future__ import annotations

import functools
import json
import os
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader
# tqdm.auto's asyncio flavour calls iter() on the DataLoader when the bar is made, then again to loop:
# two iterators per epoch (two sets of workers, and a sampler's resume position used up by the first).
from tqdm import tqdm

from geko_data import signals as signals_mod
from geko_data.atomic import atomic_write_bytes
from geko_data.config import GEKOConfig
from geko_data.efficiency import BASELINE_MODES
from geko_data.integrations.metrics import epoch_metrics
from geko_data.sampler import GEKOSampler
from geko_data.stream import GEKOStream
from geko_data.train import build
from geko_data.train.args import RESUME_BEFORE, RESUME_FIXED, TrainArgs, lr_factor
from geko_data.train.checkpoint import load_checkpoint, save_checkpoint
from geko_data.train.collate import pad_collate
from geko_data.train.distributed import setup_distributed
from geko_data.train.metrics import MetricsLogger, evaluate
from geko_data.train.outdir import claim_output_dir
from geko_data.world import World

__all__ = ["TrainResult", "train"]


@dataclass
class TrainResult:
    """What ``train`` returns: the run's summary, then the trained objects.

    Attributes:
        step: optimizer steps of the whole run (a resumed run counts the interrupted part).
        epochs: epochs run (fewer than ``num_epochs`` after an early stop).
        efficiency: the efficiency report (also written to ``output_dir/efficiency.json``).
        eval: the last evaluation (``eval_loss``, ``eval_accuracy``), empty without eval data.
        output_dir: ``args.output_dir``.
        state_path: the SampleState file written at the end (``output_dir/state.arrow``).
        model: the trained model (the peft model under LoRA).
        optimizer: its optimizer.
        data: the GEKOSampler or GEKOStream, whose ``state`` this rank holds.
        ids_seen: the sample ids this rank trained on, in order, when ``train(record_ids=True)``; else None.
    """

    step: int
    epochs: int
    efficiency: dict[str, Any]
    eval: dict[str, float]
    output_dir: str
    state_path: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    data: GEKOSampler | GEKOStream
    ids_seen: list[int] | None = None


@dataclass(kw_only=True)
class _Run:
    """Every part of one run and everything its steps advance (nanoGPT keeps these as module globals)."""

    args: TrainArgs
    world: World
    device: torch.device
    say: Callable[[str], None]
    data: GEKOSampler | GEKOStream
    model: torch.nn.Module  # what is trained and checkpointed
    forward_model: torch.nn.Module  # what batches go through: the model under DDP and/or torch.compile
    uncompiled: torch.nn.Module  # the fallback while a compiled forward_model has not run yet
    compile_armed: bool
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # disabled (every call a pass-through) unless fp16
    loader: DataLoader
    loader_rng: torch.Generator
    logger: MetricsLogger
    signals: build.SignalsFn
    collate_fn: Callable[..., Any]
    eval_data: Any
    warmup: int
    resumed: bool = False
    first_epoch: int = 0  # the epoch the run (or its resume) starts in, and its position there
    first_position: int = 0
    # the position: the epoch being run (or stopped at) and the samples of it consumed
    step: int = 0
    epoch: int = 0
    consumed: int = 0
    epochs_run: int = 0
    epoch_len: int = 0
    micro: int = 0  # micro-batches of this epoch
    running: float = 0.0  # their summed mean losses
    backward_in_window: bool = False  # did any micro-batch of this accumulation window run backward?
    forward_passes: int = 0
    backward_passes: int = 0
    start_time: float = field(default_factory=time.time)
    last_eval: dict[str, float] = field(default_factory=dict)
    last_eval_step: int | None = None
    ids_seen: list[int] | None = None


def train(model: torch.nn.Module, train_data: Any, *, args: TrainArgs, config: GEKOConfig | None = None,
          eval_data: Any = None, lora_config: Any = None, signals: build.SignalsFn | None = None,
          collate_fn: Callable[..., Any] | None = None, decode: Any = None, resume_from: str | None = None,
          record_ids: bool = False, log: Callable[[str], None] = print) -> TrainResult:
    """Fine-tune ``model`` on ``train_data`` with GEKO; returns a ``TrainResult``.

    ``train_data``: a map-style dataset of dict samples (read through a GEKOSampler), a ``GEKOStream``,
    or a shard folder (JSON samples, see ``geko_data.train.collate.decode_json``). Batches are dicts; the
    model is called with the batch's keys minus the ``__``-prefixed ones. ``signals(outputs, batch)``
    gives per-sample loss / confidence / correctness (default: causal-LM signals on ``labels``, or
    classification signals for 1-D labels). ``resume_from``: a checkpoint, or an output dir whose newest
    complete checkpoint is used; a checkpoint that does not fit (other arguments, other data, a file
    changed since it was written) is refused before the model changes. ``record_ids``: keep every trained
    sample id in ``TrainResult.ids_seen`` (for tests of exact resume; a list as long as the run).
    One run at a time may use ``args.output_dir``: rank 0 locks it for the whole run, and another run
    raises ``OutputDirBusyError``.
    """
    if not isinstance(args, TrainArgs):
        raise TypeError(f"`args` must be a TrainArgs, got {type(args).__name__}")
    world = setup_distributed()
    device = build.choose_device(args, world.rank)
    if args.fp16:
        build.check_fp16(device)
    # One run per output dir, held to the end: a second run's pruning and temp-dir cleanup would delete
    # this one's files.
    with claim_output_dir(args.output_dir, world, device):
        run = _start(model, train_data, args=args, config=config, eval_data=eval_data, lora_config=lora_config,
                     signals=signals, collate_fn=collate_fn, decode=decode, resume_from=resume_from,
                     record_ids=record_ids, log=log, world=world, device=device)
        if not run.resumed:
            _evaluate(run)  # the held-out baseline before any training
        for epoch in range(run.first_epoch, args.num_epochs):
            if not _start_epoch(run, epoch):
                break
            _train_epoch(run)
            _evaluate(run)
        _evaluate(run)
        if args.save_at_end:
            _checkpoint(run)
        return _finish(run)


# ---------------------------------------------------------------- setting the run up
def _start(model: torch.nn.Module, train_data: Any, *, args: TrainArgs, config: GEKOConfig | None,
           eval_data: Any, lora_config: Any, signals: build.SignalsFn | None, collate_fn: Callable[..., Any] | None,
           decode: Any, resume_from: str | None, record_ids: bool, log: Callable[[str], None], world: World,
           device: torch.device) -> _Run:
    """Every part of the run, in the order their random draws and checks must happen; resumed if asked."""
    say = log if world.is_main else (lambda _msg: None)
    torch.manual_seed(args.seed)
    data, dataset = build.build_data(train_data, args, config, decode, world)
    data.log = say  # the partition table each epoch goes where the loop's own messages go
    warmup = _warmup(args, data.state.num_samples, world, say)
    if lora_config is not None:
        model = build.apply_lora(model, lora_config, say)
    if args.gradient_checkpointing:
        build.enable_gradient_checkpointing(model)
    model.to(device)
    model.train()
    optimizer = build.make_optimizer(model, args)
    scaler = torch.amp.GradScaler(device.type, enabled=args.fp16)
    collate_fn = collate_fn or pad_collate
    resumed = _resume(resume_from, args=args, data=data, model=model, optimizer=optimizer, scaler=scaler,
                      say=say) if resume_from is not None else {}
    forward_model, uncompiled, compile_armed = build.wrap_model(model, args, world, device)
    loader, loader_rng = build.make_loader(data, dataset, args, collate_fn)
    logger = MetricsLogger(args.output_dir, world.is_main)
    logger.start(resumed_step=resumed.get("step"))
    run = _Run(args=args, world=world, device=device, say=say, data=data, model=model,
               forward_model=forward_model, uncompiled=uncompiled, compile_armed=compile_armed,
               optimizer=optimizer, scaler=scaler, loader=loader, loader_rng=loader_rng, logger=logger,
               signals=signals or build.default_signals(args.correct_threshold), collate_fn=collate_fn,
               eval_data=eval_data, warmup=warmup, ids_seen=[] if record_ids else None)
    if resumed:  # counters of the whole run: the interrupted part is in the checkpoint
        run.resumed, run.step = True, resumed["step"]
        run.first_epoch = run.epochs_run = resumed["epoch"]
        run.epoch = max(resumed["epoch"], 0)
        run.first_position = run.consumed = resumed["position"]
        run.start_time -= resumed["time"]
        run.forward_passes, run.backward_passes = resumed["forward_passes"], resumed["backward_passes"]
    return run


def _warmup(args: TrainArgs, num_samples: int, world: World, say: Callable[[str], None]) -> int:
    """The run's warmup steps; a warmup as long as the whole run is worth a warning."""
    planned = args.planned_steps(num_samples, world.world_size)
    warmup = args.warmup_for(planned)
    if warmup and warmup >= planned:
        say(f"[GEKO] warning: warmup is {warmup} optimizer steps and the whole run at most {planned}: the "
            f"learning rate does not reach `learning_rate` {args.learning_rate:g} before the end; lower "
            f"`warmup_steps`, or leave it unset and use `warmup_ratio`")
    return warmup


def _accept(trainer_state: dict[str, Any], data_state: dict[str, Any], state: Any, *, args: TrainArgs,
            data: GEKOSampler | GEKOStream) -> None:
    """Take the checkpoint's data position, or refuse a resume with other step-defining arguments.

    Runs inside ``load_checkpoint`` before it changes the model: a refused resume leaves it untouched.
    """
    saved = trainer_state.get("args") or {}
    if saved:  # a field the checkpoint's version did not have: what that version ran with
        saved = {**RESUME_BEFORE, **saved}
    for name in RESUME_FIXED:
        if name in saved and saved[name] != getattr(args, name):
            raise ValueError(f"resume: `{name}` is {getattr(args, name)!r} but the checkpoint was written with "
                             f"{saved[name]!r}; resume with the same value (other fields, such as the number "
                             f"of DataLoader workers or the output dir, may change)")
    data.use_state(state)
    data.load_state_dict(data_state)


def _resume(resume_from: str, *, args: TrainArgs, data: GEKOSampler | GEKOStream, model: torch.nn.Module,
            optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
            say: Callable[[str], None]) -> dict[str, Any]:
    """Load the checkpoint into the model, optimizer, scaler, RNG and data; return the run's counters."""
    trainer_state, data_state, _state = load_checkpoint(
        resume_from, model=model, optimizer=optimizer, expect_fingerprint=data.state.fingerprint,
        check=functools.partial(_accept, args=args, data=data))
    if trainer_state.get("scaler"):  # None or {} when written without fp16; a disabled scaler ignores it
        scaler.load_state_dict(trainer_state["scaler"])
    step, epoch, position = trainer_state["step"], data_state["epoch"], data_state.get("position", 0)
    say(f"[GEKO] resumed from step {step}, epoch {epoch}, {position} samples into it")
    return {"step": step, "epoch": epoch, "position": position, "time": float(trainer_state.get("time") or 0.0),
            "forward_passes": int(trainer_state.get("forward_passes_rank") or 0),
            "backward_passes": int(trainer_state.get("backward_passes_rank") or 0)}


# ---------------------------------------------------------------- one epoch
def _start_epoch(run: _Run, epoch: int) -> bool:
    """Repartition and plan ``epoch`` and move the position there; False when the run stops early instead.

    Early stop is decided at an epoch's start, after its repartition. A fresh run always trains its first
    epoch (a state handed in may be all FREEZE: those epochs are re-checks). A run resumed at an epoch's
    position 0 decides again: that is the end checkpoint of a run that stopped here.
    """
    run.data.set_epoch(epoch)
    if build.loader_is_stale(run.loader, run.data):
        run.loader, run.loader_rng = build.make_loader(run.data, run.loader.dataset, run.args, run.collate_fn,
                                                       stream_batch_size=run.data.epoch_batch_size)
    run.loader_rng.manual_seed(run.args.seed * 100_003 + epoch)  # the workers' seeds, the same on a resume
    run.epoch, run.consumed = epoch, run.first_position if epoch == run.first_epoch else 0
    run.running, run.micro = 0.0, 0
    stop = run.data.should_stop
    if run.consumed == 0 and (epoch > run.first_epoch or run.resumed) and stop:
        run.say(f"[GEKO] FREEZE share {run.data.state.frozen_share:.1%} >= early_stop_frozen "
                f"{run.data.config.early_stop_frozen:.0%}: stopping early")
        return False  # the end checkpoint describes this position: this epoch, repartitioned, at sample 0
    run.epoch_len = run.consumed + len(run.data)
    return True


def _train_epoch(run: _Run) -> None:
    """Every micro-batch of the epoch, an optimizer step after each ``gradient_accumulation_steps``."""
    args, main = run.args, run.world.is_main
    accum = args.gradient_accumulation_steps
    # a baseline, or a run too short for the curriculum, has no phase to show
    show_phase = run.data.config.mode not in BASELINE_MODES and run.data.follows_curriculum
    bar = tqdm(run.loader, desc=f"Epoch {run.epoch + 1}/{args.num_epochs}", disable=not (args.progress and main),
               total=len(run.loader), leave=True)
    for batch in bar:
        _micro_batch(run, batch)
        if run.micro % accum == 0:
            _optimizer_step(run, (run.epoch + run.consumed / max(run.epoch_len, 1)) / args.num_epochs)
        bar.set_postfix(loss=f"{run.running / max(run.micro, 1):.3f}",
                        **({"phase": run.data.phase.lower()} if show_phase else {}))
    bar.close()
    if run.micro % accum:  # the epoch's last, partial accumulation still counts as a step
        _optimizer_step(run, (run.epoch + 1) / args.num_epochs)
    run.epochs_run = run.epoch + 1
    _log_epoch(run)


def _micro_batch(run: _Run, batch: dict[str, Any]) -> None:
    """Forward (and backward unless every weight is 0) one micro-batch; report its losses to GEKO."""
    ids = batch.pop("__index__")
    weight = batch.pop("__weight__").to(device=run.device, dtype=torch.float32)
    inputs = {k: v.to(run.device) for k, v in batch.items() if not k.startswith("__") and isinstance(v, torch.Tensor)}
    # A micro-batch of re-checks only (weight 0) needs no backward; under DDP every rank must run one.
    forward_only = bool((weight == 0).all()) and run.world.world_size == 1
    sig = _forward_backward(run, inputs, weight, forward_only)
    if not forward_only:
        run.compile_armed = False  # forward and backward both ran compiled: no more fallback
        run.backward_in_window = True
        run.backward_passes += int((weight > 0).sum())
    per_sample = sig.loss.detach().float()
    finite = torch.isfinite(per_sample)
    run.forward_passes += len(ids)
    run.data.report(ids, per_sample, correct=sig.correct, confidence=sig.confidence,
                    answer=getattr(sig, "answer", None), step=run.step)  # a user's signals may have none
    if run.ids_seen is not None:
        run.ids_seen.extend(ids.tolist())
    run.consumed += len(ids)
    run.micro += 1
    if finite.any():
        run.running += float(per_sample[finite].mean())


def _forward_backward(run: _Run, inputs: dict[str, torch.Tensor], weight: torch.Tensor,
                      forward_only: bool) -> signals_mod.Signals:
    """One pass; a compiled model that fails before its first full pass is dropped for the uncompiled one."""
    try:
        return _pass(run, inputs, weight, forward_only)
    except Exception as e:
        if not run.compile_armed:
            raise
        warnings.warn(f"torch.compile failed at the first call ({e}); training continues without it", stacklevel=2)
        run.forward_model, run.compile_armed = run.uncompiled, False
        run.optimizer.zero_grad(set_to_none=True)  # whatever the failed backward left behind
        return _pass(run, inputs, weight, forward_only)


def _pass(run: _Run, inputs: dict[str, torch.Tensor], weight: torch.Tensor, forward_only: bool) -> signals_mod.Signals:
    with build.autocast(run.args, run.device), (torch.no_grad() if forward_only else nullcontext()):
        sig = run.signals(run.forward_model(**inputs), inputs)
    if not forward_only:
        per_sample = sig.loss.float()
        loss = (torch.where(torch.isfinite(per_sample), per_sample, 0.0) * weight).sum() / max(len(weight), 1)
        run.scaler.scale(loss / run.args.gradient_accumulation_steps).backward()
    return sig


# ---------------------------------------------------------------- one optimizer step
def _optimizer_step(run: _Run, progress: float) -> None:
    """One optimizer step over the accumulated window, then the step's interval checks.

    A window whose micro-batches were all forward-only re-checks has no gradient: the optimizer, the
    clipping and the fp16 scaler are left alone (the scaler cannot unscale what was never scaled), but
    the step still counts, so logging / eval / save intervals and the LR schedule stay tied to the
    data's position and a resumed run counts the same steps.
    """
    args, optimizer = run.args, run.optimizer
    lr = args.learning_rate * lr_factor(args, run.step, progress, run.data.follows_curriculum, run.warmup)
    for group in optimizer.param_groups:
        group["lr"] = lr
    if run.backward_in_window:
        run.scaler.unscale_(optimizer)
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p in run.model.parameters() if p.requires_grad],
                                           args.max_grad_norm)
        run.scaler.step(optimizer)
        run.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    run.backward_in_window = False
    run.step += 1
    if run.step % args.logging_steps == 0:
        run.logger({"event": "train", "step": run.step, "epoch": run.epoch, "loss": run.running / max(run.micro, 1),
                    "lr": lr, "phase": run.data.phase, "samples": run.consumed,
                    "time": time.time() - run.start_time})
    if args.eval_steps and run.step % args.eval_steps == 0:
        _evaluate(run)
    if args.save_steps and run.step % args.save_steps == 0:
        _checkpoint(run)


def _evaluate(run: _Run) -> None:
    """Evaluate ``eval_data`` once per step (an epoch's end and the run's end often coincide)."""
    if run.eval_data is None or run.step == run.last_eval_step:
        return
    run.last_eval_step = run.step
    run.last_eval = evaluate(run.model, run.eval_data, args=run.args, signals=run.signals, device=run.device,
                             collate_fn=run.collate_fn)
    run.logger({"event": "eval", "step": run.step, **run.last_eval})
    run.say(f"[eval] step {run.step}: loss {run.last_eval['eval_loss']:.4f} "
            f"accuracy {run.last_eval['eval_accuracy']:.3f}")


def _checkpoint(run: _Run) -> None:
    """Rank 0 writes the checkpoint of the current position; every rank waits for it."""
    trainer_state = {"step": run.step, "epoch": run.epoch, "consumed": run.consumed, "args": run.args.to_dict(),
                     "scaler": run.scaler.state_dict() or None, "time": time.time() - run.start_time,
                     "forward_passes_rank": run.forward_passes, "backward_passes_rank": run.backward_passes}
    data_state = run.data.state_dict(consumed=run.consumed)
    if run.world.is_main:
        path = save_checkpoint(run.args.output_dir, step=run.step, model=run.model, optimizer=run.optimizer,
                               trainer_state=trainer_state, data_state=data_state, state=run.data.state,
                               keep=run.args.save_total_limit)
        run.logger({"event": "checkpoint", "step": run.step, "path": path})
    if run.world.world_size > 1:
        torch.distributed.barrier()


# ---------------------------------------------------------------- records and the end
def _log_epoch(run: _Run) -> None:
    hist = run.data.state.history[-1] if run.data.state.history else {}
    loss = run.running / max(run.micro, 1)
    run.logger({"event": "epoch", "epoch": run.epoch, "step": run.step, "loss": loss, "micro_batches": run.micro,
                **{k: hist.get(k) for k in ("freeze", "light", "focus", "hard", "pruned")},
                **epoch_metrics(run.data, epochs_done=run.epoch + 1, prefix="")})
    ranks = f" on rank 0 ({run.world.world_size} ranks share the epoch)" if run.world.world_size > 1 else ""
    run.say(f"[Epoch {run.epoch + 1}] average loss {loss:.4f} over {run.consumed} samples{ranks}")


def _finish(run: _Run) -> TrainResult:
    """Close the logs; rank 0 writes the state file and ``efficiency.json`` and prints the report."""
    run.logger.close()
    report = run.data.efficiency_report(epochs_done=run.epochs_run)
    report.update({"wall_time_s": time.time() - run.start_time, "optimizer_steps": run.step,
                   "forward_passes_rank": run.forward_passes, "backward_passes_rank": run.backward_passes,
                   "world_size": run.world.world_size})
    state_path = os.path.join(run.args.output_dir, "state.arrow")
    if run.world.is_main:
        run.data.state.save(state_path)
        atomic_write_bytes(os.path.join(run.args.output_dir, "efficiency.json"), json.dumps(report, indent=1).encode())
        run.say(run.data.format_efficiency_report(epochs_done=run.epochs_run)
                + f"\n  Wall time          : {report['wall_time_s']:.1f} s")
    return TrainResult(step=run.step, epochs=run.epochs_run, efficiency=report, eval=run.last_eval,
                       output_dir=run.args.output_dir, state_path=state_path, model=run.model,
                       optimizer=run.optimizer, data=run.data, ids_seen=run.ids_seen)
