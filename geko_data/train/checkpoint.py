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
pruning never leaves a half-deleted one under a checkpoint name. The next
save deletes the hidden ``.checkpoint-*.tmp`` directories a killed save left.
Loading reads every file before it changes anything, and refuses a file it
cannot read safely (corrupt, truncated, a pickle payload) with an error
naming it.
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
_LEFTOVER = re.compile(r"^\.checkpoint-\d+\..+\.tmp$")  # a killed save's temp dir (atomic_dir's or _remove's)
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


def _storage_key(tensor: torch.Tensor) -> tuple[int, int]:
    """Where a tensor's data lives: tied weights (one tensor under two names) share it."""
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset()


def _weights(model: torch.nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    if _is_peft(model):
        from peft import get_peft_model_state_dict

        return "adapter.safetensors", {k: v.detach().cpu().contiguous() for k, v in
                                       get_peft_model_state_dict(model, save_embedding_layers=False).items()}
    # Tied weights share storage, which safetensors refuses: store each name once per storage.
    seen: dict[tuple[int, int], str] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = _storage_key(tensor)
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
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:  # a read-only parent, a regular file on the way: same type, naming the argument
        raise type(e)(e.errno, f"`output_dir` {output_dir!r} cannot be created: {e.strerror}") from None
    if not os.access(output_dir, os.W_OK):
        raise PermissionError(f"`output_dir` {output_dir!r} is not writable")
    _clear_leftovers(output_dir)
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


def _clear_leftovers(output_dir: str) -> None:
    """Delete the temp dirs of saves that were killed: each may be as large as a checkpoint, and a run
    that crashes now and then would fill the disk. Only rank 0 writes here, so none is still in use."""
    for name in os.listdir(output_dir):
        if _LEFTOVER.match(name):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


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


def _read(path: str, name: str, reader: Any) -> Any:
    """``reader(file)``; any failure (corrupt, truncated, foreign, a pickle payload) names the file."""
    try:
        return reader(os.path.join(path, name))
    except Exception as e:  # noqa: BLE001 (safetensors, json and torch raise many types: name the file)
        raise CheckpointError(f"checkpoint {path!r}: {name} refused, it cannot be read safely "
                              f"({type(e).__name__}: {str(e)[:300]})") from None


def _read_json(file: str) -> dict[str, Any]:
    with open(file, encoding="utf-8") as f:
        value = json.load(f)
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def load_checkpoint(path: str, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None
                    ) -> tuple[dict[str, Any], dict[str, Any], SampleState]:
    """Restore weights, optimizer and RNG from ``path``; return (trainer_state, data_state, state).

    Every file is read (and a bad one refused, naming it) before the model, optimizer or RNG change.
    """
    path = find_latest(path)
    name = "adapter.safetensors" if _is_peft(model) else "model.safetensors"
    if not os.path.exists(os.path.join(path, name)):
        raise CheckpointError(f"checkpoint {path!r} has no {name} (saved from a {'non-' if _is_peft(model) else ''}"
                              f"peft model?)")
    weights = _read(path, name, load_file)
    # weights_only refuses pickled code objects: that is the point
    opt_state = (_read(path, "optimizer.pt", lambda f: torch.load(f, map_location="cpu", weights_only=True))
                 if optimizer is not None else None)
    rng = _read(path, "rng.safetensors", lambda f: load_file(f)["cpu"])
    trainer_state = _read(path, "trainer_state.json", _read_json)
    data_state = _read(path, "data_state.json", _read_json)
    state = _read(path, "state.arrow", lambda f: SampleState.load(f, memory_map=False))
    if _is_peft(model):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, weights)
    else:
        # strict=False: tied weights were stored once and stay tied to the loaded copy. Any other missing
        # weight is an error: the model would silently keep its initial values.
        current = model.state_dict()
        stored = {_storage_key(current[k]) for k in weights if k in current}
        untied = [k for k in current
                  if k not in weights and current[k].numel() > 0 and _storage_key(current[k]) not in stored]
        if untied:
            raise CheckpointError(f"checkpoint {path!r} lacks weights of the model: {untied[:5]}")
        _missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected:
            raise CheckpointError(f"checkpoint {path!r} has weights the model lacks: {unexpected[:5]}")
    if optimizer is not None:
        optimizer.load_state_dict(opt_state)
    torch.set_rng_state(rng)
    return trainer_state, data_state, state
