"""Smoke run of the value benchmark's whole pipeline (real tasks, tiny sizes): it must finish and report."""

import json
import os
import subprocess
import sys

import pytest

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
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from bench_value import gen_answer
    finally:
        sys.path.pop(0)
    cases = {"I appreciate the quick response.": " response", "Hmm.": " Hmm", "Pleeeease!!!! :)": " Pleeeease",
             "so good #happy @JetBlue http://t.co/x": " good", "don't": " don't", "2:55 !!": " none"}
    for text, answer in cases.items():
        assert gen_answer({"text": text, "label": "neutral"}) == answer, text


def test_bench_value_rejects_a_negative_first_seed(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/bench_value.py", "--tiny", "--first-seed", "-1", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "--first-seed" in proc.stderr and "-1" in proc.stderr
