"""Checkpoint directories: everything of one optimizer step, written atomically, tied together by a
manifest, loaded without pickle.

Layout of ``checkpoint-<step>/``::

    model.safetensors | adapter.safetensors   trainable weights (the LoRA adapter under peft)
    optimizer.pt                              optimizer state (torch.save; loaded with weights_only=True)
    rng.safetensors                           torch CPU RNG state
    trainer_state.json                        step, epoch, consumed samples, scaler, args
    data_state.json                           the sampler's / stream's state_dict()
    state.arrow                               the SampleState, with the plan of the epoch being run
    manifest.json                             step, plan seed, data fingerprint, and the size and xxh3_64
                                              hash of every other file; written last

The directory is built under a temporary name and renamed into place, so a
crash leaves either the complete checkpoint or nothing under that name; old
checkpoints are renamed away before they are deleted, so a crash while
pruning never leaves a half-deleted one under a checkpoint name. The next
save deletes the hidden ``.checkpoint-*.tmp`` directories a killed save left.

Loading checks the manifest first: a file changed, added, missing or copied
in from another checkpoint (another step, another seed) is refused, naming
it. Then it reads every file and checks it against the model, the optimizer
and the manifest's step, seed and fingerprint, and only then changes the
model, the optimizer and the RNG: a refused checkpoint leaves them as they
were.

One training run at a time may write to an output dir: ``outdir.lock_output_dir``
holds a lock file there (the reference loop takes it for the whole run).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from geko_data.atomic import atomic_dir, fsync_dir
from geko_data.state import SampleState
from geko_data.validate import check_int
# MANIFEST, CheckpointError, file_hash and write_manifest are re-exported: this is where users import them from.
from geko_data.train.manifest import (MANIFEST, CheckpointError, check_against_manifest, check_manifest, file_hash,
                                      is_int, read_file, read_json, refuse, write_manifest)

__all__ = ["MANIFEST", "CheckpointError", "file_hash", "find_latest", "list_checkpoints", "load_checkpoint",
           "save_checkpoint", "write_manifest"]


_NAME = re.compile(r"^checkpoint-(\d+)$")
_LEFTOVER = re.compile(r"^\.checkpoint-\d+\..+\.tmp$")  # a killed save's temp dir (atomic_dir's or _remove's)
_REQUIRED = ("trainer_state.json", "data_state.json", "state.arrow", "optimizer.pt", "rng.safetensors", MANIFEST)
_WEIGHTS = ("model.safetensors", "adapter.safetensors")


def _missing(path: str, *, manifest: bool = True) -> list[str]:
    missing = [f for f in _REQUIRED if (manifest or f != MANIFEST) and not os.path.exists(os.path.join(path, f))]
    if not any(os.path.exists(os.path.join(path, f)) for f in _WEIGHTS):
        missing.append(" or ".join(_WEIGHTS))
    return missing


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def _storage_key(tensor: torch.Tensor) -> tuple[int, int]:
    """Where a tensor's data lives: tied weights (one tensor under two names) share it."""
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset()


def _peft_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, save_embedding_layers=False)


def _weights(model: torch.nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    if _is_peft(model):
        return "adapter.safetensors", {k: v.detach().cpu().contiguous() for k, v in _peft_state(model).items()}
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


# ---------------------------------------------------------------- save
def save_checkpoint(output_dir: str, *, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], data_state: dict[str, Any], state: SampleState,
                    keep: int = 2) -> str:
    """Write ``output_dir/checkpoint-<step>`` atomically; keep the newest ``keep`` checkpoints.

    The manifest records ``step``, the plan seed (``data_state["seed"]``) and the data fingerprint
    (``state.fingerprint``). A complete checkpoint of the same step is kept as it is (the final save often
    falls on a step a periodic save already wrote: same weights, same optimizer): deleting it first would
    leave a window with no checkpoint at all. Only one process may write to ``output_dir`` at a time (see
    ``lock_output_dir``).
    """
    check_int("step", step, 0, numpy=False)
    if "step" in trainer_state and trainer_state["step"] != step:
        raise ValueError(f"`trainer_state` step {trainer_state['step']!r} differs from `step` {step}")
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
            json.dump({**trainer_state, "step": step}, f, indent=1)
        with open(os.path.join(tmp, "data_state.json"), "w") as f:
            json.dump(data_state, f, indent=1)
        state.save(os.path.join(tmp, "state.arrow"))
        seed = data_state.get("seed")
        write_manifest(tmp, step=step, seed=seed if is_int(seed) else None, fingerprint=state.fingerprint)
    _prune(output_dir, keep)
    return final


def _clear_leftovers(output_dir: str) -> None:
    """Delete the temp dirs of saves that were killed: each may be as large as a checkpoint, and a run
    that crashes now and then would fill the disk. One process writes here (the output dir's lock), so
    none is still in use."""
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
        missing = _missing(path, manifest=False)  # a missing manifest gets load_checkpoint's own message
        if missing:
            raise CheckpointError(f"checkpoint {path!r} is incomplete (missing {missing})")
        return path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"no complete checkpoint in {path!r} (looked for checkpoint-<step> directories "
                              f"holding {', '.join(_REQUIRED)} and the weights)")
    return found[-1]


# ---------------------------------------------------------------- load
def _check_weights(path: str, name: str, model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Every stored weight fits the model (name and shape), and none of the model's is missing."""
    current = _peft_state(model) if _is_peft(model) else model.state_dict()
    unexpected = [k for k in weights if k not in current]
    if unexpected:
        raise refuse(path, name, f"it has weights the model lacks: {unexpected[:5]}")
    shapes = [f"{k} {tuple(weights[k].shape)} (the model's: {tuple(current[k].shape)})" for k in weights
              if weights[k].shape != current[k].shape]
    if shapes:
        raise refuse(path, name, f"weights of another shape: {shapes[:3]}")
    # Tied weights were stored once and stay tied to the loaded copy. Any other missing weight is an error:
    # the model would silently keep its initial values.
    stored = {_storage_key(current[k]) for k in weights}
    untied = [k for k in current
              if k not in weights and current[k].numel() > 0 and _storage_key(current[k]) not in stored]
    if untied:
        raise CheckpointError(f"checkpoint {path!r} lacks weights of the model: {untied[:5]}")


#: Optimizer state entries that have their parameter's shape (torch's Adam / AdamW / SGD).
_PARAM_SHAPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def _check_optimizer(path: str, optimizer: torch.optim.Optimizer, opt_state: Any) -> None:
    """What ``optimizer.load_state_dict`` would accept (the same group checks), plus moment shapes."""
    name = "optimizer.pt"
    groups = opt_state.get("param_groups") if isinstance(opt_state, dict) else None
    saved = opt_state.get("state") if isinstance(opt_state, dict) else None
    if not isinstance(groups, list) or not isinstance(saved, dict) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise refuse(path, name, "not an optimizer state_dict ('state' and 'param_groups' with 'params')")
    if len(groups) != len(optimizer.param_groups):
        raise refuse(path, name, f"{len(groups)} parameter group(s), the optimizer has "
                                  f"{len(optimizer.param_groups)}")
    params: dict[Any, torch.Tensor] = {}
    for i, (g, mine) in enumerate(zip(groups, optimizer.param_groups)):
        if len(g["params"]) != len(mine["params"]):
            raise refuse(path, name, f"parameter group {i} holds {len(g['params'])} parameters, the "
                                      f"optimizer's {len(mine['params'])}")
        params.update(zip(g["params"], mine["params"]))
    for pid, entry in saved.items():
        if pid not in params or not isinstance(entry, dict):
            raise refuse(path, name, f"state for parameter {pid!r}, which no parameter group lists")
        for key in _PARAM_SHAPED:
            value = entry.get(key)
            if isinstance(value, torch.Tensor) and value.shape != params[pid].shape:
                raise refuse(path, name, f"{key} of parameter {pid} has shape {tuple(value.shape)}, the "
                                          f"parameter {tuple(params[pid].shape)}")


def load_checkpoint(path: str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    expect_fingerprint: str | None = None,
                    check: Callable[[dict[str, Any], dict[str, Any], SampleState], None] | None = None,
                    ) -> tuple[dict[str, Any], dict[str, Any], SampleState]:
    """Restore weights, optimizer and RNG from ``path``; return (trainer_state, data_state, state).

    ``path``: a checkpoint, or a folder whose newest complete checkpoint is used. The manifest is checked
    first, then every file is read and checked (against the manifest, the model, the optimizer, and
    ``expect_fingerprint`` when given: the fingerprint of the data the run will read), then
    ``check(trainer_state, data_state, state)`` runs if given (raise there to refuse). Only then do the
    model, the optimizer and the RNG change: any refusal, a ``CheckpointError`` naming the file, leaves
    them as they were.
    """
    path = find_latest(path)
    manifest = check_manifest(path)
    if expect_fingerprint is not None and manifest["fingerprint"] != expect_fingerprint:
        raise refuse(path, MANIFEST, f"the checkpoint was written for data with fingerprint "
                                      f"{manifest['fingerprint']!r}, the data here has fingerprint "
                                      f"{expect_fingerprint!r} (the shards changed since)")
    name = "adapter.safetensors" if _is_peft(model) else "model.safetensors"
    if not os.path.exists(os.path.join(path, name)):
        raise CheckpointError(f"checkpoint {path!r} has no {name} (saved from a {'non-' if _is_peft(model) else ''}"
                              f"peft model?)")
    weights = read_file(path, name, load_file)
    # weights_only refuses pickled code objects: that is the point
    opt_state = (read_file(path, "optimizer.pt", lambda f: torch.load(f, map_location="cpu", weights_only=True))
                 if optimizer is not None else None)
    rng = read_file(path, "rng.safetensors", lambda f: load_file(f)["cpu"])
    trainer_state = read_file(path, "trainer_state.json", read_json)
    data_state = read_file(path, "data_state.json", read_json)
    state = read_file(path, "state.arrow", lambda f: SampleState.load(f, memory_map=False))
    check_against_manifest(path, manifest, trainer_state, data_state, state)
    _check_weights(path, name, model, weights)
    now = torch.get_rng_state()
    if rng.dtype != now.dtype or rng.shape != now.shape:
        raise refuse(path, "rng.safetensors", f"'cpu' is a {rng.dtype} tensor of shape {tuple(rng.shape)}, "
                                               f"torch's CPU RNG state is {now.dtype} {tuple(now.shape)}")
    if optimizer is not None:
        _check_optimizer(path, optimizer, opt_state)
    if check is not None:
        check(trainer_state, data_state, state)
    # Apply: the optimizer first, since it can be put back (its old tensors are not modified by a load);
    # the weights' names and shapes were checked above; the RNG last.
    before = optimizer.state_dict() if optimizer is not None else None
    try:
        if optimizer is not None:
            optimizer.load_state_dict(opt_state)
        if _is_peft(model):
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, weights)
        else:
            model.load_state_dict(weights, strict=False)
    except Exception as e:  # noqa: BLE001 (what is left after the checks above: name the checkpoint)
        if optimizer is not None:
            optimizer.load_state_dict(before)
        raise CheckpointError(f"checkpoint {path!r} could not be applied ({type(e).__name__}: "
                              f"{str(e)[:300]})") from None
    torch.set_rng_state(rng)
    return trainer_state, data_state, state
