"""epoch_metrics: the flat scalars the framework integrations and the reference loop log per epoch."""

import numpy as np
import pytest
import torch

from geko_data.config import GEKOConfig
from geko_data.integrations.metrics import epoch_metrics
from geko_data.sampler import GEKOSampler

CONFIG = GEKOConfig(log_bucket_stats=False, recheck_frozen=0.0, q_value_lr=1.0, min_q_for_freeze=0.5,
                    prune_frozen_after=1)


def _epoch(sampler, epoch, mastered):
    """One epoch: every drawn id is reported, right and sure when ``mastered(id)``, else wrong."""
    sampler.set_epoch(epoch)
    ids = np.array(list(sampler))
    good = np.array([mastered(i) for i in ids], bool)
    sampler.report(torch.tensor(ids), torch.tensor(np.where(good, 0.01, 2.0), dtype=torch.float32),
                   correct=torch.tensor(good), confidence=torch.tensor(np.where(good, 0.99, 0.9)))
    return ids


@pytest.mark.timeout(60)
def test_epoch_metrics_follow_the_efficiency_report():
    s = GEKOSampler(40, total_epochs=4, config=CONFIG, seed=3)
    drawn = [_epoch(s, e, lambda i: i < 30) for e in range(3)]
    m = epoch_metrics(s, epochs_done=3, prefix="g/")
    report = s.efficiency_report(epochs_done=3)
    shares = [m[f"g/{k}_share"] for k in ("freeze", "light", "focus", "hard", "pruned")]
    assert sum(shares) == pytest.approx(1.0) and all(isinstance(v, float) for v in m.values())
    assert m["g/pruned_share"] == report["pruned"] / 40 > 0  # mastered samples were pruned
    assert m["g/hard_share"] == report["buckets"]["HARD"] / 40 > 0  # confidently wrong ones are HARD
    assert m["g/sample_passes"] == sum(len(d) for d in drawn) == report["sample_passes"]
    assert m["g/uniform_passes"] == 40 * 3 and m["g/passes_saved"] == pytest.approx(report["compute_saved"])
    assert m["g/epoch_draws"] == len(drawn[-1])  # the plan of the epoch that just ended
    assert m["g/forgetting_events"] == report["forgetting_events"]
