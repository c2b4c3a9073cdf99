"""The run folder: lipschitz-train never overwrites what it did not write,
checkpoints are read in one place with a fallback, paths work from any directory,
and resuming a finished run changes nothing it already recorded."""

import json
import os
import shutil

import pytest
import torch

from lipschitz_ext.cli import train as cli_train
from lipschitz_ext.cli import eval as cli_eval
from lipschitz_ext.training import loop as T
from lipschitz_ext.training.run import read_checkpoint
from lipschitz_ext.storage.files import read_metrics
from tiny_runs import TINY, tiny_run, write_corpus


def _argv(**kw):
    args = []
    for k, v in {**TINY, **kw}.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    return args + ["--quiet"]


def _one_line_error(capsys, prog="lipschitz-train"):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and err.startswith(f"{prog}: error:"), err
    return err


def _snapshot(folder):
    return {p: open(os.path.join(folder, p), "rb").read() for p in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, p))}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step run (evals at steps 2 and 4, so it has best.pt and latest.pt) and its corpus."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("run-folder")
    corpus = write_corpus(root)
    return corpus, tiny_run(corpus, root / "done", TINY, eval_every=2)


def _copy(finished, tmp_path, name="r"):
    dst = str(tmp_path / name)
    shutil.copytree(finished[1], dst)
    return dst


# --- item 2: never overwrite --------------------------------------------------------------
def test_new_run_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json.bak").write_text("the user's file")
    (out / "notes.txt").write_text("keep me")
    before = _snapshot(out)
    # the data file does not exist: the refusal comes before any data is read
    assert cli_train.train_main(["--data", str(tmp_path / "absent.txt"), "--out", str(out), *_argv()]) == 2
    err = _one_line_error(capsys)
    assert "not empty" in err and str(out) in err and "data" not in err.split(str(out))[-1]
    assert _snapshot(out) == before


def test_new_run_refuses_an_existing_run_without_resume(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    before = _snapshot(run)
    assert cli_train.train_main(["--data", finished[0], "--out", run, *_argv(steps=2)]) == 2
    err = _one_line_error(capsys)
    assert f"--resume {run}" in err and "another --out" in err
    assert _snapshot(run) == before


def test_new_run_into_an_empty_folder_works(finished, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert cli_train.train_main(["--data", finished[0], "--out", str(out), *_argv()]) == 0
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


# --- item 10: unwritable --out --------------------------------------------------------------
def test_unusable_out_fails_in_one_line_before_the_data(tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    outs = [str(a_file), str(a_file / "sub")]
    if os.path.isdir("/sys") and not os.path.exists("/sys/lipschitz-train-test"):
        outs.append("/sys/lipschitz-train-test")  # sysfs: not writable even as root
    for out in outs:
        assert cli_train.train_main(["--data", str(tmp_path / "absent.txt"), "--out", out, *_argv()]) == 2, out
        err = _one_line_error(capsys)
        assert out in err and "data file not found" not in err, err
    assert a_file.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_fails_in_one_line(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert cli_train.train_main(["--data", str(tmp_path / "absent.txt"), "--out", str(ro), *_argv()]) == 2
        assert "cannot write" in _one_line_error(capsys)
    finally:
        ro.chmod(0o755)


# --- items 3 and 5: checkpoints read in one place, with a fallback -----------------------
def _corrupt(path, kind):
    if kind == "truncated":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    elif kind == "empty":
        open(path, "wb").close()
    elif kind == "random":
        open(path, "wb").write(bytes((i * 97 + 13) % 256 for i in range(4000)))
    elif kind == "missing_keys":
        ck = torch.load(path, weights_only=True)
        del ck["optimizer"], ck["sampler"]
        torch.save(ck, path)
    elif kind == "directory":
        os.remove(path)
        os.mkdir(path)


KINDS = ["truncated", "empty", "random", "missing_keys", "directory"]


@pytest.mark.parametrize("kind", KINDS)
def test_resume_falls_back_to_best_when_latest_is_unusable(finished, tmp_path, capsys, kind):
    run = _copy(finished, tmp_path)
    best_step = torch.load(os.path.join(run, "best.pt"), weights_only=True)["step"]
    _corrupt(os.path.join(run, "latest.pt"), kind)
    assert cli_train.train_main(["--resume", run, "--quiet", "--steps", "5"]) == 0
    err = capsys.readouterr().err
    assert "latest.pt" in err and f"using {os.path.join(run, 'best.pt')}" in err, err
    assert json.loads(open(os.path.join(run, "summary.json")).read())["steps"] == 5
    assert [r["step"] for r in read_metrics(os.path.join(run, "metrics.jsonl")) if "train_loss" in r] == \
        [s for s in (2, 4) if s <= best_step] + [s for s in (4, 5) if s > best_step]


def test_resume_with_no_usable_checkpoint_fails_in_one_line(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    _corrupt(os.path.join(run, "latest.pt"), "truncated")
    _corrupt(os.path.join(run, "best.pt"), "random")
    assert cli_train.train_main(["--resume", run, "--quiet"]) == 2
    err = _one_line_error(capsys)
    assert "latest.pt is not a lipschitz-train checkpoint" in err and "best.pt is not" in err


@pytest.mark.parametrize("kind", ["truncated", "directory"])
def test_eval_uses_latest_when_best_is_corrupt(finished, tmp_path, capsys, kind):
    run = _copy(finished, tmp_path)
    _corrupt(os.path.join(run, "best.pt"), kind)
    assert cli_eval.eval_main(["certify", run, "--which", "best", "--json"]) == 0
    assert cli_eval.eval_main(["sample", run, "--chars", "5"]) == 0
    err = capsys.readouterr().err
    assert f"using {os.path.join(run, 'latest.pt')}" in err, err
    ckpt, _, path = read_checkpoint(run, ("best", "latest"))
    assert path == os.path.join(run, "latest.pt") and ckpt["step"] == 4


# --- item 9: paths that work from any directory ---------------------------------------------
def test_data_path_is_stored_absolute(finished, tmp_path, monkeypatch, capsys):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    shutil.copy(finished[0], work / "corpus.txt")
    monkeypatch.chdir(work)
    assert cli_train.train_main(["--data", "corpus.txt", "--out", "run", *_argv(steps=2, eval_every=2)]) == 0
    cfg = json.loads((work / "run" / "config.json").read_text())
    assert cfg["data"] == str(work / "corpus.txt") and cfg["out"] == str(work / "run")
    monkeypatch.chdir(elsewhere)
    assert cli_train.train_main(["--resume", str(work / "run"), "--quiet", "--steps", "3"]) == 0
    assert cli_eval.eval_main(["accuracy", str(work / "run"), "--protocol", "spread", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 3


def test_old_run_folder_with_a_relative_data_path_still_loads(finished, tmp_path, monkeypatch, capsys):
    """Older run folders stored --data as typed: it is tried relative to the current
    directory, then relative to the run folder."""
    run = _copy(finished, tmp_path)
    shutil.copy(finished[0], os.path.join(run, "text.txt"))
    for name in ("latest.pt", "best.pt"):
        ck = torch.load(os.path.join(run, name), weights_only=True)
        ck["config"]["data"] = "text.txt"
        torch.save(ck, os.path.join(run, name))
    monkeypatch.chdir(tmp_path)  # text.txt is not here: found beside the run
    assert cli_eval.eval_main(["accuracy", run, "--protocol", "spread", "--json"]) == 0
    assert cli_train.train_main(["--resume", run, "--quiet", "--steps", "5"]) == 0
    assert json.loads(open(os.path.join(run, "config.json")).read())["data"] == os.path.join(run, "text.txt")


# --- item 14: resuming a finished run, leftovers of a SIGKILL ----------------------------
def test_resuming_a_finished_run_logs_no_second_final_eval(finished, tmp_path):
    run = _copy(finished, tmp_path)
    metrics = os.path.join(run, "metrics.jsonl")
    before = read_metrics(metrics)
    summary = json.loads(open(os.path.join(run, "summary.json")).read())
    for _ in range(2):
        s = T.train(resume=run, quiet=True)
        assert s["val_loss"] == summary["val_loss"] and s["steps"] == 4
    assert read_metrics(metrics) == before
    assert [r["step"] for r in before if "val_loss" in r] == [2, 4]


def test_leftover_temporaries_of_a_killed_run_are_removed(finished, tmp_path):
    run = _copy(finished, tmp_path)
    stale = [os.path.join(run, "latest.pt.tmp-999999"), os.path.join(run, "metrics.jsonl.tmp-12")]
    for p in stale:
        open(p, "wb").write(b"half a checkpoint")
    assert cli_train.train_main(["--resume", run, "--quiet"]) == 0
    assert not any(os.path.exists(p) for p in stale)
    assert not any(".tmp-" in n for n in os.listdir(run))


# --- item 13: lipschitz-eval flags it cannot use -----------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["robustness", "--batches", "0"], "--batches must be >= 1"),
    (["robustness", "--batches", "-1"], "--batches must be >= 1"),
    (["activations", "--batches", "0"], "--batches must be >= 1"),
    (["activations", "--batches", "-1"], "--batches must be >= 1"),
    (["robustness", "--pgd-steps", "0"], "--pgd-steps must be >= 1"),
    (["robustness", "--eps", ""], "--eps must be one or more"),
    (["robustness", "--eps", "0.1,-0.2"], "--eps must be one or more"),
    (["robustness", "--device", "bogus"], "--device must be cpu or cuda"),
    (["activations", "--device", "bogus"], "--device must be cpu or cuda"),
    (["certify", "--device", "bogus"], "--device must be cpu or cuda"),
    (["activations", "--baseline", "RUN"], "is a lipschitz run, not a baseline"),
])
def test_eval_refuses_unusable_flags_in_one_line(finished, tmp_path, capsys, argv, needle):
    run = finished[1]
    argv = [a if a != "RUN" else run for a in argv]
    cmd, rest = argv[0], argv[1:]
    where = [run] if cmd == "certify" else ["--checkpoint", run, "--out", str(tmp_path / "o")]
    assert cli_eval.eval_main([cmd, *where, *rest]) == 2
    assert needle in _one_line_error(capsys, "lipschitz-eval")
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("cmd", ["robustness", "activations", "certify", "sample", "accuracy"])
def test_eval_device_cuda_without_cuda_fails_in_one_line(finished, tmp_path, capsys, cmd):
    run = finished[1]
    where = [run] if cmd in ("certify", "sample", "accuracy") else ["--checkpoint", run, "--out", str(tmp_path / "o")]
    assert cli_eval.eval_main([cmd, *where, "--device", "cuda"]) == 2
    assert "no CUDA device" in _one_line_error(capsys, "lipschitz-eval")


@pytest.mark.parametrize("field, value", [("steps", 2.7), ("batch_size", 8.0), ("eval_every", True), ("seed", "1")])
def test_integer_settings_must_be_integers(field, value):
    from lipschitz_ext.training import config as C

    with pytest.raises(ValueError, match=f"--{field.replace('_', '-')} must be an integer"):
        C.config_from_preset("shakespeare-cpu", **{field: value})
    assert C.config_from_preset("shakespeare-cpu", **{field: 3 if field != "eval_every" else 5}) is not None
