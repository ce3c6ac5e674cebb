"""The checkpoint manifest: what ties a checkpoint's files together, and the checks a load makes with it.

``manifest.json`` records the step, the plan seed, the data fingerprint, and the byte size and xxh3_64 of
every other file of the checkpoint directory; ``save_checkpoint`` writes it last. A load reads it before
anything else and refuses, naming the file, anything changed, added, missing or copied in from another
checkpoint, then holds each file's own step, seed and fingerprint to it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import xxhash

from geko_data.atomic import atomic_write_bytes
from geko_data.state import SampleState
from geko_data.validate import check_int

__all__ = ["MANIFEST", "CheckpointError", "check_against_manifest", "check_manifest", "file_hash", "is_int",
           "read_file", "read_json", "refuse", "write_manifest"]

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_HASH = "xxh3_64"
_CHUNK = 4 << 20  # hashing reads this much at a time: memory stays flat for any file size


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, incomplete, inconsistent, or unsafe to load)."""


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def file_hash(path: str | os.PathLike) -> str:
    """xxh3_64 of a file's bytes as 16 hex digits, read in chunks (a multi-GB file costs no memory)."""
    h = xxhash.xxh3_64()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def write_manifest(path: str, *, step: int, seed: int | None, fingerprint: str | None) -> dict[str, Any]:
    """Write ``path/manifest.json`` over every other file of the checkpoint dir ``path``; return it.

    ``save_checkpoint`` calls it last, inside the temporary directory. Call it yourself only to re-seal a
    checkpoint you changed on purpose: it vouches for whatever the files are now.
    """
    check_int("step", step, 0, numpy=False)
    check_int("seed", seed, optional=True, numpy=False)
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise ValueError(f"`fingerprint` must be a str or None, got {fingerprint!r}")
    files: dict[str, dict[str, Any]] = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name == MANIFEST:
            continue
        if not os.path.isfile(full):
            raise CheckpointError(f"checkpoint {path!r}: {name} is not a regular file")
        files[name] = {"bytes": os.path.getsize(full), _HASH: file_hash(full)}
    manifest = {"format_version": MANIFEST_VERSION, "step": step, "seed": seed, "fingerprint": fingerprint,
                "hash": _HASH, "files": files}
    atomic_write_bytes(os.path.join(path, MANIFEST), json.dumps(manifest, indent=1).encode())
    return manifest


def refuse(path: str, name: str, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path!r}: {name} refused: {why}")


def check_manifest(path: str) -> dict[str, Any]:
    """Read ``manifest.json`` and check every file against it; return it. Nothing else is read before."""
    if not os.path.exists(os.path.join(path, MANIFEST)):
        raise CheckpointError(f"checkpoint {path!r} has no {MANIFEST}, so nothing shows that its files belong "
                              f"together (a checkpoint of an older geko_data, or assembled by hand); refused")
    manifest = read_file(path, MANIFEST, read_json)
    files = manifest.get("files")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > MANIFEST_VERSION:
        raise refuse(path, MANIFEST, f"format_version {version!r} is not one this geko_data reads "
                                      f"(<= {MANIFEST_VERSION})")
    if manifest.get("hash") != _HASH or not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get(_HASH), str)
            for v in files.values()):
        raise refuse(path, MANIFEST, f"expected 'hash': {_HASH!r} and 'files': {{name: {{'bytes': int, "
                                      f"{_HASH!r}: str}}}}")
    step, seed, fp = manifest.get("step"), manifest.get("seed"), manifest.get("fingerprint")
    if not is_int(step) or not (seed is None or is_int(seed)) or not (fp is None or isinstance(fp, str)):
        raise refuse(path, MANIFEST, f"'step' must be an int, 'seed' an int or null, 'fingerprint' a string or "
                                      f"null (got {step!r}, {seed!r}, {fp!r})")
    present = set(os.listdir(path)) - {MANIFEST}
    extra, gone = sorted(present - set(files)), sorted(set(files) - present)
    if extra:
        raise refuse(path, extra[0], f"it is not listed in {MANIFEST} (a file added after the checkpoint was "
                                      f"written)")
    if gone:
        raise CheckpointError(f"checkpoint {path!r}: {gone[0]} is listed in {MANIFEST} but missing")
    for name in sorted(files):
        full, want = os.path.join(path, name), files[name]
        size = os.path.getsize(full) if os.path.isfile(full) else None
        got = file_hash(full) if size == want["bytes"] else None
        if got != want[_HASH]:
            what = (f"{size} bytes, {MANIFEST} says {want['bytes']}" if got is None
                    else f"{_HASH} {got}, {MANIFEST} says {want[_HASH]}")
            raise refuse(path, name, f"it does not match {MANIFEST} ({what}): it changed, or was copied from "
                                      f"another checkpoint, after this one was written")
    return manifest


def read_file(path: str, name: str, reader: Any) -> Any:
    """``reader(file)``; any failure (corrupt, truncated, foreign, a pickle payload) names the file."""
    try:
        return reader(os.path.join(path, name))
    except Exception as e:  # noqa: BLE001 (safetensors, json and torch raise many types: name the file)
        raise CheckpointError(f"checkpoint {path!r}: {name} refused, it cannot be read safely "
                              f"({type(e).__name__}: {str(e)[:300]})") from None


def read_json(file: str) -> dict[str, Any]:
    with open(file, encoding="utf-8") as f:
        value = json.load(f)
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def check_against_manifest(path: str, manifest: dict[str, Any], trainer_state: dict[str, Any],
                            data_state: dict[str, Any], state: SampleState) -> None:
    """The files' own step, seed and fingerprint agree with the manifest's (each file names itself)."""
    step = trainer_state.get("step")
    if not is_int(step) or step < 0:
        raise refuse(path, "trainer_state.json", f"'step' must be an int >= 0, got {step!r}"
                      if "step" in trainer_state else "it has no 'step'")
    checks = [("trainer_state.json", "step", step, manifest["step"]),
              ("state.arrow", "fingerprint", state.fingerprint, manifest["fingerprint"])]
    if "seed" in data_state:
        checks.append(("data_state.json", "seed", data_state["seed"], manifest["seed"]))
    if "fingerprint" in data_state:
        checks.append(("data_state.json", "fingerprint", data_state["fingerprint"], manifest["fingerprint"]))
    for name, field, theirs, ours in checks:
        if theirs != ours:
            raise refuse(path, name, f"its {field} is {theirs!r} but {MANIFEST} says {ours!r}")
