"""The reference loop under torchrun DDP on CPU (gloo): every rank holds the same GEKO state.

    torchrun --standalone --nproc_per_node=2 examples/ddp_torchrun.py

A tiny Llama built from a config learns a synthetic copy task; each rank
reads its equal share of the epoch plan, reports are all-gathered, rank 0
logs and writes checkpoints (into ``$GEKO_OUT``, else a folder in the temp dir; the
first line says which). The per-epoch line is rank 0's share of the epoch. Runs in
seconds.
"""

import os
import tempfile

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from geko_data import GEKOConfig
from geko_data.train import TrainArgs, leave_process_group, train


def copy_task(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        prompt = rng.integers(3, 32, 6).tolist()
        rows.append({"input_ids": prompt + [1] + prompt[:3], "labels": [-100] * 7 + prompt[:3]})
    return rows


def main() -> None:
    torch.manual_seed(0)  # the same initial weights on every rank
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    out = os.environ.get("GEKO_OUT") or os.path.join(tempfile.gettempdir(), "geko-ddp-example")
    rank = int(os.environ.get("RANK", 0))
    if rank == 0:
        chosen = "GEKO_OUT" if os.environ.get("GEKO_OUT") else "default; set GEKO_OUT to choose"
        print(f"[ddp example] checkpoints, metrics and state go to {out} ({chosen})", flush=True)
    args = TrainArgs(output_dir=out, num_epochs=4, batch_size=16, learning_rate=3e-3, warmup_steps=5,
                     logging_steps=5, save_steps=20, eval_steps=0, dataloader_num_workers=0, progress=False)
    result = train(model, copy_task(512), args=args, config=GEKOConfig(q_value_lr=0.5, min_q_for_freeze=0.7))
    # Both figures are the same on every rank: the job's steps (each one on every rank) and the passes of all
    # ranks, counted in the shared state.
    print(f"[rank {rank}] optimizer steps {result.step} (the job's), sample passes of all ranks "
          f"{result.efficiency['sample_passes']} (shared state)")
    leave_process_group()  # a barrier, then the group destroyed: exiting with it up can hang a gloo rank


if __name__ == "__main__":
    main()
