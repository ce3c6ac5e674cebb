"""Batch assembly for the reference loop: safe JSON decoding of shard samples and padding collation."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

__all__ = ["PAD_VALUES", "decode_json", "pad_collate"]

#: Padding value per key; other integer keys pad with 0.
PAD_VALUES = {"labels": -100, "attention_mask": 0, "input_ids": 0}


def decode_json(sample: dict[str, Any]) -> dict[str, Any]:
    """Merge the sample's ``json`` member (a JSON object) into the sample; no pickle, no code."""
    raw = sample.pop("json", None)
    if raw is None:
        return sample
    try:
        fields = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"sample {sample.get('__key__')!r}: json member is not valid JSON ({e})") from None
    if not isinstance(fields, dict):
        raise ValueError(f"sample {sample.get('__key__')!r}: json member must be an object, "
                         f"got {type(fields).__name__}")
    sample.update(fields)
    return sample


def _as_tensor(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return torch.from_numpy(value)
    if isinstance(value, (int, float, bool, np.number, np.bool_)) or (
            isinstance(value, (list, tuple)) and value
            and all(isinstance(v, (int, float, bool, np.number)) for v in value)):
        return torch.tensor(np.asarray(value))
    return value


def pad_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack dict samples into a batch; 1-D sequences of different lengths are right-padded.

    ``labels`` pad with -100 (ignored by the loss), ``attention_mask`` and ``input_ids`` with 0.
    Non-numeric values (keys, URLs, raw bytes) are kept as lists.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [_as_tensor(s[key]) for s in samples]
        if not all(isinstance(v, torch.Tensor) for v in values):
            batch[key] = values
            continue
        if values[0].dim() == 1 and len({v.shape[0] for v in values}) > 1:
            longest = max(v.shape[0] for v in values)
            pad = PAD_VALUES.get(key, 0)
            out = torch.full((len(values), longest), pad, dtype=values[0].dtype)
            for i, v in enumerate(values):
                out[i, :v.shape[0]] = v
            batch[key] = out
        else:
            batch[key] = torch.stack(values)
    return batch
