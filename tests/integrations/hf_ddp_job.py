"""Run under torchrun (2 CPU processes, gloo): a GEKOTrainer run that writes, per rank, what it trained."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tiny  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from geko_data import GEKOConfig  # noqa: E402
from geko_data.integrations.hf import GEKOTrainer  # noqa: E402
from geko_data.train.collate import pad_collate  # noqa: E402


def main() -> None:
    """argv: OUT_DIR [SHARDS]: with SHARDS (a folder of the same 160 rows as json shards) the ranks read them
    through ShardDataset, one DataLoader worker each."""
    out = sys.argv[1]
    shards = sys.argv[2] if len(sys.argv) > 2 else None
    args = TrainingArguments(output_dir=out, num_train_epochs=3, per_device_train_batch_size=8,
                             gradient_accumulation_steps=2, learning_rate=3e-2, logging_steps=1,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                             ddp_backend="gloo", seed=3, dataloader_num_workers=1 if shards else 0)
    if shards:
        from geko_data.dataset import ShardDataset
        from geko_data.train.collate import decode_json

        data = ShardDataset(shards, decode=decode_json)
    else:
        data = tiny.hf_dataset(160)
    trainer = tiny.recording_trainer(GEKOTrainer)(
        model=tiny.tiny_llama(), args=args, train_dataset=data, data_collator=pad_collate,
        geko_config=GEKOConfig(freeze_confidence=0.6, freeze_quality=0.5, log_bucket_stats=False))
    trainer.train()
    rank = int(os.environ["RANK"])
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"ids": trainer.ids_by_epoch, "plans": trainer.plans, "steps": trainer.state.global_step,
                   "batch_sizes": trainer.batch_sizes,
                   "state": tiny.state_digest(trainer.geko_state), "lrs": trainer.lrs,
                   "world": trainer.geko_sampler.world.world_size}, f)
    from geko_data.train import leave_process_group

    leave_process_group()  # Trainer leaves the group up: a rank's gloo threads could hang or abort it at exit


if __name__ == "__main__":
    main()
