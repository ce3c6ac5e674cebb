"""Remote shards: bytes fetched, requests and samples/s of GEKOStream's byte-range reads vs webdataset's
streaming of the same URLs.

The shards are served by RangeHTTPServer on 127.0.0.1 behind the proxy of tests/servers.py, which
counts requests and body bytes and adds 0 or 20 ms to every request. DataLoader with 2 workers, raw bytes
(no decode), one epoch per run, best of 2:

    python benchmarks/bench_remote.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import signal
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
from bench_stream import frozen_stream  # noqa: E402 - the same frozen shares as the local benchmark
from servers import HttpServer, Proxy  # noqa: E402

from geko_data.shards import write_shards  # noqa: E402

BATCH = 32


def as_list(batch):
    return batch


def epoch(loader) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = sum(len(b) for b in loader)
    return n, time.perf_counter() - t0


def measure(proxy: Proxy, make_loader, repeat: int = 2) -> dict[str, float]:
    """Best-of-``repeat`` epoch time, and the bytes and requests the proxy saw in one epoch."""
    best = None
    for _ in range(repeat):
        loader = make_loader()  # made before the counters reset: GEKOStream reads its index here
        proxy.reset()
        n, t = epoch(loader)
        stats = proxy.stats()
        print(f"  {n} samples in {t:.2f} s, {stats['bytes'] / 1e6:.2f} MB, {stats['requests']} requests",
              file=sys.stderr, flush=True)
        if best is None or t < best["seconds"]:
            best = {"samples": n, "seconds": t, "bytes": stats["bytes"], "requests": stats["requests"]}
    assert best is not None
    return best


def geko_loader(url: str, share: float, workers: int):
    def make():
        return DataLoader(frozen_stream(url, share, BATCH), batch_size=BATCH, num_workers=workers, collate_fn=as_list)
    return make


def wds_loader(urls: list[str], workers: int):
    def make():
        ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node).shuffle(256)
        return DataLoader(ds, batch_size=BATCH, num_workers=workers, collate_fn=as_list)
    return make


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="4 shards x 250 samples")
    ns = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so `finally` stops the servers on a timeout
    shards, per, size = (4, 250, 20_000) if ns.quick else (8, 500, 20_000)
    payload = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    rows, lines = [], []
    with tempfile.TemporaryDirectory() as d:
        samples = ({"__key__": f"k{i:06d}", "bin": payload, "cls": str(i % 10).encode()} for i in range(shards * per))
        idx = write_shards(samples, os.path.join(d, "shards", "shard-%03d.tar"), maxcount=per)
        names = [os.path.basename(s) for s in idx.shards]
        server = HttpServer(d)
        server.start()
        try:
            results = {}
            for delay in (0.0, 0.02):
                proxy = Proxy(server.url, delay=delay)
                proxy.start()
                try:
                    url = proxy.url + "shards/"
                    results[delay, "wds"] = measure(proxy, wds_loader([url + n for n in names], 2))
                    for share in (0.0, 0.5, 0.9):
                        results[delay, share] = measure(proxy, geko_loader(url, share, 2))
                    if delay == 0.0:
                        for workers in (1, 4):
                            results[delay, "workers", workers] = measure(proxy, geko_loader(url, 0.0, workers), 1)
                finally:
                    proxy.stop()
        finally:
            server.stop()
    lines.append("| latency | reader | frozen | samples | samples/s | MB fetched | requests |")
    lines.append("|---|---|---|---|---|---|---|")
    for delay in (0.0, 0.02):
        for what in ("wds", 0.0, 0.5, 0.9):
            r = results[delay, what]
            reader = "webdataset" if what == "wds" else "GEKOStream"
            frozen = "-" if what == "wds" else f"{int(what * 100)}%"
            lines.append(f"| {int(delay * 1000)} ms | {reader} | {frozen} | {r['samples']:,} | "
                         f"{r['samples'] / r['seconds']:,.0f} | {r['bytes'] / 1e6:.2f} | {r['requests']:,} |")
    zero = results[0.0, 0.0]
    for share, goal in ((0.5, 0.55), (0.9, 0.15)):
        ratio = results[0.0, share]["bytes"] / zero["bytes"]
        rows.append((f"bytes fetched, {int(share * 100)}% frozen vs 0%", f"{ratio:.2f}x", f"<= {goal}x",
                     verdict(ratio <= goal)))
    for delay, goal in ((0.0, 0.9), (0.02, 1.0)):
        geko, plain = results[delay, 0.0], results[delay, "wds"]
        ratio = (geko["samples"] / geko["seconds"]) / (plain["samples"] / plain["seconds"])
        rows.append((f"samples/s at 0% frozen vs webdataset, +{int(delay * 1000)} ms per request",
                     f"{ratio:.2f}x", f">= {goal}x", verdict(ratio >= goal)))
    by_workers = {1: results[0.0, "workers", 1]["bytes"], 2: zero["bytes"], 4: results[0.0, "workers", 4]["bytes"]}
    spread = max(by_workers.values()) / min(by_workers.values()) - 1
    rows.append(("bytes fetched with 1 / 2 / 4 workers (0% frozen)",
                 " / ".join(f"{b / 1e6:.2f} MB" for b in by_workers.values()) + f" (spread {spread:.1%})",
                 "within 5%", verdict(spread <= 0.05)))
    print(f"### bench_remote: {shards} shards x {per} samples x {size // 1000} KB, 2 DataLoader workers, "
          f"{os.cpu_count()} CPUs\n")
    print("\n".join(lines) + "\n")
    print(table("goals", rows))


if __name__ == "__main__":
    main()
