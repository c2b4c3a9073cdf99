"""Scoring a model: in-training metrics (``metrics.py``), the evaluation protocols, i.e.
which validation windows are scored (``protocols.py``, the paper's windows included),
attention and output logit growth (``logits.py``), figures and tables."""

from .metrics import evaluate
from .protocols import EVAL_PROTOCOLS, evaluate_protocols, protocol_batches, score

__all__ = ["EVAL_PROTOCOLS", "evaluate", "evaluate_protocols", "protocol_batches", "score"]
