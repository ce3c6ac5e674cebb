"""GEKO in an existing map-style training loop: the few lines a user adds are marked ``# GEKO``.

A small classifier on data this script makes (two noisy Gaussian blobs plus a
few mislabeled points). Run: ``python examples/map_style.py`` (a few seconds on CPU).
"""

import torch
from torch.utils.data import DataLoader, Dataset

from geko_data import GEKOConfig, GEKOSampler  # GEKO


class Blobs(Dataset):
    def __init__(self, n=4000, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 2, (n,), generator=g)
        self.x = torch.randn(n, 8, generator=g) + (self.y[:, None] * 2 - 1) * torch.linspace(0.2, 2.0, 8)
        flip = torch.rand(n, generator=g) < 0.03  # some hard, mislabeled samples
        self.y[flip] = 1 - self.y[flip]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def main(epochs: int = 6) -> None:
    torch.manual_seed(0)
    data = Blobs()
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    config = GEKOConfig(q_value_lr=0.5, min_q_for_freeze=0.7, log_bucket_stats=True)
    sampler = GEKOSampler(data, total_epochs=epochs, config=config, seed=0)  # GEKO
    loader = DataLoader(sampler.wrap(data), batch_size=64, sampler=sampler, num_workers=2)  # GEKO: wrap + sampler
    for epoch in range(epochs):
        sampler.set_epoch(epoch)  # GEKO
        for batch in loader:
            logits = model(batch["x"])
            losses = torch.nn.functional.cross_entropy(logits, batch["y"], reduction="none")
            loss = (losses * batch["__weight__"].float()).mean()  # GEKO: per-sample loss weight
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                probs = logits.softmax(-1)
                sampler.report(batch["__index__"], losses.detach(),  # GEKO: feedback
                               correct=probs.argmax(-1) == batch["y"], confidence=probs.max(-1).values,
                               answer=batch["y"])
    with torch.no_grad():
        acc = (model(data.x).argmax(-1) == data.y).float().mean().item()
    print(sampler.format_efficiency_report())
    print(f"accuracy on all {len(data)} samples: {acc:.3f}")


if __name__ == "__main__":
    main()
