"""Remote shards: bytes fetched, requests and samples/s of GEKOStream's byte-range reads vs webdataset's
streaming of the same URLs.

The shards are served by RangeHTTPServer on 127.0.0.1 behind two proxies of tests/servers.py, which count
requests and body bytes, one adding nothing and one 20 ms to every request. DataLoader with 2 workers,
batch 32, raw bytes (no decode), one epoch per run; every round runs every reader once (rotating the
order), and the tables give the median over the rounds, so the load of the machine falls on all alike:

    python benchmarks/bench_remote.py [--quick] [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time

import numpy as np
import webdataset as wds
from torch.utils.data import DataLoader

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
from _common import table, verdict  # noqa: E402
from servers import HttpServer, Proxy  # noqa: E402

from geko_data import policy  # noqa: E402
from geko_data.config import GEKOConfig  # noqa: E402
from geko_data.shards import write_shards  # noqa: E402
from geko_data.stream import GEKOStream  # noqa: E402

BATCH = 32
DELAYS = (0.0, 0.02)
SHARES = (0.0, 0.5, 0.9)


def as_list(batch):
    return batch


def frozen_stream(url: str, share: float) -> GEKOStream:
    """A stream over ``url`` whose first epoch draws all but a seeded ``share`` of the samples."""
    s = GEKOStream(url, total_epochs=1, batch_size=BATCH, shuffle_buffer=256,
                   config=GEKOConfig(log_bucket_stats=False, recheck_frozen=0.0, short_run_keep=None))
    frozen = np.random.default_rng(0).permutation(len(s.state))[: int(share * len(s.state))]
    s.state.bucket[frozen] = policy.FREEZE  # as a repartition leaves it
    s.state.epoch = 0
    s.set_epoch(0)
    return s


def loader(what, url: str, names: list[str], workers: int = 2) -> DataLoader:
    if what == "wds":
        ds = wds.WebDataset([url + n for n in names], shardshuffle=False, nodesplitter=wds.split_by_node).shuffle(256)
    else:
        ds = frozen_stream(url, what)
    return DataLoader(ds, batch_size=BATCH, num_workers=workers, collate_fn=as_list)


def run(proxy: Proxy, make) -> dict[str, float]:
    """One epoch: its wall time, and the bytes and requests the proxy saw."""
    dl = make()  # made before the counters reset: GEKOStream reads its index here
    proxy.reset()
    t0 = time.perf_counter()
    n = sum(len(b) for b in dl)
    seconds = time.perf_counter() - t0
    stats = proxy.stats()
    return {"samples": n, "seconds": seconds, "bytes": stats["bytes"], "requests": stats["requests"]}


def measure(server: HttpServer, names: list[str], rounds: int) -> dict:
    proxies = {d: Proxy(server.url, delay=d) for d in DELAYS}
    for p in proxies.values():
        p.start()
    configs = [(d, what) for d in DELAYS for what in ("wds", *SHARES)]
    runs: dict = {c: [] for c in configs}
    try:
        for k in range(rounds):
            for d, what in configs[k % len(configs):] + configs[:k % len(configs)]:  # rotate the order
                r = run(proxies[d], lambda: loader(what, proxies[d].url + "shards/", names))
                runs[d, what].append(r)
                print(f"  round {k}: +{int(d * 1000)} ms {what}: {r['samples']} samples in {r['seconds']:.2f} s, "
                      f"{r['bytes'] / 1e6:.2f} MB, {r['requests']} requests", file=sys.stderr, flush=True)
        for workers in (1, 4):  # bytes only: they do not depend on the load
            runs["workers", workers] = [run(proxies[0.0], lambda: loader(0.0, proxies[0.0].url + "shards/", names,
                                                                          workers))]
    finally:
        for p in proxies.values():
            p.stop()
    return runs


def median(rs: list[dict]) -> dict:
    return {"samples": rs[0]["samples"], "seconds": statistics.median(r["seconds"] for r in rs),
            "bytes": rs[0]["bytes"], "requests": statistics.median(r["requests"] for r in rs)}


def report(runs: dict) -> str:
    res = {k: median(v) for k, v in runs.items()}
    rate = {k: r["samples"] / r["seconds"] for k, r in res.items()}
    lines = ["| latency | reader | frozen | samples | samples/s (median) | MB fetched | requests |",
             "|---|---|---|---|---|---|---|"]
    for d in DELAYS:
        for what in ("wds", *SHARES):
            r = res[d, what]
            reader, frozen = ("webdataset", "-") if what == "wds" else ("GEKOStream", f"{int(what * 100)}%")
            lines.append(f"| {int(d * 1000)} ms | {reader} | {frozen} | {r['samples']:,} | {rate[d, what]:,.0f} | "
                         f"{r['bytes'] / 1e6:.2f} | {r['requests']:,.0f} |")
    rows = []
    for share, goal in ((0.5, 0.55), (0.9, 0.15)):
        ratio = res[0.0, share]["bytes"] / res[0.0, 0.0]["bytes"]
        rows.append((f"bytes fetched, {int(share * 100)}% frozen vs 0%", f"{ratio:.2f}x", f"<= {goal}x",
                     verdict(ratio <= goal)))
    for d, goal in zip(DELAYS, (0.9, 1.0)):
        ratio = rate[d, 0.0] / rate[d, "wds"]
        per_round = sorted((g["samples"] / g["seconds"]) / (w["samples"] / w["seconds"])
                           for g, w in zip(runs[d, 0.0], runs[d, "wds"]))
        rows.append((f"samples/s at 0% frozen vs webdataset, +{int(d * 1000)} ms per request",
                     f"{ratio:.2f}x (rounds {per_round[0]:.2f}-{per_round[-1]:.2f}x)", f">= {goal}x",
                     verdict(ratio >= goal)))
    for d in DELAYS:
        faster = [f"{rate[d, s] / rate[d, 0.0]:.2f}x" for s in SHARES[1:]]
        rows.append((f"epoch time at 50% / 90% frozen vs 0%, +{int(d * 1000)} ms (samples/s x samples)",
                     " / ".join(f"{res[d, s]['seconds'] / res[d, 0.0]['seconds']:.2f}x" for s in SHARES[1:])
                     + f" (samples/s {' / '.join(faster)})", "< 1x", verdict(all(
                         res[d, s]["seconds"] < res[d, 0.0]["seconds"] for s in SHARES[1:]))))
    by_workers = {1: res["workers", 1]["bytes"], 2: res[0.0, 0.0]["bytes"], 4: res["workers", 4]["bytes"]}
    spread = max(by_workers.values()) / min(by_workers.values()) - 1
    rows.append(("bytes fetched with 1 / 2 / 4 workers (0% frozen)",
                 " / ".join(f"{b / 1e6:.2f} MB" for b in by_workers.values()) + f" (spread {spread:.1%})",
                 "within 5%", verdict(spread <= 0.05)))
    return "\n".join(lines) + "\n\n" + table("goals", rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="4 shards x 250 samples, 3 rounds")
    p.add_argument("--rounds", type=int, default=None, help="rounds of interleaved runs (default 5; --quick 3)")
    ns = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so `finally` stops the servers on a timeout
    shards, per, size = (4, 250, 20_000) if ns.quick else (8, 500, 20_000)
    rounds = ns.rounds or (3 if ns.quick else 5)
    payload = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        samples = ({"__key__": f"k{i:06d}", "bin": payload, "cls": str(i % 10).encode()} for i in range(shards * per))
        idx = write_shards(samples, os.path.join(d, "shards", "shard-%03d.tar"), maxcount=per)
        names = [os.path.basename(s) for s in idx.shards]
        server = HttpServer(d)
        server.start()
        try:
            runs = measure(server, names, rounds)
        finally:
            server.stop()
    print(f"### bench_remote: {shards} shards x {per} samples x {size // 1000} KB, 2 DataLoader workers, "
          f"{os.cpu_count()} CPUs, median of {rounds} interleaved rounds, load average {load:.1f} -> "
          f"{os.getloadavg()[0]:.1f}\n")
    print(report(runs))


if __name__ == "__main__":
    main()
