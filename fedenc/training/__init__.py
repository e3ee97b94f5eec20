"""Local training of one encoder: :class:`Trainer` with its :class:`TrainConfig`, ranking
metrics (Recall@K, MRR@K over the whole catalog) and checkpoints that reload and score the
same (:func:`save_checkpoint`, :func:`load_checkpoint`)."""

from fedenc.training.checkpoint import load_checkpoint, save_checkpoint
from fedenc.training.config import TrainConfig
from fedenc.training.trainer import FitResult, Trainer

__all__ = ["FitResult", "TrainConfig", "Trainer", "load_checkpoint", "save_checkpoint"]
