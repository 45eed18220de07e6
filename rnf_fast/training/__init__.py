"""Training of rectangular flows: objectives (ML, two-step, ML without log det), the trainer,
checkpoints, and multi-process data parallelism.

Example:
    >>> import tempfile
    >>> import torch
    >>> from rnf_fast.models import RectangularFlow
    >>> from rnf_fast.training import train
    >>> model = RectangularFlow({"D": 3, "d": 2, "f_layers": 1, "h_layers": 1})
    >>> x = torch.randn(64, 3)
    >>> with tempfile.TemporaryDirectory() as run_dir:  # the run folder: log, checkpoints
    ...     history = train(model, x[:48], x[48:], {"epochs": 1, "progress": False}, run_dir)
    >>> history.stop_reason
    'completed 1 epochs'
    >>> [record["epoch"] for record in history.records]
    [0]
"""

from .checkpoint import TrainState, load_checkpoint, save_checkpoint
from .objectives import OBJECTIVES, TS_PHASES, Objective, ml_loss, ts_loss
from .trainer import TrainConfig, TrainHistory, likelihood_weight, train

__all__ = [
    "OBJECTIVES",
    "TS_PHASES",
    "Objective",
    "TrainConfig",
    "TrainHistory",
    "TrainState",
    "likelihood_weight",
    "load_checkpoint",
    "ml_loss",
    "save_checkpoint",
    "train",
    "ts_loss",
]
