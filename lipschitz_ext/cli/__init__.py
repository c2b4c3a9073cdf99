"""The commands, one module each: ``lipschitz-train`` (``train.py``), ``lipschitz-eval``
(``eval.py``), ``lipschitz-classify`` (``classify.py``), ``lipschitz-bench`` (``bench.py``)."""
