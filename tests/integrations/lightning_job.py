"""A tiny Lightning fit with GEKOCallback; run in-process or under torchrun (2 CPU processes, gloo).

Usage: lightning_job.py OUT_DIR MODE, MODE ``callback`` (the callback's loader, Lightning's defaults) or
``plain`` (a GEKOSampler in a user-made DataLoader, Lightning's default use_distributed_sampler=True).
"""

import json
import os
import sys

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from geko_data import GEKOConfig, GEKOSampler
from geko_data.integrations.lightning import GEKOCallback

EASY = GEKOConfig(freeze_confidence=0.6, freeze_quality=0.5, log_bucket_stats=False)


def dataset(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long()
    return [{"x": x[i], "y": y[i]} for i in range(n)]


class Module(pl.LightningModule):
    def __init__(self, loader_fn):
        super().__init__()
        self.net = torch.nn.Linear(8, 2)
        self.loader_fn = loader_fn
        self.ids = {}

    def train_dataloader(self):
        return self.loader_fn()

    def training_step(self, batch, batch_idx):
        self.ids.setdefault(self.current_epoch, []).extend(batch["__index__"].tolist())
        logits = self.net(batch["x"])
        losses = F.cross_entropy(logits, batch["y"], reduction="none")
        probs = logits.detach().softmax(-1)
        return {"loss": (losses * batch["__weight__"]).mean(), "per_sample_loss": losses.detach(),
                "correct": probs.argmax(-1) == batch["y"], "confidence": probs.max(-1).values}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def run(out, mode, devices=1, epochs=3, ckpt_path=None, checkpoint=False, total_epochs=None):
    torch.manual_seed(0)  # the same initial weights in every run
    data = dataset()
    geko = GEKOCallback(data, config=EASY, seed=2, total_epochs=total_epochs)
    if mode == "callback":
        loader_fn = lambda: geko.dataloader(batch_size=8)  # noqa: E731
    else:
        def loader_fn():  # after the process group is up: the sampler reads the ranks from it
            sampler = GEKOSampler(data, total_epochs=epochs, config=EASY)
            return DataLoader(sampler.wrap(data), batch_size=8, sampler=sampler)
    module = Module(loader_fn)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=devices,
                         strategy="ddp" if devices > 1 else "auto", callbacks=[geko], logger=False,
                         enable_checkpointing=checkpoint, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=out)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer, module, geko


def main():
    out, mode = sys.argv[1], sys.argv[2]
    trainer, module, geko = run(out, mode, devices=int(os.environ.get("WORLD_SIZE", "1")))
    from tiny import state_digest

    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump({"ids": module.ids, "state": state_digest(geko.sampler.state),
                   "plan": geko.sampler.plan.counts.tolist(), "world": trainer.world_size,
                   "metrics": {k: float(v) for k, v in trainer.logged_metrics.items()}}, f)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
