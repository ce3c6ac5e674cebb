"""TrainArgs: the reference loop's knobs, gekolib's ``GEKOTrainingArgs`` names plus a few more.

Defaults suit a small fine-tune (hundreds to thousands of samples, a few epochs): warmup is a share of
the run, evaluation happens before training and after every epoch, and a generative sample counts as
correct only when its whole answer is right.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from geko_data import policy
from geko_data.batches import BATCHES
from geko_data.config import GEKOConfig
from geko_data.validate import check_int, check_number

__all__ = ["LR_SCHEDULES", "RESUME_FIXED", "TrainArgs", "anneal_warning", "lr_factor"]

LR_SCHEDULES = ("mountain", "cosine", "constant")

#: TrainArgs a resume must keep: they decide which samples make up each optimizer step, the LR there and
#: what counts as correct. The others (output dir, workers, intervals, precision, progress) may change.
RESUME_FIXED = ("batch_size", "batches", "gradient_accumulation_steps", "num_epochs", "seed", "learning_rate",
                "warmup_steps", "warmup_ratio", "lr_schedule", "weight_decay", "max_grad_norm",
                "use_8bit_optimizer", "correct_threshold")
#: What a checkpoint written before a RESUME_FIXED field existed ran with.
RESUME_BEFORE = {"batches": "fixed"}


@dataclass(frozen=True, kw_only=True)
class TrainArgs:
    """Arguments of ``geko_data.train.train``; validated at construction.

    Args:
        output_dir: where checkpoints, ``metrics.jsonl``, ``efficiency.json`` and the state file go.
            Defaults to ``"./geko_output"``.
        num_epochs: training epochs. Defaults to ``3``.
        batch_size: per-device micro-batch size. Defaults to ``16``.
        batches: ``steps``: an epoch that skips samples takes as many micro-batches as a full epoch, each
            smaller, down to half of ``batch_size`` (map-style data through ``GEKOBatchSampler``, shards
            through a DataLoader per epoch at ``GEKOStream.epoch_batch_size``); ``fixed``: micro-batches of
            ``batch_size``, fewer of them. Defaults to ``"steps"``.
        learning_rate: peak AdamW learning rate (full fine-tune; ``geko-train --lora`` uses 1e-3 unless
            given). Defaults to ``5e-5``.
        weight_decay: AdamW weight decay. Defaults to ``0.01``.
        warmup_steps: linear warmup in optimizer steps; when set it wins over ``warmup_ratio``.
            Defaults to ``None``.
        warmup_ratio: linear warmup as a share of the run's optimizer steps (counted as if every epoch read
            every sample once), used when ``warmup_steps`` is None. Defaults to ``0.1``.
        logging_steps: log a metrics line every N optimizer steps. Defaults to ``10``.
        save_steps: checkpoint every N optimizer steps (0 = only at the end). Defaults to ``1000``.
        eval_steps: with eval data, evaluate every N optimizer steps as well; evaluation always runs
            before training and after every epoch (0 = only then). Defaults to ``0``.
        max_grad_norm: gradient clipping norm (0 disables). Defaults to ``1.0``.
        gradient_accumulation_steps: micro-batches per optimizer step. Defaults to ``1``.
        seed: seed of the model's RNG and of the data plan. Defaults to ``42``.
        save_at_end: write a final checkpoint. Defaults to ``True``.
        bf16: bf16 autocast. Defaults to ``False``.
        fp16: fp16 autocast with a GradScaler. Defaults to ``False``.
        gradient_checkpointing: recompute activations in backward. Defaults to ``False``.
        compile_model: ``torch.compile`` the model (falls back with a warning). Defaults to ``False``.
        use_8bit_optimizer: 8-bit AdamW from bitsandbytes. Defaults to ``False``.
        dataloader_num_workers: DataLoader workers (-1 = min(2, CPUs)). Defaults to ``-1``.
        dataloader_persistent_workers: keep workers between epochs. Defaults to ``True``.
        dataloader_prefetch_factor: batches prefetched per worker. Defaults to ``2``.
        lr_schedule: ``mountain`` (GEKO's LR shape), ``cosine`` or ``constant`` after warmup.
            Defaults to ``"mountain"``.
        save_total_limit: checkpoints kept (oldest removed first). Defaults to ``2``.
        eval_batch_size: batch size of evaluation. Defaults to ``batch_size``.
        correct_threshold: token accuracy under teacher forcing a causal-LM sample needs to count as correct,
            in training signals and in eval accuracy; 1.0 is sequence exact match (every answer token is the
            model's top choice). Defaults to ``1.0``.
        progress: show tqdm bars. Defaults to ``True``.
        device: ``auto``, ``cpu`` or ``cuda``. Defaults to ``"auto"``.
    """

    output_dir: str = "./geko_output"
    num_epochs: int = 3
    batch_size: int = 16
    batches: str = "steps"
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_steps: int | None = None
    warmup_ratio: float = 0.1
    logging_steps: int = 10
    save_steps: int = 1000
    eval_steps: int = 0
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    seed: int = 42
    save_at_end: bool = True
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    compile_model: bool = False
    use_8bit_optimizer: bool = False
    dataloader_num_workers: int = -1
    dataloader_persistent_workers: bool = True
    dataloader_prefetch_factor: int = 2
    lr_schedule: str = "mountain"
    save_total_limit: int = 2
    eval_batch_size: int | None = None
    correct_threshold: float = 1.0
    progress: bool = True
    device: str = "auto"

    def __post_init__(self) -> None:
        # Written to geko-train.json as they are: Python numbers only, no numpy scalars.
        def need_int(name: str, lo: int) -> None:
            check_int(name, getattr(self, name), lo, numpy=False)

        def need_float(name: str, lo: float, hi: float | None = None, lo_open: bool = False) -> None:
            check_number(name, getattr(self, name), lo, hi, lo_open=lo_open, numpy=False)

        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ValueError(f"`output_dir` must be a non-empty path string, got {self.output_dir!r}")
        for name in ("num_epochs", "batch_size", "gradient_accumulation_steps", "logging_steps",
                     "dataloader_prefetch_factor", "save_total_limit"):
            need_int(name, 1)
        for name in ("save_steps", "eval_steps", "seed"):
            need_int(name, 0)
        if self.warmup_steps is not None:
            need_int("warmup_steps", 0)
        need_float("warmup_ratio", 0.0, 1.0)
        need_int("dataloader_num_workers", -1)
        if self.eval_batch_size is not None:
            need_int("eval_batch_size", 1)
        need_float("learning_rate", 0.0, 10.0, lo_open=True)
        need_float("weight_decay", 0.0, 10.0)
        need_float("max_grad_norm", 0.0)
        need_float("correct_threshold", 0.0, 1.0)
        for name in ("save_at_end", "bf16", "fp16", "gradient_checkpointing", "compile_model",
                     "use_8bit_optimizer", "dataloader_persistent_workers", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be a bool, got {getattr(self, name)!r}")
        if self.batches not in BATCHES:
            raise ValueError(f"`batches` must be one of {', '.join(BATCHES)}, got {self.batches!r}")
        if self.bf16 and self.fp16:
            raise ValueError("`bf16` and `fp16` are exclusive; set at most one to True")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"`lr_schedule` must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"`device` must be auto, cpu or cuda, got {self.device!r}")

    def planned_steps(self, num_samples: int, world_size: int = 1) -> int:
        """Optimizer steps of the run if every epoch read every sample once (GEKO's epochs shrink as
        samples freeze, so a GEKO run takes fewer); each epoch's partial last step counts."""
        per_rank = math.ceil(num_samples / max(world_size, 1))
        micro = math.ceil(per_rank / self.batch_size)
        return self.num_epochs * math.ceil(micro / self.gradient_accumulation_steps)

    def warmup_for(self, planned_steps: int) -> int:
        """Warmup steps of a run of ``planned_steps``: ``warmup_steps`` when set, else ``warmup_ratio`` of it."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return math.ceil(self.warmup_ratio * planned_steps)

    def replace(self, **changes: Any) -> "TrainArgs":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainArgs":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainArgs field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**d)


def anneal_warning(config: GEKOConfig, num_epochs: int) -> str | None:
    """A message when ``config.anneal`` was given a value that anneals no epoch of a ``num_epochs`` run.

    Epoch ``e`` anneals when ``e >= (1 - anneal) * num_epochs`` (``policy.annealing``), so the last epoch
    needs ``anneal >= 1 / num_epochs``: 0.33 anneals nothing in a 3-epoch run. ``anneal=0`` and ``None``
    (the mode's default) are deliberate and get no message.
    """
    if config.anneal is None or config.anneal <= 0 or num_epochs < 1:
        return None
    if policy.annealing(num_epochs - 1, num_epochs, config):
        return None
    smallest = math.ceil(1000.0 / num_epochs) / 1000.0  # rounded up, so the printed value works as given
    return (f"`anneal` {config.anneal!r} anneals no epoch of this {num_epochs}-epoch run (epoch e anneals "
            f"when e >= (1 - anneal) * {num_epochs}); the smallest value that anneals the last epoch is "
            f"{smallest:g} (1/{num_epochs})")


def lr_factor(args: TrainArgs, step: int, progress: float, use_curriculum: bool, warmup: int | None = None) -> float:
    """The LR multiplier at optimizer ``step``, ``progress`` (0-1) through the run: linear warmup times the
    schedule's shape. ``warmup``: the run's warmup steps (default ``args.warmup_steps`` or 0)."""
    warmup = (args.warmup_steps or 0) if warmup is None else warmup
    warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
    if args.lr_schedule == "mountain":
        shape = policy.lr_multiplier(progress) if use_curriculum else 1.0
    elif args.lr_schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    else:
        shape = 1.0
    return warm * shape
