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


@pytest.mark.timeout(120)
def test_lightning_callback_trains_a_tuple_dataset(tmp_path):
    # GEKOCallback refused every batch of a TensorDataset ("the batch has no `__index__`"), although its loader
    # appends index and weight to tuple items, as the README's `x, y, index, weight = batch` says.
    lightning = pytest.importorskip("lightning")

    from geko_data.integrations.lightning import GEKOCallback

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    dataset = TensorDataset(x, (x[:, 0] > 0).long())
    geko = GEKOCallback(dataset, config=GEKOConfig(log_bucket_stats=False))
    trained = []

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(3, 2)

        def train_dataloader(self):
            return geko.dataloader(batch_size=8)

        def training_step(self, batch, batch_idx):
            xb, yb, index, weight = batch
            trained.extend(index.tolist())
            losses = F.cross_entropy(self.net(xb), yb, reduction="none")
            return {"loss": (losses * weight).mean(), "per_sample_loss": losses.detach()}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    lightning.Trainer(max_epochs=2, callbacks=[geko], accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(tmp_path)).fit(Module())
    assert sorted(trained[:64]) == list(range(64))
    assert int(geko.sampler.state.times_seen.sum()) == len(trained) > 64
