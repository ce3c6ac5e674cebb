"""TRL's SFTTrainer with GEKO: supervised fine-tuning on prompt/completion pairs, on CPU in under a minute.

A character-level tokenizer and a tiny Llama are built here, so nothing is downloaded. The one line that
differs from a plain SFTTrainer script is marked ``# GEKO``. TRL tokenizes the dataset, masks the prompts
and drops rows that truncation leaves without a completion token; GEKO's sampler is built afterwards, from
the rows TRL kept, and its collator keeps ``__index__`` / ``__weight__`` next to TRL's.

Run: ``python examples/trl_sft.py``; ``GEKO_OUT=dir`` keeps the checkpoints, ``GEKO_EPOCHS=n`` sets epochs.
"""

import os
import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig

from geko_data.integrations.hf import GEKOSFTTrainer  # GEKO

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 :.,?!"
ANIMALS = ["cat", "dog", "cow", "owl", "bee", "fox", "pig", "hen", "eel", "ant"]
SOUNDS = {"cat": "meow", "dog": "woof", "cow": "moo", "owl": "hoot", "bee": "buzz", "fox": "yip",
          "pig": "oink", "hen": "cluck", "eel": "zap", "ant": "tick"}


def char_tokenizer():
    """One token per character, plus pad / bos / eos / unk."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({c: i + 4 for i, c in enumerate(CHARS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def make_rows():
    """"what does the N say?" -> " SOUND" (the sound is easy to learn) and "count N: k" -> " k+1" (harder);
    three over-long prompts that TRL's truncation leaves without completion tokens: TRL drops them."""
    rows = [{"prompt": f"what does the {a} say?", "completion": f" {SOUNDS[a]}"} for a in ANIMALS for _ in range(4)]
    rows += [{"prompt": f"count {a}: {k}", "completion": f" {k + 1}"} for a in ANIMALS[:6] for k in range(8)]
    rows += [{"prompt": "tell me everything about " + "the " * 20, "completion": " no"}] * 3
    return rows


def main():
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                                         eos_token_id=2))
    args = SFTConfig(output_dir=os.environ.get("GEKO_OUT") or tempfile.mkdtemp(prefix="geko-sft-"),
                     num_train_epochs=int(os.environ.get("GEKO_EPOCHS", "6")), per_device_train_batch_size=16,
                     learning_rate=1e-2, warmup_steps=3, logging_steps=5, save_strategy="epoch",
                     save_total_limit=1, max_length=40, report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    rows = make_rows()
    trainer = GEKOSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),  # GEKO: the class
                             processing_class=tokenizer)
    trainer.train()
    print(f"rows given {len(rows)}, kept by TRL {len(trainer.train_dataset)}, "
          f"GEKO sampler over {trainer.geko_sampler.num_samples}")
    print(trainer.geko_sampler.format_efficiency_report())
    print(f"optimizer steps {trainer.state.global_step}, final learning rate "
          f"{trainer.lr_scheduler.get_last_lr()[0]:.2g}")


if __name__ == "__main__":
    main()
