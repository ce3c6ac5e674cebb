"""The reference training loop: ``train(model, data, args=TrainArgs(...))`` and ``python -m geko_data.train``."""

from geko_data.train.args import TrainArgs
from geko_data.train.loop import evaluate, train

__all__ = ["TrainArgs", "evaluate", "train"]
