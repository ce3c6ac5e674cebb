"""The parts a training run is built from: device, precision, model preparation, optimizer, data, loader.

Each function takes ``TrainArgs`` and returns one ready part; ``loop.train`` calls them in order and keeps
what they return in its run state. Nothing here trains.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch.utils.data import DataLoader

from geko_data import signals as signals_mod
from geko_data.batches import GEKOBatchSampler
from geko_data.config import GEKOConfig
from geko_data.sampler import GEKOSampler
from geko_data.stream import GEKOStream
from geko_data.train.args import TrainArgs
from geko_data.train.collate import decode_json
from geko_data.world import World

__all__ = ["SignalsFn", "apply_lora", "autocast", "build_data", "check_fp16", "choose_device", "default_signals",
           "enable_gradient_checkpointing", "make_loader", "make_optimizer", "wrap_model"]

#: ``signals(outputs, batch)``: per-sample loss, confidence and correctness of one micro-batch.
SignalsFn = Callable[[Any, dict[str, torch.Tensor]], signals_mod.Signals]


def default_signals(correct_threshold: float) -> SignalsFn:
    """Causal-LM signals on ``labels``, or classification signals when the labels are 1-D."""
    def fn(outputs: Any, batch: dict[str, torch.Tensor]) -> signals_mod.Signals:
        logits = outputs.logits if hasattr(outputs, "logits") else outputs
        labels = batch["labels"]
        if labels.dim() == 1:
            return signals_mod.classification(logits, labels)
        return signals_mod.causal_lm(logits, labels, correct_threshold=correct_threshold)
    return fn


def choose_device(args: TrainArgs, rank: int) -> torch.device:
    """``args.device`` resolved: CPU, or this rank's CUDA device (ranks share devices round robin)."""
    if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("`device` is 'cuda' but no CUDA device is available")
    return torch.device("cuda", rank % torch.cuda.device_count())


def autocast(args: TrainArgs, device: torch.device) -> Any:
    """The forward's autocast context: bf16, fp16, or none."""
    if args.bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if args.fp16:
        return torch.autocast(device.type, dtype=torch.float16)
    return nullcontext()


def check_fp16(device: torch.device) -> None:
    """Refuse fp16 up front on a device without fp16 autocast or a GradScaler (naming bf16 instead)."""
    try:
        with torch.autocast(device.type, dtype=torch.float16):
            torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)
        torch.amp.GradScaler(device.type)
    except (RuntimeError, AssertionError, ValueError) as e:
        raise ValueError(f"`fp16` is not supported on device {device} ({e}); use bf16=True instead") from None


def make_optimizer(model: torch.nn.Module, args: TrainArgs) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' 8-bit AdamW) over the trainable parameters."""
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


def apply_lora(model: torch.nn.Module, lora_config: Any, log: Callable[[str], None]) -> torch.nn.Module:
    """The peft model of ``lora_config``; logs trainable / total / frozen parameter counts."""
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


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in backward (a transformers model; others are refused, naming the argument)."""
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


def build_data(train_data: Any, args: TrainArgs, config: GEKOConfig | None, decode: Any,
               world: World) -> tuple[GEKOSampler | GEKOStream, Any]:
    """(the GEKO data object, the dataset the DataLoader reads) of ``train_data``."""
    if isinstance(train_data, (str, os.PathLike)):
        train_data = GEKOStream(train_data, total_epochs=args.num_epochs, config=config, seed=args.seed,
                                decode=decode if decode is not None else decode_json, batch_size=args.batch_size)
    if isinstance(train_data, GEKOStream):
        if train_data.batch_size is None:
            train_data.batch_size = args.batch_size
        elif train_data.batch_size != args.batch_size:
            raise ValueError(f"GEKOStream batch_size {train_data.batch_size} differs from args.batch_size "
                             f"{args.batch_size}; they must match for exact resume")
        train_data.batches = args.batches  # the loop cuts the epochs as its arguments say
        return train_data, train_data
    if isinstance(train_data, GEKOSampler):
        raise TypeError("pass the map-style dataset itself as `train_data`; train() builds the GEKOSampler")
    if not hasattr(train_data, "__getitem__") or not hasattr(train_data, "__len__"):
        raise TypeError(f"`train_data` must be a map-style dataset, a GEKOStream or a shard folder, "
                        f"got {type(train_data).__name__}")
    sampler = GEKOSampler(train_data, total_epochs=args.num_epochs, config=config, seed=args.seed, world=world)
    return sampler, sampler.wrap(train_data)


def wrap_model(model: torch.nn.Module, args: TrainArgs, world: World,
               device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module, bool]:
    """(the module batches go through, the same without ``torch.compile``, whether it is compiled).

    Under torch.distributed the model is wrapped in DDP. torch.compile is lazy: most failures come at the
    first call (tracing, the compiler, the backward graph), so the loop keeps the uncompiled module to fall
    back to until one micro-batch has run forward and backward.
    """
    uncompiled = model
    if world.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        uncompiled = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if not args.compile_model:
        return uncompiled, uncompiled, False
    try:
        return torch.compile(uncompiled), uncompiled, True
    except Exception as e:  # compile support varies by platform; training goes on uncompiled
        warnings.warn(f"torch.compile failed ({e}); training continues without it", stacklevel=3)
        return uncompiled, uncompiled, False


def make_loader(data: GEKOSampler | GEKOStream, dataset: Any, args: TrainArgs, collate_fn: Callable[..., Any],
                *, stream_batch_size: int | None = None) -> tuple[DataLoader, torch.Generator]:
    """(the training DataLoader, the generator its workers' seeds come from: seed it per epoch). A stream
    whose epochs change their batch size (``batches="steps"``) needs a new one when it changes
    (``loader_is_stale``), made with ``stream_batch_size`` = the planned epoch's ``epoch_batch_size``
    (default the stream's ``batch_size``: the first loader is made before any epoch is planned)."""
    workers = args.dataloader_num_workers if args.dataloader_num_workers >= 0 else min(2, os.cpu_count() or 1)
    loader_kw: dict[str, Any] = {}
    if workers > 0:
        loader_kw = {"persistent_workers": args.dataloader_persistent_workers,
                     "prefetch_factor": args.dataloader_prefetch_factor}
    # Each DataLoader iterator draws its workers' base seed from `generator`, or else from the global torch
    # RNG, which would shift dropout's random stream between a run and its resume.
    rng = torch.Generator()
    if isinstance(data, GEKOSampler) and args.batches == "steps":
        batching: dict[str, Any] = {"batch_sampler": GEKOBatchSampler(data, batch_size=args.batch_size)}
    elif isinstance(data, GEKOStream):  # stream_batch_size: the planned epoch's (loader_is_stale)
        batching = {"batch_size": data.batch_size if stream_batch_size is None else stream_batch_size}
    else:
        batching = {"batch_size": args.batch_size, "sampler": data}
    loader = DataLoader(dataset, **batching, num_workers=workers, collate_fn=collate_fn, generator=rng, **loader_kw)
    return loader, rng


def loader_is_stale(loader: DataLoader, data: GEKOSampler | GEKOStream) -> bool:
    """Whether the epoch just planned needs a new DataLoader: a stream's batch size is the DataLoader's, and
    with ``batches="steps"`` it changes with the epoch's draws."""
    return isinstance(data, GEKOStream) and loader.batch_size != data.epoch_batch_size
