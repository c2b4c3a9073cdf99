"""``--compile``: validation, the ``auto`` rule, and one tiny compiled run.

The compiled run is the only test here that calls ``torch.compile`` (tens of seconds on a
CPU the first time, seconds with inductor's cache warm); every check that needs a compiled
step shares it through a module fixture. It checks: one graph compiled once (no
recompilation over the steps, no graph break), checkpoints keyed like the plain module's
state_dict, evaluation of the compiled run's weights identical to an eager evaluation of
the same weights, the compiled loss and gradients against a float64 reference, and a
stopped-and-resumed compiled run ending on the uninterrupted run's weights bit for bit.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from lipschitz_ext.training import config as C
from lipschitz_ext.training import loop as T
from lipschitz_ext.evaluation.metrics import evaluate
from lipschitz_ext.training.optimizers import build_optimizer
from lipschitz_ext.training.run import load_run, run_data
from lipschitz_ext.training.runtime import AUTO_COMPILE_MIN_SECONDS, AUTO_COMPILE_MIN_STEPS, resolve_compile
from tiny_runs import TINY, tiny_run, write_corpus

CPU = torch.device("cpu")
SETTINGS = {**TINY, "steps": 4, "eval_every": 2, "log_every": 1, "compile": "model"}


@pytest.mark.parametrize("bad, match", [
    (dict(compile="yes"), "--compile must be one of auto, none, model"),
    (dict(compile="model", attention="fp8", pos_bias="none", softmax_scale=1.0), "--compile model does not support"),
])
def test_bad_compile_settings_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        C.config_from_preset("shakespeare-cpu", **bad)


def test_cli_refuses_a_bad_compile_mode(tmp_path, capsys):
    from lipschitz_ext.cli.train import train_main

    assert train_main(["--compile", "always", "--out", str(tmp_path / "r")]) == 2
    assert "--compile must be one of auto, none, model" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before any folder, data or model


def test_auto_compiles_long_cuda_runs_only():
    preset = C.config_from_preset("shakespeare-cpu")
    assert preset.compile == "auto" and preset.steps >= AUTO_COMPILE_MIN_STEPS
    assert resolve_compile(preset, CPU) == "none"  # measured: no faster whole step on the 2-core CPU
    CUDA = torch.device("cuda")  # the rule reads only the device's type: no GPU needed
    short = dataclasses.replace(preset, steps=AUTO_COMPILE_MIN_STEPS - 1)
    assert resolve_compile(short, CUDA) == "none"
    budget = dict(steps=10**6, schedule="time")
    assert resolve_compile(dataclasses.replace(preset, **budget, time_budget=AUTO_COMPILE_MIN_SECONDS), CUDA) == "model"
    assert resolve_compile(dataclasses.replace(preset, **budget, time_budget=AUTO_COMPILE_MIN_SECONDS - 1), CUDA) == "none"
    fp8 = C.config_from_preset("shakespeare-cpu", attention="fp8", pos_bias="none", softmax_scale=1.0)
    assert resolve_compile(fp8, CUDA) == "none"
    for mode in ("none", "model"):  # explicit modes pass through, whatever the length
        assert resolve_compile(dataclasses.replace(short, compile=mode), CUDA) == mode
    # the kill/resume and command tests' tiny runs stay eager (and bit-exact on resume)
    assert resolve_compile(C.config_from_preset("shakespeare-cpu", **{**TINY, "steps": 50}), CUDA) == "none"


def test_a_run_saved_before_compile_existed_resumes_eager(tmp_path):
    corpus = write_corpus(tmp_path)
    run = tiny_run(corpus, tmp_path / "old", {**TINY, "compile": "none"}, stop_after=2)
    ckpt = torch.load(f"{run}/latest.pt", weights_only=True)
    del ckpt["config"]["compile"]  # as written before the field existed
    torch.save(ckpt, f"{run}/latest.pt")
    cfg, _ = T._resumed_config(run, None)
    assert cfg.compile == "none"
    cfg, _ = T._resumed_config(run, {"compile": "model"})  # a resume override
    assert cfg.compile == "model"


@pytest.fixture(scope="module")
def compiled_runs(tmp_path_factory):
    """A 4-step compiled run, and the same run stopped at step 2 and resumed."""
    root = tmp_path_factory.mktemp("compiled")
    corpus = write_corpus(root)
    torch._dynamo.reset()  # count this module's compilation from a clean cache
    whole = tiny_run(corpus, root / "whole", SETTINGS)
    tiny_run(corpus, root / "parts", SETTINGS, stop_after=2)
    summary = T.train(resume=str(root / "parts"), quiet=True)
    assert summary["steps"] == SETTINGS["steps"]
    return root, whole, str(root / "parts")


@pytest.mark.slow
def test_compiled_run_compiles_one_graph_once(compiled_runs):
    _, whole, _ = compiled_runs
    summary = json.loads(open(f"{whole}/summary.json", encoding="utf-8").read())
    comp = summary["compile"]
    assert comp["requested"] == "model" and comp["resolved"] == "model"
    # 4 steps and 2 evaluations in between (train/eval mode switches): still one frame
    assert (comp["frames"], comp["graphs"], comp["graph_breaks"]) == (1, 1, 0), comp
    assert comp["first_step_seconds"] > 0
    assert json.loads(open(f"{whole}/config.json", encoding="utf-8").read())["compile"] == "model"


def test_run_folder_records_the_newton_schulz_dtype(compiled_runs):
    _, whole, _ = compiled_runs
    summary = json.loads(open(f"{whole}/summary.json", encoding="utf-8").read())
    cfg = C.config_from_preset("shakespeare-cpu", **SETTINGS)
    model = C.build_model(cfg, summary["vocab_size"])
    assert summary["ns_dtype"] in ("float32", "bfloat16")
    assert summary["ns_dtype"] == T.ns_dtype_of(build_optimizer(model, cfg))
    baseline = dataclasses.replace(cfg, model="baseline")
    assert T.ns_dtype_of(build_optimizer(C.build_model(baseline, 31), baseline)) is None  # AdamW


def test_compiled_checkpoints_hold_the_plain_modules_keys(compiled_runs):
    _, whole, _ = compiled_runs
    for name in ("latest.pt", "best.pt"):
        ckpt = torch.load(f"{whole}/{name}", weights_only=True)
        fresh = C.build_model(C.TrainConfig(**ckpt["config"]), ckpt["vocab_size"])
        assert list(ckpt["model"]) == list(fresh.state_dict()), name  # no _orig_mod. prefix
        fresh.load_state_dict(ckpt["model"])  # strict


def test_evaluation_of_a_compiled_run_is_the_eager_evaluation(compiled_runs):
    """The run's last evaluation (taken inside the compiled run) equals, to the last bit, an
    eager evaluation of its saved weights in a freshly built module."""
    _, whole, _ = compiled_runs
    summary = json.loads(open(f"{whole}/summary.json", encoding="utf-8").read())
    loaded = load_run(whole, which="latest")
    cfg, data = run_data(loaded, whole)
    ev = evaluate(loaded.model, data.val, cfg, CPU)
    for k in ("val_loss", "val_accuracy", "certified_bound", "max_activation"):
        assert ev[k] == summary[k], k


def test_compiled_resume_is_bit_exact(compiled_runs):
    _, whole, parts = compiled_runs
    a = torch.load(f"{whole}/latest.pt", weights_only=True)
    b = torch.load(f"{parts}/latest.pt", weights_only=True)
    assert a["step"] == b["step"] == SETTINGS["steps"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_compiled_loss_and_gradients_match_float64(compiled_runs):
    """The compiled training loss of a tiny model (float32, no autocast) and its gradients
    against the same model's eager float64 loss."""
    cfg = C.config_from_preset("shakespeare-cpu", **{**TINY, "compile": "model"})
    model = C.build_model(cfg, 31)
    with torch.no_grad():  # non-zero output projections, so every weight gets a gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref = C.build_model(cfg, 31).double()
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    # the fixture's run batches (8 x 32 tokens of 31 characters, views of 33-token windows,
    # as the sampler cuts them): its graph is reused, not compiled again
    w = torch.randint(0, 31, (cfg.batch_size, cfg.seq_len + 1))
    x, y = w[:, :-1], w[:, 1:]
    loss = T.training_loss_fn(model, cfg, "none", CPU, compiled=True)(x, y)
    loss.backward()
    loss64 = F.cross_entropy(cfg.logit_scale * ref(x).flatten(0, 1), y.flatten())
    loss64.backward()
    assert abs(loss.item() - loss64.item()) <= 1e-5 * max(1.0, abs(loss64.item()))
    for (name, p), p64 in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is not None, name
        err = (p.grad.double() - p64.grad).abs().max().item()
        assert err <= 1e-4 * p64.grad.abs().max().item() + 1e-7, (name, err)


def test_auto_falls_back_to_eager_when_compiling_fails(tmp_path, monkeypatch, capsys):
    """No C++ compiler / Triton: --compile auto trains eager (saying so), --compile model fails."""
    def broken_compile(fn, **kw):
        def compiled(*a, **k):
            raise RuntimeError("InductorError: no working C++ compiler found")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    from lipschitz_ext.training import runtime as R

    monkeypatch.setattr(R, "AUTO_COMPILE_DEVICES", ("cuda", "cpu"))  # auto compiles on CUDA only
    corpus = write_corpus(tmp_path)
    long_run = {**TINY, "steps": AUTO_COMPILE_MIN_STEPS, "eval_every": 10**6, "stop_after": 2}
    summary = T.train(C.config_from_preset("shakespeare-cpu", data=corpus, out=str(tmp_path / "auto"),
                                           **long_run), quiet=True)
    assert summary["status"] == "paused" and summary["steps"] == 2
    assert summary["compile"]["requested"] == "auto" and summary["compile"]["resolved"] == "none"
    assert summary["compile"]["fallback"] is True
    assert "torch.compile failed (RuntimeError: InductorError: no working C++ compiler" in capsys.readouterr().err
    eager = T.train(C.config_from_preset("shakespeare-cpu", data=corpus, out=str(tmp_path / "eager"),
                                         **{**long_run, "compile": "none"}), quiet=True)
    a = torch.load(tmp_path / "auto" / "latest.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "eager" / "latest.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # the failed attempt left no trace
    assert eager["compile"]["resolved"] == "none"
    with pytest.raises(RuntimeError, match="no working C\\+\\+ compiler"):
        T.train(C.config_from_preset("shakespeare-cpu", data=corpus, out=str(tmp_path / "model"),
                                     **{**long_run, "compile": "model"}), quiet=True)
