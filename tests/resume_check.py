"""One reusable resume check (torchdata's ``run_test_save_load_state`` style).

``make`` builds a fresh (data, loader) pair: ``data`` has set_epoch / state_dict(consumed=) /
load_state_dict; ``loader`` iterates batches of dicts carrying ``__index__``. The check runs an
uninterrupted reference, then for each stop point (start, mid-epoch, end of epoch) stops, round-trips
the state through ``json.dumps``, resumes in a fresh pair and compares what follows, reporting missing,
duplicate and out-of-order samples separately.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Callable


def _ids(batch: Any) -> list[int]:
    if isinstance(batch, dict):
        return [int(i) for i in batch["__index__"]]
    return [int(s["__index__"]) for s in batch]


def run_epochs(data: Any, loader: Any, epochs: range, stop_after: int | None = None) -> tuple[list[list[int]], dict]:
    """Ids per epoch; with ``stop_after`` stop after that many samples of the first epoch and return its state."""
    out, state = [], {}
    for epoch in epochs:
        data.set_epoch(epoch)
        seen: list[int] = []
        for batch in loader:
            seen += _ids(batch)
            if stop_after is not None and epoch == epochs[0] and len(seen) >= stop_after:
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


def check_resume(make: Callable[[], tuple[Any, Any]], *, epochs: int = 2, batch_size: int) -> None:
    """Assert that resuming at start, mid-epoch and end of epoch 0 continues exactly."""
    data, loader = make()
    reference, _ = run_epochs(data, loader, range(epochs))
    first = reference[0]
    for stop in (batch_size, (len(first) // (2 * batch_size)) * batch_size or batch_size, len(first)):
        data, loader = make()
        partial, state = run_epochs(data, loader, range(epochs), stop_after=stop)
        assert partial[0] == first[:len(partial[0])]
        data2, loader2 = make()
        data2.load_state_dict(state)
        rest, _ = run_epochs(data2, loader2, range(0, epochs))
        got_epoch0 = partial[0] + rest[0]
        report = compare(first, got_epoch0)
        assert report == {"missing": [], "duplicate": [], "out_of_order": False}, (stop, report)
        for e in range(1, epochs):  # the epoch after a resume is the same too
            assert compare(reference[e], rest[e]) == {"missing": [], "duplicate": [], "out_of_order": False}
