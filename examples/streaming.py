"""GEKOStream end to end: write WebDataset shards, train on them with 2 DataLoader workers, report losses.

Frozen samples are skipped at read time (seeked over, never read); the
efficiency report at the end counts the sample passes saved. Run:
``python examples/streaming.py`` (well under a minute on CPU).
"""

import json
import tempfile

import numpy as np
import torch
from torch.utils.data import DataLoader

from geko_data import GEKOConfig, GEKOStream, write_shards


def decode(sample):
    obj = json.loads(sample.pop("json"))
    sample["x"] = torch.tensor(obj["x"], dtype=torch.float32)
    sample["y"] = torch.tensor(obj["y"])
    return sample


def main(epochs: int = 5) -> None:
    with tempfile.TemporaryDirectory(prefix="geko-shards-") as folder:
        train(folder, epochs)


def train(folder: str, epochs: int) -> None:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(3000):
        y = int(rng.integers(0, 3))
        x = rng.normal(size=6) + np.eye(3, 6)[y] * 2.5
        samples.append({"__key__": f"sample{i:05d}", "json": json.dumps({"x": x.tolist(), "y": y}).encode()})
    index = write_shards(samples, f"{folder}/shard-%04d.tar", maxcount=500)
    print(f"wrote {index.num_samples} samples in {len(index.shards)} shards to {folder}")

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    stream = GEKOStream(folder, total_epochs=epochs, seed=0, decode=decode, batch_size=50,
                        config=GEKOConfig(q_value_lr=0.5, min_q_for_freeze=0.7))
    loader = DataLoader(stream, batch_size=50, num_workers=2, persistent_workers=True)
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        n, loss_sum = 0, 0.0
        for batch in loader:
            logits = model(batch["x"])
            losses = torch.nn.functional.cross_entropy(logits, batch["y"], reduction="none")
            opt.zero_grad()
            (losses * batch["__weight__"].float()).mean().backward()
            opt.step()
            probs = logits.detach().softmax(-1)
            stream.report(batch["__index__"], losses.detach(), correct=probs.argmax(-1) == batch["y"],
                          confidence=probs.max(-1).values, answer=batch["y"])
            n += len(batch["__index__"])
            loss_sum += float(losses.detach().sum())
        print(f"epoch {epoch}: trained on {n} samples, mean loss {loss_sum / max(n, 1):.4f}")
    print(stream.format_efficiency_report())


if __name__ == "__main__":
    main()
