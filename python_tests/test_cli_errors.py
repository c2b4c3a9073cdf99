"""One-line errors (exit 2, no traceback) for bad flags and files the commands are
given: a corrupt run file in ``lipschitz-eval frontier``, a bad
``lipschitz-bench --device`` or ``--out`` (refused before any case runs), and the soft
cap's "update too large" naming the learning rate instead of an internal ``mu``."""

import json
import os
import subprocess
import sys

import pytest
import torch

from lipschitz_ext.cli import eval as cli
from lipschitz_ext.cli import bench as bench_cli
from lipschitz_ext.constraints import SpectralSoftCap
from lipschitz_ext.optim import Muon


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)
    return err


def _fake_run(folder, summary: str, config: str):
    folder.mkdir()
    (folder / "summary.json").write_text(summary)
    (folder / "config.json").write_text(config)
    return folder


_CONFIG = json.dumps({"constraint": "soft_cap", "sigma_max": 1.0})
_SUMMARY = json.dumps({"certified_bound": 2.0, "val_accuracy": 0.5, "val_loss": 1.0})


@pytest.mark.parametrize("summary, config, bad, why", [
    ("{not json", _CONFIG, "summary.json", "unreadable"),
    ("", _CONFIG, "summary.json", "unreadable"),
    ("[1, 2]", _CONFIG, "summary.json", "JSON object"),
    (_SUMMARY, "\x00\x01garbage", "config.json", "unreadable"),
    (_SUMMARY, json.dumps({"sigma_max": 1.0}), "config.json", "constraint"),
])
def test_frontier_names_the_corrupt_file(tmp_path, capsys, summary, config, bad, why):
    run = _fake_run(tmp_path / "run", summary, config)
    assert cli.eval_main(["frontier", str(run), "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, os.path.join(str(run), bad), why)
    assert not (tmp_path / "o" / "frontier.csv").exists()


def test_frontier_still_reads_a_good_fake_run(tmp_path):
    """The checks refuse only bad files: a well-formed pair gives its row."""
    from lipschitz_ext.experiments.sweep import frontier

    run = _fake_run(tmp_path / "run", _SUMMARY, _CONFIG)
    (row,) = frontier([str(run)], str(tmp_path / "o"))
    assert row["constraint"] == "soft_cap" and row["certified_bound"] == 2.0 and row["val_accuracy"] == 0.5


@pytest.mark.parametrize("device, needle", [
    ("bogus", "--device must be cpu, cuda or cuda:N, got 'bogus'"),
    ("cuda:x", "--device must be cpu, cuda or cuda:N, got 'cuda:x'"),
    ("meta", "--device must be cpu, cuda or cuda:N, got 'meta'"),
    *([] if torch.cuda.is_available() else [("cuda", "no CUDA device"), ("cuda:0", "no CUDA device")]),
])
def test_bench_bad_device_is_one_line_exit_2(tmp_path, capsys, device, needle):
    with pytest.raises(SystemExit) as exc:
        bench_cli.main(["--smoke", "--device", device, "--out", str(tmp_path)])
    assert exc.value.code == 2
    _one_line_error(capsys, needle)


def test_bench_cuda_index_beyond_the_devices(tmp_path, capsys):
    n = torch.cuda.device_count()
    if n == 0:
        pytest.skip("needs CUDA (without it 'cuda:N' is refused as no CUDA device)")
    with pytest.raises(SystemExit) as exc:
        bench_cli.main(["--smoke", "--device", f"cuda:{n}", "--out", str(tmp_path)])
    assert exc.value.code == 2
    _one_line_error(capsys, f"cuda:{n}", f"{n} CUDA device")


def test_bench_bad_device_from_the_shell_has_no_traceback(tmp_path):
    """The real entry point: stderr is exactly one line, exit status 2."""
    r = subprocess.run([sys.executable, "-m", "lipschitz_ext.cli.bench", "--device", "bogus", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == ["lipschitz-bench: --device must be cpu, cuda or cuda:N, got 'bogus'"]


def test_bench_out_that_is_a_file_fails_before_any_case(tmp_path, capsys):
    f = tmp_path / "a-file"
    f.write_text("user data")
    with pytest.raises(SystemExit) as exc:
        bench_cli.main(["--smoke", "--out", str(f)])
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert "cases on" not in out  # refused before the banner, so before any case ran
    assert err.strip().splitlines() == [f"lipschitz-bench: --out {f}: exists and is not a directory"]
    assert f.read_text() == "user data"
    below = f / "sub"  # a folder under a file cannot be made either
    with pytest.raises(SystemExit) as exc:
        bench_cli.main(["--smoke", "--out", str(below)])
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert "cases on" not in out and len(err.strip().splitlines()) == 1 and "not writable" in err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes to read-only folders")
def test_bench_unwritable_out_fails_before_any_case(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        for out in (ro, ro / "new"):
            with pytest.raises(SystemExit) as exc:
                bench_cli.main(["--smoke", "--out", str(out)])
            assert exc.value.code == 2
            stdout, err = capsys.readouterr()
            assert "cases on" not in stdout
            assert len(err.strip().splitlines()) == 1 and f"--out {out}: not writable" in err
        assert list(ro.iterdir()) == []  # the write probe left nothing behind
    finally:
        ro.chmod(0o700)


def test_bench_writable_out_keeps_no_probe_file(tmp_path):
    """A missing --out folder is made up front; the write probe is removed (the run then
    stops at the missing suite file, after the --out check)."""
    out = tmp_path / "new" / "results"
    with pytest.raises(SystemExit, match="bench_optim.py"):
        bench_cli.main(["--smoke", "--suite", "optim", "--cases-dir", str(tmp_path), "--out", str(out)])
    assert out.is_dir() and list(out.iterdir()) == []


def test_soft_cap_too_large_an_update_names_the_learning_rate():
    torch.manual_seed(0)
    W = torch.nn.Parameter(0.1 * torch.randn(8, 8))
    opt = Muon([W], lr=3.0, constraint=SpectralSoftCap(1.0))
    W.grad = torch.randn(8, 8)
    with pytest.raises(ValueError) as exc:
        opt.step()
    msg = str(exc.value)
    assert "learning rate" in msg and "lr=3" in msg and "SpectralSoftCap" in msg
    assert "mu=" not in msg  # no internal name the user never set


def test_soft_cap_direct_call_names_the_update_norm():
    with pytest.raises(ValueError, match="update norm 3.5 .*lower the learning rate"):
        SpectralSoftCap(1.0).alpha_for(update_norm=3.5)
    assert SpectralSoftCap(1.0).alpha_for(update_norm=0.05) > 0  # in range: still the coupling's alpha
