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


def _workers_cpu(dl: DataLoader) -> float:
    """CPU seconds (user + system) the persistent workers of ``dl`` have used so far (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for w in getattr(getattr(dl, "_iterator", None), "_workers", []):
        fields = open(f"/proc/{w.pid}/stat").read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def interleaved_medians(loaders: dict, rounds: int) -> dict:
    """Median (wall s, main-process CPU s, workers' CPU s) of one pass over each loader, the loaders taking
    turns in every round, in reverse order every other round: a busy spell of the machine slows every loader
    of that round, not one of them, nor always the same one. The CPU times do not count the time other work
    on the machine took."""
    import statistics

    times: dict = {k: [] for k in loaders}
    for r in range(rounds):
        for k, dl in list(loaders.items())[::1 if r % 2 else -1]:
            t0, c0, w0 = time.perf_counter(), time.process_time(), _workers_cpu(dl)
            sum(1 for _ in dl)
            times[k].append((time.perf_counter() - t0, time.process_time() - c0, _workers_cpu(dl) - w0))
    return {k: tuple(statistics.median(col) for col in zip(*v)) for k, v in times.items()}


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

    # wrap's two columns (__index__, __weight__) travel inside a worker's pickled batch, not as two more
    # shared-memory tensors (a segment and a file descriptor each); the plain wrapper adds the same keys
    # without GEKO and sends them the default way, which shows what that transport costs.
    for name, ds in (("image items (3x96x96)", Images(4_000)), ("token items (512)", Tokens(20_000, 512))):
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
        ratio = t["bare"][0] / t["wrap"][0]
        cpu = {k: v[1] + v[2] for k, v in t.items()}
        rows.append((f"DataLoader, {m:,} {name}, 2 workers, batch 32",
                     f"{m / t['wrap'][0]:,.0f}/s through wrap vs {m / t['bare'][0]:,.0f}/s bare ({ratio:.2f}x); "
                     f"plain wrapper adding the same keys {m / t['keys'][0]:,.0f}/s ({t['bare'][0] / t['keys'][0]:.2f}x). "
                     f"CPU s a pass (main + workers): wrap {t['wrap'][1]:.2f} + {t['wrap'][2]:.2f}, "
                     f"bare {t['bare'][1]:.2f} + {t['bare'][2]:.2f}, plain wrapper {t['keys'][1]:.2f} + "
                     f"{t['keys'][2]:.2f} (bare/wrap {cpu['bare'] / cpu['wrap']:.2f}x)",
                     ">= 0.9x", verdict(ratio >= 0.9)))


if __name__ == "__main__":
    main()
