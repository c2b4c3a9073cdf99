"""The benchmark suites shipped with the package: ``bench_<suite>.py``, each defining
``cases(cfg: SuiteConfig) -> list[Case]`` (:mod:`lipschitz_ext.bench.registry`).

``lipschitz-bench`` runs these, and only these, unless ``--suite-dir DIR`` names a folder of
suite files explicitly (then it runs that folder's code). Each is also a module of its own:
``python -m lipschitz_ext.bench.suites.bench_optim [lipschitz-bench options]``.
"""
