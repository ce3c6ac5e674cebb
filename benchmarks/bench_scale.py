"""GEKOSampler at scale: time and peak memory of each step of a run at 10M (and 100M) samples.

    python benchmarks/bench_scale.py [--sizes 10M,100M] [--stream 10M]

Steps, in one process per size (so each size's peak memory is its own): construct the sampler, the first
set_epoch, report half the samples in 10 chunks, set_epoch (repartition + plan), iterate the first
million indices, shuffle the rest of the epoch's order (set_epoch deals it into blocks; the iterator
shuffles each block as it reaches it), save the state, load it memory-mapped. Peak RSS is sampled every 5 ms by a thread (and
checked against ``ru_maxrss``); "peak" is the highest RSS seen during the step, "held" what is left after
it. ``--stream SIZE`` adds GEKOStream over a shard index of SIZE samples: reading the index and opening the
stream (time and memory), what a spawned DataLoader worker receives and what it costs in memory. ``--sizes ''``
skips the sampler runs.
"""

from __future__ import annotations

import argparse
import gc
import itertools
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


def _kernel_seconds() -> float:
    """CPU seconds this process has spent in the kernel (system time)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def rss_anon() -> int:
    """Anonymous resident memory of this process in bytes (what a memory-mapped file's pages are not)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class _Count:
    """A file that only counts what is written to it (a pickle's size without holding it)."""

    def __init__(self) -> None:
        self.n = 0

    def write(self, b) -> int:
        self.n += len(b)
        return len(b)


#: Above this many samples the whole stream is not sent to a probe worker: its pickle (the state, 32 bytes a
#: sample) would be held by both processes at once.
_WHOLE_STREAM_PROBE_MAX = 20_000_000


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


def run_size(n: int) -> list[tuple[str, float, int, int, float, float]]:
    """(step, seconds, peak RSS, RSS after, CPU seconds, of them in the kernel) of every step of a run of
    ``n`` samples. The kernel's share is mostly page faults and the page cache: on a virtual machine whose
    host takes back freed memory, memory the process touches for the first time costs far more than memory
    it reuses."""
    from geko_data.config import GEKOConfig
    from geko_data.sampler import GEKOSampler
    from geko_data.state import SampleState

    steps: list[tuple[str, float, int, int, float, float]] = []

    def step(name, fn):
        gc.collect()
        with PeakRSS() as p:
            t0, c0, k0 = time.perf_counter(), time.process_time(), _kernel_seconds()
            out = fn()
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        steps.append((name, dt, p.peak, rss(), cpu, _kernel_seconds() - k0))
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
    ranked = getattr(sampler, "_order", None)
    if hasattr(ranked, "ready"):  # blocks shuffled as the iterator reaches them: the rest of the epoch's share
        step("shuffle the rest of the order (iterating the epoch does it a block at a time)",
             lambda: ranked.ready(len(ranked)))
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        path = os.path.join(d, "state.arrow")
        step("save", lambda: sampler.state.save(path))
        size = os.path.getsize(path)
        step("baseline: one plain write of as many bytes to a fresh file, fsynced",
             lambda: _plain_write(os.path.join(d, "plain.bin"), sampler.state._columns(), size))
        os.unlink(os.path.join(d, "plain.bin"))
        del sampler
        gc.collect()
        anon = rss_anon()
        loaded = step("load (memory map, checksum verified)", lambda: SampleState.load(path))
        steps.append(("memory a loaded state adds (anonymous, not the file's pages)", 0.0, rss_anon() - anon, 0, 0.0, 0.0))
        del loaded
        step("load (memory map, verify=False)", lambda: SampleState.load(path, verify=False))
    steps.append(("file size", 0.0, size, 0, 0.0, 0.0))
    steps.append(("peak RSS of the whole run (ru_maxrss)", 0.0,
                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 0, 0.0, 0.0))
    return steps


def _plain_write(path: str, columns: dict[str, np.ndarray], size: int) -> None:
    """Write ``size`` bytes taken from the state's own columns (no new memory) to ``path`` with plain
    ``write`` calls of 64 MB, then fsync: what putting a file of the state's size into the page cache costs
    on this machine in this run, the floor under ``save``."""
    step = 64 << 20
    parts = itertools.cycle([v[a:a + step] for v in map(lambda c: memoryview(c).cast("B"), columns.values())
                             for a in range(0, len(v), step)])
    left = size
    with open(path, "wb", buffering=0) as f:
        while left:
            left -= f.write(next(parts)[:left])
        os.fsync(f.fileno())


def _synthetic_index(folder: str, n: int) -> str:
    """Write a shard index of ``n`` samples over 1,000 shards (sparse files of the indexed sizes: opening an
    index reads only the index and checks the shards' sizes, so no tar of ``n`` samples is needed). The keys
    (``k000000000``...) are built as Arrow buffers, never as ``n`` Python strings."""
    import json

    import pyarrow as pa

    from geko_data import shards as sh

    per = -(-n // 1000)
    shard = (np.arange(n, dtype=np.int64) // per).astype(np.int32)
    names = [f"s{i:04d}.tar" for i in range(1000)]
    sizes = [int(c) * 1024 + 1024 for c in np.bincount(shard, minlength=1000)]
    for name, size in zip(names, sizes):
        with open(os.path.join(folder, name), "wb") as f:
            f.truncate(size)
    offset = np.arange(n, dtype=np.int64)
    for a in range(0, n, 1 << 22):  # offset = (id - first id of its shard) * 1024, a step at a time
        offset[a:a + (1 << 22)] -= shard[a:a + (1 << 22)].astype(np.int64) * per
    offset *= 1024
    digits = np.empty((n, 10), dtype=np.uint8)
    digits[:, 0] = ord("k")
    for a in range(0, n, 1 << 22):
        ids = np.arange(a, min(n, a + (1 << 22)), dtype=np.int64)
        for p in range(9, 0, -1):
            digits[a:a + ids.size, p] = ids % 10 + ord("0")
            ids //= 10
    large = 10 * n >= 2**31
    key_offsets = np.arange(0, 10 * n + 1, 10, dtype=np.int64 if large else np.int32)
    keys = pa.Array.from_buffers(pa.large_string() if large else pa.string(), n,
                                 [None, pa.py_buffer(key_offsets), pa.py_buffer(digits)])
    # One 16-byte digest a sample (format 3's BLAKE2b-128), distinct per sample: the id in the first 8 bytes.
    hashes = np.zeros((n, sh.HASH_BYTES), np.uint8)
    hashes[:, :8] = np.arange(n, dtype="<u8").view(np.uint8).reshape(n, 8)
    meta = {"format_version": sh.INDEX_VERSION, "shards": names, "sizes": sizes, "num_samples": n,
            "fingerprint": sh.fingerprint(names, sizes, n, hashes=hashes)}
    table = pa.table({"id": pa.array(np.arange(n, dtype=np.int64)), "key": keys, "shard": shard, "offset": offset,
                      "length": np.full(n, 1024, np.int64), "hash": sh._hash_column(hashes)}
                     ).replace_schema_metadata({sh._META_KEY: json.dumps(meta).encode()})
    path = os.path.join(folder, sh.INDEX_NAME)
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def _touch(index) -> int:
    """Read every byte of an index's columns (as a worker that reads every sample eventually does)."""
    import xxhash

    total = sum(int(np.asarray(c).sum(dtype=np.uint64)) for c in (index.shard, index.offset, index.length, index.hashes))
    keys = index.keys.arrow if hasattr(index.keys, "arrow") else None
    if keys is not None:  # a mapped index: its key bytes
        total += sum(xxhash.xxh3_64_intdigest(b) for b in keys.buffers() if b is not None)
    return total


def _worker_probe(blob: bytes, out) -> None:
    """A spawned process that receives a pickled stream (or index), as a DataLoader worker does, and reports
    what unpickling it costs, and what reading every index column once adds."""
    import torch.multiprocessing  # noqa: F401 - torch's reducers, as in a DataLoader worker
    from multiprocessing.reduction import ForkingPickler

    import geko_data.stream  # noqa: F401 - imported before the baseline, as in a worker

    r0, a0 = rss(), rss_anon()
    t0, c0 = time.perf_counter(), time.process_time()
    got = ForkingPickler.loads(blob)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    r1, a1 = rss(), rss_anon()
    _touch(getattr(got, "index", got))
    out.put((dt, cpu, r1 - r0, a1 - a0, rss() - r0, rss_anon() - a0))


def run_stream(n: int) -> list[tuple[str, str]]:
    """GEKOStream over a shard index of ``n`` samples: reading the index alone, then opening the stream, each
    in a fresh process (so neither reuses memory the other freed), and what a spawned DataLoader worker
    receives and costs. Pickle sizes are ``ForkingPickler``'s (what a DataLoader sends: torch's shared-memory
    tensors go as handles)."""
    import json

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        path = _synthetic_index(d, n)
        rows = [("index file", f"{os.path.getsize(path) / 1e9:.2f} GB")]
        for part in ("index", "stream"):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--stream-part", part, path],
                                 check=True, stdout=subprocess.PIPE, text=True).stdout
            rows += [tuple(r) for r in json.loads(out.splitlines()[-1])]
    return rows


def measure_stream_part(part: str, path: str) -> list[tuple[str, str]]:
    """``part`` "index": ``read_index(path)`` and a spawned worker given the pickled index; "stream": a
    GEKOStream over it and a spawned worker given the pickled stream."""
    import multiprocessing as mp

    import torch.multiprocessing  # noqa: F401 - registers torch's shared-memory reducers with ForkingPickler
    from multiprocessing.reduction import ForkingPickler

    from geko_data import shards as sh
    from geko_data.config import GEKOConfig
    from geko_data.stream import GEKOStream

    gb = 1e9
    rows: list[tuple[str, str]] = []

    def opened(what, fn):
        gc.collect()
        before, anon = rss(), rss_anon()
        with PeakRSS() as p:
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        rows.append((f"{what}: open", f"{dt:.2f} s, CPU {cpu:.2f} s"))
        rows.append((f"{what}: memory added, RSS (anonymous)",
                     f"{(rss() - before) / gb:.3f} GB ({(rss_anon() - anon) / gb:.3f} GB), peak {p.peak / gb:.2f} GB"))
        return out

    def probe(what, blob):
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        worker = ctx.Process(target=_worker_probe, args=(blob, out))
        worker.start()
        dt, cpu, r1, a1, r2, a2 = out.get(timeout=1800)
        worker.join()
        rows.append((f"spawned worker given {what}: unpickle", f"{dt:.2f} s, CPU {cpu:.2f} s"))
        rows.append((f"spawned worker given {what}: memory added, RSS (anonymous)", f"{r1 / gb:.3f} GB ({a1 / gb:.3f} GB)"))
        rows.append((f"spawned worker given {what}: after reading every index column once, RSS (anonymous)",
                     f"{r2 / gb:.3f} GB ({a2 / gb:.3f} GB)"))

    if part == "index":
        index = opened("read_index", lambda: sh.read_index(path))
        blob = bytes(ForkingPickler.dumps(index))
        rows.append(("pickled index", f"{len(blob):,} bytes"))
        probe("the index", blob)
        return rows
    stream = opened("GEKOStream (index + state)", lambda: GEKOStream(
        path, total_epochs=3, config=GEKOConfig(log_bucket_stats=False), verify=False))
    count = _Count()
    ForkingPickler(count).dump(stream)
    rows.append(("bytes a spawned DataLoader worker receives (pickled stream)", f"{count.n / gb:.3f} GB"))
    if stream.index.num_samples <= _WHOLE_STREAM_PROBE_MAX:
        probe("the stream", bytes(ForkingPickler.dumps(stream)))
    else:
        rows.append(("spawned worker given the stream", f"not run above {_WHOLE_STREAM_PROBE_MAX:,} samples "
                     f"(both processes would hold the {count.n / gb:.1f} GB pickle)"))
    return rows


def goal_of(name: str, n: int) -> float | None:
    """The goal of a step at 100M samples (other sizes have none: fixed costs do not scale with N)."""
    if n != 100_000_000:
        return None
    for key, seconds in GOALS_100M.items():
        if name.startswith(key) and "(0)" not in name and "verify=False" not in name:
            return seconds
    return None


def report_size(n: int, steps: list[tuple[str, float, int, int, float, float]]) -> str:
    rows = []
    gb = 1e9
    for name, dt, peak, held, cpu, kernel in steps:
        if name in ("file size", "memory the open stream adds") or name.startswith(("memory a loaded", "bytes a")):
            rows.append((name, f"{peak / gb:.2f} GB", "", ""))
            continue
        if name.startswith("peak RSS"):
            ok = peak <= PEAK_GOAL_BYTES_100M
            rows.append((name, f"{peak / gb:.2f} GB", *(("<= 6 GB", verdict(ok)) if n == 100_000_000 else ("", ""))))
            continue
        goal = goal_of(name, n)
        rows.append((name, f"{dt:.2f} s, CPU {cpu:.2f} s of which kernel {kernel:.2f} s (peak {peak / gb:.2f} GB, "
                     f"held {held / gb:.2f} GB)",
                     "" if goal is None else f"<= {goal:.2g} s", "" if goal is None else verdict(dt <= goal)))
        if name.startswith("baseline: one plain write"):
            save = next(s[1] for s in steps if s[0] == "save")
            rows.append(("save / the plain write (same run)", f"{save / dt:.2f}x wall", "", ""))
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
    p.add_argument("--stream-part", nargs=2, metavar=("PART", "INDEX"), help=argparse.SUPPRESS)
    p.add_argument("--stream", type=parse_size, metavar="SIZE",
                   help="also GEKOStream over a shard index of SIZE samples (building the synthetic index takes "
                        "about 50 bytes a sample, 5 GB at 100M)")
    ns = p.parse_args()
    if ns.one:
        print(report_size(ns.one, run_size(ns.one)), flush=True)
        return
    if ns.stream_part:
        import json

        print(json.dumps(measure_stream_part(*ns.stream_part)), flush=True)
        return
    if ns.stream_one:
        rows = [(name, result, "", "") for name, result in run_stream(ns.stream_one)]
        print(table(f"bench_scale --stream, {ns.stream_one:,} samples ({os.cpu_count()} CPUs)", rows), flush=True)
        return
    children = [["--one", str(parse_size(s))] for s in ns.sizes.split(",") if s.strip()]
    children += [["--stream-one", str(ns.stream)]] if ns.stream else []
    for argv in children:  # one process per run, so each peak is its own
        subprocess.run([sys.executable, os.path.abspath(__file__), *argv], check=True)
        print()


if __name__ == "__main__":
    main()
