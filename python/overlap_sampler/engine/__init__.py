"""Training, checkpoints, evaluation and export of detectors with the Overlap Sampler.

- ``TrainConfig`` (``config.py``): every training setting; TOML/JSON files + CLI overrides.
- ``train(config)`` (``train.py``): the training job (single process or ``torchrun``/DDP).
- ``save_checkpoint`` / ``load_checkpoint`` / ``load_model_from_checkpoint`` (``checkpoint.py``).
- ``evaluate`` (``evaluate.py``) and ``export`` (``export.py``): COCO AP and TorchScript export.
"""

from .checkpoint import load_checkpoint, load_model_from_checkpoint, save_checkpoint
from .config import TrainConfig
from .train import train

__all__ = ["TrainConfig", "load_checkpoint", "load_model_from_checkpoint", "save_checkpoint", "train"]
