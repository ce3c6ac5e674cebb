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
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

import torch
from torch.utils.data import DataLoader
# tqdm.auto's asyncio flavour calls iter() on the DataLoader when the bar is made, then again to loop:
# two iterators per epoch (two sets of workers, and a sampler's resume position used up by the first).
from tqdm import tqdm

from geko_data import policy, signals as signals_mod
from geko_data.atomic import atomic_write_bytes
from geko_data.config import GEKOConfig
from geko_data.efficiency import BASELINE_MODES
from geko_data.integrations.metrics import epoch_metrics
from geko_data.sampler import GEKOSampler
from geko_data.stream import GEKOStream
from geko_data.train.args import RESUME_FIXED, TrainArgs
from geko_data.train.checkpoint import load_checkpoint, lock_output_dir, save_checkpoint
from geko_data.train.collate import decode_json, pad_collate

__all__ = ["train"]

SignalsFn = Callable[[Any, dict[str, torch.Tensor]], signals_mod.Signals]


def _default_signals(correct_threshold: float) -> SignalsFn:
    def fn(outputs: Any, batch: dict[str, torch.Tensor]) -> signals_mod.Signals:
        logits = outputs.logits if hasattr(outputs, "logits") else outputs
        labels = batch["labels"]
        if labels.dim() == 1:
            return signals_mod.classification(logits, labels)
        return signals_mod.causal_lm(logits, labels, correct_threshold=correct_threshold)
    return fn


def _setup_distributed() -> tuple[int, int]:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device(args: TrainArgs, rank: int) -> torch.device:
    if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("`device` is 'cuda' but no CUDA device is available")
    return torch.device("cuda", rank % torch.cuda.device_count())


def _autocast(args: TrainArgs, device: torch.device) -> Any:
    if args.bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if args.fp16:
        return torch.autocast(device.type, dtype=torch.float16)
    return nullcontext()


def _check_fp16(device: torch.device) -> None:
    try:
        with torch.autocast(device.type, dtype=torch.float16):
            torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)
        torch.amp.GradScaler(device.type)
    except (RuntimeError, AssertionError, ValueError) as e:
        raise ValueError(f"`fp16` is not supported on device {device} ({e}); use bf16=True instead") from None


def _optimizer(model: torch.nn.Module, args: TrainArgs) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if args.use_8bit_optimizer:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("`use_8bit_optimizer` needs bitsandbytes: pip install 'geko-data[bnb]'") from None
        return bnb.optim.AdamW8bit(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    return torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)


def _apply_lora(model: torch.nn.Module, lora_config: Any, log: Callable[[str], None]) -> torch.nn.Module:
    try:
        from peft import get_peft_model
    except ImportError:
        raise ImportError("`lora_config` needs peft: pip install 'geko-data[peft]'") from None
    model = get_peft_model(model, lora_config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"[GEKO] LoRA applied\n  Trainable params : {trainable:,} ({100.0 * trainable / total:.2f}%)\n"
        f"  Total params     : {total:,}\n  Frozen params    : {total - trainable:,}")
    return model


def _lr_factor(args: TrainArgs, step: int, progress: float, use_curriculum: bool,
               warmup: int | None = None) -> float:
    """LR multiplier at ``step``; ``warmup``: the run's warmup steps (default ``args.warmup_steps`` or 0)."""
    warmup = (args.warmup_steps or 0) if warmup is None else warmup
    warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
    if args.lr_schedule == "mountain":
        shape = policy.lr_multiplier(progress) if use_curriculum else 1.0
    elif args.lr_schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    else:
        shape = 1.0
    return warm * shape


def _build_data(train_data: Any, args: TrainArgs, config: GEKOConfig | None, decode: Any,
                rank: int, world: int) -> tuple[GEKOSampler | GEKOStream, Any]:
    """(the GEKO data object, the dataset the DataLoader reads)."""
    if isinstance(train_data, (str, os.PathLike)):
        train_data = GEKOStream(train_data, total_epochs=args.num_epochs, config=config, seed=args.seed,
                                decode=decode if decode is not None else decode_json, batch_size=args.batch_size)
    if isinstance(train_data, GEKOStream):
        if train_data.batch_size is None:
            train_data.batch_size = args.batch_size
        elif train_data.batch_size != args.batch_size:
            raise ValueError(f"GEKOStream batch_size {train_data.batch_size} differs from args.batch_size "
                             f"{args.batch_size}; they must match for exact resume")
        return train_data, train_data
    if isinstance(train_data, GEKOSampler):
        raise TypeError("pass the map-style dataset itself as `train_data`; train() builds the GEKOSampler")
    if not hasattr(train_data, "__getitem__") or not hasattr(train_data, "__len__"):
        raise TypeError(f"`train_data` must be a map-style dataset, a GEKOStream or a shard folder, "
                        f"got {type(train_data).__name__}")
    sampler = GEKOSampler(train_data, total_epochs=args.num_epochs, config=config, seed=args.seed,
                          num_replicas=world, rank=rank)
    return sampler, sampler.wrap(train_data)


#: TrainArgs a resume must keep: they decide which samples make up each optimizer step and the LR there.
def _check_resume_args(saved: dict[str, Any], args: TrainArgs) -> None:
    """A resume with other step-defining arguments would not continue the interrupted run: refuse it."""
    for name in RESUME_FIXED:
        if name in saved and saved[name] != getattr(args, name):
            raise ValueError(f"resume: `{name}` is {getattr(args, name)!r} but the checkpoint was written with "
                             f"{saved[name]!r}; resume with the same value (other fields, such as the number "
                             f"of DataLoader workers or the output dir, may change)")


class _Logger:
    """``metrics.jsonl``, one JSON record a line, written by rank 0 only; with the ``tensorboard`` package
    installed, the same numbers as TensorBoard scalars (``EVENT/FIELD`` at the record's step) in
    ``tensorboard/`` beside it."""

    def __init__(self, output_dir: str, enabled: bool) -> None:
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.tb_dir = os.path.join(output_dir, "tensorboard")
        self._tb: Any = None

    def start(self, *, resumed_step: int | None) -> None:
        """A fresh run starts an empty file; a resumed one drops the records after its checkpoint's step
        (the interrupted run logged them, the resumed run logs them again)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        kept: list[bytes] = []  # joined once at the end: appending to one bytes object is quadratic
        if resumed_step is not None:
            with open(self.path, "rb") as f:
                for line in f:
                    try:
                        rec_step = json.loads(line).get("step", 0)
                    except (json.JSONDecodeError, AttributeError):
                        continue  # a line cut by a crash
                    if isinstance(rec_step, int) and rec_step <= resumed_step:
                        kept.append(line if line.endswith(b"\n") else line + b"\n")
        atomic_write_bytes(self.path, b"".join(kept))

    def __call__(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        writer = self._writer()
        if writer is not None:
            event, step = record.get("event", "log"), int(record.get("step") or 0)
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "event"):
                    writer.add_scalar(f"{event}/{key}", value, step)
            if event == "epoch":  # the writer flushes on its own timer too; an epoch's end is worth one now
                writer.flush()

    def _writer(self) -> Any:
        if self._tb is None:
            try:  # TensorBoard is optional (the `tensorboard` extra); metrics.jsonl always has everything
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._tb = False
            else:
                self._tb = SummaryWriter(self.tb_dir)
        return self._tb or None

    def close(self) -> None:
        if self._tb:
            self._tb.close()


def evaluate(model: torch.nn.Module, eval_data: Any, *, args: TrainArgs, signals: SignalsFn,
             device: torch.device, collate_fn: Callable[..., Any]) -> dict[str, float]:
    """Mean loss and accuracy (share of correct samples) of ``eval_data``."""
    loader = DataLoader(eval_data, batch_size=args.eval_batch_size or args.batch_size, shuffle=False,
                        collate_fn=collate_fn, generator=torch.Generator().manual_seed(0))  # leaves the global RNG be
    was_training = model.training
    model.eval()
    losses, correct = [], []
    with torch.no_grad(), _autocast(args, device):
        for batch in loader:
            inputs = {k: v.to(device) for k, v in batch.items()
                      if not k.startswith("__") and isinstance(v, torch.Tensor)}
            sig = signals(model(**inputs), inputs)
            losses.append(sig.loss.float().cpu())
            correct.append(sig.correct.cpu())
    model.train(was_training)
    loss = torch.cat(losses)
    return {"eval_loss": float(loss[torch.isfinite(loss)].mean()) if torch.isfinite(loss).any() else math.nan,
            "eval_accuracy": float(torch.cat(correct).float().mean())}


@contextmanager
def _claim_output_dir(output_dir: str, rank: int, world: int, device: torch.device) -> Iterator[None]:
    """Rank 0 makes ``output_dir`` and holds its lock for the body; the other ranks never touch it.

    Every rank learns whether rank 0 succeeded: a rank 0 that raised alone would leave the others waiting
    in their first collective call.
    """
    error: Exception | None = None
    with ExitStack() as stack:
        if rank == 0:
            try:
                try:
                    os.makedirs(output_dir, exist_ok=True)
                except OSError as e:
                    raise PermissionError(f"`output_dir` {output_dir!r} cannot be created "
                                          f"({e.strerror or e})") from None
                if not os.access(output_dir, os.W_OK):
                    raise PermissionError(f"`output_dir` {output_dir!r} is not writable")
                stack.enter_context(lock_output_dir(output_dir))
            except Exception as e:  # noqa: BLE001 (OutputDirBusyError and anything else: the others must hear)
                error = e
        if world > 1:
            failed = torch.tensor([int(error is not None)], device=device)
            torch.distributed.broadcast(failed, src=0)
            if failed.item() and rank > 0:
                raise RuntimeError(f"rank 0 could not claim `output_dir` {output_dir!r}; its error says why")
        if error is not None:
            raise error
        yield


def train(model: torch.nn.Module, train_data: Any, *, args: TrainArgs, config: GEKOConfig | None = None,
          eval_data: Any = None, lora_config: Any = None, signals: SignalsFn | None = None,
          collate_fn: Callable[..., Any] | None = None, decode: Any = None,
          resume_from: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune ``model`` on ``train_data`` with GEKO; returns a summary dict.

    ``train_data``: a map-style dataset of dict samples (read through a GEKOSampler), a ``GEKOStream``,
    or a shard folder (JSON samples, see ``geko_data.train.collate.decode_json``). Batches are dicts; the
    model is called with the batch's keys minus the ``__``-prefixed ones. ``signals(outputs, batch)``
    gives per-sample loss / confidence / correctness (default: causal-LM signals on ``labels``, or
    classification signals for 1-D labels). ``resume_from``: a checkpoint, or an output dir whose newest
    complete checkpoint is used; a checkpoint that does not fit (other arguments, other data, a file
    changed since it was written) is refused before the model changes. One run at a time may use
    ``args.output_dir``: rank 0 locks it for the whole run, and another run raises ``OutputDirBusyError``.

    Returns ``step`` (optimizer steps), ``epochs`` (epochs run: fewer after an early stop), ``efficiency``,
    ``eval`` (the last evaluation), ``output_dir``, ``state_path``, ``ids_seen`` (the sample ids this rank
    trained on, in order), and the trained ``model``, its ``optimizer`` and ``data`` (the GEKOSampler or
    GEKOStream, whose ``state`` this rank holds).
    """
    if not isinstance(args, TrainArgs):
        raise TypeError(f"`args` must be a TrainArgs, got {type(args).__name__}")
    rank, world = _setup_distributed()
    device = _device(args, rank)
    if args.fp16:
        _check_fp16(device)
    # One run per output dir, held to the end: a second run's pruning and temp-dir cleanup would delete
    # this one's files.
    with _claim_output_dir(args.output_dir, rank, world, device):
        return _train(model, train_data, args=args, config=config, eval_data=eval_data, lora_config=lora_config,
                      signals=signals, collate_fn=collate_fn, decode=decode, resume_from=resume_from, log=log,
                      rank=rank, world=world, device=device)


def _train(model: torch.nn.Module, train_data: Any, *, args: TrainArgs, config: GEKOConfig | None,
           eval_data: Any, lora_config: Any, signals: SignalsFn | None, collate_fn: Callable[..., Any] | None,
           decode: Any, resume_from: str | None, log: Callable[[str], None], rank: int, world: int,
           device: torch.device) -> dict[str, Any]:
    """``train`` once the output dir is claimed."""
    main = rank == 0
    say = log if main else (lambda _msg: None)
    torch.manual_seed(args.seed)
    signals = signals or _default_signals(args.correct_threshold)
    collate_fn = collate_fn or pad_collate
    data, dataset = _build_data(train_data, args, config, decode, rank, world)
    data.log = say  # the partition table each epoch goes where the loop's own messages go
    planned = args.planned_steps(data.state.num_samples, world)
    warmup = args.warmup_for(planned)
    if warmup and warmup >= planned:
        say(f"[GEKO] warning: warmup is {warmup} optimizer steps and the whole run at most {planned}: the "
            f"learning rate does not reach `learning_rate` {args.learning_rate:g} before the end; lower "
            f"`warmup_steps`, or leave it unset and use `warmup_ratio`")

    if lora_config is not None:
        model = _apply_lora(model, lora_config, say)
    if args.gradient_checkpointing:
        # transformers 5 renamed gradient_checkpointing_enable; take whichever the model has.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            raise ValueError("`gradient_checkpointing` needs a model with gradient_checkpointing_enable() "
                             "(a transformers PreTrainedModel)")
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.to(device)
    model.train()
    optimizer = _optimizer(model, args)
    scaler = torch.amp.GradScaler(device.type) if args.fp16 else None

    step, epoch0, consumed0 = 0, 0, 0
    if resume_from is not None:
        def accept(trainer_state: dict[str, Any], data_state: dict[str, Any], state: Any) -> None:
            # Inside load_checkpoint, before it changes the model: a refused resume leaves it untouched.
            _check_resume_args(trainer_state.get("args") or {}, args)
            data.use_state(state)
            data.load_state_dict(data_state)

        trainer_state, data_state, _state = load_checkpoint(resume_from, model=model, optimizer=optimizer,
                                                            expect_fingerprint=data.state.fingerprint, check=accept)
        step, epoch0, consumed0 = trainer_state["step"], data_state["epoch"], data_state.get("position", 0)
        if scaler is not None and trainer_state.get("scaler"):
            scaler.load_state_dict(trainer_state["scaler"])
        say(f"[GEKO] resumed from step {step}, epoch {epoch0}, {consumed0} samples into it")

    forward_model: torch.nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        forward_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    uncompiled = forward_model
    # torch.compile is lazy: most failures come at the first call (tracing, the compiler, the backward
    # graph). The fallback stays armed until one micro-batch has run forward and backward, then a later
    # error is a real error and propagates.
    compile_armed = False
    if args.compile_model:
        try:
            forward_model = torch.compile(forward_model)
            compile_armed = True
        except Exception as e:  # compile support varies by platform; training goes on uncompiled
            warnings.warn(f"torch.compile failed ({e}); training continues without it", stacklevel=2)

    workers = args.dataloader_num_workers if args.dataloader_num_workers >= 0 else min(2, os.cpu_count() or 1)
    loader_kw: dict[str, Any] = {}
    if workers > 0:
        loader_kw = {"persistent_workers": args.dataloader_persistent_workers,
                     "prefetch_factor": args.dataloader_prefetch_factor}
    # Each DataLoader iterator draws its workers' base seed from `generator`, or else from the global torch
    # RNG, which would shift dropout's random stream between a run and its resume. Seeded per epoch below.
    loader_rng = torch.Generator()
    loader = DataLoader(dataset, batch_size=args.batch_size,
                        sampler=data if isinstance(data, GEKOSampler) else None,
                        num_workers=workers, collate_fn=collate_fn, generator=loader_rng, **loader_kw)
    logger = _Logger(args.output_dir, main)
    logger.start(resumed_step=step if resume_from is not None else None)
    accum = args.gradient_accumulation_steps
    start_time = time.time()
    last_eval: dict[str, float] = {}
    last_eval_step: int | None = None
    backward_passes = forward_passes = 0
    if resume_from is not None:  # counters of the whole run: the interrupted part is in the checkpoint
        start_time -= float(trainer_state.get("time") or 0.0)
        forward_passes = int(trainer_state.get("forward_passes_rank") or 0)
        backward_passes = int(trainer_state.get("backward_passes_rank") or 0)
    backward_in_window = False  # did any micro-batch of the current accumulation window run backward?
    ids_seen: list[int] = []

    def checkpoint(epoch: int, consumed: int) -> None:
        trainer_state = {"step": step, "epoch": epoch, "consumed": consumed, "args": args.to_dict(),
                         "scaler": scaler.state_dict() if scaler is not None else None,
                         "time": time.time() - start_time, "forward_passes_rank": forward_passes,
                         "backward_passes_rank": backward_passes}
        data_state = data.state_dict(consumed=consumed)
        if main:
            path = save_checkpoint(args.output_dir, step=step, model=model, optimizer=optimizer,
                                   trainer_state=trainer_state, data_state=data_state, state=data.state,
                                   keep=args.save_total_limit)
            logger({"event": "checkpoint", "step": step, "path": path})
        if world > 1:
            torch.distributed.barrier()

    def run_eval() -> None:
        nonlocal last_eval, last_eval_step
        if eval_data is None or step == last_eval_step:  # once per step: epoch end and run end often coincide
            return
        last_eval_step = step
        last_eval = evaluate(model, eval_data, args=args, signals=signals, device=device, collate_fn=collate_fn)
        logger({"event": "eval", "step": step, **last_eval})
        say(f"[eval] step {step}: loss {last_eval['eval_loss']:.4f} accuracy {last_eval['eval_accuracy']:.3f}")

    def optimizer_step(progress: float) -> None:
        """One optimizer step over the accumulated window.

        A window whose micro-batches were all forward-only re-checks has no gradient: the optimizer, the
        clipping and the fp16 scaler are left alone (the scaler cannot unscale what was never scaled), but
        the step still counts, so logging / eval / save intervals and the LR schedule stay tied to the
        data's position and a resumed run counts the same steps.
        """
        nonlocal step, backward_in_window
        lr = args.learning_rate * _lr_factor(args, step, progress, data.config.use_curriculum, warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if backward_in_window:
            if scaler is not None:
                scaler.unscale_(optimizer)
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                               args.max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        backward_in_window = False
        step += 1

    def after_step(epoch: int, consumed: int, running: float, micro: int) -> None:
        """The interval checks of every optimizer step, the epoch's last partial one included."""
        if step % args.logging_steps == 0:
            logger({"event": "train", "step": step, "epoch": epoch, "loss": running / max(micro, 1),
                    "lr": optimizer.param_groups[0]["lr"], "phase": data.phase,
                    "samples": consumed, "time": time.time() - start_time})
        if args.eval_steps and step % args.eval_steps == 0:
            run_eval()
        if args.save_steps and step % args.save_steps == 0:
            checkpoint(epoch, consumed)

    def forward_backward(fwd: torch.nn.Module, inputs: dict[str, torch.Tensor], weight: torch.Tensor,
                         forward_only: bool) -> signals_mod.Signals:
        with _autocast(args, device), (torch.no_grad() if forward_only else nullcontext()):
            sig = signals(fwd(**inputs), inputs)
        if not forward_only:
            per_sample = sig.loss.float()
            loss = (torch.where(torch.isfinite(per_sample), per_sample, 0.0) * weight).sum() / max(len(weight), 1)
            (scaler.scale(loss / accum) if scaler is not None else loss / accum).backward()
        return sig

    epochs_run = epoch0
    if resume_from is None:
        run_eval()  # the held-out baseline before any training
    last_epoch, last_consumed = max(epoch0, 0), consumed0
    for epoch in range(epoch0, args.num_epochs):
        data.set_epoch(epoch)
        loader_rng.manual_seed(args.seed * 100_003 + epoch)
        consumed = consumed0 if epoch == epoch0 else 0
        # Early stop is decided at an epoch's start, after its repartition. A fresh run always trains its
        # first epoch (a state handed in may be all FREEZE: those epochs are re-checks). A run resumed at
        # an epoch's position 0 decides again: that is the end checkpoint of a run that stopped here.
        stop = data.should_stop
        if consumed == 0 and (epoch > epoch0 or resume_from is not None) and stop:
            say(f"[GEKO] FREEZE share {data.state.frozen_share:.1%} >= early_stop_frozen "
                f"{data.config.early_stop_frozen:.0%}: stopping early")
            # The end checkpoint describes this position: the next epoch, repartitioned, at sample 0.
            last_epoch, last_consumed = epoch, 0
            break
        epoch_len = consumed + len(data)
        running, micro = 0.0, 0
        bar = tqdm(loader, desc=f"Epoch {epoch + 1}/{args.num_epochs}", disable=not (args.progress and main),
                   total=len(loader), leave=True)
        for batch in bar:
            ids = batch.pop("__index__")
            weight = batch.pop("__weight__").to(device=device, dtype=torch.float32)
            inputs = {k: v.to(device) for k, v in batch.items()
                      if not k.startswith("__") and isinstance(v, torch.Tensor)}
            forward_only = bool((weight == 0).all()) and world == 1
            try:
                sig = forward_backward(forward_model, inputs, weight, forward_only)
            except Exception as e:
                if not compile_armed:
                    raise
                warnings.warn(f"torch.compile failed at the first call ({e}); training continues "
                              f"without it", stacklevel=2)
                forward_model, compile_armed = uncompiled, False
                optimizer.zero_grad(set_to_none=True)  # whatever the failed backward left behind
                sig = forward_backward(forward_model, inputs, weight, forward_only)
            if not forward_only:
                compile_armed = False  # forward and backward both ran compiled: no more fallback
                backward_in_window = True
                backward_passes += int((weight > 0).sum())
            per_sample = sig.loss.detach().float()
            finite = torch.isfinite(per_sample)
            forward_passes += len(ids)
            data.report(ids, per_sample, correct=sig.correct, confidence=sig.confidence, step=step)
            ids_seen.extend(ids.tolist())
            consumed += len(ids)
            micro += 1
            if finite.any():
                running += float(per_sample[finite].mean())
            if micro % accum == 0:
                optimizer_step((epoch + consumed / max(epoch_len, 1)) / args.num_epochs)
                after_step(epoch, consumed, running, micro)
            # a baseline follows no curriculum: its bar shows no phase
            bar.set_postfix(loss=f"{running / max(micro, 1):.3f}",
                            **({} if data.config.mode in BASELINE_MODES else {"phase": data.phase.lower()}))
        bar.close()
        if micro % accum:  # the epoch's last, partial accumulation still counts as a step
            optimizer_step((epoch + 1) / args.num_epochs)
            after_step(epoch, consumed, running, micro)
        epochs_run = epoch + 1
        last_epoch, last_consumed = epoch, consumed
        hist = data.state.history[-1] if data.state.history else {}
        logger({"event": "epoch", "epoch": epoch, "step": step, "loss": running / max(micro, 1),
                "micro_batches": micro, **{k: hist.get(k) for k in ("freeze", "light", "focus", "hard", "pruned")},
                **epoch_metrics(data, epochs_done=epoch + 1, prefix="")})
        say(f"[Epoch {epoch + 1}] average loss {running / max(micro, 1):.4f} over {consumed} samples"
            + (f" on rank 0 ({world} ranks share the epoch)" if world > 1 else ""))  # only rank 0 prints
        run_eval()

    run_eval()
    if args.save_at_end:
        checkpoint(last_epoch, last_consumed)
    logger.close()
    report = data.efficiency_report(epochs_done=epochs_run)
    report.update({"wall_time_s": time.time() - start_time, "optimizer_steps": step,
                   "forward_passes_rank": forward_passes, "backward_passes_rank": backward_passes,
                   "world_size": world})
    state_path = os.path.join(args.output_dir, "state.arrow")
    if main:
        data.state.save(state_path)
        atomic_write_bytes(os.path.join(args.output_dir, "efficiency.json"),
                           json.dumps(report, indent=1).encode())
        say(data.format_efficiency_report(epochs_done=epochs_run)
            + f"\n  Wall time          : {report['wall_time_s']:.1f} s")
    return {"step": step, "epochs": epochs_run, "efficiency": report, "eval": last_eval,
            "output_dir": args.output_dir, "state_path": state_path, "ids_seen": ids_seen,
            "model": model, "optimizer": optimizer, "data": data}
