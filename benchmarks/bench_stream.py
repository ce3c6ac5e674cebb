"""GEKOStream I/O: throughput vs plain webdataset, wall time as samples freeze, and what content hashes cost
(at index time, and when reading with ``verify=True``).

8 shards x 2000 samples of ~20 KB, DataLoader with 2 workers, raw bytes (no decode):

    python benchmarks/bench_stream.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import webdataset as wds
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import best_of, table, verdict  # noqa: E402

from geko_data import policy  # noqa: E402
from geko_data.config import GEKOConfig  # noqa: E402
from geko_data.shards import _hash_samples, _scan_tar, write_shards  # noqa: E402
from geko_data.stream import GEKOStream  # noqa: E402


def as_list(batch):
    return batch


def drain(loader) -> int:
    return sum(len(b) for b in loader)


def frozen_stream(folder: str, share: float, batch: int, verify: bool = False) -> GEKOStream:
    s = GEKOStream(folder, total_epochs=1, batch_size=batch, shuffle_buffer=256, verify=verify,
                   config=GEKOConfig(log_bucket_stats=False, recheck_frozen=0.0))
    n = len(s.state)
    frozen = np.random.default_rng(0).permutation(n)[: int(share * n)]
    s.state.bucket[frozen] = policy.FREEZE  # as a repartition leaves it
    s.state.epoch = 0
    s.set_epoch(0)
    return s


def cpu_per_sample(streams: dict[str, GEKOStream], repeat: int = 3) -> dict[str, float]:
    """Best CPU seconds per sample of iterating each stream in this process, the streams taking turns (CPU
    time, not wall time: other work on the machine barely moves it)."""
    best = dict.fromkeys(streams, float("inf"))
    for _ in range(repeat):
        for name, s in streams.items():
            t0 = time.process_time()
            n = sum(1 for _ in s)
            best[name] = min(best[name], (time.process_time() - t0) / n)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="4 shards x 500 samples")
    ns = p.parse_args()
    shards, per, size, batch = (4, 500, 20_000, 32) if ns.quick else (8, 2000, 20_000, 32)
    rng = np.random.default_rng(0)
    payload = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        samples = ({"__key__": f"k{i:06d}", "bin": payload, "cls": str(i % 10).encode()} for i in range(shards * per))
        idx = write_shards(samples, os.path.join(d, "shard-%03d.tar"), maxcount=per)
        n = idx.num_samples
        plain = wds.WebDataset(list(idx.shards), shardshuffle=False, nodesplitter=wds.split_by_node)
        plain_loader = DataLoader(plain, batch_size=batch, num_workers=2, collate_fn=as_list,
                                  persistent_workers=True)
        t_plain = best_of(lambda: drain(plain_loader), repeat=3)
        times = {}
        for share in (0.0, 0.5, 0.9):
            s = frozen_stream(d, share, batch)
            loader = DataLoader(s, batch_size=batch, num_workers=2, collate_fn=as_list, persistent_workers=True)
            got = drain(loader)
            assert got == len(s), (got, len(s))
            times[share] = best_of(lambda loader=loader: drain(loader), repeat=3)
        ratio = (n / times[0.0]) / (n / t_plain)
        rows.append((f"{shards} shards x {per} x {size // 1000} KB, 2 workers: samples/s",
                     f"GEKOStream {n / times[0.0]:,.0f}/s vs webdataset {n / t_plain:,.0f}/s ({ratio:.2f}x)",
                     ">= 0.95x", verdict(ratio >= 0.95)))
        for share, goal in ((0.5, 0.55), (0.9, 0.15)):
            r = times[share] / times[0.0]
            rows.append((f"wall time, {int(share * 100)}% frozen vs 0%", f"{times[share]:.2f} s vs {times[0.0]:.2f} s "
                         f"({r:.2f}x)", f"<= {goal}x", verdict(r <= goal)))
        s = frozen_stream(d, 0.0, batch, verify=True)
        loader = DataLoader(s, batch_size=batch, num_workers=2, collate_fn=as_list, persistent_workers=True)
        t_verify = best_of(lambda: drain(loader), repeat=3)
        rows.append(("verify=True (xxh3 of every sample read), 2 workers: samples/s",
                     f"{n / t_verify:,.0f}/s vs {n / times[0.0]:,.0f}/s without ({times[0.0] / t_verify:.2f}x)",
                     "(its cost)", ""))
        cpu = cpu_per_sample({"off": frozen_stream(d, 0.0, batch), "on": frozen_stream(d, 0.0, batch, verify=True)})
        rows.append(("verify=True, one process: CPU time per sample read",
                     f"{cpu['on'] * 1e6:.1f} us vs {cpu['off'] * 1e6:.1f} us without ({cpu['on'] / cpu['off']:.2f}x)",
                     "(its cost)", ""))
        # Indexing = a header scan (what it was before content hashes) + hashing each sample's bytes.
        ranges = [_scan_tar(p) for p in idx.shards]
        t_scan = best_of(lambda: [_scan_tar(p) for p in idx.shards], repeat=3)
        t_hash = best_of(lambda: [_hash_samples(p, r) for p, r in zip(idx.shards, ranges)], repeat=3)
        mb = sum(idx.sizes) / 1e6
        rows.append((f"index {mb:,.0f} MB (page cache warm): with vs without content hashes",
                     f"{t_scan + t_hash:.2f} s vs {t_scan:.2f} s ({(t_scan + t_hash) / t_scan:.2f}x; hashing "
                     f"{mb / t_hash:,.0f} MB/s)", "(its cost)", ""))
    print(table(f"bench_stream ({os.cpu_count()} CPUs)", rows))


if __name__ == "__main__":
    main()
