"""What replicating the state costs per step under torch.distributed: ``report()``'s all-gather and apply.

Every rank keeps the whole SampleState and applies every rank's report, so a step's feedback costs an
all-gather of the batch's rows (32 bytes a row) plus an apply of ``world_size x batch`` rows on every rank.
This measures both at 2, 4 and 8 gloo processes on this machine (real processes, loopback), and the
single-process apply of the same rows as the baseline.

    python benchmarks/bench_allgather.py [--samples 1000000] [--batch 32] [--steps 200] [--worlds 2 4 8]

On a machine with fewer cores than processes, the processes share cores: the figures are upper bounds of
what the collective costs on dedicated hardware, and are reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from geko_data.config import GEKOConfig
from geko_data.feedback import Feedback
from geko_data.state import SampleState


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches(rank: int, steps: int, batch: int, samples: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng([rank, 7])
    return [(rng.integers(0, samples, batch), rng.random(batch, dtype=np.float32) * 3) for _ in range(steps)]


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        state = SampleState(args.samples, config=GEKOConfig(log_bucket_stats=False))
        feedback = Feedback(state)
        batches = _batches(rank, args.steps, args.batch, args.samples)
        for ids, losses in batches[:10]:  # warm-up: connections, allocator
            feedback.report(ids, losses)
        dist.barrier()
        times = []
        for ids, losses in batches[10:]:
            t0 = time.perf_counter()
            feedback.report(ids, losses)
            times.append(time.perf_counter() - t0)
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"median_ms": 1e3 * float(np.median(times)), "p90_ms": 1e3 * float(np.quantile(times, 0.9))}, f)
    finally:
        dist.destroy_process_group()


def _single(args: argparse.Namespace, rows: int) -> float:
    state = SampleState(args.samples, config=GEKOConfig(log_bucket_stats=False))
    batches = _batches(0, args.steps, rows, args.samples)
    times = []
    for ids, losses in batches:
        t0 = time.perf_counter()
        state.report(ids, losses)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times[10:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=32, help="samples reported per rank per step")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}, samples: {args.samples:,}, batch per rank: {args.batch}, steps: {args.steps}")
    print("| processes | rows applied per step | report() median ms | p90 ms | one process applying the same rows, ms |")
    print("|---|---|---|---|---|")
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            mp.start_processes(_worker, args=(world, _free_port(), args, out), nprocs=world, start_method="spawn")
            with open(out) as f:
                result = json.load(f)
        base = _single(args, world * args.batch)
        print(f"| {world} | {world * args.batch} | {result['median_ms']:.2f} | {result['p90_ms']:.2f} | {base:.3f} |",
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
