"""Distributed GAN training with two DeepSpeed engines (see trainer.py for the loop, step.py for the step)."""
from gafh_fast.train.trainer import Trainer, TrainingAborted, build_models

__all__ = ["Trainer", "TrainingAborted", "build_models"]
