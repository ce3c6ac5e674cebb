"""`geko-train` on a user's own JSONL: small-run defaults, held-out evals, resume, baselines, anneal.

Real runs through ``main()`` on a tiny Llama and word-level tokenizer saved to tmp_path (nothing downloaded).
"""

import json
import os

import pytest

from geko_data import policy
from geko_data.config import GEKOConfig
from geko_data.train.__main__ import LORA_LEARNING_RATE, _settings, build_parser, main
from geko_data.train.args import TrainArgs, anneal_warning
from test_train_cli import records, task_rows, tiny_model_dir, write_jsonl

pytest.importorskip("transformers")

QUIET = ["--progress", "false", "--dataloader_num_workers", "0"]


@pytest.fixture
def job(tmp_path, monkeypatch):
    """A tiny model, 24 training rows and 8 held-out rows; the cwd is an empty dir (nothing may land there)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_model_dir(tmp_path / "model")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return {"model": str(tmp_path / "model"), "data": write_jsonl(tmp_path / "train.jsonl", task_rows(24, 0)),
            "dev": write_jsonl(tmp_path / "dev.jsonl", task_rows(8, 1)), "tmp": tmp_path, "cwd": cwd}


def test_warmup_is_a_share_of_the_run():
    args = TrainArgs(num_epochs=3, batch_size=16)
    assert args.planned_steps(400) == 3 * 25 and args.warmup_for(75) == 8  # 0.1 of 75 steps, rounded up
    assert args.replace(warmup_steps=0).warmup_for(75) == 0  # an explicit warmup_steps wins
    assert args.replace(gradient_accumulation_steps=2).planned_steps(400, world_size=2) == 3 * 7


def test_anneal_warning_names_the_smallest_value_that_works():
    msg = anneal_warning(GEKOConfig(anneal=0.33), 3)
    assert "0.33" in msg and "3-epoch" in msg and "0.334" in msg
    assert policy.annealing(2, 3, GEKOConfig(anneal=0.334))  # the value it names does anneal the last epoch
    assert anneal_warning(GEKOConfig(anneal=0.334), 3) is None
    assert anneal_warning(GEKOConfig(anneal=0.0), 3) is None and anneal_warning(GEKOConfig(), 3) is None
    assert "0.125" in anneal_warning(GEKOConfig(anneal=0.1), 8)


@pytest.mark.timeout(150)
def test_small_run_defaults_eval_before_and_after_every_epoch(job, capsys):
    out = job["tmp"] / "out"
    assert main(["--model", job["model"], "--data", job["data"], "--eval_data", job["dev"], "--output_dir", str(out),
                 "--learning_rate", "0.01", "--anneal", "0.33", *QUIET]) == 0
    captured = capsys.readouterr()
    assert "`anneal` 0.33 anneals no epoch of this 3-epoch run" in captured.err and "0.334" in captured.err
    assert "held-out metric on 8 --eval_data samples: accuracy = sequence exact match" in captured.out
    assert "warmup 0.1 of the steps" in captured.out and "warning: warmup" not in captured.out
    evals = [r["step"] for r in records(out) if r["event"] == "eval"]
    epochs = [r["step"] for r in records(out) if r["event"] == "epoch"]
    # before training, after each of the 3 epochs, and the end of the run is not evaluated twice
    assert len(epochs) == 3 and evals == [0, *epochs]
    assert captured.out.count("[eval] step") == 4
    # a run too short for its warmup says so; LoRA without a learning rate gets LoRA's default
    assert main(["--model", job["model"], "--data", job["data"], "--output_dir", str(job["tmp"] / "short"),
                 "--num_epochs", "1", "--warmup_steps", "100", "--lora", *QUIET]) == 0
    printed = capsys.readouterr().out
    assert "warning: warmup is 100 optimizer steps and the whole run at most 2" in printed
    assert "LoRA applied" in printed and f"lr {LORA_LEARNING_RATE:g}," in printed


@pytest.mark.timeout(240)  # two short runs; the machine may be shared
def test_resume_reuses_the_runs_settings_and_refuses_conflicts_up_front(job, capsys):
    out = job["tmp"] / "out"
    first = ["--model", job["model"], "--data", job["data"], "--output_dir", str(out), "--num_epochs", "2",
             "--batch_size", "4", "--learning_rate", "0.01", "--save_steps", "3", "--save_total_limit", "10",
             "--q_value_lr", "0.9", *QUIET]
    assert main(first) == 0
    full = json.load(open(out / "efficiency.json"))
    capsys.readouterr()
    # a flag that would change the run: one error naming the field and both values, nothing written
    before = sorted(os.listdir(out))
    assert main(["--resume", str(out), "--learning_rate", "0.02", "--q_value_lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "`learning_rate` is 0.02 here but the run was started with 0.01" in err
    assert "`q_value_lr` is 0.5 here but the run was started with 0.9" in err and "Traceback" not in err
    assert sorted(os.listdir(out)) == before and os.listdir(job["cwd"]) == []
    os.rename(out / "geko-train.json", job["tmp"] / "saved.json")  # a run not started by geko-train
    assert main(["--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "has no geko-train.json" in err and "pass --model and --data" in err
    os.rename(job["tmp"] / "saved.json", out / "geko-train.json")
    # --resume DIR alone, from another directory: the saved model, data, args and policy are used
    assert main(["--resume", str(out / "checkpoint-3")]) == 0
    printed = capsys.readouterr().out
    assert "resumed from step 3" in printed and "lr 0.01" in printed
    assert os.listdir(job["cwd"]) == []  # no stray ./geko_output
    again = json.load(open(out / "efficiency.json"))
    for key in ("optimizer_steps", "sample_passes", "forward_passes_rank", "backward_passes_rank"):
        assert again[key] == full[key], key  # counters of the whole run, not only the resumed part
    interrupted = json.load(open(out / "checkpoint-3" / "trainer_state.json"))["time"]
    assert again["wall_time_s"] > interrupted > 0  # the time before the checkpoint counts too
    # flags that do not change the run (logging, workers, output dir) are taken, the rest comes from the run
    run, args, config = _settings(build_parser().parse_args(
        ["--resume", str(out), "--logging_steps", "2", "--dataloader_num_workers", "1", "--learning_rate", "0.01"]))
    assert (args.logging_steps, args.dataloader_num_workers, args.batch_size, config.q_value_lr) == (2, 1, 4, 0.9)
    assert args.output_dir == str(out) and run["data"] == job["data"] and run["model"] == job["model"]


@pytest.mark.timeout(120)
def test_uniform_baseline_output_and_the_final_partition(job, capsys):
    out = job["tmp"] / "out"
    assert main(["--model", job["model"], "--data", job["data"], "--output_dir", str(out), "--mode", "uniform",
                 "--num_epochs", "2", "--batch_size", "4", "--learning_rate", "0.01", "--dataloader_num_workers",
                 "0"]) == 0  # with progress bars
    captured = capsys.readouterr()
    printed = captured.out
    assert "a baseline" in printed and "Mastered" not in printed and "Partition" not in printed
    assert "loss=" in captured.err and "phase=" not in captured.err
    assert not any(phase in printed for phase in policy.PHASES)
    report = json.load(open(out / "efficiency.json"))
    table = printed[printed.index("  epoch "):].splitlines()
    end = next(line.split() for line in table if line.split()[:1] == ["end"])  # after the last epoch
    assert int(end[1]) == report["mastered_freeze"] == report["after_last_epoch"]["freeze"]
    assert f"Would be FREEZE    : {report['mastered_freeze']}" in printed


@pytest.mark.timeout(60)
def test_an_output_dir_in_use_is_refused_before_the_model_loads(job, capsys):
    from geko_data.train.outdir import lock_output_dir

    out = job["tmp"] / "busy"
    out.mkdir()
    (out / "geko-train.json").write_text('{"model": "theirs"}')
    with lock_output_dir(str(out)):  # another run holds the dir
        # a model folder that passes the up-front check but cannot load: the busy dir is named, nothing loaded
        fake = job["tmp"] / "fake-model"
        fake.mkdir(exist_ok=True)
        (fake / "config.json").write_text("{}")
        assert main(["--model", str(fake), "--data", job["data"], "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "in use by another training run" in err and f"pid {os.getpid()}" in err
    assert json.load(open(out / "geko-train.json")) == {"model": "theirs"}  # its settings are untouched
