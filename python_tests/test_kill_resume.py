"""Kill test: a tiny run SIGKILLed at seeded random moments, many times,
resumes each time with ``--resume`` and ends with bit-for-bit the weights of an uninterrupted run.

Why exact equality holds: ``latest.pt`` is written atomically (temporary file + ``os.replace``) after
every eval, and it holds the model, the optimizer, the data sampler's state and the step; the run is
on one CPU thread, so replaying the steps after the last checkpoint repeats the same float operations.
A kill before the first ``latest.pt`` exists leaves nothing to resume; then the folder is removed and
the run started afresh, as a user would.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from lipschitz_ext.storage.files import read_metrics
from tiny_runs import TINY, tiny_run, write_corpus

# A checkpoint (latest.pt, written after each eval) every 2 steps: most kills land between
# checkpoints, so the steps after the last one are replayed on resume.
SETTINGS = {**TINY, "steps": 50, "eval_every": 2, "log_every": 2}
KILLS = 6
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _argv(corpus: str, out: str) -> list[str]:
    args = ["--data", corpus, "--out", out, "--quiet"]
    for k, v in SETTINGS.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    return args


def _step(out: str) -> int:
    """The step in ``out/latest.pt`` (-1 when there is none yet)."""
    path = os.path.join(out, "latest.pt")
    return torch.load(path, weights_only=True)["step"] if os.path.isfile(path) else -1


def _launch(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lipschitz_ext.cli.train", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _mtime(out: str) -> int:
    """When ``out/latest.pt`` was last replaced (0 when there is none)."""
    path = os.path.join(out, "latest.pt")
    return os.stat(path).st_mtime_ns if os.path.isfile(path) else 0


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_uninterrupted_weights(tmp_path):
    torch.set_num_threads(1)
    corpus = write_corpus(tmp_path)
    ref = tiny_run(corpus, tmp_path / "ref", SETTINGS)
    rows = [r for r in read_metrics(os.path.join(ref, "metrics.jsonl")) if "train_loss" in r]
    step_s = (rows[-1]["elapsed"] - rows[0]["elapsed"]) / (rows[-1]["step"] - rows[0]["step"])

    out = str(tmp_path / "killed")
    rng = random.Random(0)
    kills, steps_seen = 0, []
    while True:
        resume = os.path.isfile(os.path.join(out, "latest.pt"))
        if not resume and os.path.exists(out):  # killed before its first checkpoint: nothing to resume
            shutil.rmtree(out)
        before = _mtime(out)
        proc = _launch(["--resume", out, "--quiet"] if resume else _argv(corpus, out))
        if kills < KILLS:
            # Startup (imports, data, model, checkpoint load) costs seconds and varies with the load,
            # so the moments are relative to what the process has done: a third of the kills at a
            # random time in its first seconds, the rest a random few steps after it wrote its first
            # checkpoint -- in a step, an eval or a checkpoint write -- so the run progresses.
            if rng.random() < 1 / 3:
                time.sleep(rng.uniform(0.0, 3.0))
            else:
                while _mtime(out) == before and proc.poll() is None:
                    time.sleep(0.005)
                time.sleep(step_s * rng.uniform(0.0, 5.0))
            assert proc.poll() is None, "the run ended before it was killed; make it longer"
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert proc.returncode == -signal.SIGKILL
            kills += 1
            steps_seen.append(_step(out))
            continue
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
        break

    # the kills left checkpoints at several steps short of the end: training really was interrupted
    assert len({s for s in steps_seen if 0 < s < SETTINGS["steps"]}) >= 3, steps_seen
    assert _step(out) == SETTINGS["steps"]
    sa = torch.load(os.path.join(ref, "latest.pt"), weights_only=True)
    sb = torch.load(os.path.join(out, "latest.pt"), weights_only=True)
    assert sa["model"].keys() == sb["model"].keys()
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"]), steps_seen
    assert sa["best_val"] == sb["best_val"]
