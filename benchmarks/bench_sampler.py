"""GEKOSampler costs: plan + repartition at 10M, iteration vs RandomSampler, DataLoader through wrap().

    python benchmarks/bench_sampler.py [--quick] [--rounds 7] [--loaders-only]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import best_of, table, verdict  # noqa: E402

from geko_data.config import GEKOConfig  # noqa: E402
from geko_data.sampler import GEKOSampler  # noqa: E402


class Images(Dataset):
    """An image item: a 3x96x96 float tensor normalized on access (what a decode + transform costs, roughly)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        img = torch.randint(0, 256, (3, 96, 96), generator=g, dtype=torch.uint8).float()
        return {"pixels": (img - img.mean()) / (img.std() + 1e-6), "labels": i % 10}


class KeysOnly(Dataset):
    """The same two keys added by a plain wrapper, without GEKO: isolates what the keys themselves cost."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        item = dict(self.ds[i])
        item["__index__"], item["__weight__"] = i, 1.0
        return item


class Tokens(Dataset):
    """A tokenized-text item: ``length`` int64 token ids and a label, built on access as real items are."""

    def __init__(self, n, length):
        self.n, self.length = n, length

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"input_ids": torch.randint(0, 32000, (self.length,), generator=g), "labels": i % 10}


def interleaved_medians(loaders: dict, rounds: int) -> dict:
    """Median seconds of one pass over each loader, the loaders taking turns in every round: a busy spell
    of the machine slows every loader of that round, not one of them."""
    import statistics

    times: dict = {k: [] for k in loaders}
    for _ in range(rounds):
        for k, dl in loaders.items():
            t0 = time.perf_counter()
            sum(1 for _ in dl)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=7, help="interleaved passes over each DataLoader (median)")
    p.add_argument("--loaders-only", action="store_true", help="only the DataLoader rows")
    ns = p.parse_args()
    big = 1_000_000 if ns.quick else 10_000_000
    rows = []
    quiet = GEKOConfig(log_bucket_stats=False)
    if not ns.loaders_only:
        rows += planning_rows(big, quiet)
    dataloader_rows(rows, quiet, ns)
    print(table(f"bench_sampler ({os.cpu_count()} CPUs)", rows))


def planning_rows(big: int, quiet: GEKOConfig) -> list:
    rows = []
    s = GEKOSampler(big, total_epochs=3, config=quiet)
    rng = np.random.default_rng(0)
    s.state.report(np.arange(big), rng.exponential(1.0, big))
    t0 = time.perf_counter()
    s.set_epoch(1)  # repartition + plan + order + publish to shared memory
    t = time.perf_counter() - t0
    rows.append((f"set_epoch (repartition + plan), {big:,}", f"{t:.2f} s", "<= 1 s at 10M", verdict(t <= 1.0)))

    n = 200_000
    g = GEKOSampler(n, total_epochs=1, config=quiet)
    g.set_epoch(0)
    r = RandomSampler(range(n), generator=torch.Generator().manual_seed(0))
    t_geko = best_of(lambda: sum(1 for _ in g))
    t_rand = best_of(lambda: sum(1 for _ in r))
    rows.append((f"iterate {n:,} indices", f"{t_geko:.3f} s vs RandomSampler {t_rand:.3f} s "
                 f"({t_geko / t_rand:.2f}x)", "<= 1.5x", verdict(t_geko / t_rand <= 1.5)))
    return rows


def dataloader_rows(rows: list, quiet: GEKOConfig, ns: argparse.Namespace) -> None:

    # Two extra tensors per batch (__index__, __weight__) cross the worker queue: a fixed cost per batch
    # (about 1 ms here) that matters for cheap items and fades for real ones. The plain wrapper adding the
    # same keys without GEKO shows what is the keys' cost and what is GEKO's.
    for name, ds, goal in (("image items (3x96x96)", Images(4_000), True), ("token items (512)", Tokens(20_000, 512),
                                                                              False)):
        m = len(ds)
        gs = GEKOSampler(ds, total_epochs=1, config=quiet)
        gs.set_epoch(0)
        loaders = {
            "wrap": DataLoader(gs.wrap(ds), batch_size=32, sampler=gs, num_workers=2, persistent_workers=True),
            "bare": DataLoader(ds, batch_size=32, shuffle=True, num_workers=2, persistent_workers=True),
            "keys": DataLoader(KeysOnly(ds), batch_size=32, shuffle=True, num_workers=2, persistent_workers=True),
        }
        for dl in loaders.values():
            sum(1 for _ in dl)  # start the workers
        t = interleaved_medians(loaders, ns.rounds)
        ratio = t["bare"] / t["wrap"]
        rows.append((f"DataLoader, {m:,} {name}, 2 workers",
                     f"{m / t['wrap']:,.0f}/s through wrap vs {m / t['bare']:,.0f}/s bare ({ratio:.2f}x); "
                     f"plain wrapper adding the same keys {m / t['keys']:,.0f}/s",
                     ">= 0.9x" if goal else "(cheap items)", verdict(ratio >= 0.9) if goal else ""))


if __name__ == "__main__":
    main()
