"""The reference training loop: ``train(model, data, args=TrainArgs(...))`` and ``python -m geko_data.train``."""

from geko_data.train.args import TrainArgs
from geko_data.train.distributed import leave_process_group, setup_distributed
from geko_data.train.loop import TrainResult, train
from geko_data.train.metrics import evaluate

__all__ = ["TrainArgs", "TrainResult", "evaluate", "leave_process_group", "setup_distributed", "train"]
