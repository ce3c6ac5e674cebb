"""Run under torchrun (2 CPU processes, gloo): a GEKO loader through accelerate, per rank what it trained."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from geko_data import GEKOConfig, GEKOSampler  # noqa: E402
from geko_data.batches import GEKOBatchSampler  # noqa: E402
from geko_data.integrations.accelerate import prepare_loader  # noqa: E402
from geko_data.train import leave_process_group  # noqa: E402

N, BATCH = 96, 8


def run(accelerator: Accelerator, how: str) -> dict:
    """Two epochs; in the first, the even ids are learnt (right, sure, low loss), so the second skips them."""
    data = [{"x": torch.tensor(float(i))} for i in range(N)]
    sampler = GEKOSampler(N, total_epochs=2, config=GEKOConfig(log_bucket_stats=False), seed=1)
    if how == "steps":
        loader = DataLoader(sampler.wrap(data), batch_sampler=GEKOBatchSampler(sampler, batch_size=BATCH))
    else:
        loader = DataLoader(sampler.wrap(data), batch_size=BATCH, sampler=sampler)
    loader = accelerator.prepare(loader) if how == "prepare" else prepare_loader(accelerator, loader)
    out = {"ids": {}, "plans": {}, "sizes": {}}
    for epoch in range(2):
        sampler.set_epoch(epoch)
        out["plans"][epoch] = sampler.plan.counts.tolist()
        ids, sizes = [], []
        for batch in loader:
            idx = batch["__index__"]
            ids += idx.tolist()
            sizes.append(len(idx))
            easy = idx % 2 == 0
            sampler.report(idx, torch.where(easy, 0.01, 2.0), correct=easy,
                           confidence=torch.where(easy, 0.99, 0.3))
        gathered = [None] * accelerator.num_processes
        dist.all_gather_object(gathered, ids)
        out["ids"][epoch] = gathered
        out["sizes"][epoch] = sizes
    return out


def main() -> None:
    accelerator = Accelerator(cpu=True)
    result = {how: run(accelerator, how) for how in ("prepare", "sampler", "steps")}
    if accelerator.process_index == 0:
        with open(os.path.join(sys.argv[1], "result.json"), "w") as f:
            json.dump(result, f)
    leave_process_group()


if __name__ == "__main__":
    main()
