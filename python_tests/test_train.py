"""lipschitz-train end to end on tiny texts: artifacts, exact resume, baseline,
presets, errors, signals, and a 2-process torchrun (gloo) run."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from lipschitz_ext.cli.train import train_main
from lipschitz_ext.training import config as C
from lipschitz_ext.evaluation import metrics as EV
from lipschitz_ext.training import optimizers as O
from lipschitz_ext.training import runtime as RT
from lipschitz_ext.training import loop as T

TINY = dict(target_bound=0.0, d_model=32, n_layers=2, n_heads=2, seq_len=32, batch_size=8, steps=12, eval_every=6,
            eval_batches=2, log_every=3, sample_chars=40, head_sigma_max=4.0, device="cpu", threads=1)


@pytest.fixture
def corpus(tmp_path):
    text = "".join(f"{i} little pigs went to market, and {i * 7 % 13} came home.\n" for i in range(400))
    p = tmp_path / "corpus.txt"
    p.write_text(text, encoding="utf-8")
    return str(p)


def run(corpus, out, **kw):
    cfg = C.config_from_preset("shakespeare-cpu", data=corpus, out=str(out), **{**TINY, **kw})
    return T.train(cfg, quiet=True)


def test_run_writes_every_artifact(corpus, tmp_path):
    s = run(corpus, tmp_path / "r")
    d = tmp_path / "r"
    for name in ("config.json", "metrics.jsonl", "summary.json", "latest.pt", "best.pt", "curves.png", "sample.txt"):
        assert (d / name).exists(), name
    summary = json.loads((d / "summary.json").read_text())
    for k in ("val_accuracy", "val_loss", "certified_bound", "max_activation", "steps", "tokens_per_second",
              "wall_seconds", "device"):
        assert summary[k] is not None, k
    assert summary["steps"] == 12 and summary["status"] == "completed"
    assert 0 < summary["certified_bound"] < float("inf") and 0 <= summary["val_accuracy"] <= 1
    rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [6, 12]
    assert all({"train_loss", "lr", "tokens_per_second"} <= r.keys() for r in rows if "train_loss" in r)
    assert s["val_loss"] == evals[-1]["val_loss"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["d_model"] == 32 and cfg["data"] == corpus


@pytest.mark.slow
def test_resume_is_exact(corpus, tmp_path):
    full = run(corpus, tmp_path / "full")
    run(corpus, tmp_path / "part", stop_after=5)  # stops at step 5, between evals, as if killed
    resumed = T.train(resume=str(tmp_path / "part"), quiet=True)
    a = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(l) for l in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    key = lambda rows: [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in rows]
    assert key(a) == key(b)
    assert resumed["val_loss"] == full["val_loss"]
    sa = torch.load(tmp_path / "full" / "latest.pt", weights_only=True)["model"]
    sb = torch.load(tmp_path / "part" / "latest.pt", weights_only=True)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_loss_temperature_is_for_the_lipschitz_model_only():
    lip = C.config_from_preset("shakespeare-cpu")
    assert lip.logit_scale > 1 and EV.loss_logit_scale(lip) == lip.logit_scale
    assert EV.loss_logit_scale(C.config_from_preset("shakespeare-cpu", model="baseline")) == 1.0


def test_baseline_trains(corpus, tmp_path):
    s = run(corpus, tmp_path / "b", model="baseline", steps=30, eval_every=30)
    assert s["certified_bound"] is None and s["status"] == "completed"
    rows = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("model", ["lipschitz", "baseline"])
def test_bf16_autocast_trains_and_evaluates_in_float32(corpus, tmp_path, model):
    s = run(corpus, tmp_path / model, model=model, autocast="bf16", steps=30, eval_every=30)
    assert s["status"] == "completed"
    assert json.loads((tmp_path / model / "config.json").read_text())["autocast"] == "bf16"
    assert s["autocast"] == "bf16"
    rows = [json.loads(l) for l in (tmp_path / model / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    assert losses[-1] < losses[0]
    # weights stay float32; the reported evaluation is the float32 model's
    from lipschitz_ext.training.run import load_run_data

    net, cfg, data = load_run_data(str(tmp_path / model), which="latest")
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert EV.evaluate(net, data.val, cfg, torch.device("cpu"))["val_loss"] == pytest.approx(s["val_loss"], rel=1e-6)


def test_auto_autocast_follows_the_hardware(monkeypatch):
    cpu = torch.device("cpu")
    cfg = C.TrainConfig(autocast="auto")
    for avx512_bf16, amx, want in [(True, False, "bf16"), (False, True, "bf16"), (False, False, "none")]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert RT.resolve_autocast(cfg, cpu) == want
        ctx = RT.training_autocast(RT.resolve_autocast(cfg, cpu), cpu)
        assert isinstance(ctx, torch.autocast) == (want == "bf16")
    for fixed in ("none", "bf16"):  # explicit values are kept whatever the hardware
        assert RT.resolve_autocast(C.TrainConfig(autocast=fixed), cpu) == fixed
    assert C.config_from_preset("shakespeare-cpu").autocast == "auto"


def test_logit_scale_is_a_loss_temperature_only(corpus, tmp_path):
    """logit_scale changes the loss the model is trained and reported with, never the
    model's logits: the saved weights certify to the reported bound, and evaluating them
    with logit_scale 1 gives the same accuracy and a different loss."""
    import dataclasses

    from lipschitz_ext.data import text as D
    from lipschitz_ext.certify import certify

    s = run(corpus, tmp_path / "t", pos_bias="learned", logit_scale=4.0, head_sigma_max=1.0, steps=6,
            eval_every=6)
    ck = torch.load(tmp_path / "t" / "latest.pt", weights_only=True)
    cfg = C.TrainConfig(**json.loads((tmp_path / "t" / "config.json").read_text()))
    assert cfg.logit_scale == 4.0 and cfg.pos_bias == "learned"
    model = C.build_model(cfg, ck["model"]["embed.weight"].shape[0])
    model.load_state_dict(ck["model"])
    assert any("bias_table" in k for k in ck["model"])
    assert certify(model).bound == pytest.approx(s["certified_bound"], rel=1e-9)
    val = D.load_data(corpus, "char", cfg.seq_len, cfg.vocab_size).val
    at4 = EV.evaluate(model, val, cfg, torch.device("cpu"))
    at1 = EV.evaluate(model, val, dataclasses.replace(cfg, logit_scale=1.0), torch.device("cpu"))
    assert at4["val_loss"] == pytest.approx(s["val_loss"], rel=1e-6)
    assert at4["val_accuracy"] == at1["val_accuracy"] and at4["val_loss"] != at1["val_loss"]


def test_lr_schedule_warmup_hold_and_cooldown():
    lin = C.TrainConfig(steps=100, warmup_steps=10, final_lr_frac=0.1)
    assert O.lr_multiplier(lin, 0) == pytest.approx(0.1) and O.lr_multiplier(lin, 9) == pytest.approx(1.0)
    assert O.lr_multiplier(lin, 10) == pytest.approx(1.0)
    assert O.lr_multiplier(lin, 55) == pytest.approx(1 - 0.9 * 45 / 90)
    assert O.lr_multiplier(lin, 100) == pytest.approx(0.1)
    wsd = C.TrainConfig(steps=100, cooldown_frac=0.4)
    assert [O.lr_multiplier(wsd, s) for s in (0, 30, 60)] == [1.0, 1.0, 1.0]
    assert O.lr_multiplier(wsd, 80) == pytest.approx(0.5) and O.lr_multiplier(wsd, 100) == pytest.approx(0.0)
    mults = [O.lr_multiplier(wsd, s) for s in range(101)]
    assert all(a >= b for a, b in zip(mults, mults[1:]))


@pytest.mark.slow
def test_time_schedule_follows_the_clock(corpus, tmp_path):
    cfg = C.TrainConfig(steps=10, schedule="time", time_budget=100.0, cooldown_frac=0.5)
    assert O.lr_multiplier(cfg, 9, elapsed=20.0) == 1.0  # steps do not matter, time does
    assert O.lr_multiplier(cfg, 0, elapsed=75.0) == pytest.approx(0.5)
    assert O.lr_multiplier(cfg, 0, elapsed=150.0) == 0.0
    s = run(corpus, tmp_path / "t", schedule="time", time_budget=3.0, steps=10**6, eval_every=10**6)
    assert s["status"] == "time_budget" and 0 < s["steps"] < 10**6 and s["val_accuracy"] is not None
    rows = [json.loads(l) for l in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert lrs[-1] < 0.25 * lrs[0]  # decayed by the clock, not by --steps
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_presets_validate():
    for name in C.PRESETS:
        cfg = C.config_from_preset(name)
        assert cfg.preset == name
    assert C.config_from_preset("shakespeare").d_model == 256
    g = C.config_from_preset("gpt2-small")
    assert (g.n_layers, g.d_model, g.n_heads, g.d_model // g.n_heads) == (12, 768, 6, 128)


def test_explicit_sigma_max_replaces_preset_group_caps():
    cpu = C.config_from_preset("shakespeare-cpu")
    assert (cpu.attn_sigma_max, cpu.mlp_sigma_max) == (1.5, 2.0)
    # --sigma-max alone: one cap for every hidden matrix (what a sweep varies)
    one = C.config_from_preset("shakespeare-cpu", sigma_max=0.5)
    assert (one.sigma_max, one.attn_sigma_max, one.mlp_sigma_max) == (0.5, None, None)
    # a per-group cap given beside it is kept
    both = C.config_from_preset("shakespeare-cpu", sigma_max=0.5, mlp_sigma_max=3.0)
    assert (both.attn_sigma_max, both.mlp_sigma_max) == (None, 3.0)
    model = C.build_model(both, vocab_size=11)
    assert {g["name"]: g["sigma_max"] for g in model.param_groups_spec() if g["kind"] == "hidden"} == {
        "attention": 0.5, "mlp": 3.0}


def test_target_bound_scales_the_head_by_the_worst_case():
    """--target-bound multiplies the head cap and head lr by k = target / worst case (less
    a relative margin of 1e-3) and divides the loss temperature by k."""
    from lipschitz_ext.certify import worst_case_certificate

    base = C.config_from_preset("shakespeare-cpu", target_bound=0.0)
    cfg = C.apply_target_bound(C.config_from_preset("shakespeare-cpu", target_bound=2.0))
    worst = worst_case_certificate(C.build_model(base, 65)).bound
    k = 2.0 / (worst * (1 + C.TARGET_BOUND_MARGIN))
    assert 0 < k < 1 and C.TARGET_BOUND_MARGIN == 1e-3
    assert cfg.head_sigma_max == pytest.approx(base.head_sigma_max * k, rel=1e-12)
    assert cfg.head_lr == pytest.approx(base.head_lr * k, rel=1e-12)
    assert cfg.logit_scale == pytest.approx(base.logit_scale / k, rel=1e-12)
    assert worst_case_certificate(C.build_model(cfg, 65)).bound == pytest.approx(2.0 / 1.001, rel=1e-12)
    assert C.apply_target_bound(base) is base  # 0 = off


@pytest.mark.slow
def test_target_bound_run_stays_under_it_and_trains_like_the_unscaled_run(corpus, tmp_path):
    """The rescaled run is the unscaled run with its logits times k: same losses (the
    loss sees logit_scale * logits), same accuracy, certified bound <= the target; the
    saved config holds the scaled head, so a resumed run does not scale it again."""
    kw = dict(autocast="none", head_sigma_max=1.0, steps=6, eval_every=3, sample_chars=0)
    plain = run(corpus, tmp_path / "plain", **kw)
    scaled = run(corpus, tmp_path / "scaled", target_bound=0.5, **kw)
    rows = lambda d: [json.loads(l) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    a, b = rows("plain"), rows("scaled")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("train_loss", "val_loss"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5), (ra["step"], key)
    assert scaled["val_accuracy"] == pytest.approx(plain["val_accuracy"], abs=0.01)
    assert scaled["certified_bound"] <= 0.5
    cfg = json.loads((tmp_path / "scaled" / "config.json").read_text())
    assert cfg["target_bound"] == 0.5 and cfg["head_sigma_max"] < 1.0
    assert scaled["target_bound"] == 0.5 and scaled["head_sigma_max"] == cfg["head_sigma_max"]
    k = cfg["head_sigma_max"]
    assert scaled["certified_bound"] == pytest.approx(k * plain["certified_bound"], rel=1e-4)
    T.train(resume=str(tmp_path / "scaled"), quiet=True, overrides={"steps": 9})
    assert json.loads((tmp_path / "scaled" / "config.json").read_text())["head_sigma_max"] == k


@pytest.mark.parametrize("kw, match", [
    (dict(d_model=30, n_heads=4), "multiple of --n-heads"),
    (dict(sigma_max=-1.0), "must be > 0"),
    (dict(model="resnet"), "--model must be"),
    (dict(steps=0), "--steps must be > 0"),
    (dict(logit_scale=0.0), "--logit-scale"),
    (dict(pos_bias="sinusoid"), "--pos-bias"),
    (dict(mlp_sigma_max=0.0), "--mlp-sigma-max"),
    (dict(attn_sigma_max=float("inf")), "--attn-sigma-max"),
    (dict(pos_bias="learned", attention="fp8", softmax_scale=1.0), "no positional bias"),
    (dict(autocast="fp16"), "--autocast must be one of none, bf16, auto"),
    (dict(cooldown_frac=0.0), "--cooldown-frac"),
    (dict(schedule="cosine"), "--schedule must be steps or time"),
    (dict(schedule="time", time_budget=0.0), "--schedule time needs a --time-budget"),
    (dict(softmax_scale=-0.5), "--softmax-scale must be finite and >= 0"),
    (dict(softmax_scale=0.0, pos_bias="none", attention="fp8"), "no use for --attention fp8"),
    (dict(target_bound=-1.0), "--target-bound must be finite and >= 0"),
    (dict(target_bound=2.0, model="baseline"), "--target-bound needs --model lipschitz"),
    (dict(target_bound=2.0, constraint="hammer"), "--target-bound needs a constraint that keeps"),
    (dict(target_bound=2.0, constraint="none"), "--target-bound needs a constraint that keeps"),
])
def test_bad_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        C.config_from_preset("shakespeare-cpu", **kw)
    with pytest.raises(ValueError, match="unknown preset"):
        C.config_from_preset("imagenet")


def test_cli_errors(tmp_path, capsys):
    assert train_main(["--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x")]) == 2
    assert "data file not found" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("hello", encoding="utf-8")
    assert train_main(["--data", str(short), "--out", str(tmp_path / "y")]) == 2
    assert "too short" in capsys.readouterr().err
    assert train_main(["--resume", str(tmp_path / "nothing")]) == 2


def test_resume_with_other_vocabulary_is_refused(corpus, tmp_path):
    run(corpus, tmp_path / "r", steps=3, eval_every=3)
    other = tmp_path / "other.txt"
    other.write_text("ZYXW vuts " * 500, encoding="utf-8")
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    ck = torch.load(tmp_path / "r" / "latest.pt", weights_only=True)
    ck["config"]["data"] = str(other)
    torch.save(ck, tmp_path / "r" / "latest.pt")
    with pytest.raises(ValueError, match="does not match the checkpoint"):
        T.train(resume=str(tmp_path / "r"), quiet=True)
    assert cfg["data"] == corpus


def test_non_finite_loss_stops_and_keeps_checkpoint(corpus, tmp_path):
    s = run(corpus, tmp_path / "nan", model="baseline", baseline_lr=1e6, steps=60, eval_every=2)
    if s["status"] == "completed":
        pytest.fail("expected the absurd learning rate to diverge")
    assert s["status"] == "diverged"
    ck = torch.load(tmp_path / "nan" / "latest.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_sigterm_leaves_resumable_checkpoint(corpus, tmp_path):
    out = tmp_path / "sig"
    code = textwrap.dedent(f"""
        import os, signal, sys
        from lipschitz_ext.data import text as data
        from lipschitz_ext.cli.train import train_main
        calls = [0]
        real_next = data.BatchSampler.next
        def next_and_signal(self, device="cpu"):
            calls[0] += 1
            if calls[0] == 5:
                os.kill(os.getpid(), signal.SIGTERM)
            return real_next(self, device)
        data.BatchSampler.next = next_and_signal
        sys.exit(train_main(["--data", {corpus!r}, "--out", {str(out)!r}, "--quiet"] + {T_args()!r}))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 130, r.stderr
    assert "resume with" in r.stderr
    ck = torch.load(out / "latest.pt", weights_only=True)
    assert ck["step"] == 5
    s = T.train(resume=str(out), quiet=True)
    assert s["steps"] == 12 and s["status"] == "completed"


def T_args():
    args = []
    for k, v in TINY.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    return args


@pytest.mark.slow
def test_sweep_writes_frontier(corpus, tmp_path):
    out = tmp_path / "sw"
    assert train_main(["sweep", "--sigma-max", "0.5,2", "--constraint", "soft_cap,normalize", "--data", corpus,
                   "--out", str(out), "--quiet", *T_args()]) == 0
    lines = (out / "frontier.csv").read_text().splitlines()
    assert len(lines) == 5 and lines[0].startswith("constraint,sigma_max,certified_bound")
    assert (out / "frontier.png").exists()
    # the swept cap is every hidden matrix's cap (the preset's per-group caps are dropped)
    for cap in ("0.5", "2"):
        cfg = json.loads((out / f"soft_cap-s{cap}" / "config.json").read_text())
        assert (cfg["sigma_max"], cfg["attn_sigma_max"], cfg["mlp_sigma_max"]) == (float(cap), None, None)


def torchrun2(corpus, out, port, *extra):
    """``lipschitz-train`` on the TINY config under a 2-process CPU (gloo) torchrun; the summary."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "lipschitz_ext.cli.train", "--data", corpus, "--out", str(out), "--quiet", *T_args(), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_torchrun_two_processes(corpus, tmp_path):
    summary = torchrun2(corpus, tmp_path / "ddp", 29517)
    assert summary["status"] == "completed" and summary["steps"] == 12
    # twice the tokens per step of a single process
    assert summary["tokens"] == 12 * 2 * TINY["batch_size"] * TINY["seq_len"]


@pytest.mark.slow
def test_torchrun_time_budget_stops_every_rank_at_the_same_step(corpus, tmp_path):
    # rank 0's clock decides: a rank stopping one step early would leave the other
    # waiting in DDP's all-reduce (this test would time out)
    # the later --steps overrides TINY's (argparse keeps the last value)
    summary = torchrun2(corpus, tmp_path / "ddp-time", 29518, "--steps", "1000000", "--schedule", "time",
                        "--time-budget", "4")
    assert summary["status"] == "time_budget" and 0 < summary["steps"] < 10**6


def test_default_preset_is_a_time_budgeted_bound_2_job():
    """The main job ends at its time budget on any machine and is certified <= 2 whatever the
    weights; an explicit --steps gives a step-count run, a baseline model or a constraint that
    does not cap the spectrum drops the target bound."""
    cpu = C.config_from_preset("shakespeare-cpu")
    assert (cpu.schedule, cpu.time_budget, cpu.target_bound) == ("time", C.MAIN_JOB_SECONDS, 2.0)
    steps = C.config_from_preset("shakespeare-cpu", steps=500)
    assert (steps.schedule, steps.time_budget, steps.steps, steps.target_bound) == ("steps", 0.0, 500, 2.0)
    kept = C.config_from_preset("shakespeare-cpu", steps=500, schedule="time", time_budget=60.0)
    assert (kept.schedule, kept.time_budget) == ("time", 60.0)
    assert C.config_from_preset("shakespeare-cpu", model="baseline").target_bound == 0.0
    assert C.config_from_preset("shakespeare-cpu", constraint="hammer").target_bound == 0.0
    assert C.config_from_preset("shakespeare-cpu", constraint="soft_cap").target_bound == 2.0
    # asking for N steps or for the baseline means what it says: no note; a non-capping constraint
    # silently loses the bound: a note
    assert C.preset_override_notes("shakespeare-cpu", {"steps": 500, "model": "baseline"}) == []
    assert C.preset_override_notes("shakespeare-cpu", {"constraint": "hammer"}) == [
        "note: --constraint hammer replaces preset shakespeare-cpu's target bound (--target-bound 2); "
        "give it explicitly to keep it"]
    assert C.preset_override_notes("shakespeare-cpu", {"steps": 500, "schedule": "time", "time_budget": 9.0}) == []
