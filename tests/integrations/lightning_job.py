"""A tiny Lightning fit with GEKOCallback; run in-process or under torchrun (2 CPU processes, gloo).

Usage: lightning_job.py OUT_DIR MODES, MODES one or more (comma-separated, fitted one after the other in the
same processes) of ``callback`` (the callback's loader, its default ``batches="steps"``, Lightning's
defaults), ``nodist`` (the same with ``use_distributed_sampler=False``), ``fixed`` (``batches="fixed"``,
Lightning's defaults) or ``plain`` (a GEKOSampler in a user-made DataLoader, Lightning's default
use_distributed_sampler=True). Each rank writes ``rank{r}_{mode}.json``.
"""

import json
import os
import sys

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from geko_data import GEKOConfig, GEKOSampler
from geko_data.integrations.lightning import GEKOCallback

EASY = GEKOConfig(freeze_confidence=0.8, freeze_quality=0.5, log_bucket_stats=False)
# Under DDP a step averages both ranks' batches, so the model learns less per epoch: a lower threshold
# freezes enough that an epoch's draws fall where fixed batches would lose a step (a rank's 17-24 of 32).
EASY_DDP = EASY.replace(freeze_confidence=0.7)
BATCH = 8


def dataset(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long()
    return [{"x": x[i], "y": y[i]} for i in range(n)]


def decode_xy(sample):
    """A shard sample's json member as the tensors of ``dataset()``'s rows."""
    row = json.loads(sample["json"])
    return {"x": torch.tensor(row["x"]), "y": torch.tensor(row["y"])}


def shard_dataset(folder, prefix=""):
    """``dataset()`` written as WebDataset shards in ``folder`` (sample keys ``prefix`` + a number), read back
    as a ``ShardDataset``."""
    from geko_data.dataset import ShardDataset
    from geko_data.shards import write_shards

    rows = [{"__key__": f"{prefix}{i:04d}", "json": json.dumps({"x": r["x"].tolist(), "y": int(r["y"])})}
            for i, r in enumerate(dataset())]
    write_shards(rows, os.path.join(folder, "shard-%02d.tar"), maxcount=20)
    return ShardDataset(folder, decode=decode_xy)


class Module(pl.LightningModule):
    def __init__(self, loader_fn, geko):
        super().__init__()
        self.net = torch.nn.Linear(8, 2)
        self.loader_fn = loader_fn
        self.geko = geko
        self.ids = {}  # epoch: sample ids trained, in order
        self.sizes = {}  # epoch: batch sizes (one optimizer step each)
        self.plans = {}  # epoch: the callback's plan (draws per sample, over all ranks)

    def train_dataloader(self):
        # No loader function: the callback's loader, built here (a module fitted in spawned processes is
        # pickled, and a lambda cannot be)
        return self.loader_fn() if self.loader_fn is not None else self.geko.dataloader(batch_size=BATCH)

    def training_step(self, batch, batch_idx):
        ids = batch["__index__"].tolist()
        self.ids.setdefault(self.current_epoch, []).extend(ids)
        self.sizes.setdefault(self.current_epoch, []).append(len(ids))
        if self.geko.sampler is not None:
            self.plans[self.current_epoch] = self.geko.sampler.plan.counts.tolist()
        logits = self.net(batch["x"])
        losses = F.cross_entropy(logits, batch["y"], reduction="none")
        probs = logits.detach().softmax(-1)
        return {"loss": (losses * batch["__weight__"]).mean(), "per_sample_loss": losses.detach(),
                "correct": probs.argmax(-1) == batch["y"], "confidence": probs.max(-1).values,
                "answer": batch["y"]}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def run(out, mode, devices=1, epochs=3, ckpt_path=None, checkpoint=False, total_epochs=None, max_steps=-1,
        config=EASY, workers=0, module_cls=None, fingerprint=None, strategy=None, data=None):
    """One fit. ``checkpoint``: False, True (Lightning's default end-of-epoch checkpoints) or N (a checkpoint
    every N optimizer steps, all kept); ``max_steps`` stops the fit there, mid-epoch; ``workers``: the
    callback's loader's DataLoader workers (persistent); ``module_cls``: a ``Module`` subclass to fit instead;
    ``data``: the train dataset (default ``dataset()``); ``strategy``: Lightning's (default ``"ddp"`` with 2+ devices); ``"ddp_spawn"`` / ``"ddp_fork"`` fit in child
    processes, with the callback's loader (``mode`` ``"callback"``, no workers)."""
    torch.manual_seed(0)  # the same initial weights in every run
    data = dataset() if data is None else data
    geko = GEKOCallback(data, config=config, seed=2, total_epochs=total_epochs,
                        batches="fixed" if mode == "fixed" else "steps", fingerprint=fingerprint)
    if mode == "plain":
        def loader_fn():  # after the process group is up: the sampler reads the ranks from it
            sampler = GEKOSampler(data, total_epochs=epochs, config=config)
            return DataLoader(sampler.wrap(data), batch_size=BATCH, sampler=sampler)
    elif strategy in ("ddp_spawn", "ddp_fork"):
        loader_fn = None
    else:
        loader_fn = lambda: geko.dataloader(batch_size=BATCH, num_workers=workers,  # noqa: E731
                                            persistent_workers=workers > 0)
    callbacks = [geko]
    if checkpoint is not True and checkpoint:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=os.path.join(out, "checkpoints"), save_top_k=-1,
                                                      every_n_train_steps=checkpoint))
    module = (module_cls or Module)(loader_fn, geko)
    trainer = pl.Trainer(max_epochs=epochs, max_steps=max_steps, accelerator="cpu", devices=devices,
                         strategy=strategy or ("ddp" if devices > 1 else "auto"), callbacks=callbacks, logger=False,
                         enable_checkpointing=bool(checkpoint), enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=out,
                         use_distributed_sampler=mode != "nodist")
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer, module, geko


def main():
    out, modes = sys.argv[1], sys.argv[2]
    from tiny import state_digest

    for mode in modes.split(","):
        trainer, module, geko = run(out, mode, devices=int(os.environ.get("WORLD_SIZE", "1")), config=EASY_DDP)
        with open(os.path.join(out, f"rank{trainer.global_rank}_{mode}.json"), "w") as f:
            json.dump({"ids": module.ids, "sizes": module.sizes, "plans": module.plans,
                       "state": state_digest(geko.sampler.state), "world": trainer.world_size,
                       "global_step": trainer.global_step,
                       "metrics": {k: float(v) for k, v in trainer.logged_metrics.items()}}, f)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
