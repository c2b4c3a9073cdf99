"""Training runs: the config (``config.py``: every field, presets, validation), the loop
read top to bottom (``loop.py``), the optimizer of a run and its lr schedule
(``optimizers.py``), device / ranks / autocast / signals (``runtime.py``), the run
folder's files and :func:`load_run` (``run.py``), text generation (``sampling.py``), and
certified MLP classifiers (``classifier_config.py``, ``classifier.py``)."""

from .classifier import load_classifier_run, train_classifier
from .classifier_config import ClassifyConfig, classify_config
from .config import PRESETS, TrainConfig, config_from_preset
from .loop import train
from .run import LoadedRun, load_run

__all__ = ["PRESETS", "ClassifyConfig", "LoadedRun", "TrainConfig", "classify_config", "config_from_preset",
           "load_classifier_run", "load_run", "train", "train_classifier"]
