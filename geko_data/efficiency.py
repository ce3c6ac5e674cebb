"""The efficiency report: what GEKO really saved, counted in sample passes.

gekolib reports the FREEZE share as "compute saved"; its epochs draw N
samples whatever the freeze rate, so nothing is saved. Here the saving is
the sample passes done (every report counts) against a uniform run of the
same epochs (num_samples x epochs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from geko_data import policy
from geko_data.summary import GROUPS, groups

if TYPE_CHECKING:  # the state file module formats its history rows here: no import back at run time
    from geko_data.config import GEKOConfig
    from geko_data.plan import EpochPlan
    from geko_data.state import SampleState

__all__ = ["BASELINE_MODES", "efficiency_report", "format_efficiency_report", "format_history",
           "format_partition"]

#: Modes that do not steer sampling: their buckets are measured, never used.
BASELINE_MODES = ("uniform", "random_subset", "infobatch")
#: Samples per step when a plan is counted (a few MB of temporaries at any size).
_CHUNK = 1 << 20


def efficiency_report(state: SampleState, *, epochs_done: int, total_epochs: int,
                      config: GEKOConfig | None = None, last_epoch_share: float = 1.0) -> dict[str, Any]:
    """A JSON-serializable summary of ``state`` after ``epochs_done`` epochs; every key is a count over the
    whole run unless it says otherwise.

    * ``samples``: the dataset's size (N). ``mode``: the policy's mode. ``epochs_done`` / ``total_epochs``:
      as passed (what the loop finished, what it plans).
    * ``seen``: samples reported at least once.
    * ``sample_passes``: every reported forward pass of a sample (``times_seen`` summed), **forward-only
      re-checks included**: a FREEZE sample drawn for a re-check (loss weight 0) is evaluated, not trained,
      and still counts one pass. ``uniform_passes``: what a uniform run of ``epochs_done`` epochs reports,
      ``samples * epochs_done``, or with the last of those epochs cut short (``last_epoch_share`` of its
      planned draws reported, below 1: a run stopped by ``max_steps``) that share of its last epoch: the
      report's ``last_epoch_share``. ``compute_saved``: ``1 - sample_passes / uniform_passes`` (negative when the
      run reported more passes than a uniform one, e.g. a fixed ``epoch_length`` with repeats).
    * ``epoch_plan``: the plan of the last epoch started (``None`` before the first ``set_epoch``):
      ``epoch``, its ``draws``, of which ``trained_draws`` carry a loss weight above 0 (forward and
      backward) and ``forward_only_draws`` a weight of 0 (re-checks: forward only, no gradient). The state
      keeps only the current epoch's plan, so the split is this epoch's; a loop that wants the run's split
      counts ``__weight__ > 0`` itself (``geko-train``'s report has ``backward_passes_rank``).
    * ``buckets``: the buckets **in use now**: the partition made at the start of the last epoch (the last
      ``set_epoch``), less the FREEZE samples thawed since by a wrong answer; pruned samples are counted in
      ``pruned``, not in a bucket. It says what the current epoch was planned from.
    * ``after_last_epoch``: the partition **by every sample's latest report**, as the next ``set_epoch``
      would make it (before its pruning), with ``pruned``: the printed table's ``end`` row. Its counts differ
      from ``buckets`` by what the last epoch's reports moved. ``mastered_freeze`` is its FREEZE count.
      ``config``: the run's planning config (``GEKOConfig.planning``; default the state's), whose rule
      that partition follows.
    * ``pruned``: samples pruned for good (frozen for ``prune_after_frozen_epochs`` repartitions).
    * ``forgetting_events``: times a sample reported correct was later reported wrong (summed over samples).
    * ``nonfinite_reports``: reported losses that were NaN or inf (not applied to the state).
    * ``history``: one record per repartition (``set_epoch``): ``epoch``, curriculum ``progress`` and
      ``phase`` (``""`` in a run that follows no curriculum), optimizer ``step``, the bucket counts ``freeze``
      / ``light`` / ``focus`` / ``hard`` and ``pruned`` (these five sum to ``samples``), ``newly_pruned``,
      ``active`` (neither FREEZE nor pruned), ``seen``, ``forgets`` (forgetting events so far) and
      ``mean_loss`` (of the latest reports; ``None`` before any).

    ``GEKOStream.efficiency_report()`` adds ``skipped_unreadable`` / ``skipped_draws`` (bad samples a
    ``handler`` skipped, and the plan's draws they cost) and the stream's read totals ``bytes_read``,
    ``requests``, ``retries``; ``geko-train`` adds ``wall_time_s``, ``optimizer_steps``, ``world_size`` and
    this rank's ``forward_passes_rank`` / ``backward_passes_rank`` (samples through forward, and through
    backward: the trained ones).
    """
    n = state.num_samples
    passes = int(state.times_seen.sum(dtype=np.int64))
    if not 0.0 <= last_epoch_share <= 1.0:
        raise ValueError(f"`last_epoch_share` must be in [0, 1], got {last_epoch_share!r}")
    # A uniform run cut at the same point: its last epoch trained the same share of its samples.
    uniform = round(n * (max(epochs_done, 1) - 1 + last_epoch_share)) if epochs_done > 0 else 0
    counts = np.bincount(groups(state.bucket, state.pruned), minlength=len(GROUPS))
    # The partition after the last epoch: the state's buckets are those of the last repartition (an epoch's
    # start), so the epoch's own reports would otherwise show only at a next epoch that never comes.
    final = policy.classify(seen=state.seen, correct=state.correct, confidence=state.confidence, q=state.q,
                            loss_var=state.loss_var, loss=state.loss, last_step=state.last_step,
                            config=state.config if config is None else config)
    after = np.bincount(groups(final, state.pruned), minlength=len(GROUPS))
    return {
        "samples": n,
        "mode": state.config.mode,
        "epochs_done": epochs_done,
        "last_epoch_share": last_epoch_share,
        "total_epochs": total_epochs,
        "seen": int(state.seen.sum()),
        "mastered_freeze": int(after[policy.FREEZE]),
        "pruned": int(state.pruned.sum()),
        "buckets": {name: int(counts[i]) for i, name in enumerate(policy.BUCKET_NAMES)},
        "after_last_epoch": {name.lower(): int(after[i]) for i, name in enumerate(policy.BUCKET_NAMES)}
        | {"pruned": int(state.pruned.sum())},
        "forgetting_events": int(state.forgets.sum(dtype=np.int64)),
        "sample_passes": passes,
        "uniform_passes": uniform,
        "epoch_plan": _plan_draws(state.plan),
        "compute_saved": (1.0 - passes / uniform) if uniform else 0.0,
        "nonfinite_reports": state.num_nonfinite,
        "history": list(state.history),
    }


def _plan_draws(plan: EpochPlan | None) -> dict[str, int] | None:
    """``{"epoch", "draws", "trained_draws", "forward_only_draws"}`` of an epoch plan (``None`` for none).

    Counted in steps so a plan of 100M samples needs no (N,) temporaries.
    """
    if plan is None:
        return None
    draws = forward_only = 0
    for a in range(0, plan.counts.shape[0], _CHUNK):
        counts = plan.counts[a:a + _CHUNK]
        draws += int(counts.sum(dtype=np.int64))
        forward_only += int(counts[plan.loss_weight[a:a + _CHUNK] == 0].sum(dtype=np.int64))
    return {"epoch": int(plan.epoch), "draws": draws, "trained_draws": draws - forward_only,
            "forward_only_draws": forward_only}


def format_efficiency_report(report: dict[str, Any]) -> str:
    """The report as a printable table, with the partition at each epoch's start and after the last epoch.

    A baseline mode's buckets steered nothing: its report says so, and has no curriculum phases.
    """
    baseline = report["mode"] in BASELINE_MODES
    lines = [
        "=" * 64,
        "  GEKO efficiency report",
        "=" * 64,
        f"  Samples            : {report['samples']:,}",
        f"  Mode               : {report['mode']}"
        + (" (a baseline: buckets are measured, they do not steer sampling)" if baseline else ""),
        f"  Epochs             : {report['epochs_done']} of {report['total_epochs']}"
        + (f" (the last cut short at {report['last_epoch_share']:.0%} of its draws)"
           if report.get("last_epoch_share", 1.0) < 1.0 else ""),
        (f"  Would be FREEZE    : {report['mastered_freeze']:,} (trained all the same)" if baseline else
         f"  Mastered (FREEZE)  : {report['mastered_freeze']:,}"),
        f"  Pruned             : {report['pruned']:,}",
        f"  Forgetting events  : {report['forgetting_events']:,}",
        f"  Sample passes      : {report['sample_passes']:,} (uniform run: {report['uniform_passes']:,})",
        f"  Compute saved      : {100.0 * report['compute_saved']:.1f}% of sample passes",
    ]
    plan = report.get("epoch_plan")
    if plan and plan["forward_only_draws"]:  # passes count re-checks too: say how many this epoch had
        label = f"Epoch {plan['epoch']} draws"
        lines.append(f"  {label:<19}: {plan['draws']:,} = {plan['trained_draws']:,} trained"
                     f" + {plan['forward_only_draws']:,} forward-only re-check"
                     f"{'' if plan['forward_only_draws'] == 1 else 's'}")
    if report.get("nonfinite_reports"):
        lines.append(f"  Non-finite reports : {report['nonfinite_reports']:,} (not applied)")
    if report.get("skipped_unreadable"):
        epoch = f" in epoch {plan['epoch']}" if plan else ""
        lines.append(f"  Unreadable skipped : {report['skipped_unreadable']:,} samples, "
                     f"{report.get('skipped_draws', 0):,} draws{epoch} (passed over by the stream's handler)")
    history = list(report.get("history") or [])
    if history:
        after = report.get("after_last_epoch")
        if after is not None:
            history.append({"epoch": "end", "phase": "", **after})
        lines.append("-" * 64)
        lines += ["  " + line for line in format_history(history, phase=not baseline)]
    lines.append("=" * 64)
    return "\n".join(lines)


def format_history(history: Sequence[Mapping[str, Any]], *, phase: bool = True, detail: bool = False) -> list[str]:
    """The partition-history table: a header line, then one line per row of ``history``.

    A row is a repartition's record (``PartitionStats.to_dict()``, as the state file's metadata holds it):
    its epoch, curriculum phase and the count of each group. ``phase=False`` leaves the phase column out (a
    baseline mode has none), as does a history without a phase (a run that follows no curriculum);
    ``detail=True`` adds the step and the mean loss. Every table of partitions (``geko-data inspect``, the
    efficiency report) is this one.
    """
    phase = phase and any(h.get("phase") for h in history)
    head = f"{'epoch':>5}" + (f" {'phase':<12}" if phase else "") + (f" {'step':>7}" if detail else "")
    lines = [head + "".join(f" {g:>8}" for g in GROUPS) + (f" {'loss':>7}" if detail else "")]
    for h in history:
        line = f"{h['epoch']:>5}" + (f" {h['phase']:<12}" if phase else "") + (f" {h['step']:>7}" if detail else "")
        line += "".join(f" {h[g.lower()]:>8,}" for g in GROUPS)
        if detail:
            loss = h.get("mean_loss")
            line += f" {'-' if loss is None else format(loss, '.3f'):>7}"
        lines.append(line)
    return lines


def format_partition(row: Mapping[str, Any]) -> str:
    """One repartition's record as one log line, gekolib's with the pruned count added (``PartitionStats.format``)."""
    counts = [(g, row[g.lower()]) for g in GROUPS]
    total = max(sum(n for _, n in counts), 1)
    parts = [f"{g}: {n:>6} ({100.0 * n / total:5.1f}%)" for g, n in counts]
    phase = f" ({row['phase']})" if row["phase"] else ""  # a run that follows no curriculum has no phase
    return f"[GEKO] Epoch {row['epoch']}{phase} Partition: " + " | ".join(parts)
