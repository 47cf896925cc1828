"""The one training loop (Accelerate, plain PyTorch) every trainable stage uses; see loop.fit."""

from loragen.train.checkpoints import Checkpointer, list_checkpoints
from loragen.train.loop import FitResult, LossFn, TrainingDiverged, fit

__all__ = ["Checkpointer", "FitResult", "LossFn", "TrainingDiverged", "fit", "list_checkpoints"]
