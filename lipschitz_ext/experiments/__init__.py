"""Experiments over run folders: re-scoring (``rescore.py``), robustness and activation
analyses (``analyses.py``), sweeps, the accuracy-bound frontier and lr sensitivity
(``sweep.py``), and classifier sweeps (``classifier_sweep.py``)."""
