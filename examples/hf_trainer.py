"""transformers.Trainer with GEKO: a tiny Llama learns one-digit arithmetic, on CPU in under a minute.

The model is built from a config and the data is made here, so nothing is downloaded. The one line that
differs from a plain Trainer script is marked ``# GEKO``; under ``torchrun --nproc_per_node=2`` the same
script trains each rank on its equal share of GEKO's plan.

Run: ``python examples/hf_trainer.py``; ``GEKO_OUT=dir`` keeps the checkpoints (each holds the GEKO state,
``trainer.train(resume_from_checkpoint=True)`` continues exactly), ``GEKO_EPOCHS=n`` sets the epochs.
``GEKO_SHARDS=dir`` writes the rows as WebDataset shards there and trains from them through
``ShardDataset`` (a folder URL such as ``s3://bucket/shards/`` reads shards indexed there instead).
"""

import os
import tempfile

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from geko_data.integrations.hf import GEKOTrainer  # GEKO
from geko_data.train import leave_process_group
from geko_data.train.collate import pad_collate

CHARS = "0123456789+*=#"  # '#' ends the answer
STOI = {c: i + 1 for i, c in enumerate(CHARS)}  # 0 pads


def make_rows():
    """One-digit arithmetic: "a*0=" and "0*a=" answer 0, "a*1=" and "1*a=" answer a (easy: GEKO soon
    freezes these), "a+b=" answers the last digit of a + b (harder: these keep training); then '#'.
    Labels are -100 on the prompt."""
    pairs = [pair for a in range(10) for pair in ((f"{a}*0=", "0"), (f"0*{a}=", "0"), (f"{a}*1=", f"{a}"),
                                                  (f"1*{a}=", f"{a}"))]
    pairs += [(f"{a}+{b}=", f"{(a + b) % 10}") for a in range(10) for b in range(10)]
    rows = []
    for prompt, answer in pairs:
        ids = [STOI[c] for c in prompt + answer + "#"]
        rows.append({"input_ids": ids, "labels": [-100] * len(prompt) + ids[len(prompt):],
                     "attention_mask": [1] * len(ids)})
    return rows


@torch.no_grad()
def exact_match(model, rows):
    """Share of rows whose every answer token is the model's top prediction (teacher forcing)."""
    batch = pad_collate(rows)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    pred, target = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
    mask = target != -100
    return float(((pred == target) | ~mask).all(dim=1).float().mean())


def main():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(CHARS) + 1, hidden_size=48, intermediate_size=96,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=16, pad_token_id=0))
    rows = make_rows()
    report_to = ["tensorboard"] if _has("tensorboard") else []
    args = TrainingArguments(output_dir=os.environ.get("GEKO_OUT") or tempfile.mkdtemp(prefix="geko-hf-"),
                             num_train_epochs=int(os.environ.get("GEKO_EPOCHS", "8")),
                             per_device_train_batch_size=20, learning_rate=1e-2, warmup_steps=3,
                             lr_scheduler_type="linear", logging_steps=5, save_strategy="epoch",
                             save_total_limit=2, report_to=report_to, use_cpu=True, disable_tqdm=True, seed=0)
    trainer = GEKOTrainer(model=model, args=args, train_dataset=train_data(rows),  # GEKO: the class
                          data_collator=pad_collate)
    print(f"exact match before: {exact_match(model, rows):.0%}")
    trainer.train()
    print(f"exact match after:  {exact_match(model, rows):.0%}")
    print(trainer.geko_sampler.format_efficiency_report())
    print(f"optimizer steps {trainer.state.global_step}, final learning rate "
          f"{trainer.lr_scheduler.get_last_lr()[0]:.2g}; logs and checkpoints in {args.output_dir}")
    leave_process_group()  # under torchrun: Trainer leaves the group up, and a gloo rank can hang at exit with it


def train_data(rows):
    """The rows in memory, or with ``GEKO_SHARDS`` set, read from WebDataset shards (written there first
    when it is a local folder without an index)."""
    shards = os.environ.get("GEKO_SHARDS")
    if not shards:
        return Dataset.from_list(rows)
    import json

    from geko_data import ShardDataset, write_shards
    from geko_data.train.collate import decode_json

    if "://" not in shards and not os.path.exists(os.path.join(shards, "index.arrow")):
        os.makedirs(shards, exist_ok=True)
        write_shards([{"__key__": f"{i:05d}", "json": json.dumps(r)} for i, r in enumerate(rows)],
                     os.path.join(shards, "shard-%03d.tar"), maxcount=64)
    return ShardDataset(shards, decode=decode_json)  # the index's order: the rows' order


def _has(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    main()
