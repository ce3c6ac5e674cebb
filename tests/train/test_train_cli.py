"""The geko-train command: flags, config files, and end-to-end runs on a tiny model saved to tmp_path."""

import json
import os
import sys

import numpy as np
import pytest
import torch

from geko_data.state import SampleState
from geko_data.train.__main__ import build_parser, main

pytest.importorskip("transformers")


def test_every_field_is_a_flag():
    ns = build_parser().parse_args(["--num_epochs", "2", "--bucket_weights", "[5, 2, 0]", "--bf16", "true"])
    assert ns.num_epochs == 2 and ns.bucket_weights == [5, 2, 0] and ns.bf16 is True


def test_an_explicit_null_is_a_setting_not_an_absent_flag():
    # fields whose None means something (the rule before short runs kept FREEZE; the threshold freeze
    # rule) were dropped with every flag left unset, so the command line could not reach them
    from geko_data.train.__main__ import _settings

    _, _, config = _settings(build_parser().parse_args(["--short_run_keep", "null", "--freeze_share", "null"]))
    assert config.short_run_keep is None and config.freeze_share is None
    _, _, config = _settings(build_parser().parse_args([]))
    assert config.short_run_keep == 0.5 and config.freeze_share == 0.5


def test_python_none_on_the_command_line_is_refused_with_the_json_spelling(capsys):
    assert main(["--short_run_keep", "None"]) == 2
    err = capsys.readouterr().err
    assert "short_run_keep" in err and "write null for None" in err
    assert main(["--num_epochs", "0"]) == 2
    assert "null" not in capsys.readouterr().err  # the hint only where it helps


def test_bad_values_exit_2_with_the_field_named(capsys):
    assert main(["--num_epochs", "0"]) == 2
    assert "num_epochs" in capsys.readouterr().err
    assert main(["--mode", "fast"]) == 2
    assert "mode" in capsys.readouterr().err


def test_config_file_unknown_key(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"train": {"num_epochs": 1}, "geko": {"bogus": 1}}))
    assert main(["--config", str(cfg)]) == 2
    assert "bogus" in capsys.readouterr().err


def test_toml_config_is_read(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\nnum_epochs = 0\n")
    assert main(["--config", str(cfg)]) == 2  # the file's value was applied (and rejected)
    assert "num_epochs" in capsys.readouterr().err


def test_toml_without_a_parser_fails_clearly(tmp_path, capsys, monkeypatch):
    # Python 3.10 has no tomllib: the CLI falls back to tomli, and says so when that is missing too
    monkeypatch.setitem(sys.modules, "tomllib", None)
    monkeypatch.setitem(sys.modules, "tomli", None)
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\nnum_epochs = 1\n")
    assert main(["--config", str(cfg)]) == 2
    assert "tomli" in capsys.readouterr().err


def test_eval_data_must_be_jsonl(capsys):
    assert main(["--eval_data", "dev.csv", "--data", "x.jsonl", "--model", "m"]) == 2
    assert "--eval_data" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, says", [
    ("--model", "{tmp}/not/there", "no such folder"),
    ("--model", "{tmp}/empty", "folder without config.json"),
    ("--model", "no-such-org/no-such-model", "no model of that name in the offline Hugging Face cache"),
    ("--data", "{tmp}/not/there", "no such file or folder"),
    ("--data", "{tmp}/empty", "folder without index.arrow"),
    ("--data", "{tmp}/missing.jsonl", "no such file"),
    ("--eval_data", "{tmp}/missing.jsonl", "no such file"),
])
def test_a_model_or_data_that_is_not_there_fails_up_front_in_one_line(tmp_path, capsys, flag, value, says):
    # It printed the banner, then a 30-line traceback from the hub client (or the stream) once it got there.
    (tmp_path / "empty").mkdir()
    value = value.format(tmp=tmp_path)
    assert main([flag, value, "--output_dir", str(tmp_path / "out")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith(f"geko-train: `{flag}` "), err
    assert says in err and repr(value if value.startswith("no-such") else os.path.abspath(value)) in err
    assert ("config.json" in err if flag == "--model" else ".jsonl" in err)  # what is allowed instead
    assert ("default" in err) == (flag != "--eval_data")
    assert not (tmp_path / "out").exists()


def test_urls_and_hub_names_are_not_turned_into_local_paths():
    from geko_data.train.__main__ import _path_setting

    assert _path_setting("s3://bucket/shards/") == "s3://bucket/shards/"  # was /cwd/s3:/bucket/shards
    assert _path_setting("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert _path_setting("./x") == os.path.abspath("x") and _path_setting("default") == "default"



# ---------------------------------------------------------------- end to end on a tiny local model

WORDS = [f"w{i}" for i in range(40)]


def tiny_model_dir(path):
    """A tiny Llama and a word-level tokenizer saved as an HF folder (built here, nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = ["<pad>", "</s>", "<unk>", "yes", "no", "Tweet:", "Sentiment:", "negative", "neutral", "positive"]
    vocab += WORDS
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 pad_token_id=0, bos_token_id=1, eos_token_id=1)).save_pretrained(path)
    return fast


def task_rows(n, seed):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(3, 7))).tolist()
        rows.append({"prompt": " ".join(words), "completion": "yes" if len(words) % 2 else "no"})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_args(model, data, out, *extra, epochs=2):
    return ["--model", model, "--data", data, "--output_dir", str(out), "--num_epochs", str(epochs),
            "--batch_size", "4", "--learning_rate", "0.01", "--warmup_steps", "0", "--logging_steps", "1",
            "--save_steps", "2", "--save_total_limit", "10", "--eval_steps", "0", "--progress", "false",
            "--dataloader_num_workers", "0", "--log_bucket_stats", "false", *extra]


def records(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_model_dir(tmp_path / "model")
    return str(tmp_path / "model")


@pytest.mark.timeout(120)
def test_cli_trains_on_jsonl_with_eval_data_and_resumes(tmp_path, model_dir, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", task_rows(24, 0))
    dev = write_jsonl(tmp_path / "dev.jsonl", task_rows(8, 1))
    out = tmp_path / "out"
    assert main(run_args(model_dir, data, out, "--eval_data", dev, "--eval_steps", "2")) == 0
    printed = capsys.readouterr().out
    assert printed.count("  geko-train\n") == 1 and "GEKO efficiency report" in printed
    recs = records(out)
    evals = [r for r in recs if r["event"] == "eval"]
    assert evals and all(r["step"] % 2 == 0 and 0 <= r["eval_accuracy"] <= 1 for r in evals)
    full = json.load(open(out / "efficiency.json"))
    assert full["samples"] == 24 and full["optimizer_steps"] >= 6  # 24 / 4 = 6 steps in epoch 1 alone
    # --resume from a mid-run checkpoint, into a fresh output dir: it ends where the full run ended
    resumed = tmp_path / "resumed"
    assert main(run_args(model_dir, data, resumed, "--eval_data", dev, "--resume", str(out / "checkpoint-4"))) == 0
    assert "resumed from step 4" in capsys.readouterr().out
    again = json.load(open(resumed / "efficiency.json"))
    assert again["optimizer_steps"] == full["optimizer_steps"] and again["sample_passes"] == full["sample_passes"]
    a, b = SampleState.load(out / "state.arrow"), SampleState.load(resumed / "state.arrow")
    assert np.array_equal(a.times_seen, b.times_seen) and np.allclose(a.loss, b.loss, equal_nan=True, atol=1e-5)


@pytest.mark.timeout(120)
def test_cli_trains_on_a_shard_folder_and_resumes(tmp_path, model_dir, capsys):
    from transformers import AutoTokenizer

    from geko_data.shards import write_shards
    from geko_data.train.__main__ import _jsonl_dataset

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = _jsonl_dataset(write_jsonl(tmp_path / "rows.jsonl", task_rows(20, 2)), tok)
    write_shards(({"__key__": f"r{i:03d}", "json": json.dumps(r).encode()} for i, r in enumerate(rows)),
                 str(tmp_path / "shards" / "s-%03d.tar"), maxcount=7)
    out = tmp_path / "out"
    assert main(run_args(model_dir, str(tmp_path / "shards"), out)) == 0
    full = json.load(open(out / "efficiency.json"))
    assert full["samples"] == 20 and full["optimizer_steps"] >= 5
    assert main(run_args(model_dir, str(tmp_path / "shards"), out, "--resume", str(out / "checkpoint-2"))) == 0
    assert "resumed from step 2" in capsys.readouterr().out
    again = json.load(open(out / "efficiency.json"))
    assert again["optimizer_steps"] == full["optimizer_steps"] and again["sample_passes"] == full["sample_passes"]
    # resuming in the same output dir: the steps after the checkpoint are logged once, not twice
    steps = [r["step"] for r in records(out) if r["event"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == full["optimizer_steps"]


def test_default_job_shards_are_rebuilt_for_other_settings(tmp_path):
    from geko_data.shards import read_index
    from geko_data.train import default as dj

    tok = tiny_model_dir(tmp_path / "model")
    rows = [{"text": " ".join(WORDS[i:i + 3]), "label": dj.LABELS[i % 3]} for i in range(9)]
    folder = str(tmp_path / "data")
    manifest = dj.task_manifest(tok, n_train=9, n_eval=3, seed=0)
    assert dj.ensure_task_shards(tok, rows, folder, manifest)  # first run: written
    assert not dj.ensure_task_shards(tok, rows, folder, manifest)  # same settings: the cache is used
    assert json.load(open(os.path.join(folder, dj.MANIFEST_NAME))) == manifest
    fewer = dj.task_manifest(tok, n_train=6, n_eval=3, seed=0)
    assert dj.ensure_task_shards(tok, rows[:6], folder, fewer)  # --n_train changed: rebuilt
    assert read_index(folder).num_samples == 6
    for changed in (dict(seed=1), dict(max_prompt_tokens=8)):
        other = dj.task_manifest(tok, **{"n_train": 6, "n_eval": 3, "seed": 0, **changed})
        assert other != fewer and dj.ensure_task_shards(tok, rows[:6], folder, other)
    tok.name_or_path = "another-model"  # another model's tokenizer: its ids differ
    assert dj.task_manifest(tok, n_train=6, n_eval=3, seed=0) != fewer


@pytest.mark.timeout(150)
def test_cli_under_torchrun_prints_on_rank_0_only(tmp_path, model_dir):
    import subprocess

    data = write_jsonl(tmp_path / "train.jsonl", task_rows(16, 0))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    argv = run_args(model_dir, data, tmp_path / "out", epochs=1)
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "geko_data.train", *argv],
                          capture_output=True, text=True, timeout=140,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("  geko-train\n") == 1  # the banner, once: rank 1 prints nothing
    assert proc.stdout.count("GEKO efficiency report") == 1 and proc.stdout.count("[geko-train] done") == 1
    assert json.load(open(tmp_path / "out" / "efficiency.json"))["world_size"] == 2


@pytest.mark.timeout(120)
def test_a_model_name_in_the_offline_hf_cache_trains(tmp_path, monkeypatch, capsys):
    # A name the HF cache holds is a model too; it was made an absolute path under the working directory
    # and failed. The cache is laid out as the hub client writes it (refs/main -> snapshots/<commit>/).
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    commit = "0" * 40
    repo = cache / "models--tiny-org--tiny-llama"
    tiny_model_dir(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read at each lookup
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "train.jsonl", task_rows(8, 0))
    # Nothing may reach for the network: transformers' adapter lookup asked the hub for adapter_config.json
    # despite local_files_only and, offline, retried for ~20 s. An audit hook sees every name lookup/connect
    # (HF_HUB_OFFLINE set in the environment now is not read: the hub client read it at import).
    reached = []
    watching = [True]
    sys.addaudithook(lambda event, args: reached.append((event, args[:2])) if watching[0] and event in (
        "socket.getaddrinfo", "socket.connect") else None)
    try:
        assert main(run_args("tiny-org/tiny-llama", data, tmp_path / "out", epochs=1)) == 0
    finally:
        watching[0] = False  # an audit hook cannot be removed
    assert reached == []
    assert json.load(open(tmp_path / "out" / "efficiency.json"))["samples"] == 8
    assert json.load(open(tmp_path / "out" / "geko-train.json"))["model"] == "tiny-org/tiny-llama"


def test_resuming_a_checkpoint_from_before_a_config_field_keeps_the_value_the_run_had(tmp_path):
    """A checkpoint whose saved config predates ``answer_weight_cap`` resumes without the answers' balance
    (GEKOConfig.from_dict's rule for an older state), not with the new default 4."""
    from geko_data.config import GEKOConfig
    from geko_data.train.__main__ import _saved_run

    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    old = GEKOConfig().to_dict()
    del old["answer_weight_cap"]
    (ckpt / "trainer_state.json").write_text(json.dumps({"args": {"num_epochs": 3}}))
    (ckpt / "data_state.json").write_text(json.dumps({"config": old}))
    for name in ("state.arrow", "optimizer.pt", "rng.safetensors", "model.safetensors"):
        (ckpt / name).write_bytes(b"")
    _, _, saved_config, _ = _saved_run(str(ckpt))
    assert saved_config["answer_weight_cap"] is None
    assert GEKOConfig().replace(**{k: v for k, v in saved_config.items() if k != "name"}).answer_weight_cap is None
