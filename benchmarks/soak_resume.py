"""Soak test of crash-resume: N random SIGKILLs of a real training run, each resumed and compared.

Each trial runs the reference loop (tests/crash_job.py: a tiny LM, 2 DataLoader workers, streamed shards
or a map-style dataset) in a subprocess, kills it with SIGKILL at a random optimizer step (seeded),
resumes from the newest complete checkpoint and compares with an uninterrupted run: the step resumed
from, the sample ids after it, the final SampleState, the final weights. A trial that fails in any way
(a difference, a crash, a timeout) is reported and the soak goes on; a job that times out is killed with
its process group. Prints ``20/20 identical`` or what differed.

    python benchmarks/soak_resume.py [--kills 20] [--seed 0] [--kind stream|map] [--timeout 180]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(os.path.dirname(HERE), "tests")
sys.path[:0] = [TESTS, os.path.join(TESTS, "train")]  # crash_job.py and train/test_crash_resume.py

from crash_job import rows
from test_crash_resume import compare, finish, job, kill_at_step, steps_logged

from geko_data.shards import write_shards
from geko_data.train.checkpoint import find_latest


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", "--trials", dest="kills", type=int, default=20, help="random kills (trials)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kind", choices=("stream", "map"), default="stream")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds a job may take before it is killed")
    ns = p.parse_args()
    if ns.kills < 1:
        p.error(f"--kills must be >= 1, got {ns.kills}")
    rng = random.Random(ns.seed)
    start = time.time()
    with tempfile.TemporaryDirectory() as d:
        shards = os.path.join(d, "shards")
        write_shards(({"__key__": f"r{i:03d}", "json": json.dumps(r).encode()} for i, r in enumerate(rows())),
                     os.path.join(shards, "s-%03d.tar"), maxcount=25)
        reference = os.path.join(d, "reference")
        try:
            finish(job(reference, shards, ns.kind), timeout=ns.timeout)
        except Exception as e:  # noqa: BLE001 (nothing to compare with: say why)
            print(f"the uninterrupted reference run failed: {type(e).__name__}: {str(e)[:1000]}", flush=True)
            return 2
        total = steps_logged(reference)
        ok, failures = 0, []
        for t in range(ns.kills):
            step = rng.randint(4, total - 1)
            out = os.path.join(d, f"trial-{t}")
            try:
                kill_at_step(job(out, shards, ns.kind), out, step, timeout=ns.timeout)
                resumed = int(os.path.basename(find_latest(out)).split("-")[1])
                finish(job(out, shards, ns.kind, "--resume"), timeout=ns.timeout)
                compare(reference, out, resumed_from=resumed)
            except Exception as e:  # noqa: BLE001 (a difference, a crash or a timeout: report it, go on)
                text = str(e).strip()  # a traceback says what went wrong at its end
                what = f"{type(e).__name__}: {text if len(text) <= 900 else text[:300] + ' ... ' + text[-600:]}"
                failures.append((t, step, what))
                print(f"trial {t}: killed at step {step}: DIFFERENT: {what}", flush=True)
            else:
                ok += 1
                print(f"trial {t}: killed at step {step}, resumed from step {resumed}: identical", flush=True)
    print(f"{ok}/{ns.kills} identical ({ns.kind}, seed {ns.seed}, {time.time() - start:.0f} s)")
    for t, step, what in failures:
        print(f"  trial {t} (kill at step {step}): {what}")
    return 0 if ok == ns.kills else 1


if __name__ == "__main__":
    sys.exit(main())
