"""Run-folder files that survive a crash (``files.py``: atomic writes, strict JSON, the
metrics log, the safe checkpoint reader) and run folders as places to write
(``folder.py``: the one-writer lock, new-folder rules). The files a training run keeps
there: :mod:`lipschitz_ext.training.run`."""
