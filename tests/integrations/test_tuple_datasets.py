"""Tuple datasets (TensorDataset, torchvision's (x, y)) keep a tuple loop: one changed line."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from geko_data import GEKOConfig, GEKOSampler


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_tensor_dataset_loop_unpacks_with_index_and_weight(num_workers):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g)
    y = (x[:, 0] > 0).long()
    dataset = TensorDataset(x, y)
    sampler = GEKOSampler(dataset, total_epochs=2, config=GEKOConfig(log_bucket_stats=False))
    loader = DataLoader(sampler.wrap(dataset), batch_size=8, sampler=sampler, num_workers=num_workers)
    model = torch.nn.Linear(3, 2)
    seen = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for xb, yb, index, weight in loader:  # was: for xb, yb in loader
            losses = F.cross_entropy(model(xb), yb, reduction="none")
            (losses * weight).mean().backward()
            sampler.report(index, losses.detach())
            assert torch.equal(xb, x[index]) and torch.equal(yb, y[index])
            assert weight.dtype == torch.float32 and index.dtype == torch.int64
            seen.extend(index.tolist())
    assert sorted(seen[:40]) == list(range(40))
    assert int(sampler.state.times_seen.sum()) == len(seen)


def test_single_tensor_items_append_index_and_weight():
    dataset = TensorDataset(torch.arange(6.0).unsqueeze(1))
    sampler = GEKOSampler(dataset, total_epochs=1)
    item = sampler.wrap(dataset)[4]
    assert len(item) == 3 and item[0].item() == 4.0 and item[1] == 4 and item[2] == 1.0
