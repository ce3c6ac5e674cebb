"""Smoke run of the value benchmark's whole pipeline (real tasks, tiny sizes): it must finish and report."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(300)
def test_bench_value_quick_tiny(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/bench_value.py", "--tiny", "--tasks", "mnist,minilm",
                           "--policies", "uniform,random_subset,infobatch,geko", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=290, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "value.json").read_text())
    rows = {(r["task"], r["split"], r["policy"]): r for r in result["rows"]}
    assert {t for t, _, _ in rows} == {"mnist", "minilm"} and {s for _, s, _ in rows} == {"dev", "test"}
    uniform = rows[("mnist", "test", "uniform")]
    assert uniform["backward_vs_uniform"] == 1.0 and uniform["diff_mean"] == 0.0
    assert rows[("mnist", "test", "random_subset")]["backward"] < uniform["backward"]
    for run in result["runs"]["mnist"]:  # both splits measured after every epoch
        assert len(run["curve"]) == 3 and all(0 <= c["dev"] <= 1 and 0 <= c["test"] <= 1 for c in run["curve"])
        # the answers each epoch trained on, per class: they add up to the epoch's backward passes
        trained = [sum(c["trained_by_class"].values()) for c in run["curve"]]
        assert trained == list(np.diff([0] + [c["backward"] for c in run["curve"]]))
        assert all(set(c["dev_by_class"]) <= {str(k) for k in range(10)} and
                   all(0 <= v <= 1 for v in c["dev_by_class"].values()) for c in run["curve"])
    md = (tmp_path / "value.md").read_text()
    assert md.count("| geko |") == 4 and "mnist: geko" in md and "vs infobatch" in md
    assert (tmp_path / "value.png").stat().st_size > 10_000


def test_bench_value_rejects_unknown_names(tmp_path):
    for args, word in ((["--tasks", "cifar"], "cifar"), (["--policies", "magic"], "magic"),
                       (["--variant", "v:no_such_field=1"], "no_such_field")):
        proc = subprocess.run([sys.executable, "benchmarks/bench_value.py", "--tiny", "--out", str(tmp_path), *args],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert proc.returncode == 2 and word in proc.stderr


def test_generative_task_answer_is_the_tweets_last_word():
    gen_answer = _bench_value().gen_answer
    cases = {"I appreciate the quick response.": " response", "Hmm.": " Hmm", "Pleeeease!!!! :)": " Pleeeease",
             "so good #happy @JetBlue http://t.co/x": " good", "don't": " don't", "2:55 !!": " none"}
    for text, answer in cases.items():
        assert gen_answer({"text": text, "label": "neutral"}) == answer, text


def test_length_task_cuts_at_the_tertiles_of_the_training_rows():
    length_cuts = _bench_value().length_cuts
    rows = [{"text": " ".join(["w"] * n)} for n in range(1, 10)]  # 1..9 words
    assert length_cuts(rows) == (3, 6)  # short <= 3 words < medium <= 6 < long


def test_answer_class_is_the_label_or_the_first_answer_token():
    answer_class = _bench_value().answer_class
    assert answer_class(torch.tensor([3, 0, 7])).tolist() == [3, 0, 7]
    labels = torch.tensor([[-100, -100, 11, 2, -100], [-100, 5, 2, -100, -100], [-100, -100, -100, 11, 2]])
    assert answer_class(labels).tolist() == [11, 5, 11]


def test_bench_value_rejects_a_negative_first_seed(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/bench_value.py", "--tiny", "--first-seed", "-1", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "--first-seed" in proc.stderr and "-1" in proc.stderr


def _bench_value():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_value
    finally:
        sys.path.pop(0)
    return bench_value


def test_llm_cache_key_covers_what_the_cached_states_depend_on():
    """The cached hidden states are the output of the layers under the LoRA for the cut prompts: a setup
    with another layer count or prompt cut must not reuse them; rank, learning rate, batch size and the
    MLP flag change only the trained part, so they share one cache."""
    bv = _bench_value()
    pairs = [("Tweet: a\nSentiment:", " positive"), ("Tweet: b\nSentiment:", " negative")]
    base = bv.LMSetup(lora_layers=2, rank=4, lr=5e-3, prompt_tokens=32)
    key = bv.cache_key(base, pairs)
    assert bv.cache_key(base.__class__(**{**base.__dict__, "lora_layers": 6}), pairs) != key
    assert bv.cache_key(base.__class__(**{**base.__dict__, "prompt_tokens": 24}), pairs) != key
    assert bv.cache_key(base, pairs[:1]) != key
    same = bv.LMSetup(lora_layers=2, rank=8, lr=1e-3, prompt_tokens=32, batch_size=8, mlp=True)
    assert bv.cache_key(same, pairs) == key
    for task, setup in bv.LM_SETUPS.items():  # every LLM task's setup names a valid split of the 30 layers
        assert 1 <= setup.lora_layers < 30, task


def test_llm_setup_rejects_bad_values():
    bv = _bench_value()
    for field, value in (("lora_layers", 0), ("rank", 2.5), ("prompt_tokens", -1), ("batch_size", 0), ("lr", 0)):
        kwargs = {"lora_layers": 2, "rank": 4, "lr": 5e-3, "prompt_tokens": 32, field: value}
        with pytest.raises(ValueError, match=field):
            bv.LMSetup(**kwargs)


@pytest.mark.timeout(300)
def test_bench_value_merges_seeds_run_apart(tmp_path):
    """Seeds run in separate processes (one value.json each) combine into the table a single run of all
    seeds reports: same rows, same summary lines; a repeated (policy, seed) is refused."""
    cmd = [sys.executable, "benchmarks/bench_value.py", "--tiny", "--tasks", "mnist", "--policies", "uniform,geko"]
    proc = subprocess.run([*cmd, "--seeds", "2", "--out", str(tmp_path / "both")], capture_output=True, text=True,
                          timeout=280, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    whole = json.loads((tmp_path / "both" / "value.json").read_text())
    for seed in (0, 1):  # what `--first-seed S --seeds 1` writes: the same runs, one seed per folder
        (tmp_path / f"s{seed}").mkdir()
        part = {**whole, "seeds": 1, "runs": {"mnist": [r for r in whole["runs"]["mnist"] if r["seed"] == seed]}}
        (tmp_path / f"s{seed}" / "value.json").write_text(json.dumps(part))
    merged = subprocess.run([*cmd, "--merge", f"{tmp_path / 's0'},{tmp_path / 's1'}", "--out", str(tmp_path / "m")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert merged.returncode == 0, merged.stderr[-2000:]
    result = json.loads((tmp_path / "m" / "value.json").read_text())
    assert result["rows"] == whole["rows"] and result["summary"] == whole["summary"]
    assert result["rows"][0]["seeds"] == 2 and (tmp_path / "m" / "value.png").stat().st_size > 10_000
    again = subprocess.run([*cmd, "--merge", f"{tmp_path / 's0'},{tmp_path / 's0'}", "--out", str(tmp_path / "m2")],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert again.returncode == 2 and "repeats runs" in again.stderr
    # more policies for the same seeds, run without uniform, and a variant shown under another name
    more = subprocess.run([*cmd[:-2], "--policies", "random_subset", "--without-uniform", "--seeds", "2",
                           "--variant", "cand:bucket_weights=[1,1,1]", "--out", str(tmp_path / "more")],
                          capture_output=True, text=True, timeout=280, cwd=ROOT)
    assert more.returncode == 0, more.stderr[-2000:]
    assert {r["policy"] for r in json.loads((tmp_path / "more" / "value.json").read_text())["runs"]["mnist"]} == {
        "random_subset", "cand"}
    renamed = subprocess.run([*cmd, "--merge", f"{tmp_path / 'both'},{tmp_path / 'more'}", "--rename",
                              "geko=previous,cand=geko", "--out", str(tmp_path / "r")],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert renamed.returncode == 0, renamed.stderr[-2000:]
    result = json.loads((tmp_path / "r" / "value.json").read_text())
    rows = {(r["split"], r["policy"]): r for r in result["rows"]}
    assert {p for _, p in rows} == {"uniform", "previous", "random_subset", "geko"}
    assert rows[("test", "previous")]["quality_mean"] == next(
        r for r in whole["rows"] if r["split"] == "test" and r["policy"] == "geko")["quality_mean"]
    assert result["policies"]["geko"]["bucket_weights"] == [1.0, 1.0, 1.0]
    # a policy run on fewer seeds than uniform is marked in the table
    (tmp_path / "more0").mkdir()
    part = json.loads((tmp_path / "more" / "value.json").read_text())
    part["runs"]["mnist"] = [r for r in part["runs"]["mnist"] if r["seed"] == 0]
    (tmp_path / "more0" / "value.json").write_text(json.dumps(part))
    fewer = subprocess.run([*cmd, "--merge", f"{tmp_path / 'both'},{tmp_path / 'more0'}", "--out", str(tmp_path / "f")],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert fewer.returncode == 0, fewer.stderr[-2000:]
    md = (tmp_path / "f" / "value.md").read_text()
    assert "(2 seed(s);" in md and "| random_subset (1 seed) |" in md and "| geko |" in md
    bad = subprocess.run([*cmd, "--merge", str(tmp_path / "s0"), "--rename", "geko", "--out", str(tmp_path / "b")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "--rename" in bad.stderr


def test_lr_scale_shapes_and_bad_name():
    lr_scale = _bench_value().lr_scale
    assert [lr_scale("constant", p) for p in (0.0, 0.5, 1.0)] == [1.0, 1.0, 1.0]
    assert lr_scale("cosine", 0.0) == 1.0 and abs(lr_scale("cosine", 0.5) - 0.5) < 1e-12
    assert lr_scale("cosine", 1.0) < 1e-12 and lr_scale("cosine", 2.0) < 1e-12  # clamped past the end
    with pytest.raises(ValueError, match="`schedule` must be one of constant, cosine, got 'linear'"):
        lr_scale("linear", 0.5)


@pytest.mark.timeout(200)
def test_bench_value_cosine_schedule_is_recorded_and_changes_the_run(tmp_path):
    common = [sys.executable, "benchmarks/bench_value.py", "--tiny", "--tasks", "mnist", "--policies", "uniform"]
    runs = {}
    for sched in ("constant", "cosine"):
        out = tmp_path / sched
        proc = subprocess.run([*common, "--lr-schedule", sched, "--out", str(out)], capture_output=True, text=True,
                              timeout=180, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[sched] = json.loads((out / "value.json").read_text())
    assert "lr_schedule" not in runs["constant"]["sizes"]["mnist"]  # as results written before the option
    assert runs["cosine"]["sizes"]["mnist"]["lr_schedule"] == "cosine"
    curve = {k: [c["dev"] for c in v["runs"]["mnist"][0]["curve"]] for k, v in runs.items()}
    assert curve["constant"] != curve["cosine"]  # the schedule reached the optimizer
    proc = subprocess.run([*common, "--lr-schedule", "linear", "--out", str(tmp_path / "x")], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "linear" in proc.stderr


def test_a_merged_row_without_cpu_time_shows_a_dash_not_nan():
    # results recorded before CPU time was measured, merged with newer ones, printed "nan"
    cpu = _bench_value()._cpu
    assert cpu({"cpu_s": float("nan")}) == "-" and cpu({}) == "-" and cpu({"cpu_s": 3.25}) == "3.2"


def test_noisy_labels_change_exactly_the_share_asked_to_another_class():
    flip_labels = _bench_value().flip_labels
    y = torch.arange(1000) % 10
    out = flip_labels(y, share=0.1, classes=10)
    changed = out != y
    assert int(changed.sum()) == 100 and out.min() >= 0 and out.max() <= 9
    assert torch.equal(out, flip_labels(y, share=0.1, classes=10))  # seeded


def test_summary_line_compares_the_random_subset_nearest_geko_budget():
    """A long run's geko trains about 64% of the passes: the summary compares it with random_subset64, not with
    a random half (which only shows what a smaller budget loses)."""
    bv = _bench_value()

    def row(policy, share, quality):
        return {"task": "mnist", "split": "test", "policy": policy, "seeds": 3, "backward_vs_uniform": share,
                "quality_mean": quality, "diff_mean": quality - 0.95, "diff_std": 0.0}

    rows = [row("uniform", 1.0, 0.95), row("geko", 0.63, 0.95), row("infobatch", 0.72, 0.955),
            row("random_subset", 0.5, 0.94), row("random_subset64", 0.64, 0.94), row("random_subset85", 0.85, 0.95)]
    (line,) = bv.summary_lines(rows)
    assert "vs infobatch -0.50 pt (infobatch at 72% of passes)" in line
    assert "vs random_subset64 +1.00 pt (random_subset64 at 64% of passes)" in line
    assert "random_subset at" not in line and "random_subset85" not in line
    (line,) = bv.summary_lines(rows[:3] + rows[3:4])  # only a random half: that one
    assert "vs random_subset +1.00 pt (random_subset at 50% of passes)" in line


class _CountSteps(torch.optim.AdamW):
    steps = 0

    def step(self, *a, **kw):
        type(self).steps += 1
        return super().step(*a, **kw)


@pytest.mark.timeout(60)
def test_batches_steps_keeps_a_full_epochs_steps_and_leaves_uniform_unchanged(monkeypatch):
    bv = _bench_value()
    g = torch.Generator().manual_seed(0)
    x = {s: {"input": torch.randn(n, 4, generator=g)} for s, n in (("train", 256), ("dev", 64), ("test", 64))}
    y = {s: (v["input"][:, 0] > 0).long() for s, v in x.items()}
    task = bv.Task("toy", x, y, lambda: torch.nn.Linear(4, 2), lambda m, b, t: bv.signals.classification(m(**b), t),
                   lr=0.05, epochs=3, batch_size=32)
    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in task.make_model().state_dict().items()}
    monkeypatch.setattr(bv.torch.optim, "AdamW", _CountSteps)
    steps, curves = {}, {}
    for policy in ("uniform", "drop_frozen"):
        for batches in bv.BATCHES:
            _CountSteps.steps = 0
            r = bv.run(task, policy, 0, initial, batches=batches)
            steps[policy, batches], curves[policy, batches] = _CountSteps.steps, r["curve"]
    assert steps["uniform", "fixed"] == steps["uniform", "steps"] == 24  # 3 full epochs of 8 batches
    assert curves["uniform", "fixed"] == curves["uniform", "steps"]
    assert curves["drop_frozen", "fixed"][-1]["backward"] < 3 * 256  # frozen samples skipped
    assert steps["drop_frozen", "fixed"] < steps["drop_frozen", "steps"] == 24
    with pytest.raises(ValueError, match="`batches` must be one of steps, fixed, got 'x'"):
        bv.run(task, "uniform", 0, initial, batches="x")


def test_a_seeds_initial_weights_do_not_depend_on_the_seeds_run_before_it():
    """A memoized model (MiniLM, the LLM tasks) used to hand every seed a copy of the first seed's random
    layers, so seed 1 started elsewhere in a process that ran seed 0 first than in one of its own, and runs
    merged from such processes were paired with the wrong uniform run."""
    bv = _bench_value()

    def task():
        net = bv._memo(lambda: torch.nn.Sequential(torch.nn.Linear(4, 3)))
        return bv.Task("t", {}, {}, net, None, lr=0.1, epochs=1, batch_size=2)

    after_seed_0 = task()
    bv.initial_weights(after_seed_0, 0)
    alone = bv.initial_weights(task(), 1)
    second = bv.initial_weights(after_seed_0, 1)
    assert all(torch.equal(alone[k], second[k]) for k in alone)
    assert not torch.equal(alone["0.weight"], bv.initial_weights(task(), 0)["0.weight"])
    # the copies a run starts from are the seed's model, not the first one built
    assert torch.equal(after_seed_0.make_model()[0].weight, second["0.weight"])
