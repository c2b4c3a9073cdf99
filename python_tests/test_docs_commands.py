"""Every shell command of README.md and docs/*.md (fenced ``bash`` blocks) still works from a
clone: a renamed flag, preset, corpus or path fails here, not in a reader's terminal.

Each command is split into its programs (``&&``, ``;``), and each program is checked:

- ``lipschitz-train`` (also under ``torchrun -m lipschitz_ext.cli.train``), ``lipschitz-eval``,
  ``lipschitz-bench``: its arguments parse with the tool's own parser and, for training, the
  config they describe validates; the repository paths it names exist.
- Every ``lipschitz-train`` command then runs for real with a tiny model and a two-step
  budget appended (later flags win), data included; ``lipschitz-eval certify``, ``sample`` and
  ``accuracy`` run for real on such a run (placeholders like ``RUN_DIR`` or ``runs/...`` are
  that run), or on the committed run folder the command names.
- ``lipschitz-classify``: its arguments parse and a training config validates; every
  ``train`` command then runs for real for a few steps on a small generated IDX set (``DIR``),
  and ``certify`` / ``attack`` run on such a run (``RUN``); ``sweep`` is parsed only.
- Scripts (``bash X``, ``python X``) must exist; ``pip install`` must never name a bare
  ``torch``; ``source .venv/bin/activate`` and the setup script are what CI itself runs.

A program the test does not know fails it, so a new kind of command gets a check.
"""

from __future__ import annotations

import contextlib
import glob
import io
import re
import shlex
from pathlib import Path

import pytest
import torch

from image_samples import make_idx_set
from lipschitz_ext.cli import train as cli_train
from lipschitz_ext.cli import common as cli_common
from lipschitz_ext.cli import eval as cli_eval
from lipschitz_ext.cli import classify as cli_classify
from lipschitz_ext.cli import bench as bench_cli
from lipschitz_ext.training.classifier_config import classify_config
from lipschitz_ext.training.config import config_from_preset

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Appended to every lipschitz-train command: a tiny model, two steps, one eval batch.
TINY = ["--d-model", "16", "--n-heads", "2", "--n-layers", "2", "--seq-len", "16", "--mlp-ratio", "2",
        "--batch-size", "2", "--steps", "2", "--eval-every", "2", "--eval-batches", "1", "--log-every", "1",
        "--sample-chars", "8", "--threads", "1", "--device", "cpu", "--compile", "none", "--quiet"]
#: Eval subcommands cheap enough to run for real on a tiny run.
EVAL_RUN = ("certify", "sample", "accuracy")
PLACEHOLDER = re.compile(r"^(RUN_[A-Z]+|runs/.*)$")
#: Placeholders of the classifier commands: the data folder and the run / sweep folders.
CLASSIFY_PLACEHOLDER = re.compile(r"^(DIR|RUN|SWEEP|PEER)$")
#: Appended to every lipschitz-classify train command: a narrow MLP, six steps, a tiny attack.
CLASSIFY_TINY = ["--steps", "6", "--widths", "16", "--batch-size", "32", "--attack-examples", "8",
                 "--attack-steps", "3", "--quiet"]
REPO_PREFIXES = ("docs/", "bench/", "scripts/", "python_tests/", "lipschitz_ext/", "csrc/")


def doc_commands() -> list[tuple[str, list[str]]]:
    """``(where, argv)`` of every program in every fenced bash block of the docs."""
    out = []
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                words = shlex.split(line, comments=True)
                where = f"{path.relative_to(ROOT)}: {line.strip()}"
                argv: list[str] = []
                for w in [*words, "&&"]:
                    if w in ("&&", ";", "||"):
                        if argv:
                            out.append((where, argv))
                        argv = []
                    else:
                        argv.append(w)
    return out


COMMANDS = doc_commands()


def _program(argv: list[str]) -> tuple[str, list[str]]:
    """``(kind, args)``: the tool a doc command runs and its arguments."""
    argv = list(argv)
    while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):  # VAR=value prefixes
        argv.pop(0)
    if argv[:1] == ["time"]:
        argv.pop(0)
    if argv[:1] == ["nice"]:
        argv = argv[3:] if argv[1:2] == ["-n"] else argv[1:]
    head = argv[0].rsplit("/", 1)[-1] if argv else ""
    if head in ("lipschitz-train", "lipschitz-eval", "lipschitz-bench", "lipschitz-classify"):
        return head, argv[1:]
    if head == "torchrun" and "-m" in argv and argv[argv.index("-m") + 1] == "lipschitz_ext.cli.train":
        return "lipschitz-train", argv[argv.index("-m") + 2:]
    if head.startswith("python"):
        commands = {f"lipschitz_ext.cli.{c}": f"lipschitz-{c}" for c in ("train", "eval", "bench", "classify")}
        if argv[1:2] == ["-m"] and argv[2:3] and argv[2] in commands:
            return commands[argv[2]], argv[3:]
        if argv[1:3] == ["-m", "pytest"]:
            return "pytest", argv[3:]
        return "script", argv[1:2]
    if head == "bash":
        return "script", argv[1:2]
    if head in ("pip", "pip3") or argv[1:3] == ["-m", "pip"]:
        return "pip", argv[1:]
    if head == "source":
        return "source", argv[1:]
    return "unknown", argv


def _parse(parser, args: list[str], where: str):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            return parser.parse_args(args)
        except SystemExit as exc:
            if exc.code not in (0, None):
                pytest.fail(f"{where}: does not parse: {err.getvalue().strip()}")
    return None  # --help


def _check_paths(args: list[str], where: str) -> None:
    for a in args:
        for part in a.split(","):
            if part.startswith(REPO_PREFIXES):
                assert glob.glob(str(ROOT / part)), f"{where}: {part} is not in the repository"


def _train_parser(args: list[str]):
    sweep = args[:1] == ["sweep"]
    rest = args[1:] if sweep or args[:1] == ["presets"] else args
    return cli_train._train_parser(cli_common.preset_of(rest), sweep), rest


def test_the_docs_have_commands():
    kinds = {_program(a)[0] for _, a in COMMANDS}
    assert {"lipschitz-train", "lipschitz-eval", "lipschitz-bench", "script"} <= kinds, kinds
    readme = [a for w, a in COMMANDS if w.startswith("README.md")]
    assert readme[:2] == [["bash", "scripts/setup.sh"], [".venv/bin/lipschitz-train"]], readme[:2]


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[f"{i}" for i in range(len(COMMANDS))])
def test_doc_command_parses(where, argv):
    kind, args = _program(argv)
    assert kind != "unknown", f"{where}: the docs test does not know {argv[0]!r}: teach it a check"
    _check_paths(args, where)
    if kind == "lipschitz-train":
        if args[:1] == ["presets"]:
            return
        parser, rest = _train_parser(args)
        ns = _parse(parser, rest, where)
        if ns is not None and not getattr(ns, "resume", None):
            config_from_preset(ns.preset, **cli_common.config_overrides(ns))  # values validate too
    elif kind == "lipschitz-eval":
        ns = _parse(cli_eval._eval_parser(), args, where)
        if ns is not None and not any(PLACEHOLDER.match(a) for a in args):
            cli_eval._check_eval_args(ns)  # the committed run folders it names are usable
    elif kind == "lipschitz-bench":
        _parse(bench_cli._parser(), args, where)
    elif kind == "lipschitz-classify":
        ns = _parse(cli_classify._parser(), args, where)
        if ns is not None and ns.command == "train" and not ns.resume:
            classify_config(ns.preset, **cli_classify._overrides(ns))  # values validate too
    elif kind == "script":
        assert args and (ROOT / args[0]).is_file(), f"{where}: script {args[:1]} is not in the repository"
    elif kind == "pytest":
        _check_paths([a for a in args if not a.startswith("-")], where)
        assert all((ROOT / a).exists() for a in args if a.startswith("python_tests")), where
    elif kind == "pip":
        bare = [a for a in args if re.match(r"^torch($|[<>~ ])", a)]
        assert not bare, f"{where}: a bare torch lets pip fetch a multi-GB CUDA wheel; pin torch==2.13.0"
    elif kind == "source":
        assert args == [".venv/bin/activate"], where


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Every distinct lipschitz-train command of the docs, run tiny; returns the folders."""
    base = tmp_path_factory.mktemp("docs-runs")
    folders = {}
    for i, (where, argv) in enumerate(COMMANDS):
        kind, args = _program(argv)
        if kind != "lipschitz-train" or args[:1] == ["presets"] or "--help" in args or "-h" in args:
            continue
        key = tuple(args)
        if key in folders:
            continue
        # the first command (the README's main job) reads the built-in complete works; the others
        # read the small built-in corpus unless they name one (the final scores cover the whole split)
        data = [] if not folders or "--data" in args else ["--data", "tiny-shakespeare"]
        out = base / f"run{i}"
        status = cli_train.train_main([*args, *TINY, *data, "--out", str(out)])
        assert status == 0, f"{where}: exit status {status} with a tiny budget"
        folders[key] = out
    return folders


@pytest.mark.slow
def test_doc_train_commands_run_tiny(tiny_runs):
    assert tiny_runs, "no lipschitz-train command in the docs"
    for args, out in tiny_runs.items():
        if args[:1] == ("sweep",):
            assert (out / "frontier.csv").is_file(), args
        else:
            assert (out / "summary.json").is_file() and (out / "latest.pt").is_file(), args


@pytest.mark.slow
def test_doc_eval_commands_run(tiny_runs, capsys, monkeypatch):
    """certify / sample / accuracy as documented, on a tiny run or the committed run folder."""
    monkeypatch.chdir(ROOT)  # the docs' paths are relative to the repository root
    run = next(out for args, out in tiny_runs.items() if args[:1] != ("sweep",))
    ran = 0
    for where, argv in COMMANDS:
        kind, args = _program(argv)
        if kind != "lipschitz-eval" or args[:1] not in [[c] for c in EVAL_RUN]:
            continue
        args = [str(run) if PLACEHOLDER.match(a) else a for a in args]
        if args[0] == "accuracy" and any(a.startswith("docs/runs/") for a in args):
            args = [*args, "--protocol", "paper"]  # one protocol of the committed run: seconds
        assert cli_eval.eval_main(args) == 0, f"{where}: failed ({capsys.readouterr().err.strip()})"
        ran += 1
    assert ran, "no certify / sample / accuracy command in the docs"


@pytest.mark.slow
def test_doc_classify_commands_run(tmp_path, capsys):
    """Every documented ``lipschitz-classify train`` runs a few steps on a generated IDX set;
    the documented ``certify`` and ``attack`` then run on such a run."""
    data = make_idx_set(tmp_path / "data", 256, 64)

    def fill(args: list[str], out) -> list[str]:
        return [data if a == "DIR" else str(out) if CLASSIFY_PLACEHOLDER.match(a) else a for a in args]

    run = None
    for i, (where, argv) in enumerate(COMMANDS):
        kind, args = _program(argv)
        if kind != "lipschitz-classify" or args[:1] != ["train"] or "--resume" in args:
            continue
        out = tmp_path / f"run{i}"
        status = cli_classify.main([*fill(args, out), *CLASSIFY_TINY])
        assert status == 0, f"{where}: exit status {status} ({capsys.readouterr().err.strip()})"
        run = run or out
    assert run is not None, "no lipschitz-classify train command in the docs"
    ran = 0
    for where, argv in COMMANDS:
        kind, args = _program(argv)
        if kind != "lipschitz-classify" or args[:1] not in (["certify"], ["attack"]):
            continue
        extra = ["--examples", "8", "--steps", "3", "--restarts", "1"] if args[0] == "attack" else []
        status = cli_classify.main([*fill(args, run), *extra])
        assert status == 0, f"{where}: exit status {status} ({capsys.readouterr().err.strip()})"
        ran += 1
    assert ran, "no lipschitz-classify certify / attack command in the docs"


def python_blocks() -> list[tuple[str, str]]:
    """``(where, code)`` of every fenced python block of the docs that stands alone: it
    imports what it uses and reads no run folder (those are covered by the commands)."""
    out = []
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        for k, block in enumerate(re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)):
            if ("import lipschitz_ext" in block or "from lipschitz_ext" in block) and "load_run(" not in block:
                out.append((f"{path.relative_to(ROOT)} python block {k}", block))
    return out


PYTHON_BLOCKS = python_blocks()


@pytest.mark.parametrize("where,code", PYTHON_BLOCKS, ids=[w for w, _ in PYTHON_BLOCKS])
def test_doc_python_blocks_run(where, code, tmp_path, monkeypatch):
    """The API the docs show exists and runs as shown (one thread, in a scratch folder)."""
    monkeypatch.chdir(tmp_path)
    names: dict = {"__name__": "__doc_block__"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(compile(code, where, "exec"), names)
    finally:
        torch.set_num_threads(threads)
