"""GEKOSampler at scale: time and peak memory of each step of a run at 10M (and 100M) samples.

    python benchmarks/bench_scale.py [--sizes 10M,100M] [--stream 10M]

Steps, in one process per size (so each size's peak memory is its own): construct the sampler, the first
set_epoch, report half the samples in 10 chunks, set_epoch (repartition + plan), iterate the first
million indices, save the state, load it memory-mapped. Peak RSS is sampled every 5 ms by a thread (and
checked against ``ru_maxrss``); "peak" is the highest RSS seen during the step, "held" what is left after
it. ``--stream SIZE`` adds GEKOStream over a shard index of SIZE samples: opening it, the memory it adds,
and what a spawned DataLoader worker receives.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import table, verdict  # noqa: E402

#: Goals at 100M samples, on this project's 2-core machine.
GOALS_100M = {"set_epoch": 5.0, "report": 8.0, "save": 4.0, "load": 0.5}
PEAK_GOAL_BYTES_100M = 6e9


def rss() -> int:
    """Resident set size of this process in bytes (/proc: anonymous plus file-backed pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_anon() -> int:
    """Anonymous resident memory of this process in bytes (what a memory-mapped file's pages are not)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Highest RSS seen while the ``with`` block runs (sampled every 5 ms by a thread)."""

    def __enter__(self) -> "PeakRSS":
        self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def run_size(n: int) -> list[tuple[str, float, int, int, float]]:
    """(step, seconds, peak RSS, RSS after, CPU seconds) of every step of a run of ``n`` samples."""
    from geko_data.config import GEKOConfig
    from geko_data.sampler import GEKOSampler
    from geko_data.state import SampleState

    steps: list[tuple[str, float, int, int, float]] = []

    def step(name, fn):
        gc.collect()
        with PeakRSS() as p:
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        steps.append((name, dt, p.peak, rss(), cpu))
        return out

    import warnings

    warnings.simplefilter("ignore")  # the coverage warning: this run reports half the samples on purpose
    config = GEKOConfig(log_bucket_stats=False)
    sampler = step("construct", lambda: GEKOSampler(n, total_epochs=3, config=config))
    step("set_epoch(0) (all unseen)", lambda: sampler.set_epoch(0))
    rng = np.random.default_rng(0)
    half, chunk = n // 2, n // 20
    # Distinct ids scattered over the state, made a chunk at a time: the benchmark's own arrays stay small.
    stride = next(p for p in range(1_000_003, 2 * n + 1_000_003, 2) if np.gcd(p, n) == 1)
    chunks = [((np.arange(a, min(a + chunk, half), dtype=np.int64) * stride) % n,
               rng.exponential(0.5, min(chunk, half - a)).astype(np.float32)) for a in range(0, half, chunk)]

    def report():
        while chunks:
            sampler.report(*chunks.pop(0))

    step(f"report {half:,} ids in chunks of {chunk:,}", report)
    step("set_epoch(1) (repartition + plan)", lambda: sampler.set_epoch(1))

    first = min(1_000_000, len(sampler))

    def iterate():
        it = iter(sampler)
        for _ in range(first):
            next(it)

    step(f"iterate the first {first:,} indices", iterate)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        path = os.path.join(d, "state.arrow")
        step("save", lambda: sampler.state.save(path))
        size = os.path.getsize(path)
        del sampler
        gc.collect()
        anon = rss_anon()
        loaded = step("load (memory map, checksum verified)", lambda: SampleState.load(path))
        steps.append(("memory a loaded state adds (anonymous, not the file's pages)", 0.0, rss_anon() - anon, 0, 0.0))
        del loaded
        step("load (memory map, verify=False)", lambda: SampleState.load(path, verify=False))
    steps.append(("file size", 0.0, size, 0, 0.0))
    steps.append(("peak RSS of the whole run (ru_maxrss)", 0.0,
                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 0, 0.0))
    return steps


def run_stream(n: int) -> list[tuple[str, float, int, int, float]]:
    """GEKOStream over a shard index of ``n`` samples: opening the index, building the stream, and what a
    spawned DataLoader worker receives (the pickled stream). The index is synthetic (1,000 shards named but
    not written: opening reads only the index), so no tar of ``n`` samples is needed."""
    import pickle

    from geko_data import shards as sh
    from geko_data.config import GEKOConfig
    from geko_data.stream import GEKOStream

    steps: list[tuple[str, float, int, int, float]] = []
    per = -(-n // 1000)
    shard = (np.arange(n) // per).astype(np.int32)
    offset = (np.arange(n) % per).astype(np.int64) * 1024
    hashes = np.arange(n, dtype=np.uint64)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        names = [os.path.join(d, f"s{i:04d}.tar") for i in range(1000)]
        sizes = [int(np.count_nonzero(shard == i)) * 1024 + 1024 for i in range(1000)]
        index = sh.ShardIndex(shards=tuple(names), sizes=tuple(sizes), keys=np.array([f"k{i:09d}" for i in range(n)],
                              dtype=object), shard=shard, offset=offset, length=np.full(n, 1024, np.int64),
                              fingerprint=sh.fingerprint(names, sizes, n, hashes=hashes), hashes=hashes)
        for name, size in zip(names, sizes):  # sparse files of the indexed sizes: opening checks them
            with open(name, "wb") as f:
                f.truncate(size)
        path = os.path.join(d, sh.INDEX_NAME)
        sh._write_index(index, path)
        del index, shard, offset, hashes
        gc.collect()
        before = rss()
        with PeakRSS() as p:
            t0, c0 = time.perf_counter(), time.process_time()
            stream = GEKOStream(path, total_epochs=3, config=GEKOConfig(log_bucket_stats=False), verify=False)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        steps.append((f"GEKOStream over a {n:,}-sample index: open (index + state)", dt, p.peak, rss(), cpu))
        steps.append(("memory the open stream adds", 0.0, rss() - before, 0, 0.0))
        t0 = time.perf_counter()
        size = len(pickle.dumps(stream, protocol=pickle.HIGHEST_PROTOCOL))
        steps.append(("bytes a spawned DataLoader worker receives (pickled stream)", time.perf_counter() - t0, size,
                      0, 0.0))
    return steps


def goal_of(name: str, n: int) -> float | None:
    """The goal of a step at 100M samples (other sizes have none: fixed costs do not scale with N)."""
    if n != 100_000_000:
        return None
    for key, seconds in GOALS_100M.items():
        if name.startswith(key) and "(0)" not in name and "verify=False" not in name:
            return seconds
    return None


def report_size(n: int, steps: list[tuple[str, float, int, int, float]]) -> str:
    rows = []
    gb = 1e9
    for name, dt, peak, held, cpu in steps:
        if name in ("file size", "memory the open stream adds") or name.startswith(("memory a loaded", "bytes a")):
            rows.append((name, f"{peak / gb:.2f} GB", "", ""))
            continue
        if name.startswith("peak RSS"):
            ok = peak <= PEAK_GOAL_BYTES_100M
            rows.append((name, f"{peak / gb:.2f} GB", *(("<= 6 GB", verdict(ok)) if n == 100_000_000 else ("", ""))))
            continue
        goal = goal_of(name, n)
        rows.append((name, f"{dt:.2f} s, CPU {cpu:.2f} s (peak {peak / gb:.2f} GB, held {held / gb:.2f} GB)",
                     "" if goal is None else f"<= {goal:.2g} s", "" if goal is None else verdict(dt <= goal)))
    return table(f"bench_scale, {n:,} samples ({os.cpu_count()} CPUs)", rows)


def parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1_000, "M": 1_000_000, "G": 1_000_000_000}.get(text[-1:], 1)
    value = int(float(text.rstrip("KMG")) * mult)
    if value < 1000:
        raise argparse.ArgumentTypeError(f"a size must be at least 1000 samples, got {text!r}")
    return value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10M", help="comma-separated sample counts (e.g. 10M,100M); default 10M")
    p.add_argument("--one", type=parse_size, help=argparse.SUPPRESS)  # a child process: run one size
    p.add_argument("--stream-one", type=parse_size, help=argparse.SUPPRESS)
    p.add_argument("--stream", type=parse_size, metavar="SIZE",
                   help="also GEKOStream over a shard index of SIZE samples (its keys are Python strings: about "
                        "70 bytes a sample while building and opening it)")
    ns = p.parse_args()
    if ns.one:
        print(report_size(ns.one, run_size(ns.one)), flush=True)
        return
    if ns.stream_one:
        print(report_size(ns.stream_one, run_stream(ns.stream_one)), flush=True)
        return
    children = [["--one", str(parse_size(s))] for s in ns.sizes.split(",")]
    children += [["--stream-one", str(ns.stream)]] if ns.stream else []
    for argv in children:  # one process per run, so each peak is its own
        subprocess.run([sys.executable, os.path.abspath(__file__), *argv], check=True)
        print()


if __name__ == "__main__":
    main()
