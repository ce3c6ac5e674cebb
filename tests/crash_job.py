"""A training job the crash tests run in a subprocess, kill with SIGKILL, and resume.

    python tests/crash_job.py OUT_DIR DATA (stream|map) [--resume]

DATA is a shard folder (stream) or ignored (map). Writes OUT_DIR/result-ids.npy (the sample ids this
process trained on, in order) and OUT_DIR/result-weights.safetensors when it finishes.
"""

import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

from geko_data.config import GEKOConfig
from geko_data.train import TrainArgs, train

CFG = GEKOConfig(q_value_lr=0.6, min_q_for_freeze=0.5, freeze_confidence=0.05, freeze_quality=0.0,
                 log_bucket_stats=False)


def rows(n=96, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prompt = rng.integers(1, 64, int(rng.integers(4, 9))).tolist()
        answer = rng.integers(1, 8, 2).tolist()
        out.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return out


def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def main() -> None:
    out, data, kind = sys.argv[1], sys.argv[2], sys.argv[3]
    resume = "--resume" in sys.argv
    args = TrainArgs(output_dir=out, num_epochs=3, batch_size=8, learning_rate=5e-3, warmup_steps=2,
                     logging_steps=1, save_steps=3, eval_steps=0, progress=False, save_total_limit=3,
                     dataloader_num_workers=2 if kind == "stream" else 0)
    train_data = data if kind == "stream" else rows()
    result = train(model(), train_data, args=args, config=CFG, resume_from=out if resume else None,
                   log=lambda _m: None)
    np.save(os.path.join(out, "result-ids.npy"), np.array(result["ids_seen"], dtype=np.int64))
    save_file({k: v.detach().contiguous() for k, v in result["model"].state_dict().items()},
              os.path.join(out, "result-weights.safetensors"))
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump({"step": result["step"]}, f)


if __name__ == "__main__":
    main()
