"""SampleState costs: report() vs a bare numpy scatter, repartition, save/load, bytes per sample.

    python benchmarks/bench_state.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import best_of, table, verdict  # noqa: E402

from geko_data.state import SampleState  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="1M instead of 10M samples")
    ns = p.parse_args()
    big = 1_000_000 if ns.quick else 10_000_000
    rng = np.random.default_rng(0)
    rows = []

    s = SampleState(100_000)
    ids = rng.integers(0, 100_000, 256)
    losses = rng.exponential(1.0, 256).astype(np.float32)
    conf = np.exp(-losses)
    correct = conf >= 0.5
    loss_arr, conf_arr, corr_arr, seen = (np.zeros(100_000, np.float32), np.zeros(100_000, np.float32),
                                          np.zeros(100_000, bool), np.zeros(100_000, np.uint16))

    def bare():  # the floor: scatter the same four arrays with plain numpy
        loss_arr[ids] = losses
        conf_arr[ids] = conf
        corr_arr[ids] = correct
        np.add.at(seen, ids, 1)

    n_calls = 2000
    t_report = best_of(lambda: [s.report(ids, losses, correct=correct, confidence=conf) for _ in range(n_calls)])
    t_bare = best_of(lambda: [bare() for _ in range(n_calls)])
    ratio = t_report / t_bare
    rows.append(("report() of 256 ids", f"{1e6 * t_report / n_calls:.1f} us ({ratio:.1f}x a bare numpy scatter "
                 f"at {1e6 * t_bare / n_calls:.1f} us)", "<= 5x", verdict(ratio <= 5)))

    for n in sorted({1_000_000, big}):
        st = SampleState(n)
        st.loss[:] = rng.exponential(1.0, n)
        st.confidence[:] = np.exp(-st.loss)
        st.correct[:] = st.confidence > 0.5
        st.q[:] = rng.random(n)
        t = best_of(lambda: st.repartition(0.5), repeat=2)
        rows.append((f"repartition, {n:,} samples", f"{t:.2f} s", "<= 1 s at 10M", verdict(t <= 1.0)))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "state.arrow")
        t_save = best_of(lambda: st.save(path), repeat=2)
        # Every load validates structure and value ranges; verify (the default) also hashes every byte.
        t_load = best_of(lambda: SampleState.load(path, memory_map=True), repeat=3)
        t_load_fast = best_of(lambda: SampleState.load(path, memory_map=True, verify=False), repeat=3)
        t_load_copy = best_of(lambda: SampleState.load(path, memory_map=False), repeat=2)
        size = os.path.getsize(path)
    rows.append((f"save, {big:,} samples", f"{t_save:.2f} s ({size / 1e6:.0f} MB)", "<= 2 s", verdict(t_save <= 2)))
    rows.append((f"load (memory map, checksum verified), {big:,}", f"{t_load:.3f} s", "<= 0.3 s",
                 verdict(t_load <= 0.3)))
    rows.append((f"load (memory map, verify=False), {big:,}", f"{t_load_fast:.3f} s", "-", ""))
    rows.append((f"load (read, checksum verified), {big:,}", f"{t_load_copy:.3f} s", "-", ""))
    bps = SampleState(1000).nbytes / 1000
    rows.append(("memory per sample", f"{bps:.0f} bytes (gekolib: ~1.1 KB)", "<= 32", verdict(bps <= 32)))
    print(table(f"bench_state ({os.cpu_count()} CPUs)", rows))


def bench_cli(num_samples: int = 10_000_000) -> None:
    """Seconds of each `geko-data` command on a state file of ``num_samples`` with 3 repartitions.

    The commands run in this process (``cli.main``) on a warm page cache; output goes to a temp folder.
    """
    import contextlib
    import io

    from geko_data import cli
    from geko_data.config import GEKOConfig

    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        a, b = os.path.join(d, "a.arrow"), os.path.join(d, "b.arrow")
        st = SampleState(num_samples, config=GEKOConfig(q_value_lr=0.7, min_q_for_freeze=0.5, prune_frozen_after=2))
        ids = np.arange(num_samples)
        for e in range(3):  # every sample reported once per epoch, with losses that differ by id class
            st.report(ids, (rng.exponential(0.4, num_samples) * (ids % 3 + 0.1)).astype(np.float32), step=e)
            st.repartition((e + 0.5) / 3, epoch=e)
        st.save(a)
        st.report(ids[::7], np.full(ids[::7].shape[0], 3.0, np.float32), step=3)  # some forget, move, prune
        st.repartition(0.95, epoch=3)
        st.save(b)
        del st

        def run(*argv: str) -> None:
            with contextlib.redirect_stdout(io.StringIO()):
                code = cli.main(list(argv))
            assert code == 0, argv

        out = os.path.join(d, "out")
        commands = [
            ("inspect", ["inspect", b], 3.0, 2),
            ("inspect --json", ["inspect", b, "--json"], 3.0, 2),
            ("inspect --top frozen 20", ["inspect", b, "--top", "frozen", "20"], 3.0, 2),  # sorts millions
            ("diff", ["diff", a, b], 3.0, 2),
            ("sql (count per bucket)", ["sql", b, "SELECT bucket, count(*) FROM state GROUP BY bucket"], 3.0, 2),
            ("plot", ["plot", b, "-o", out + ".png"], 5.0, 2),
            ("export parquet", ["export", b, "--to", "parquet", "-o", out + ".parquet"], 5.0, 2),
            ("export csv", ["export", b, "--to", "csv", "-o", out + ".csv"], 15.0, 1),
            ("export jsonl", ["export", b, "--to", "jsonl", "-o", out + ".jsonl"], 15.0, 1),
        ]
        for name, argv, goal, repeat in commands:
            t = best_of(lambda argv=argv: run(*argv), repeat=repeat)
            rows.append((f"geko-data {name}, {num_samples:,} samples", f"{t:.2f} s", f"<= {goal:g} s",
                         verdict(t <= goal)))
        jsonl_mb = os.path.getsize(out + ".jsonl") / 1e6
    rows[-1] = (rows[-1][0], f"{rows[-1][1]} ({jsonl_mb:,.0f} MB)", *rows[-1][2:])
    print(table(f"bench_cli ({os.cpu_count()} CPUs, warm page cache)", rows))


if __name__ == "__main__":
    main()
    bench_cli(1_000_000 if "--quick" in sys.argv else 10_000_000)
