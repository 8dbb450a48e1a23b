"""Engine: the trainer, distributed helpers, checkpoints and logging (knows nothing about methods)."""
from visrep.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

from .trainer import NonFiniteLossError, ResumeError, Trainer, TrainResult, train

__all__ = ["CheckpointError", "NonFiniteLossError", "ResumeError", "TrainResult", "Trainer", "load_checkpoint",
           "save_checkpoint", "train"]
