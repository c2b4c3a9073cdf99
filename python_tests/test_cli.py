"""The commands on tiny runs: lipschitz-train --help (the preset's values as defaults),
presets and the preset-override note; lipschitz-eval certify and sample; the public
lipschitz_ext.load_run; one-line errors for missing and foreign run folders."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

import lipschitz_ext
from lipschitz_ext.cli import train as cli_train
from lipschitz_ext.cli import eval as cli_eval
from lipschitz_ext.training import config as C
from lipschitz_ext.certify import certify, worst_case_certificate
from tiny_runs import TINY, tiny_run, write_corpus



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished Lipschitz run and a baseline run (4 steps each)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cli-runs")
    corpus = write_corpus(root, lines=300)
    return SimpleNamespace(root=root, lip=tiny_run(corpus, root / "lip", TINY),
                           base=tiny_run(corpus, root / "base", TINY, model="baseline"))


def _help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_train.train_main(argv + ["--help"])
    assert exc.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


@pytest.mark.parametrize("preset", sorted(C.PRESETS))
def test_help_shows_the_presets_values(preset, capsys):
    text = _help(["--preset", preset], capsys)
    want = {**C.dataclasses.asdict(C.TrainConfig()), **C.PRESETS[preset]}
    for name in ("d_model", "n_layers", "steps", "seq_len"):
        assert f"--{name.replace('_', '-')} {name.upper()} " in text
        assert f"(default: {want[name]})" in text.split(f"--{name.replace('_', '-')} {name.upper()} ")[1][:300]
    assert f"Defaults shown are preset {preset}'s" in text


def test_help_of_the_default_preset_is_shakespeare_cpu(capsys):
    text = _help([], capsys)
    assert text.split("--d-model D_MODEL ")[1].split(")")[0].endswith("(default: 128")
    assert C.PRESETS["shakespeare-cpu"]["d_model"] == 128


@pytest.mark.parametrize("sweep", [False, True])
def test_every_flag_has_help(sweep):
    parser = cli_train._train_parser("shakespeare-cpu", sweep)
    for action in parser._actions:
        assert action.help and action.help.strip(), action.option_strings
    for f in C.dataclasses.fields(C.TrainConfig):
        assert f.metadata.get("help"), f.name


def test_eval_subcommands_have_help():
    parser = cli_eval._eval_parser()
    sub = next(a for a in parser._actions if a.dest == "cmd")
    assert {"certify", "sample", "robustness", "activations", "frontier", "lr-sensitivity"} <= set(sub.choices)
    for name, sp in sub.choices.items():
        for action in sp._actions:
            assert action.help, (name, action.option_strings)


def test_presets_command_lists_every_setting(capsys):
    assert cli_train.train_main(["presets"]) == 0
    out = capsys.readouterr().out
    blocks, name = {}, None
    for line in out.splitlines():
        if line.startswith("    "):
            key, value = line.split(None, 1)
            blocks[name][key] = value
        elif line.endswith(":"):
            name = line.split(":")[0].replace(" (default)", "")
            blocks[name] = {}
    assert blocks == {name: {k: str(v) for k, v in settings.items()} for name, settings in C.PRESETS.items()}
    assert "shakespeare-cpu (default):" in out


def test_sigma_max_override_says_it_drops_the_group_caps_once(tmp_path, capsys):
    missing = str(tmp_path / "missing.txt")  # stops at the data, after the config is built
    assert cli_train.train_main(["--sigma-max", "0.5", "--data", missing, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("replaces preset shakespeare-cpu's per-group caps") == 1
    assert "--attn-sigma-max 1.5" in err and "--mlp-sigma-max 2" in err
    # given with them (or without --sigma-max) there is nothing to say
    assert cli_train.train_main(["--sigma-max", "0.5", "--attn-sigma-max", "1", "--mlp-sigma-max", "1", "--data", missing]) == 2
    assert cli_train.train_main(["--data", missing]) == 2
    assert "per-group caps" not in capsys.readouterr().err


def test_load_run_rebuilds_the_saved_model(runs):
    run = lipschitz_ext.load_run(runs.lip, which="latest")
    assert isinstance(run, lipschitz_ext.LoadedRun)
    assert run.config.d_model == 32 and run.step == 4 and not run.model.training
    ck = torch.load(f"{runs.lip}/latest.pt", weights_only=True)
    ref = C.build_model(C.TrainConfig(**ck["config"]), len(ck["tokenizer"]["chars"]))
    ref.load_state_dict(ck["model"])
    x = torch.as_tensor(run.tokenizer.encode("1 little pigs went"), dtype=torch.long)[None]
    with torch.no_grad():
        assert torch.equal(run.model(x), ref.eval()(x))
    assert run.tokenizer.decode(x[0].tolist()) == "1 little pigs went"


def test_certify_command_table_and_json(runs, capsys):
    model = lipschitz_ext.load_run(runs.lip, which="latest").model
    want = certify(model, input_rms=model.input_rms())
    summary = json.loads(open(f"{runs.lip}/summary.json", encoding="utf-8").read())
    assert cli_eval.eval_main(["certify", runs.lip]) == 0
    text = capsys.readouterr().out
    assert f"certified bound (these weights, per-token RMS <= {model.input_rms():.4g}): {want.bound:.6g}" in text
    for row in want.rows:
        assert row.name in text
    assert cli_eval.eval_main(["certify", runs.lip, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["bound"] == pytest.approx(summary["certified_bound"], rel=1e-9)
    assert rep["bound"] == pytest.approx(want.bound, rel=1e-12)
    assert len(rep["certificate"]["rows"]) == len(want.rows)
    assert rep["worst_case_bound"] == pytest.approx(worst_case_certificate(model.config).bound, rel=1e-12)
    assert rep["worst_case_bound"] >= rep["bound"] * (1 - 1e-6)  # the weights sit within their caps
    if rep["paper_bound"] is not None:
        assert math.isfinite(rep["paper_bound"]) and rep["paper_bound"] > 0


def test_sample_command(runs, capsys):
    prompt = "1 little pigs"
    args = ["sample", runs.lip, "--prompt", prompt, "--chars", "25", "--seed", "3"]
    assert cli_eval.eval_main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith(prompt) and len(first) == len(prompt) + 25 + 1  # + print's newline
    assert cli_eval.eval_main(args) == 0 and capsys.readouterr().out == first  # seeded
    # a vanishing temperature samples the argmax: compare with greedy decoding in float64
    run = lipschitz_ext.load_run(runs.lip)
    m64, ids = run.model.double(), torch.as_tensor(run.tokenizer.encode(prompt), dtype=torch.long)
    with torch.no_grad():
        for _ in range(10):
            ids = torch.cat([ids, m64(ids[None, -run.config.seq_len:])[0, -1].argmax()[None]])
    assert cli_eval.eval_main(["sample", runs.lip, "--prompt", prompt, "--chars", "10", "--temperature", "1e-9"]) == 0
    assert capsys.readouterr().out == run.tokenizer.decode(ids.tolist()) + "\n"
    assert cli_eval.eval_main(["sample", runs.base, "--chars", "5"]) == 0  # the baseline samples too, no prompt
    assert len(capsys.readouterr().out) == 5 + 1


def _fails(argv, capsys, *needles):
    assert cli_eval.eval_main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and err.startswith("lipschitz-eval: error:"), err
    for n in needles:
        assert n in err, err


def test_certify_and_sample_refuse_bad_folders_in_one_line(runs, tmp_path, capsys):
    missing, empty, junk = tmp_path / "missing", tmp_path / "empty", tmp_path / "junk"
    empty.mkdir()
    junk.mkdir()
    (junk / "latest.pt").write_bytes(b"not a checkpoint")
    (junk / "best.pt").write_bytes(b"not a checkpoint")
    for cmd in ("certify", "sample"):
        _fails([cmd, str(missing)], capsys, str(missing), "run folder not found")
        _fails([cmd, str(empty)], capsys, "holds no checkpoint")
        _fails([cmd, str(junk)], capsys, "is not a lipschitz-train checkpoint")
    _fails(["certify", runs.base], capsys, "has no certificate")
    _fails(["sample", runs.lip, "--temperature", "0"], capsys, "--temperature")
    _fails(["sample", runs.lip, "--chars", "-1"], capsys, "--chars")
    _fails(["sample", runs.lip, "--prompt", "QZ~"], capsys, "--prompt", "not in the tokenizer's vocabulary")
    with pytest.raises(ValueError, match="run folder not found"):
        lipschitz_ext.load_run(str(missing))
