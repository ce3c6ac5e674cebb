"""Make a state file with history (simulated feedback, no model) and look at it with ``geko-data``.

    python examples/inspect_state.py [FOLDER]

It writes 300 samples as shards (and as ``data.jsonl``, one sample a line), reports five epochs of simulated losses (a fifth of the samples hard,
losses falling with the epochs) with ``prune_frozen_after=2`` and a fixed freeze threshold (the simulated
confidences have no task to calibrate on), saves the state after epochs 2 and 4,
and prints the ``geko-data`` commands to run on them (the README's plot and diff come from here).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from geko_data.config import GEKOConfig
from geko_data.shards import write_shards
from geko_data.state import SampleState


def main(folder: str) -> None:
    n = 300
    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    index = write_shards(({"__key__": f"tweet{i:06d}", "json": json.dumps({"i": i}).encode()} for i in range(n)),
                         os.path.join(folder, "data", "shard-%03d.tar"), maxcount=100)
    # The same samples as the JSONL a training run would read (`geko-train --data data.jsonl`): line i is id i.
    with open(os.path.join(folder, "data.jsonl"), "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Tweet: tweet number {i}\nSentiment:", "completion": " positive"}) + "\n")
    rng = np.random.default_rng(0)
    state = SampleState(n, config=GEKOConfig(q_value_lr=0.7, min_q_for_freeze=0.5, prune_frozen_after=2,
                                                         freeze_confidence=0.85),
                        fingerprint=index.fingerprint)
    hard = rng.random(n) < 0.2
    step = 0
    for epoch in range(5):
        ids = rng.permutation(n)
        loss = rng.exponential(0.3, n) * np.where(hard[ids], 6.0, 1.0) / (1 + epoch)
        conf = np.clip(np.exp(-loss) + rng.normal(0, 0.05, n), 0, 1)
        correct = (conf > 0.5) & (rng.random(n) > 0.05)
        for lo in range(0, n, 32):
            step += 1
            part = slice(lo, lo + 32)
            state.report(ids[part], loss[part], correct=correct[part], confidence=conf[part], step=step)
        print(state.repartition((epoch + 0.5) / 5, epoch=epoch).format())
        if epoch == 2:
            state.save(os.path.join(folder, "state-epoch2.arrow"))
    state.save(os.path.join(folder, "state.arrow"))
    print(f"\nnow try, in {folder}:\n  geko-data inspect state.arrow --index data --top hard 5\n"
          "  geko-data inspect state.arrow --index data.jsonl --top hard 5\n"
          "  geko-data sql state.arrow \"SELECT bucket, count(*) FROM state GROUP BY bucket\"\n"
          "  geko-data plot state.arrow -o state.png\n"
          "  geko-data diff state-epoch2.arrow state.arrow --index data --list 5\n"
          "  geko-data export state.arrow --to jsonl -o state.jsonl")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "geko_inspect_demo")
