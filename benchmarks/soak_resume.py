"""Soak test of crash-resume: N random SIGKILLs of a real training run, each resumed and compared.

Each trial runs the reference loop (tiny Llama, streamed shards, 2 DataLoader workers) in a subprocess,
kills it with SIGKILL at a random optimizer step (seeded), resumes from the newest complete checkpoint and
compares with an uninterrupted run: sample ids after the checkpoint, the final SampleState, the final
weights. Prints ``20/20 identical`` or what differed.

    python benchmarks/soak_resume.py [--trials 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from crash_job import rows  # noqa: E402
from test_crash_resume import compare, finish, job, kill_at_step, steps_logged  # noqa: E402

from geko_data.shards import write_shards  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kind", choices=("stream", "map"), default="stream")
    ns = p.parse_args()
    rng = random.Random(ns.seed)
    with tempfile.TemporaryDirectory() as d:
        shards = os.path.join(d, "shards")
        write_shards(({"__key__": f"r{i:03d}", "json": json.dumps(r).encode()} for i, r in enumerate(rows())),
                     os.path.join(shards, "s-%03d.tar"), maxcount=25)
        reference = os.path.join(d, "reference")
        finish(job(reference, shards, ns.kind))
        total = steps_logged(reference)
        ok, failures = 0, []
        for t in range(ns.trials):
            step = rng.randint(4, total - 1)
            out = os.path.join(d, f"trial-{t}")
            try:
                kill_at_step(job(out, shards, ns.kind), out, step)
                finish(job(out, shards, ns.kind, "--resume"))
                compare(reference, out)
                ok += 1
                print(f"trial {t}: killed at step {step}: identical", flush=True)
            except AssertionError as e:
                failures.append((t, step, str(e)[:300]))
                print(f"trial {t}: killed at step {step}: DIFFERENT: {str(e)[:300]}", flush=True)
    print(f"{ok}/{ns.trials} identical")
    return 0 if ok == ns.trials else 1


if __name__ == "__main__":
    sys.exit(main())
