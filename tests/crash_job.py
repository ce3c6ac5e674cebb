"""A training job the crash tests run in a subprocess, kill with SIGKILL, and resume.

    python tests/crash_job.py OUT_DIR DATA (stream|map) [--resume] [--workers N] [--dropout P]
                              [--hook write:STEP | prune:STEP | resave]

DATA is a shard folder (stream) or ignored (map: the same rows, in memory). Both kinds read through 2
DataLoader workers unless ``--workers`` says otherwise. When it finishes the job writes
OUT_DIR/result-ids.npy (the sample ids this process trained on, in order),
OUT_DIR/result-weights.safetensors and OUT_DIR/result.json (final step, and the step it resumed from as
train() logged it).

``--hook`` stops the job *inside* ``save_checkpoint`` so that the test can SIGKILL it there: the job
writes OUT_DIR/hook-fired.json and sleeps. ``write:K``: in the temporary directory of checkpoint K, after
weights, optimizer, RNG and JSON files and before state.arrow. ``prune:K``: while a save at step >= K
deletes an old checkpoint, after part of its files are gone. ``resave``: in the save of a step whose
checkpoint already exists (the final save lands on a periodic one), at the first file written or
deleted, or at its end if it writes and deletes nothing.

The model is a tiny GRU language model in plain torch (no transformers import: the tests start many of
these processes).
"""

import argparse
import json
import os
import re
import shutil
import sys
import time

import numpy as np
import torch
from safetensors.torch import save_file

from geko_data.config import GEKOConfig
from geko_data.train import TrainArgs, train

CFG = GEKOConfig(q_value_lr=0.6, min_q_for_freeze=0.5, freeze_confidence=0.05, freeze_quality=0.0,
                 log_bucket_stats=False)
SAVE_STEPS, KEEP = 3, 3


def rows(n=96, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prompt = rng.integers(1, 64, int(rng.integers(4, 9))).tolist()
        answer = rng.integers(1, 8, 2).tolist()
        out.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return out


class TinyLM(torch.nn.Module):
    """Causal LM: embedding -> GRU -> vocabulary logits (B, T, V)."""

    def __init__(self, vocab=64, dim=32, dropout=0.0):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.rnn = torch.nn.GRU(dim, dim, batch_first=True)
        self.drop = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, input_ids, labels=None, attention_mask=None):
        hidden, _ = self.rnn(self.embed(input_ids))
        return self.head(self.drop(hidden))


def model(dropout=0.0):
    torch.manual_seed(0)
    return TinyLM(dropout=dropout)


# ---------------------------------------------------------------- kill points inside save_checkpoint
def _fire(out, where, step):
    """Tell the test where the job stands (atomically), then wait to be killed."""
    tmp = os.path.join(out, ".hook-fired.json.part")
    with open(tmp, "w") as f:
        json.dump({"where": where, "step": step}, f)
    os.replace(tmp, os.path.join(out, "hook-fired.json"))
    time.sleep(600)
    os._exit(3)  # never reached in the tests: they kill the job first


def install_hook(spec, out):
    from geko_data.state import SampleState
    from geko_data.train import checkpoint as ckpt
    from geko_data.train import loop

    where, _, arg = spec.partition(":")
    target = int(arg) if arg else None
    current = {"step": None, "resave": False}

    real_save = ckpt.save_checkpoint

    def save_checkpoint(output_dir, *, step, **kw):
        current.update(step=step, resave=os.path.isdir(os.path.join(output_dir, f"checkpoint-{step}")))
        path = real_save(output_dir, step=step, **kw)
        if where == "resave" and current["resave"]:
            _fire(out, "resave", step)  # the re-save wrote and deleted nothing: kill it at its end
        current.update(step=None, resave=False)
        return path

    ckpt.save_checkpoint = save_checkpoint
    if hasattr(loop, "save_checkpoint"):  # the loop imports it by name
        loop.save_checkpoint = save_checkpoint

    real_state_save = SampleState.save

    def state_save(self, path):
        step = current["step"]
        in_tmp = re.match(r"^\.checkpoint-\d+\..*\.tmp$", os.path.basename(os.path.dirname(os.path.abspath(path))))
        if step is not None and in_tmp and ((where == "write" and step == target) or
                                            (where == "resave" and current["resave"])):
            _fire(out, where, step)
        return real_state_save(self, path)

    SampleState.save = state_save

    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kw):
        step = current["step"]
        name = os.path.basename(os.fspath(path))
        is_ckpt = name.startswith(("checkpoint-", ".checkpoint-")) and os.path.isdir(path)
        if step is not None and is_ckpt and ((where == "prune" and step >= target) or
                                             (where == "resave" and current["resave"])):
            # rmtree got part of the way: the weights and the optimizer are gone, the rest is still there
            for f in ("model.safetensors", "optimizer.pt"):
                if os.path.exists(os.path.join(path, f)):
                    os.remove(os.path.join(path, f))
            _fire(out, where, step)
        return real_rmtree(path, *args, **kw)

    shutil.rmtree = rmtree


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("data")
    p.add_argument("kind", choices=("stream", "map"))
    p.add_argument("--resume", action="store_true")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--hook", default=None)
    ns = p.parse_args()
    os.makedirs(ns.out, exist_ok=True)
    if ns.hook:
        install_hook(ns.hook, ns.out)
    args = TrainArgs(output_dir=ns.out, num_epochs=3, batch_size=8, learning_rate=5e-3, warmup_steps=2,
                     logging_steps=1, save_steps=SAVE_STEPS, eval_steps=0, progress=False, save_total_limit=KEEP,
                     dataloader_num_workers=ns.workers)
    messages = []
    train_data = ns.data if ns.kind == "stream" else rows()
    result = train(model(ns.dropout), train_data, args=args, config=CFG, resume_from=ns.out if ns.resume else None,
                   record_ids=True, log=messages.append)
    resumed = [int(m.group(1)) for msg in messages for m in [re.search(r"resumed from step (\d+)", msg)] if m]
    np.save(os.path.join(ns.out, "result-ids.npy"), np.array(result.ids_seen, dtype=np.int64))
    save_file({k: v.detach().contiguous() for k, v in result.model.state_dict().items()},
              os.path.join(ns.out, "result-weights.safetensors"))
    with open(os.path.join(ns.out, "result.json"), "w") as f:
        json.dump({"step": result.step, "resumed_from": resumed[0] if resumed else None}, f)


if __name__ == "__main__":
    sys.exit(main())
