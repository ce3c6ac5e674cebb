"""What GEKO did in an epoch, as flat scalar metrics for a framework's logger (TensorBoard, W&B, ...)."""

from __future__ import annotations

from geko_data import policy
from geko_data.epochs import EpochDriver

__all__ = ["epoch_metrics"]


def epoch_metrics(driver: EpochDriver, *, epochs_done: int, prefix: str = "geko/") -> dict[str, float]:
    """Bucket shares of the partition the epoch trained with, passes done and saved so far, forgetting events.

    ``epochs_done``: epochs finished, the one that just ended included.
    """
    report = driver.efficiency_report(epochs_done=epochs_done)
    n = max(report["samples"], 1)
    out = {f"{prefix}{name.lower()}_share": report["buckets"][name] / n for name in policy.BUCKET_NAMES}
    out[f"{prefix}pruned_share"] = report["pruned"] / n
    out[f"{prefix}sample_passes"] = float(report["sample_passes"])
    out[f"{prefix}uniform_passes"] = float(report["uniform_passes"])
    out[f"{prefix}passes_saved"] = float(report["compute_saved"])
    out[f"{prefix}forgetting_events"] = float(report["forgetting_events"])
    out[f"{prefix}epoch_draws"] = float(int(driver.plan.counts.sum()))
    return out
