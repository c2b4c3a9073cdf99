"""Nothing runs that the user did not ask for: a run folder's checkpoint cannot execute code,
``lipschitz-bench`` never imports suites from the current folder, a run folder has one
trainer at a time, data paths are read literally and only from regular files, and the
certifier refuses a model whose function its weights do not describe.

Each test here would have caught the behaviour it guards against (code executed, a planted
suite run, duplicated metrics rows, a hang on a FIFO, a glob taken for shards, a hook the
certificate did not see).
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import lipschitz_ext
from lipschitz_ext.cli import eval as cli_eval
from lipschitz_ext.cli import train as cli_train
from lipschitz_ext.data import text as data_mod
from lipschitz_ext.storage import files as run_mod_files
from lipschitz_ext.training import run as run_mod_run
from lipschitz_ext.storage import folder as run_mod_folder
from lipschitz_ext.certify import certify
from lipschitz_ext.nn import GPTConfig, LipschitzGPT
from tiny_runs import TINY, tiny_run, write_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flags(settings: dict) -> list[str]:
    out = []
    for k, v in settings.items():
        out += ["--" + k.replace("_", "-"), str(v)]
    return out


# ---------------------------------------------------------------------------
# a checkpoint that would run code when unpickled
# ---------------------------------------------------------------------------
class _Payload:
    """Unpickling this (with weights_only=False) runs code: it writes the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('executed')",))


def _malicious_run_folder(folder, marker: str) -> str:
    os.makedirs(folder)
    cfg = {"preset": "shakespeare-cpu", "d_model": 32}
    for name in ("best.pt", "latest.pt"):
        torch.save({"config": cfg, "model": _Payload(marker), "tokenizer": {"kind": "byte"}},
                   os.path.join(folder, name))
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    return str(folder)


def test_malicious_checkpoint_is_refused_not_executed(tmp_path, capsys):
    marker = str(tmp_path / "marker")
    run = _malicious_run_folder(tmp_path / "run", marker)
    for argv in (["certify", run], ["sample", run, "--chars", "3"], ["accuracy", run]):
        assert cli_eval.eval_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "refused" in err and "execute code" in err and "Traceback" not in err, err
        assert not os.path.exists(marker), f"lipschitz-eval {argv[0]} executed the checkpoint's code"
    assert cli_train.train_main(["--resume", run, "--quiet"]) == 2
    assert "refused" in capsys.readouterr().err
    with pytest.raises(run_mod_files.CheckpointError, match="refused"):
        run_mod_run.load_run(run)
    assert not os.path.exists(marker), "resuming executed the checkpoint's code"


def test_committed_checkpoints_load_as_plain_tensors(capsys):
    """Every checkpoint under docs/runs loads with weights_only=True (no allow-listed types),
    and lipschitz-eval certifies one of them."""
    paths = sorted(glob.glob(os.path.join(ROOT, "docs", "runs", "**", "*.pt"), recursive=True))
    assert paths
    for p in paths:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
        classifier = ckpt["config"].get("task") == "classify"  # lipschitz-classify: no tokenizer
        assert ({"config", "model", "hyperparameters"} if classifier else {"config", "model", "tokenizer"}) \
            <= set(ckpt), p
        if classifier:
            assert lipschitz_ext.load_run(os.path.dirname(p)).model is not None, p
    run = next(os.path.dirname(p) for p in paths
               if torch.load(p, weights_only=True)["config"].get("model") == "lipschitz")
    assert cli_eval.eval_main(["certify", run, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bound"] > 0


# ---------------------------------------------------------------------------
# lipschitz-bench and the current folder
# ---------------------------------------------------------------------------
PLANTED = """
open({marker!r}, "w").write("planted suite ran")

def cases(cfg):
    return []
"""


def test_planted_bench_folder_in_cwd_does_not_run(tmp_path, monkeypatch, capsys):
    from lipschitz_ext.cli import bench as bench_cli
    from lipschitz_ext.bench import registry

    marker = tmp_path / "marker"
    planted = tmp_path / "checkout" / "bench"
    planted.mkdir(parents=True)
    for suite in registry.SUITES:
        (planted / f"bench_{suite}.py").write_text(PLANTED.format(marker=str(marker)))
    monkeypatch.chdir(planted.parent)
    # as installed from a wheel: no source checkout beside the package
    monkeypatch.setattr(registry, "__file__", str(tmp_path / "site-packages" / "lipschitz_ext" / "bench" / "registry.py"))
    with pytest.raises(SystemExit):  # the packaged suite has no case of this name
        bench_cli.main(["--smoke", "--suite", "orthogonalize", "--filter", "no-such-case", "--out", str(tmp_path / "o")])
    assert not marker.exists(), "lipschitz-bench imported ./bench/bench_orthogonalize.py from the current folder"
    assert "no cases selected" in capsys.readouterr().err
    # a folder named explicitly is the user's choice: then it runs
    with pytest.raises(SystemExit):
        bench_cli.main(["--smoke", "--suite", "orthogonalize", "--suite-dir", str(planted), "--out", str(tmp_path / "o")])
    assert marker.exists()


# ---------------------------------------------------------------------------
# one trainer per run folder
# ---------------------------------------------------------------------------
def _launch(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lipschitz_ext.cli.train", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _steps_logged(out: str) -> list[int]:
    return [r["step"] for r in run_mod_files.read_metrics(os.path.join(out, "metrics.jsonl")) if "train_loss" in r]


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    end = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the trainer ended early: {proc.stderr.read().decode()}")
        if time.time() > end:
            proc.kill()
            raise AssertionError("timed out waiting for the trainer")
        time.sleep(0.05)


@pytest.mark.slow
def test_second_trainer_is_refused_and_a_killed_ones_lock_is_taken_over(tmp_path, capsys):
    corpus = write_corpus(tmp_path)
    out = str(tmp_path / "run")
    long = {**TINY, "steps": 100000, "eval_every": 5, "log_every": 5}
    first = _launch(["--data", corpus, "--out", out, "--quiet", *_flags(long)])
    try:
        _wait_for(lambda: os.path.isfile(os.path.join(out, "latest.pt")) and len(_steps_logged(out)) >= 2, first)
        # a second trainer, resuming (--steps keeps it short should it run) or new with the same --out
        step = torch.load(os.path.join(out, "latest.pt"), weights_only=True)["step"]
        assert cli_train.train_main(["--resume", out, "--quiet", "--steps", str(step + 2)]) == 2
        err = capsys.readouterr().err
        assert f"another lipschitz-train process (pid {first.pid}" in err and "Traceback" not in err, err
        assert cli_train.train_main(["--data", corpus, "--out", out, "--quiet", *_flags(TINY)]) == 2
        assert "--out" in capsys.readouterr().err
        lock = os.path.join(out, run_mod_folder.LOCK_NAME)
        assert open(lock).read().split()[0] == str(first.pid)  # the holder, named for the message
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    # the kernel released the killed process's lock: the next run takes it over
    step = torch.load(os.path.join(out, "latest.pt"), weights_only=True)["step"]
    assert cli_train.train_main(["--resume", out, "--quiet", "--steps", str(step + 5)]) == 0
    assert "took over the lock" in capsys.readouterr().err
    steps = _steps_logged(out)
    assert len(steps) == len(set(steps)) and steps == sorted(steps), steps
    assert open(lock).read() == ""  # released cleanly


@pytest.mark.slow
def test_two_new_runs_with_one_out_leave_one_run(tmp_path):
    corpus = write_corpus(tmp_path)
    out = str(tmp_path / "run")
    settings = {**TINY, "steps": 60, "eval_every": 20, "log_every": 2}
    procs = [_launch(["--data", corpus, "--out", out, "--quiet", *_flags(settings)]) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read().decode()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "another lipschitz-train process" in loser or "existing run folder" in loser, loser
    steps = _steps_logged(out)
    assert steps == list(range(2, 61, 2)), steps


# ---------------------------------------------------------------------------
# data paths: literal names, regular files only
# ---------------------------------------------------------------------------
def test_devices_and_fifos_are_refused_at_once(tmp_path):
    """``load_data`` of /dev/zero, a FIFO nobody writes to and a .bin symlink to a device, in a
    child process with a time limit and a 6 GiB address-space cap: each must fail at once with
    a clear error, not hang or read until the memory runs out."""
    fifo = str(tmp_path / "pipe.txt")
    os.mkfifo(fifo)
    shard = str(tmp_path / "tokens.bin")
    os.symlink("/dev/zero", shard)
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))\n"
            "from lipschitz_ext import data\n"
            "for path in sys.argv[1:]:\n"
            "    try:\n"
            "        data.load_data(path, seq_len=8)\n"
            "        print('LOADED', path)\n"
            "    except data.DataError as exc:\n"
            "        print('DataError:', exc, flush=True)\n")
    paths = ["/dev/zero", fifo, shard]
    try:
        res = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True, timeout=60,
                             cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"load_data did not return within 60 s (it hangs); it got through: {exc.stdout}")
    assert res.returncode == 0, (res.stdout, res.stderr[-2000:])
    lines = res.stdout.splitlines()
    assert len(lines) == 3, lines
    for path, line, kind in zip(paths, lines, ("a device", "a FIFO", "a device")):
        assert line.startswith("DataError:") and path in line and f"is {kind}; only regular files are read" in line, line


def test_glob_characters_in_file_names_are_literal(tmp_path):
    text = "to be or not to be, that is the question\n" * 20
    for name in ("notes?.txt", "notes[1].txt", "all*.txt"):
        path = tmp_path / name
        path.write_text(text)
        d = data_mod.load_data(str(path), seq_len=8)
        assert d.tokenizer.kind == "char" and d.vocab_size == len(set(text)), name
    # a pattern that names no file is not silently something else
    with pytest.raises(data_mod.DataError, match="not found.*only for .bin shards"):
        data_mod.load_data(str(tmp_path / "no*tes.txt"), seq_len=8)
    # an explicit pattern of .bin shards is still a glob
    for i in range(2):
        np.arange(100, dtype=np.uint16).tofile(tmp_path / f"shard_{i}.bin")
    d = data_mod.load_data(str(tmp_path / "shard_*.bin"), seq_len=8, vocab_size=128)
    assert d.tokenizer.kind == "shards" and len(d.train) == 100 and len(d.val) == 100


def test_text_size_limit(tmp_path, monkeypatch):
    path = tmp_path / "big.txt"
    path.write_text("abc" * 100)
    monkeypatch.setattr(data_mod, "MAX_TEXT_BYTES", 200)
    with pytest.raises(data_mod.DataError, match="more than the 200 bytes"):
        data_mod.load_data(str(path), seq_len=8)


# ---------------------------------------------------------------------------
# the certifier certifies only what it can see
# ---------------------------------------------------------------------------
def _model() -> LipschitzGPT:
    return LipschitzGPT(GPTConfig(vocab_size=11, d_model=16, n_layers=1, n_heads=2, seq_len=8))


def test_certify_refuses_hooks_unknown_modules_and_foreign_backends():
    m = _model()
    plain = certify(m).bound
    hooks = [(lambda: m.head.register_forward_hook(lambda mod, i, o: 100 * o), "head has a forward hook"),
             (lambda: m.blocks[0].mlp.register_forward_pre_hook(lambda mod, i: (3 * i[0],)),
              "blocks.0.mlp has a forward pre-hook"),
             (lambda: torch.nn.modules.module.register_module_forward_hook(lambda mod, i, o: o),
              "global module forward hook"),
             (lambda: torch.nn.modules.module.register_module_forward_pre_hook(lambda mod, i: None),
              "global module forward pre-hook")]
    for register, match in hooks:
        h = register()
        try:
            with pytest.raises(ValueError, match=match):
                certify(m)
        finally:
            h.remove()
    assert certify(m).bound == plain

    m.blocks[0].mlp.extra = torch.nn.Tanh()
    with pytest.raises(ValueError, match="blocks.0.mlp.extra is a torch.nn.modules.activation.Tanh"):
        certify(m)
    del m.blocks[0].mlp.extra

    class Scaled(LipschitzGPT):
        def forward(self, idx):
            return 100 * super().forward(idx)

    s = Scaled(m.config)
    s.load_state_dict(m.state_dict())
    with pytest.raises(ValueError, match="does not know"):
        certify(s)

    m.head.forward = lambda x: 100 * x
    with pytest.raises(ValueError, match="forward replaced"):
        certify(m)
    del m.head.forward

    from lipschitz_ext.nn import ATTENTION_BACKENDS, register_attention_backend

    register_attention_backend("loud", lambda q, k, v, s, bias=None: 100 * v)
    try:
        m.blocks[0].attn.backend = "loud"
        with pytest.raises(ValueError, match="attention backend 'loud'"):
            certify(m)
    finally:
        ATTENTION_BACKENDS.pop("loud")
        m.blocks[0].attn.backend = "sdpa"
    assert certify(m).bound == plain
