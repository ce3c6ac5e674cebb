"""What the reference loop measures and records: held-out evaluation, ``metrics.jsonl`` and TensorBoard."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader

from geko_data.atomic import atomic_write_bytes
from geko_data.train.args import TrainArgs
from geko_data.train.build import SignalsFn, autocast

__all__ = ["MetricsLogger", "evaluate"]


def evaluate(model: torch.nn.Module, eval_data: Any, *, args: TrainArgs, signals: SignalsFn,
             device: torch.device, collate_fn: Callable[..., Any]) -> dict[str, float]:
    """Mean loss and accuracy (share of correct samples) of ``eval_data``."""
    loader = DataLoader(eval_data, batch_size=args.eval_batch_size or args.batch_size, shuffle=False,
                        collate_fn=collate_fn, generator=torch.Generator().manual_seed(0))  # leaves the global RNG be
    was_training = model.training
    model.eval()
    losses, correct = [], []
    with torch.no_grad(), autocast(args, device):
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


class MetricsLogger:
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
        """Append ``record`` (its ``event`` and ``step`` name the TensorBoard scalars of its other numbers)."""
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
        """Flush and close the TensorBoard writer (metrics.jsonl is closed after every record)."""
        if self._tb:
            self._tb.close()
