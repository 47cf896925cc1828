"""The one training loop (Accelerate, plain PyTorch) every trainable stage uses; see loop.fit."""

from loragen.train.checkpoints import BestCheckpoint, Checkpointer, list_checkpoints
from loragen.train.loop import FitResult, LossFn, TrainingDiverged, fit

__all__ = ["BestCheckpoint", "Checkpointer", "FitResult", "LossFn", "TrainingDiverged", "fit", "list_checkpoints"]
