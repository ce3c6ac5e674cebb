"""Tiny models, a tiny tokenizer and tiny data for the integration tests: nothing is downloaded."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

VOCAB = 64
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 :.,?!"


def tiny_llama(seed: int = 0, vocab: int = VOCAB, dropout: float = 0.0):
    """A 2-layer Llama; ``dropout`` > 0 makes training draw from torch's RNG (as GPT-2's default 0.1 does)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, attention_dropout=dropout)
    return LlamaForCausalLM(config)


def tiny_tokenizer():
    """A character-level fast tokenizer (ids 0-3 special, then one id per character)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in CHARS:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def rows(n: int, seed: int = 0) -> list[dict]:
    """n prompt+answer rows of token ids, labels -100 on the prompt. Three rows in four answer "5 5", the
    others "6 6": the model soon gets the first kind right and confident (they freeze), the rest stay."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(3, 7))
        prompt = rng.integers(7, VOCAB, size=length).tolist()
        answer = [6, 6] if i % 4 == 0 else [5, 5]
        out.append({"input_ids": prompt + answer, "labels": [-100] * length + answer,
                    "attention_mask": [1] * (length + 2)})
    return out


def hf_dataset(n: int, seed: int = 0, extra_column: bool = False):
    import datasets

    data = rows(n, seed)
    if extra_column:  # a column the model does not take: the default remove_unused_columns drops it
        for i, r in enumerate(data):
            r["text"] = f"row {i}"
    return datasets.Dataset.from_list(data)


def state_digest(state) -> str:
    """A digest of every per-sample column and the kept plan of a SampleState."""
    import hashlib

    table = state.to_arrow()
    h = hashlib.sha256()
    for name in table.column_names:
        h.update(name.encode())
        column = table.column(name).combine_chunks()
        if pa.types.is_dictionary(column.type):
            column = column.indices  # the codes: the values would be Python strings, compared by address
        h.update(np.ascontiguousarray(column.to_numpy(zero_copy_only=False)).tobytes())
    return h.hexdigest()


def recording_trainer(base):
    """``base`` (a GEKO trainer class) that records, per epoch, the sample ids it trained, and the plans."""

    class Recording(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.ids_by_epoch: dict[int, list[int]] = {}
            self.plans: dict[int, list[int]] = {}
            self.batch_sizes: dict[int, list[int]] = {}
            self.lrs: list[float] = []
            self._lr_step = -1

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if "__index__" in inputs and self.geko_sampler is not None:
                epoch = self.geko_sampler.epoch
                self.ids_by_epoch.setdefault(epoch, []).extend(inputs["__index__"].tolist())
                self.batch_sizes.setdefault(epoch, []).append(len(inputs["__index__"]))
                self.plans[epoch] = self.geko_sampler.plan.counts.tolist()
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

        def _maybe_log_save_evaluate(self, *args, **kwargs):
            # Called after every optimizer step, after the scheduler's step: the LR the next step uses.
            if self.state.global_step != self._lr_step:
                self._lr_step = self.state.global_step
                self.lrs.append(self.lr_scheduler.get_last_lr()[0])
            return super()._maybe_log_save_evaluate(*args, **kwargs)

    return Recording


def assert_trains_plan(plan: list[int], ids: list[int], world: int = 1) -> None:
    """``ids`` (all ranks' trained ids of one epoch) hold every draw of ``plan`` exactly once, plus at most
    ``world - 1`` draws repeated to give the ranks equal shares."""
    import collections

    counts = collections.Counter(ids)
    missing = {i: (c, counts[i]) for i, c in enumerate(plan) if counts[i] < c}
    assert not missing, f"draws of the plan not trained (planned, trained): {missing}"
    assert set(counts) <= {i for i, c in enumerate(plan) if c > 0}, "trained a sample the plan did not draw"
    assert 0 <= len(ids) - sum(plan) < world, (len(ids), sum(plan))
