"""The efficiency report (geko_data.efficiency) and the one partition-history table every printout uses."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from geko_data import GEKOSampler, GEKOStream, policy, write_shards
from geko_data.cli import main
from geko_data.config import GEKOConfig
from geko_data.efficiency import efficiency_report, format_efficiency_report, format_history, format_partition
from geko_data.plan import epoch_plan
from geko_data.state import SampleState
from geko_data.statefile import PartitionStats
from test_cli import make_state


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    """A saved state of 3,000 samples (so counts reach the thousands) after four epochs, some pruned."""
    path = tmp_path_factory.mktemp("eff") / "s.arrow"
    s = make_state(path, n=3000, epochs=4)
    assert s.pruned.any() and max(h["pruned"] for h in s.history) >= 1000
    return path, s


def test_report_counts_pruned_samples_apart_from_their_bucket(state):
    _, s = state
    r = efficiency_report(s, epochs_done=4, total_epochs=4)
    alive = ~s.pruned
    assert r["pruned"] == int(s.pruned.sum())
    assert r["buckets"] == {name: int((alive & (s.bucket == c)).sum()) for c, name in enumerate(policy.BUCKET_NAMES)}
    assert sum(r["buckets"].values()) + r["pruned"] == r["samples"] == 3000
    after = r["after_last_epoch"]
    assert sum(after.values()) == 3000 and after["pruned"] == r["pruned"] and after["freeze"] == r["mastered_freeze"]
    assert r["sample_passes"] == int(s.times_seen.sum()) and r["uniform_passes"] == 3000 * 4
    assert r["compute_saved"] == pytest.approx(1 - r["sample_passes"] / r["uniform_passes"])


def test_efficiency_report_and_inspect_print_the_same_history_table(state, capsys):
    path, s = state
    text = format_efficiency_report(efficiency_report(s, epochs_done=4, total_epochs=4))
    table = format_history(s.history)
    for line in table:  # the report indents the table by two spaces
        assert "  " + line in text.splitlines()
    assert f"{max(h['pruned'] for h in s.history):,}" in text  # thousands separated, as inspect prints them
    assert main(["inspect", str(path)]) == 0
    printed = capsys.readouterr().out.splitlines()
    detailed = format_history(s.history, detail=True)
    start = printed.index(detailed[0])
    assert printed[start:start + len(detailed)] == detailed
    # The detailed table has the same counts, with the step and mean loss around them.
    for plain, full in zip(table[1:], detailed[1:]):
        assert plain.split()[2:] == full.split()[3:-1]


def test_history_table_columns():
    rows = [{"epoch": 0, "phase": "ASCENT", "step": 7, "freeze": 0, "light": 12, "focus": 123456, "hard": 5,
             "pruned": 0, "mean_loss": None},
            {"epoch": "end", "phase": "", "freeze": 3, "light": 4, "focus": 5, "hard": 6, "pruned": 7}]
    head, first, end = format_history(rows)
    assert head.split() == ["epoch", "phase", "FREEZE", "LIGHT", "FOCUS", "HARD", "PRUNED"]
    assert first.split() == ["0", "ASCENT", "0", "12", "123,456", "5", "0"]
    assert end.split() == ["end", "3", "4", "5", "6", "7"]
    assert len({len(line) for line in (head, first, end)}) == 1  # aligned
    head, first = format_history(rows[:1], phase=False, detail=True)
    assert head.split() == ["epoch", "step", "FREEZE", "LIGHT", "FOCUS", "HARD", "PRUNED", "loss"]
    assert first.split() == ["0", "7", "0", "12", "123,456", "5", "0", "-"]
    # a run that follows no curriculum records no phase: no empty phase column either
    flat = [dict(rows[0], phase=""), rows[1]]
    assert format_history(flat)[0].split() == ["epoch", "FREEZE", "LIGHT", "FOCUS", "HARD", "PRUNED"]


def test_partition_line_is_gekolibs(state):
    _, s = state
    for h in s.history:
        line = PartitionStats.from_dict(h).format()
        assert line == format_partition(h)
        assert line.startswith(f"[GEKO] Epoch {h['epoch']} ({h['phase']}) Partition: FREEZE: ")
        shares = [float(part.split("(")[1].rstrip("%)")) for part in line.split("Partition: ")[1].split(" | ")]
        assert len(shares) == 5 and sum(shares) == pytest.approx(100, abs=0.3)


def test_baseline_report_has_no_phase_column():
    s = SampleState(40, config=GEKOConfig(mode="uniform"))
    s.report(np.arange(40), np.linspace(0.01, 3, 40), correct=np.ones(40, bool), confidence=np.full(40, 0.99))
    s.repartition(0.5, epoch=0)
    text = format_efficiency_report(efficiency_report(s, epochs_done=1, total_epochs=1))
    assert "a baseline" in text and "Would be FREEZE" in text and "Mastered" not in text
    header = next(line for line in text.splitlines() if line.split()[:1] == ["epoch"])
    assert "phase" not in header and not any(phase in text for phase in policy.PHASES)


class _Rows(torch.utils.data.Dataset):
    """A map-style dataset of dicts (the sampler's wrap adds ``__index__`` and ``__weight__``)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"x": torch.tensor(float(i))}


@pytest.mark.timeout(120)
def test_report_splits_the_epochs_draws_into_trained_and_forward_only_as_the_loader_delivered_them():
    # A user read sample_passes as trained passes; it counts forward-only re-checks of FREEZE samples too.
    # The epoch_plan block says how many of the epoch's draws were trained and how many only re-checked,
    # checked here against the weights the DataLoader workers really delivered.
    n, epochs = 200, 6  # a run of >= curriculum_min_epochs epochs: FREEZE samples are re-checked, weight 0
    sampler = GEKOSampler(n, total_epochs=epochs, config=GEKOConfig(recheck_frozen=0.3, q_value_lr=0.9))
    loader = DataLoader(sampler.wrap(_Rows(n)), batch_size=16, sampler=sampler, num_workers=2,
                        multiprocessing_context="fork")
    assert efficiency_report(sampler.state, epochs_done=0, total_epochs=epochs)["epoch_plan"] is None
    seen_rechecks = False
    for epoch in range(3):
        sampler.set_epoch(epoch)
        before = int(sampler.state.times_seen.sum())
        trained = forward_only = 0
        for batch in loader:
            idx, w = batch["__index__"], batch["__weight__"]
            trained += int((w > 0).sum())
            forward_only += int((w == 0).sum())
            easy = idx % 2 == 0  # half the samples are learnt at once and freeze
            sampler.report(idx, torch.where(easy, 0.01, 2.0), correct=easy, confidence=torch.where(easy, 0.99, 0.2))
        r = sampler.efficiency_report(epochs_done=epoch + 1)
        assert r["epoch_plan"] == {"epoch": epoch, "draws": trained + forward_only, "trained_draws": trained,
                                   "forward_only_draws": forward_only}
        # every delivered draw, re-checks included, is a sample pass
        assert r["sample_passes"] - before == trained + forward_only
        seen_rechecks |= forward_only > 0
        text = format_efficiency_report(r)
        assert (f"Epoch {epoch} draws" in text) == (forward_only > 0)
    assert seen_rechecks, "no FREEZE re-check was drawn: the test did not exercise the split"
    assert f"{forward_only:,} forward-only re-checks" in text
    one = {**r, "epoch_plan": {**r["epoch_plan"], "forward_only_draws": 1}}
    assert any(line.endswith(" + 1 forward-only re-check") for line in format_efficiency_report(one).splitlines())


def test_every_key_of_the_report_is_documented(state, tmp_path):
    doc = efficiency_report.__doc__
    s = SampleState.load(state[0])  # a copy: the module's state keeps no plan
    s.plan = epoch_plan(s, seed=0, epoch=4, total_epochs=6)
    r = efficiency_report(s, epochs_done=4, total_epochs=6)
    keys = set(r) | set(r["epoch_plan"]) | set(r["history"][0])
    # the stream's own keys, from a real stream over real shards
    write_shards([{"__key__": f"k{i}", "txt": b"x"} for i in range(8)], str(tmp_path / "s-%03d.tar"))
    stream = GEKOStream(str(tmp_path), total_epochs=1)
    stream.set_epoch(0)
    keys |= set(stream.efficiency_report())
    missing = sorted(k for k in keys if f"``{k}``" not in doc)
    assert not missing, f"efficiency_report keys without a word in its docstring: {missing}"
    assert "``after_last_epoch``" in doc and "``buckets``" in doc and "forward-only" in doc


@pytest.mark.timeout(60)
def test_a_report_in_an_epoch_cut_short_compares_with_a_uniform_run_cut_alike():
    # A run stopped by max_steps a fifth into its last epoch was compared with uniform's whole epochs: the
    # draws cut off counted as compute saved.
    from geko_data import GEKOSampler

    sampler = GEKOSampler(100, total_epochs=3, seed=0, config=GEKOConfig(log_bucket_stats=False))
    sampler.set_epoch(0)
    ids = list(sampler)
    sampler.report(ids, [0.1] * len(ids))
    assert sampler.efficiency_report()["uniform_passes"] == 100
    sampler.set_epoch(1)
    assert sampler.efficiency_report()["uniform_passes"] == 100  # nothing of epoch 1 trained yet
    ids = list(sampler)
    sampler.report(ids[:len(ids) // 4], [0.1] * (len(ids) // 4))
    report = sampler.efficiency_report()
    assert report["last_epoch_share"] == pytest.approx((len(ids) // 4) / len(ids))
    assert report["uniform_passes"] == round(100 * (1 + report["last_epoch_share"]))
    assert f"the last cut short at {report['last_epoch_share']:.0%} of its draws" in sampler.format_efficiency_report()
    assert sampler.efficiency_report(epochs_done=2)["uniform_passes"] == 200  # the loop's own count wins


@pytest.mark.timeout(60)
def test_a_resumed_streams_report_goes_on_from_what_the_run_read(tmp_path):
    # After a resume, bytes_read and requests counted only the resumed process while the passes covered the run.
    write_shards(({"__key__": f"k{i:03d}", "txt": "x" * 500} for i in range(40)), str(tmp_path / "s-%02d.tar"))
    first = GEKOStream(str(tmp_path), total_epochs=2, config=GEKOConfig(log_bucket_stats=False), shuffle=False)
    first.set_epoch(0)
    ids = [s["__index__"] for s in first]
    first.report(ids, [1.0] * len(ids))
    read = first.efficiency_report()["bytes_read"]
    assert read > 20_000
    sd = first.state_dict()
    again = GEKOStream(str(tmp_path), total_epochs=2, config=GEKOConfig(log_bucket_stats=False), shuffle=False)
    again.use_state(first.state)
    again.load_state_dict(sd)
    assert again.efficiency_report()["bytes_read"] == read


@pytest.mark.timeout(60)
def test_samples_a_handler_skipped_do_not_make_the_epoch_look_cut_short(tmp_path):
    # Unreadable samples passed over by the handler are never reported: the last epoch read as "cut short",
    # and its uniform run shrank with it.
    import webdataset as wds

    samples = [{"__key__": f"k{i:03d}", "txt": "x", "cls": "1" if i not in (3, 11) else "oops"} for i in range(20)]
    write_shards(samples, str(tmp_path / "s-%02d.tar"))
    stream = GEKOStream(str(tmp_path), total_epochs=2, config=GEKOConfig(log_bucket_stats=False),
                        decode=lambda s: {**s, "cls": int(s["cls"])}, handler=wds.warn_and_continue)
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        for epoch in range(2):
            stream.set_epoch(epoch)
            ids = [s["__index__"] for s in stream]
            stream.report(ids, [1.0] * len(ids))
    report = stream.efficiency_report()
    assert report["skipped_draws"] == 2 and report["last_epoch_share"] == 1.0 and report["uniform_passes"] == 40
    assert "2 draws in epoch 1 (passed over by the stream's handler)" in stream.format_efficiency_report()
