"""A run survives what users and machines do to it: a torn ``metrics.jsonl``, Ctrl-C at each
phase, a full disk or read-only folder mid-run; bad flag values are refused in one line; no
value that is NaN, ``Infinity`` or silently wrong leaves the package (strict JSON, a
non-finite step skipped whole, the normalize constraint's cap, tiny temperatures).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import signal

import pytest
import torch

from lipschitz_ext.cli import train as cli_train
from lipschitz_ext.cli import eval as cli_eval
from lipschitz_ext.training import config as C
from lipschitz_ext.storage import files as run_mod_files
from lipschitz_ext.training import run as run_mod_run
from lipschitz_ext.training import loop as T
from tiny_runs import TINY, tiny_run, write_corpus


def _flags(settings: dict) -> list[str]:
    out = []
    for k, v in settings.items():
        out += ["--" + k.replace("_", "-"), str(v)]
    return out


def _train(argv: list[str]) -> int:
    """``lipschitz-train argv`` in this process; a KeyboardInterrupt or OSError escaping it fails the test."""
    try:
        return cli_train.train_main(argv)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped lipschitz-train (a traceback for the user)")


def _strict_json(path: str):
    def refuse(name):
        raise AssertionError(f"{path} holds {name}: not strict JSON")

    with open(path) as fh:
        return json.load(fh, parse_constant=refuse)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory):
    """A finished tiny run (sample.txt included)."""
    return tiny_run(corpus, tmp_path_factory.mktemp("finished") / "run", {**TINY, "sample_chars": 20})


# ---------------------------------------------------------------------------
# metrics.jsonl
# ---------------------------------------------------------------------------
def test_torn_last_metrics_line_is_repaired_on_resume(corpus, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert _train(["--data", corpus, "--out", out, "--quiet", *_flags({**TINY, "steps": 8, "stop_after": 4})]) == 0
    metrics = os.path.join(out, "metrics.jsonl")
    with open(metrics, "a") as fh:
        fh.write('{"step": 6, "train_lo')  # a process killed mid-append
    assert [r["step"] for r in run_mod_files.read_metrics(metrics)] == [2, 4, 4]  # the torn line left out
    assert _train(["--resume", out, "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "metrics.jsonl: dropped a torn last line" in err, err
    lines = open(metrics).read().splitlines()
    assert all(json.loads(ln) for ln in lines)
    steps = [json.loads(ln)["step"] for ln in lines if "train_loss" in ln]
    assert steps == [2, 4, 6, 8]
    # a bad line before the last is an error naming the file and line, never a bare JSON message
    with open(metrics, "w") as fh:
        fh.write('{"step": 2}\nnot json\n{"step": 4}\n')
    with pytest.raises(run_mod_files.CheckpointError, match=r"metrics.jsonl: line 2 is not JSON"):
        run_mod_files.read_metrics(metrics)


def test_summary_and_metrics_are_strict_json(corpus, tmp_path):
    out = str(tmp_path / "paused")
    # paused before its first evaluation: best_val_loss is still infinite
    assert _train(["--data", corpus, "--out", out, "--quiet", *_flags({**TINY, "steps": 8, "stop_after": 2})]) == 0
    summary = _strict_json(os.path.join(out, "summary.json"))
    assert summary["status"] == "paused" and summary["best_val_loss"] is None
    run_mod_files.append_metric(os.path.join(out, "metrics.jsonl"), {"step": 3, "val_loss": math.nan, "x": -math.inf})
    assert run_mod_files.read_metrics(os.path.join(out, "metrics.jsonl"))[-1] == {"step": 3, "val_loss": None, "x": None}
    run_mod_files.write_json(str(tmp_path / "x.json"), {"a": [1.0, math.inf], "b": {"c": math.nan}})
    assert _strict_json(str(tmp_path / "x.json")) == {"a": [1.0, None], "b": {"c": None}}


# ---------------------------------------------------------------------------
# Ctrl-C at each phase
# ---------------------------------------------------------------------------
def _sigint_once(fn):
    """``fn`` that delivers a real SIGINT to this process on its first call."""
    state = {"sent": False}

    def wrapped(*a, **k):
        if not state["sent"]:
            state["sent"] = True
            os.kill(os.getpid(), signal.SIGINT)
        return fn(*a, **k)

    return wrapped


@pytest.mark.parametrize("phase", ["training loop", "final evaluation", "end-of-run sample", "summary"])
def test_ctrl_c_at_each_phase_exits_cleanly_and_resumes(corpus, tmp_path, monkeypatch, capsys, phase):
    out = str(tmp_path / "run")
    if phase == "training loop":  # the second Ctrl-C (the first asks for a clean stop at the step's end)
        original = T._loss_and_backward

        def twice(run, x, y):
            if run.step == 2:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
            return original(run, x, y)

        monkeypatch.setattr(T, "_loss_and_backward", twice)
    elif phase == "final evaluation":
        monkeypatch.setattr(T, "final_protocol_scores", _sigint_once(T.final_protocol_scores))
    elif phase == "end-of-run sample":
        monkeypatch.setattr(T, "generate", _sigint_once(T.generate))
    else:
        original_write = T.write_json

        def write_json(path, obj, _sent=[]):
            if path.endswith("summary.json") and not _sent:
                _sent.append(1)
                os.kill(os.getpid(), signal.SIGINT)
            return original_write(path, obj)

        monkeypatch.setattr(T, "write_json", write_json)
    settings = {**TINY, "steps": 6, "eval_every": 3, "sample_chars": 10}
    assert _train(["--data", corpus, "--out", out, "--quiet", *_flags(settings)]) == 130
    err = capsys.readouterr().err
    assert f"interrupted during the {phase}" in err and f"--resume {out}" in err, err
    assert "Traceback" not in err
    summary = _strict_json(os.path.join(out, "summary.json"))
    assert summary["status"] == "interrupted" and summary["interrupted_during"] == phase
    assert torch.load(os.path.join(out, "latest.pt"), weights_only=True)["step"] >= 0
    monkeypatch.undo()
    assert _train(["--resume", out, "--quiet"]) == 0
    summary = _strict_json(os.path.join(out, "summary.json"))
    assert summary["status"] == "completed" and summary["steps"] == 6
    steps = [r["step"] for r in run_mod_files.read_metrics(os.path.join(out, "metrics.jsonl")) if "train_loss" in r]
    assert steps == sorted(set(steps))


# ---------------------------------------------------------------------------
# full disk, read-only folder
# ---------------------------------------------------------------------------
@pytest.mark.slow
def test_disk_full_mid_run_is_one_line_and_keeps_the_last_checkpoint(corpus, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    real_save, calls = torch.save, []

    def full_disk_save(obj, fh, *a, **k):
        calls.append(1)
        if len(calls) == 1:  # the run's first checkpoint is written; the disk is full after that
            return real_save(obj, fh, *a, **k)
        fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_mod_run.torch, "save", full_disk_save)
    assert _train(["--data", corpus, "--out", out, "--quiet", *_flags({**TINY, "steps": 8})]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and f"--resume {out}" in err, err
    assert "is intact" in err
    monkeypatch.undo()
    assert torch.load(os.path.join(out, "latest.pt"), weights_only=True)["step"] == 0
    assert not [n for n in os.listdir(out) if ".tmp-" in n]  # no partial temporary left behind
    assert _train(["--resume", out, "--quiet"]) == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="as root, a read-only mode does not stop writes (the full-disk "
                                               "test above covers the same path)")
def test_folder_turned_read_only_mid_run(corpus, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    original = T._loss_and_backward

    def lock_folder(run, x, y):
        if run.step == 2:
            os.chmod(out, 0o555)
        return original(run, x, y)

    monkeypatch.setattr(T, "_loss_and_backward", lock_folder)
    try:
        assert _train(["--data", corpus, "--out", out, "--quiet", *_flags({**TINY, "steps": 8})]) == 1
    finally:
        os.chmod(out, 0o755)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Permission denied" in err and f"--resume {out}" in err, err
    assert torch.load(os.path.join(out, "latest.pt"), weights_only=True)["step"] == 0


# ---------------------------------------------------------------------------
# checkpoints that do not fit their config
# ---------------------------------------------------------------------------
def test_config_is_checked_against_the_weights_before_the_model_is_built(finished, tmp_path, monkeypatch, capsys):
    import shutil

    run = str(tmp_path / "run")
    shutil.copytree(finished, run)
    for name in ("best.pt", "latest.pt"):
        path = os.path.join(run, name)
        ckpt = torch.load(path, weights_only=True)
        ckpt["config"]["d_model"] = 65536  # 17 GB per matrix if built
        torch.save(ckpt, path)

    def guarded(build):
        def build_model(cfg, vocab_size):
            if cfg.d_model == 65536 and torch.get_default_device().type != "meta":
                raise AssertionError("the model of the checkpoint's config was built before its weights were checked")
            return build(cfg, vocab_size)
        return build_model

    monkeypatch.setattr(run_mod_run, "build_model", guarded(run_mod_run.build_model))
    monkeypatch.setattr(T, "build_model", guarded(T.build_model))
    with pytest.raises(run_mod_files.CheckpointError, match=r"weights do not fit .*shape of embed.weight"):
        run_mod_run.load_run(run)
    assert cli_eval.eval_main(["certify", run]) == 2
    assert "weights do not fit" in capsys.readouterr().err
    assert _train(["--resume", run, "--quiet"]) == 2
    assert "weights do not fit" in capsys.readouterr().err
    # a block count far beyond the weights' is refused before even a meta-device model is laid out
    path = os.path.join(run, "best.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"].update(d_model=32, n_layers=10**7)
    torch.save(ckpt, path)
    with pytest.raises(run_mod_files.CheckpointError, match="config n_layers 10000000, weights of 1 blocks"):
        run_mod_run.load_run(run)


# ---------------------------------------------------------------------------
# flags: refused in one line, naming the flag
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value, match", [
    ("--lr", "1e308", "--lr must be in"), ("--lr", "nan", "--lr must be finite"), ("--embed-lr", "inf", "finite"),
    ("--warmup-steps", "-5", "--warmup-steps must be >= 0"), ("--momentum", "1", "--momentum must be in"),
    ("--time-budget", "inf", "--time-budget must be finite"), ("--weight-decay", "-1", "--weight-decay"),
])
def test_numeric_flags_are_validated(corpus, tmp_path, capsys, flag, value, match):
    out = str(tmp_path / "run")
    assert _train(["--data", corpus, "--out", out, "--quiet", *_flags(TINY), flag, value]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err, err
    assert not os.path.exists(os.path.join(out, "latest.pt"))


def test_out_naming_a_file_is_a_clear_error_everywhere(finished, corpus, tmp_path, capsys):
    f = tmp_path / "a-file"
    f.write_text("mine\n")
    commands = [
        (cli_eval.eval_main, ["robustness", "--checkpoint", finished, "--out", str(f)]),
        (cli_eval.eval_main, ["activations", "--checkpoint", finished, "--out", str(f)]),
        (cli_eval.eval_main, ["frontier", finished, "--out", str(f)]),
        (cli_eval.eval_main, ["lr-sensitivity", "--steps", "2", "--lrs", "1", "--sizes", "32x1", "--data", corpus,
                         "--out", str(f)]),
        (cli_train.train_main, ["sweep", "--sigma-max", "1", "--data", corpus, "--out", str(f), "--quiet", *_flags(TINY)]),
        (cli_train.train_main, ["--data", corpus, "--out", str(f), "--quiet", *_flags(TINY)]),
    ]
    for main, argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"--out {f}: exists and is not a folder" in err and "Traceback" not in err, (argv, err)
    assert f.read_text() == "mine\n"


def test_sweep_never_overwrites_a_users_frontier(corpus, tmp_path, capsys):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "frontier.csv").write_text("my,own,results\n")
    assert cli_train.train_main(["sweep", "--sigma-max", "1", "--data", corpus, "--out", str(out), "--quiet",
                           *_flags(TINY)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "frontier.csv").read_text() == "my,own,results\n"


@pytest.mark.parametrize("cmd, files", [
    (["robustness", "--checkpoint", "{run}", "--batches", "1"], ("robustness.csv", "robustness.png")),
    (["activations", "--checkpoint", "{run}", "--batches", "1"], ("activations.csv", "activations.png")),
    (["frontier", "{run}"], ("frontier.csv", "frontier.png")),
])
def test_analysis_commands_never_overwrite_earlier_results(finished, tmp_path, capsys, cmd, files):
    out = tmp_path / "analysis"
    out.mkdir()
    for name in files:  # a user's (or an earlier run's) results in the chosen folder
        (out / name).write_text("mine\n")
        argv = [a.replace("{run}", finished) for a in cmd] + ["--out", str(out)]
        assert cli_eval.eval_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"already holds {name}" in err and "Traceback" not in err, err
        assert (out / name).read_text() == "mine\n"
        (out / name).unlink()


@pytest.mark.parametrize("argv, match", [
    (["lr-sensitivity", "--lrs", ","], "--lrs must be one or more"),
    (["lr-sensitivity", "--sizes", "abc"], "--sizes"),
    (["lr-sensitivity", "--sizes", "32x0"], "--sizes"),
])
def test_lr_sensitivity_flags_name_themselves(tmp_path, capsys, argv, match):
    try:
        rc = cli_eval.eval_main([*argv, "--out", str(tmp_path / "o")])
    except SystemExit as exc:  # argparse's own one-line error
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err, err


def test_eval_protocol_is_checked_at_startup_and_may_change_on_resume(tmp_path, capsys):
    small = write_corpus(tmp_path, lines=100)  # a validation split far short of the paper's 1280 windows
    out = str(tmp_path / "paper")
    assert _train(["--data", small, "--out", out, "--quiet", *_flags(TINY), "--eval-protocol", "paper"]) == 2
    err = capsys.readouterr().err
    assert "--eval-protocol paper" in err and "protocol 'paper' needs" in err, err
    assert not os.path.exists(os.path.join(out, "latest.pt"))  # refused before training, not at its first eval
    out = str(tmp_path / "switch")
    assert _train(["--data", small, "--out", out, "--quiet", *_flags({**TINY, "steps": 8, "stop_after": 4})]) == 0
    assert _train(["--resume", out, "--quiet", "--eval-protocol", "full"]) == 0
    assert _strict_json(os.path.join(out, "summary.json"))["eval_protocol"] == "full"
    assert "--eval-protocol full from here on" in capsys.readouterr().err


def test_tiny_temperature_samples_the_most_likely_token(finished, capsys):
    texts = {}
    for t in ("1e-300", "1e-30"):
        assert cli_eval.eval_main(["sample", finished, "--chars", "12", "--temperature", t, "--prompt", "3 little"]) == 0
        texts[t] = capsys.readouterr().out
    assert texts["1e-300"] == texts["1e-30"] and len(texts["1e-300"]) >= 12


# ---------------------------------------------------------------------------
# ops and optimizers: no silent NaN or wrong value
# ---------------------------------------------------------------------------
def test_certified_at_most_refuses_complex_int_and_bool():
    from lipschitz_ext.ops import certified_at_most

    for W in (5j * torch.eye(3), torch.eye(3, dtype=torch.int64), torch.eye(3, dtype=torch.bool)):
        with pytest.raises(ValueError, match="argument 'W' must be a real floating"):
            certified_at_most(W, 1.0)
    for t in (True, 1j, float("nan")):
        with pytest.raises(ValueError, match="argument 't'"):
            certified_at_most(torch.eye(3), t)
    assert bool(certified_at_most(torch.eye(3), 1.5)) and not bool(certified_at_most(5 * torch.eye(3), 1.5))


def test_ns_max_gain_refuses_a_grid_too_coarse_to_find_the_peak():
    from lipschitz_ext.ops import ns_max_gain

    for grid in (1, 2, 100, True, 1.5e5):
        with pytest.raises(ValueError, match="argument 'grid'"):
            ns_max_gain(grid=grid)
    assert abs(ns_max_gain(grid=10_001) - ns_max_gain()) < 1e-6


def _tiny_gpt():
    from lipschitz_ext.nn import GPTConfig, LipschitzGPT

    return LipschitzGPT(GPTConfig(vocab_size=11, d_model=16, n_layers=1, n_heads=2, seq_len=8))


def test_nonfinite_gradient_leaves_the_whole_model_untouched():
    from lipschitz_ext.optim import ConstrainedAdam, build_optimizers

    m = _tiny_gpt()
    opt = build_optimizers(m)
    x = torch.randint(0, 11, (2, 8))
    m(x).sum().backward()
    m.embed.weight.grad[0, 0] = float("nan")  # the embedding is Adam's; the matrices Muon's
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(RuntimeError, match="adam: non-finite gradient in param group 0.*nothing was changed"):
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    opt.zero_grad()
    m(x).sum().backward()
    opt.step()  # a good step afterwards goes through
    assert all(bool(torch.isfinite(v).all()) for v in m.state_dict().values())
    assert not all(torch.equal(before[k], v) for k, v in m.state_dict().items())

    w = torch.nn.Parameter(torch.ones(4, 3))
    adam = ConstrainedAdam([w], lr=0.1)
    w.grad = torch.full_like(w, float("inf"))
    with pytest.raises(RuntimeError, match="ConstrainedAdam: non-finite gradient.*nothing was changed"):
        adam.step()
    assert torch.equal(w.detach(), torch.ones(4, 3)) and not adam.state
    skip = ConstrainedAdam([w], lr=0.1, nonfinite="skip")
    skip.step()
    assert skip.skipped_steps == 1 and torch.equal(w.detach(), torch.ones(4, 3))


def test_normalize_keeps_its_cap_under_muon_at_lr_005():
    from lipschitz_ext.constraints import make_constraint
    from lipschitz_ext.optim import Muon

    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(64, 32) * 0.02)
    opt = Muon([W], lr=0.05, constraint=make_constraint("normalize", sigma_max=1.0))
    worst = 0.0
    for _ in range(60):
        W.grad = torch.randn_like(W)
        opt.step()
        worst = max(worst, math.sqrt(32 / 64) * float(torch.linalg.matrix_norm(W.detach().double(), 2)))
    assert 0.99 < worst <= 1.0 + 1e-5, worst


def test_nan_gradient_with_a_finite_loss_stops_the_run_cleanly(corpus, tmp_path, monkeypatch, capsys):
    original = T._loss_and_backward

    def poisoned(run, x, y):
        loss, finite = original(run, x, y)
        if run.step == 3:
            run.model.embed.weight.grad[0, 0] = float("nan")
        return loss, finite

    monkeypatch.setattr(T, "_loss_and_backward", poisoned)
    out = str(tmp_path / "run")
    assert _train(["--data", corpus, "--out", out, "--quiet", *_flags({**TINY, "steps": 8, "eval_every": 2})]) == 1
    err = capsys.readouterr().err
    assert "non-finite gradient" in err and "the last good checkpoint" in err and "Traceback" not in err, err
    assert _strict_json(os.path.join(out, "summary.json"))["status"] == "diverged"
    ckpt = torch.load(os.path.join(out, "latest.pt"), weights_only=True)
    assert ckpt["step"] == 2 and all(bool(torch.isfinite(v).all()) for v in ckpt["model"].values())
