"""One reusable resume check (torchdata's ``run_test_save_load_state`` style).

``make`` builds a fresh (data, loader) pair: ``data`` has set_epoch / state_dict(consumed=) /
load_state_dict / report / use_state; ``loader`` iterates batches of dicts carrying ``__index__``. The
check runs an uninterrupted reference, then for each stop point (start, mid-epoch, end of the stop epoch)
stops, round-trips the position through ``json.dumps`` (and, with ``state_dir``, the per-sample state
through its Arrow file), resumes in a fresh pair and compares what follows, reporting missing, duplicate
and out-of-order samples separately.

With ``state_dir`` every batch reports losses that make some samples freeze after epoch 0 and then
forget (their re-check turns wrong), so the state moves *during* the epochs the check stops in: the
resume must continue the plan the epoch started with, not one recomputed from the moved state.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any, Callable

import numpy as np

from geko_data.state import SampleState


def _ids(batch: Any) -> list[int]:
    if isinstance(batch, dict):
        return [int(i) for i in batch["__index__"]]
    return [int(s["__index__"]) for s in batch]


def feedback_for(ids: list[int], epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic (ids, losses, correct, confidence): every 3rd sample is mastered in epoch 0 (it will
    freeze) and forgotten from epoch 1 on; the others are wrong or unsure."""
    a = np.asarray(ids, dtype=np.int64)
    mastered = a % 3 == 0
    loss = np.where(mastered, 0.01 if epoch == 0 else 3.0, 0.5 + (a % 7) / 4.0)
    correct = np.where(mastered, epoch == 0, a % 2 == 0)
    return a, loss.astype(np.float32), correct, np.exp(-loss).astype(np.float32)


def run_epochs(data: Any, loader: Any, epochs: range, stop_after: int | None = None, *, stop_epoch: int = 0,
               report: bool = False) -> tuple[list[list[int]], dict]:
    """Ids per epoch; with ``stop_after`` stop after that many samples of ``stop_epoch`` and return its state."""
    out, state = [], {}
    for epoch in epochs:
        data.set_epoch(epoch)
        seen: list[int] = []
        for batch in loader:
            ids = _ids(batch)
            seen += ids
            if report:
                a, loss, correct, conf = feedback_for(ids, epoch)
                data.report(a, loss, correct=correct, confidence=conf)
            if stop_after is not None and epoch == stop_epoch and len(seen) >= stop_after:
                state = json.loads(json.dumps(data.state_dict(consumed=len(seen))))
                out.append(seen)
                return out, state
        out.append(seen)
    return out, state


def compare(expected: list[int], got: list[int]) -> dict[str, Any]:
    """Missing, duplicate and out-of-order samples of ``got`` against ``expected``, separately."""
    e, g = Counter(expected), Counter(got)
    missing = sorted((e - g).elements())
    duplicate = sorted((g - e).elements())
    out_of_order = not missing and not duplicate and expected != got
    return {"missing": missing, "duplicate": duplicate, "out_of_order": out_of_order}


_SAME = {"missing": [], "duplicate": [], "out_of_order": False}


def check_resume(make: Callable[[], tuple[Any, Any]], *, epochs: int = 2, batch_size: int,
                 state_dir: str | os.PathLike | None = None, stop_epoch: int = 0) -> None:
    """Assert that resuming at the start, middle and end of ``stop_epoch`` continues exactly.

    With ``state_dir`` the loop reports feedback and the resumed pair continues from the state file saved
    at the stop (as a checkpoint would), and the final states must agree column by column.
    """
    report = state_dir is not None
    data, loader = make()
    reference, _ = run_epochs(data, loader, range(epochs), report=report)
    ref_state = data.state
    target = reference[stop_epoch]
    for stop in (batch_size, (len(target) // (2 * batch_size)) * batch_size or batch_size, len(target)):
        data, loader = make()
        partial, position = run_epochs(data, loader, range(epochs), stop_after=stop, stop_epoch=stop_epoch,
                                       report=report)
        assert partial[:stop_epoch] == reference[:stop_epoch]
        assert partial[stop_epoch] == target[:len(partial[stop_epoch])]
        data2, loader2 = make()
        if report:
            path = os.path.join(os.fspath(state_dir), f"state-{stop}.arrow")
            data.state.save(path)
            data2.use_state(SampleState.load(path))
        data2.load_state_dict(position)
        rest, _ = run_epochs(data2, loader2, range(stop_epoch, epochs), report=report)
        got = partial[stop_epoch] + rest[0]
        result = compare(target, got)
        assert result == _SAME, (stop, result)
        for e in range(stop_epoch + 1, epochs):  # the epochs after a resume are the same too
            assert compare(reference[e], rest[e - stop_epoch]) == _SAME, (stop, e)
        if report:
            for name in ("loss", "bucket", "times_seen", "forgets", "q"):
                np.testing.assert_array_equal(getattr(data2.state, name), getattr(ref_state, name), err_msg=name)
