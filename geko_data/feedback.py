"""The feedback API a training loop calls: ``feedback.report(ids, losses, correct=None, confidence=None)``.

In one process it scatters into the ``SampleState``. Under torch.distributed
(world size > 1) it first all-gathers every rank's report, so every rank
applies the same rows in the same (rank) order and holds identical state;
the next epoch's plan is then identical everywhere without any broadcast.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from geko_data.state import SampleState

__all__ = ["Feedback"]


def _dist_group_size(group: Any) -> int:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return 1
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class Feedback:
    """Reports per-sample results into a ``SampleState``, all-gathering across ranks when needed.

    Args:
        state: the state to update.
        group: torch.distributed process group. Defaults to ``None`` (the default group).
        distributed: gather across ranks; ``None`` means "when torch.distributed is initialised with
            world size > 1". Defaults to ``None``.
    """

    def __init__(self, state: SampleState, *, group: Any = None, distributed: bool | None = None) -> None:
        if not isinstance(state, SampleState):
            raise TypeError(f"`state` must be a SampleState, got {type(state).__name__}")
        self.state = state
        self.group = group
        self.distributed = distributed
        self.num_reports = 0
        self.num_rows = 0

    def _world(self) -> int:
        if self.distributed is False:
            return 1
        return _dist_group_size(self.group)

    def report(self, ids: Any, losses: Any, *, correct: Any = None, confidence: Any = None,
               answer: Any = None, step: int | None = None) -> int:
        """Apply one batch of results (1-D arrays, tensors or lists of equal length); returns rows applied.

        Under torch.distributed every rank must call this the same number of times (it is a collective).
        """
        world = self._world()
        if world == 1:
            rows = self.state.report(ids, losses, correct=correct, confidence=confidence, answer=answer,
                                     step=step)
        else:
            rows = self._report_distributed(ids, losses, correct, confidence, answer, step)
        self.num_reports += 1
        self.num_rows += rows
        return rows

    __call__ = report

    def _report_distributed(self, ids: Any, losses: Any, correct: Any, confidence: Any, answer: Any,
                            step: int | None) -> int:
        import torch
        import torch.distributed as dist

        error: Exception | None = None
        try:
            prepared = self.state.prepare(ids, losses, correct=correct, confidence=confidence, answer=answer)
        except (ValueError, TypeError) as e:
            error, prepared = e, None
        # rows: (n, 5) float64 = id, loss, correct, confidence, answer (-1: none reported); ids < 2**53 and
        # answers < 2**32 are exact in float64.
        if prepared is None:
            rows = np.zeros((0, 5), dtype=np.float64)
        else:
            *columns, answers = prepared
            rows = np.stack([a.astype(np.float64) for a in columns]
                            + [np.full(columns[0].shape[0], -1.0) if answers is None else answers.astype(np.float64)],
                            axis=1)
        device = torch.device("cpu")
        if dist.get_backend(self.group) == "nccl":  # NCCL only moves CUDA tensors
            device = torch.device("cuda", torch.cuda.current_device())
        world = dist.get_world_size(self.group)
        header = torch.tensor([rows.shape[0], int(error is not None)], dtype=torch.int64, device=device)
        headers = [torch.empty_like(header) for _ in range(world)]
        dist.all_gather(headers, header, group=self.group)
        headers_np = torch.stack(headers).cpu().numpy()  # (world, 2)
        if headers_np[:, 1].any():
            bad = [r for r in range(world) if headers_np[r, 1]]
            if error is not None:
                raise error
            raise ValueError(f"feedback.report got bad input on rank(s) {bad}; see the error there")
        longest = int(headers_np[:, 0].max())
        padded = np.zeros((longest, 5), dtype=np.float64)
        padded[:rows.shape[0]] = rows
        local = torch.from_numpy(padded).to(device)
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local, group=self.group)
        all_rows = np.concatenate([g.cpu().numpy()[:n] for g, n in zip(gathered, headers_np[:, 0])])
        answers = all_rows[:, 4]
        if (answers < 0).all():  # no rank reported answers
            answers = None
        elif (answers < 0).any():  # answers from some ranks only: a loop reports them everywhere or nowhere
            raise ValueError("feedback.report got `answer` on some ranks and not on others; pass it on every rank")
        else:
            answers = answers.astype(np.uint32)
        return self.state.apply(all_rows[:, 0].astype(np.int64), all_rows[:, 1].astype(np.float32),
                                all_rows[:, 2].astype(bool), all_rows[:, 3].astype(np.float32), answers, step=step)
