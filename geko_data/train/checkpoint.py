"""Checkpoint directories: everything of one optimizer step, written atomically, loaded without pickle.

Layout of ``checkpoint-<step>/``::

    model.safetensors | adapter.safetensors   trainable weights (the LoRA adapter under peft)
    optimizer.pt                              optimizer state (torch.save; loaded with weights_only=True)
    rng.safetensors                           torch CPU RNG state
    trainer_state.json                        step, epoch, consumed samples, scaler, args
    data_state.json                           the sampler's / stream's state_dict()
    state.arrow                               the SampleState
    plan.arrow                                the epoch's plan (counts, loss weights) being run

The directory is built under a temporary name and renamed into place, so a
crash leaves either the complete checkpoint or nothing under that name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from geko_data.atomic import atomic_dir
from geko_data.plan import EpochPlan, load_plan, save_plan
from geko_data.state import SampleState

__all__ = ["CheckpointError", "find_latest", "load_checkpoint", "save_checkpoint"]

_NAME = re.compile(r"^checkpoint-(\d+)$")
_REQUIRED = ("trainer_state.json", "data_state.json", "state.arrow", "optimizer.pt")


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
                    plan: EpochPlan | None = None, keep: int = 2) -> str:
    """Write ``output_dir/checkpoint-<step>`` atomically; keep the newest ``keep`` checkpoints."""
    os.makedirs(output_dir, exist_ok=True)
    if not os.access(output_dir, os.W_OK):
        raise PermissionError(f"`output_dir` {output_dir!r} is not writable")
    final = os.path.join(output_dir, f"checkpoint-{step}")
    if os.path.exists(final):  # the same step saved twice (e.g. at the end): the old one is complete
        shutil.rmtree(final)
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
        if plan is not None:
            save_plan(plan, os.path.join(tmp, "plan.arrow"))
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoint directories, oldest first (temporary ``.checkpoint-*.tmp`` dirs are ignored)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _NAME.match(name)
        path = os.path.join(output_dir, name)
        if m and all(os.path.exists(os.path.join(path, f)) for f in _REQUIRED):
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def find_latest(path: str) -> str:
    """``path`` itself if it is a checkpoint, else the newest complete checkpoint inside it."""
    if os.path.exists(os.path.join(path, "trainer_state.json")):
        missing = [f for f in _REQUIRED if not os.path.exists(os.path.join(path, f))]
        if missing:
            raise CheckpointError(f"checkpoint {path!r} is incomplete (missing {missing})")
        return path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"no complete checkpoint in {path!r} (looked for checkpoint-<step> directories)")
    return found[-1]


def load_checkpoint(path: str, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None
                    ) -> tuple[dict[str, Any], dict[str, Any], SampleState, EpochPlan | None]:
    """Restore weights, optimizer and RNG from ``path``; return (trainer_state, data_state, state, plan)."""
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
    plan_path = os.path.join(path, "plan.arrow")
    plan = load_plan(plan_path) if os.path.exists(plan_path) else None
    return trainer_state, data_state, state, plan
