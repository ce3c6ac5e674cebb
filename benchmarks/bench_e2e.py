"""End to end: does skipping frozen samples reach the training loop's clock?

The reference loop (``geko_data.train.train``) trains a small real model, an MLP over 4,096 float32
features read from WebDataset shards (16 KB a sample, 2 DataLoader workers, batch 64), for one epoch with
0%, 50% and 90% of the samples FREEZE (16,000 samples, 256 MB). The frozen share is set by writing the state as a repartition
leaves it (``recheck_frozen=0``, ``short_run_keep=None``: frozen samples are not read at all), as ``bench_stream.py`` does. The
model is small enough that reading and decoding are a real part of a step, as in a fine-tune whose
batches are cheap next to their I/O.

Epoch wall time is measured from the ``train()`` call to the loop's end-of-epoch line (so it includes
starting the DataLoader workers and planning the epoch, which a user's clock includes too); the runs of
the three shares are interleaved, after one discarded warm-up run, and the medians are compared. After each
run the same DataLoader is drained with no model, to show what the epoch spends reading. The goals are judged
with ``batches="fixed"`` (an epoch that skips samples takes fewer batches of 64): that is the I/O and compute
saving reaching the clock. With ``batches="steps"`` (``TrainArgs``' default) the epoch keeps its 250
optimizer steps in smaller batches, so the per-step cost (the optimizer's update, Python) stays; those
rows show what a user of that default sees.

    python benchmarks/bench_e2e.py [--quick] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import table, verdict  # noqa: E402

from geko_data import policy  # noqa: E402
from geko_data.config import GEKOConfig  # noqa: E402
from geko_data.shards import write_shards  # noqa: E402
from geko_data.stream import GEKOStream  # noqa: E402
from geko_data.train import TrainArgs, train  # noqa: E402
from geko_data.train.collate import pad_collate  # noqa: E402

FEATURES, CLASSES, BATCH = 4096, 10, 64
#: frozen share -> the goal for its epoch wall time as a share of the 0% epoch's
GOALS = {0.5: 0.55, 0.9: 0.2}
# short_run_keep=None: FREEZE samples are not drawn (a 1-epoch run would otherwise train half of them)
CFG = GEKOConfig(recheck_frozen=0.0, log_bucket_stats=False, short_run_keep=None)


class MLP(torch.nn.Module):
    """4096 -> 64 -> 10: 263k weights; forward, backward and AdamW step of a batch of 64 take about 3 ms of CPU."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(FEATURES, 64), torch.nn.ReLU(), torch.nn.Linear(64, CLASSES))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x)


def decode(sample: dict) -> dict:
    """The sample's bytes as features (float32) and its class: the work a real decoder does per sample."""
    return {"x": torch.from_numpy(np.frombuffer(sample["bin"], dtype=np.float32).copy()),
            "labels": int(sample["cls"])}


def write_data(folder: str, n: int) -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(CLASSES, FEATURES)).astype(np.float32)

    def samples():
        for i in range(n):
            x = centers[i % CLASSES] + rng.normal(size=FEATURES).astype(np.float32)
            yield {"__key__": f"s{i:07d}", "bin": x.tobytes(), "cls": str(i % CLASSES).encode()}

    write_shards(samples(), os.path.join(folder, "shard-%04d.tar"), maxcount=1000)


def frozen_stream(folder: str, share: float) -> GEKOStream:
    """The shards' stream with ``share`` of the samples (a seeded random choice) FREEZE, epoch 0 not planned."""
    stream = GEKOStream(folder, total_epochs=1, config=CFG, decode=decode, batch_size=BATCH)
    n = len(stream.state)
    frozen = np.random.default_rng(1).permutation(n)[: int(share * n)]
    stream.state.bucket[frozen] = policy.FREEZE  # as a repartition leaves it
    stream.state.epoch = 0
    return stream


def read_only(folder: str, share: float) -> float:
    """Wall time of planning the epoch and draining the same DataLoader with no model: the reading alone."""
    stream = frozen_stream(folder, share)
    t0 = time.perf_counter()
    stream.set_epoch(0)
    for _ in DataLoader(stream, batch_size=BATCH, num_workers=2, collate_fn=pad_collate):
        pass
    return time.perf_counter() - t0


def one_epoch(folder: str, out: str, share: float, batches: str = "fixed") -> tuple[float, float, int, int]:
    """(epoch wall time, train() wall time, samples trained, optimizer steps) of one epoch with ``share`` of
    the data FREEZE; ``batches``: ``TrainArgs.batches`` (``steps`` keeps a full epoch's 250 steps in smaller
    batches, ``fixed`` takes batches of 64 and so fewer steps)."""
    stream = frozen_stream(folder, share)
    args = TrainArgs(output_dir=out, num_epochs=1, batch_size=BATCH, learning_rate=1e-3, warmup_steps=0,
                     save_steps=0, save_at_end=False, logging_steps=1000, progress=False, dataloader_num_workers=2,
                     batches=batches)
    ended: list[float] = []

    def log(message: str) -> None:
        if message.startswith("[Epoch 1]"):
            ended.append(time.perf_counter())

    t0 = time.perf_counter()
    result = train(MLP(), stream, args=args, config=CFG, log=log)
    total = time.perf_counter() - t0
    return ended[0] - t0, total, int(result.efficiency["forward_passes_rank"]), int(result.step)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4,000 samples, 3 repeats (a smoke run)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved runs per share (default 5, quick 3)")
    ns = p.parse_args()
    n = 4_000 if ns.quick else 16_000
    repeats = ns.repeats or (3 if ns.quick else 5)
    if repeats < 1:
        p.error(f"--repeats must be >= 1, got {repeats}")
    shares = (0.0, *GOALS)
    # One compute thread in the training process: the 2 DataLoader workers have the other core. With torch's
    # default of one thread per core, the busy workers (and any other load) stall its OpenMP threads, and a
    # 64 x 10 softmax takes 15 ms instead of 0.1 ms: the epoch would measure that stall, not the pipeline.
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        data = os.path.join(d, "shards")
        write_data(data, n)
        one_epoch(data, os.path.join(d, "warmup"), 0.0)  # imports, page cache: not measured
        runs = [(share, batches) for batches in ("fixed", "steps") for share in shares]
        epoch: dict[tuple[float, str], list[float]] = {k: [] for k in runs}
        whole: dict[tuple[float, str], list[float]] = {k: [] for k in runs}
        reading: dict[float, list[float]] = {s: [] for s in shares}
        trained: dict[tuple[float, str], tuple[int, int]] = {}
        for r in range(repeats):
            for share, batches in runs:
                e, t, k, steps = one_epoch(data, os.path.join(d, f"run-{r}-{share}-{batches}"), share, batches)
                epoch[(share, batches)].append(e)
                whole[(share, batches)].append(t)
                trained[(share, batches)] = (k, steps)
                line = (f"run {r}: {share:.0%} frozen, batches={batches}: epoch {e:.2f} s, train() {t:.2f} s, "
                        f"{k} samples trained in {steps} steps")
                if batches == "fixed":
                    reading[share].append(read_only(data, share))
                    line += f"; reading alone {reading[share][-1]:.2f} s"
                print(line, flush=True)
    med = {k: statistics.median(v) for k, v in epoch.items()}
    rows = []
    for batches in ("fixed", "steps"):
        base = med[(0.0, batches)]
        k, steps = trained[(0.0, batches)]
        rows.append((f"batches={batches}: epoch, 0% frozen ({k:,} samples, {steps} steps)",
                     f"{base:.2f} s (train() {statistics.median(whole[(0.0, batches)]):.2f} s)", "(baseline)", ""))
        for share, goal in GOALS.items():
            ratio = med[(share, batches)] / base
            k, steps = trained[(share, batches)]
            rows.append((f"batches={batches}: epoch, {share:.0%} frozen ({k:,} samples, {steps} steps) vs 0%",
                         f"{med[(share, batches)]:.2f} s vs {base:.2f} s ({ratio:.2f}x; train() "
                         f"{statistics.median(whole[(share, batches)]) / statistics.median(whole[(0.0, batches)]):.2f}x)",
                         f"<= {goal}x" if batches == "fixed" else "(steps kept: the per-step cost stays)",
                         verdict(ratio <= goal) if batches == "fixed" else ""))
    read = {s: statistics.median(reading[s]) for s in shares}
    rows.append(("reading alone (the same DataLoader, no model): 0% / 50% / 90% frozen",
                 f"{read[0.0]:.2f} s / {read[0.5]:.2f} s ({read[0.5] / read[0.0]:.2f}x) / {read[0.9]:.2f} s "
                 f"({read[0.9] / read[0.0]:.2f}x)", "(what the epochs above spend reading)", ""))
    print(table(f"bench_e2e: reference loop, MLP on {n:,} x 16 KB samples, 2 workers, batch {BATCH}, "
                f"medians of {repeats} interleaved runs ({os.cpu_count()} CPUs)", rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
