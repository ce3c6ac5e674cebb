"""Checkpoint directories: everything of one optimizer step, written atomically, loaded without pickle.

Layout of ``checkpoint-<step>/``::

    model.safetensors | adapter.safetensors   trainable weights (the LoRA adapter under peft)
    optimizer.pt                              optimizer state (torch.save; loaded with weights_only=True)
    rng.safetensors                           torch CPU RNG state
    trainer_state.json                        step, epoch, consumed samples, scaler, args
    data_state.json                           the sampler's / stream's state_dict()
    state.arrow                               the SampleState, with the plan of the epoch being run

The directory is built under a temporary name and renamed into place, so a
crash leaves either the complete checkpoint or nothing under that name; old
checkpoints are renamed away before they are deleted, so a crash while
pruning never leaves a half-deleted one under a checkpoint name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from geko_data.atomic import atomic_dir, fsync_dir
from geko_data.state import SampleState

__all__ = ["CheckpointError", "find_latest", "load_checkpoint", "save_checkpoint"]

_NAME = re.compile(r"^checkpoint-(\d+)$")
_REQUIRED = ("trainer_state.json", "data_state.json", "state.arrow", "optimizer.pt", "rng.safetensors")
_WEIGHTS = ("model.safetensors", "adapter.safetensors")


def _missing(path: str) -> list[str]:
    missing = [f for f in _REQUIRED if not os.path.exists(os.path.join(path, f))]
    if not any(os.path.exists(os.path.join(path, f)) for f in _WEIGHTS):
        missing.append(" or ".join(_WEIGHTS))
    return missing


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, incomplete, or unsafe to load)."""


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def _weights(model: torch.nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    if _is_peft(model):
        from peft import get_peft_model_state_dict

        return "adapter.safetensors", {k: v.detach().cpu().contiguous() for k, v in
                                       get_peft_model_state_dict(model, save_embedding_layers=False).items()}
    # Tied weights share storage, which safetensors refuses: store each name once per storage.
    seen: dict[tuple[int, int], str] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen and tensor.numel() > 0:
            continue
        seen[key] = name
        out[name] = tensor.detach().cpu().contiguous().clone()
    return "model.safetensors", out


def save_checkpoint(output_dir: str, *, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], data_state: dict[str, Any], state: SampleState,
                    keep: int = 2) -> str:
    """Write ``output_dir/checkpoint-<step>`` atomically; keep the newest ``keep`` checkpoints.

    A complete checkpoint of the same step is kept as it is (the final save often falls on a step a
    periodic save already wrote: same weights, same optimizer): deleting it first would leave a window with
    no checkpoint at all.
    """
    os.makedirs(output_dir, exist_ok=True)
    if not os.access(output_dir, os.W_OK):
        raise PermissionError(f"`output_dir` {output_dir!r} is not writable")
    final = os.path.join(output_dir, f"checkpoint-{step}")
    if os.path.exists(final) and not _missing(final):
        _prune(output_dir, keep)
        return final
    if os.path.exists(final):  # an incomplete leftover under a checkpoint name: move it out of the way
        _remove(final)
    with atomic_dir(final) as tmp:
        name, weights = _weights(model)
        save_file(weights, os.path.join(tmp, name))
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        save_file({"cpu": torch.get_rng_state()}, os.path.join(tmp, "rng.safetensors"))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(trainer_state, f, indent=1)
        with open(os.path.join(tmp, "data_state.json"), "w") as f:
            json.dump(data_state, f, indent=1)
        state.save(os.path.join(tmp, "state.arrow"))
    _prune(output_dir, keep)
    return final


def _remove(path: str) -> None:
    """Rename ``path`` to a hidden temporary name, then delete it: never half-deleted under its name."""
    parent, name = os.path.split(path)
    doomed = os.path.join(parent, f".{name}.deleting.tmp")
    if os.path.exists(doomed):
        shutil.rmtree(doomed, ignore_errors=True)
    os.rename(path, doomed)
    fsync_dir(parent)
    shutil.rmtree(doomed, ignore_errors=True)


def _prune(output_dir: str, keep: int) -> None:
    for old in list_checkpoints(output_dir)[:-keep]:
        _remove(old)


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoint directories, oldest first (temporary ``.checkpoint-*.tmp`` dirs are ignored)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _NAME.match(name)
        path = os.path.join(output_dir, name)
        if m and not _missing(path):
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def find_latest(path: str) -> str:
    """``path`` itself if it is a checkpoint, else the newest complete checkpoint inside it."""
    if os.path.exists(os.path.join(path, "trainer_state.json")):
        missing = _missing(path)
        if missing:
            raise CheckpointError(f"checkpoint {path!r} is incomplete (missing {missing})")
        return path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"no complete checkpoint in {path!r} (looked for checkpoint-<step> directories)")
    return found[-1]


def load_checkpoint(path: str, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None
                    ) -> tuple[dict[str, Any], dict[str, Any], SampleState]:
    """Restore weights, optimizer and RNG from ``path``; return (trainer_state, data_state, state)."""
    path = find_latest(path)
    name = "adapter.safetensors" if _is_peft(model) else "model.safetensors"
    weights_path = os.path.join(path, name)
    if not os.path.exists(weights_path):
        raise CheckpointError(f"checkpoint {path!r} has no {name} (saved from a {'non-' if _is_peft(model) else ''}"
                              f"peft model?)")
    weights = load_file(weights_path)
    if _is_peft(model):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, weights)
    else:
        # strict=False: tied weights were stored once and stay tied to the loaded copy.
        _missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected:
            raise CheckpointError(f"checkpoint {path!r} has weights the model lacks: {unexpected[:5]}")
    if optimizer is not None:
        try:
            opt_state = torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses pickled code objects: that is the point
            raise CheckpointError(f"checkpoint {path!r}: optimizer.pt refused by the safe loader ({e})") from None
        optimizer.load_state_dict(opt_state)
    torch.set_rng_state(load_file(os.path.join(path, "rng.safetensors"))["cpu"])
    with open(os.path.join(path, "trainer_state.json")) as f:
        trainer_state = json.load(f)
    with open(os.path.join(path, "data_state.json")) as f:
        data_state = json.load(f)
    state = SampleState.load(os.path.join(path, "state.arrow"), memory_map=False)
    return trainer_state, data_state, state
