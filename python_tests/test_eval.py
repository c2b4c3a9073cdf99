"""lipschitz-eval (lipschitz_ext.cli.eval) on tiny runs: robustness and the certified
radius checked by attacks, activation tables, the accuracy-bound frontier, the
learning-rate sensitivity sweep, and clear errors for bad run folders.

All models are tiny (d_model 32, 1 layer) and train for a few dozen steps on a
small text, once per module; the whole file runs in well under a minute on one thread.
"""

import copy
import csv
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

from lipschitz_ext.cli.eval import eval_main
from lipschitz_ext.training import config as C
from lipschitz_ext.certify import robustness as E_robustness
from lipschitz_ext.experiments import analyses as E_analyses
from lipschitz_ext.evaluation import logits as E_logits
from lipschitz_ext.training import run as R
from lipschitz_ext.certify import certify
from tiny_runs import tiny_run, write_corpus

TINY = dict(target_bound=0.0, d_model=32, n_layers=1, residual_scale=1.0, n_heads=2, seq_len=32, batch_size=8, steps=40, eval_every=40,
            eval_batches=2, log_every=10, sample_chars=0, head_sigma_max=4.0, device="cpu", threads=1)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Four finished runs: a Lipschitz model, a second one with another cap and
    constraint, one whose embedding rows have RMS 2 (certificate domain != 1), and a baseline."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval-runs")
    corpus = write_corpus(root)

    def train(name, **kw):
        return tiny_run(corpus, root / name, TINY, **kw)

    return SimpleNamespace(
        root=root, corpus=str(corpus),
        lip=train("lip"),
        lip_normalize=train("lip-normalize", sigma_max=0.5, constraint="normalize"),
        lip_wide=train("wide", embed_max_rms=2.0),
        base=train("base", model="baseline"),
    )


def summary_cfg(run):
    with open(os.path.join(run, "config.json"), encoding="utf-8") as fh:
        return json.load(fh)


def summary(run):
    with open(os.path.join(run, "summary.json"), encoding="utf-8") as fh:
        return json.load(fh)


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def assert_png(path):
    with open(path, "rb") as fh:
        assert fh.read(8) == PNG_MAGIC, path


def domain_rms(model):
    return max(model.config.embed_max_rms, model.embed.max_row_rms())


# ---------------------------------------------------------------------------
# robustness
# ---------------------------------------------------------------------------
@pytest.mark.slow
def test_robustness_cli_tables_and_consistency(runs, tmp_path):
    out = tmp_path / "rob"
    eps = [0.2, 0.001, 0.01, 0.05, 1.0]  # unsorted on purpose
    assert eval_main(["robustness", "--checkpoint", runs.lip, "--checkpoint", runs.lip_wide, "--checkpoint", runs.base,
                   "--eps", ",".join(map(str, eps)), "--pgd-steps", "10", "--batches", "2", "--out", str(out)]) == 0
    for name in ("robustness.csv", "robustness.json", "robustness.png"):
        assert (out / name).stat().st_size > 0, name
    assert_png(out / "robustness.png")
    rows = json.loads((out / "robustness.json").read_text())
    assert len(read_csv(out / "robustness.csv")) == len(rows) == 3 * (len(eps) + 1)

    for run in (runs.lip, runs.lip_wide, runs.base):
        rr = [r for r in rows if r["run"] == run]
        assert [r["eps"] for r in rr] == [0.0] + sorted(eps)
        clean = rr[0]["clean_accuracy"]
        assert 0 < clean <= 1 and all(r["clean_accuracy"] == clean for r in rr)
        assert rr[0]["pgd_accuracy"] == rr[0]["fgsm_accuracy"] == clean  # eps 0: no attack
        for r in rr:
            assert r["pgd_accuracy"] <= clean and r["fgsm_accuracy"] <= clean, r
        # the attacks do something: at eps = 1 (relative) most correct predictions fall
        assert rr[-1]["pgd_accuracy"] <= 0.5 * clean and rr[-1]["fgsm_accuracy"] < clean

        model, cfg, data = R.load_run_data(run)
        batches = list(E_analyses._val_batches(cfg, data, 2, 16))
        embeds = [model.embed(x).detach() for x, _ in batches]
        scale = torch.cat([e.pow(2).mean(-1).sqrt().flatten() for e in embeds]).mean().item()
        for r in rr:  # eps is relative to the mean clean token RMS
            assert r["eps_abs"] == pytest.approx(r["eps"] * scale, rel=1e-5)
        if run == runs.base:
            assert all(r["certified_bound"] is None and r["certified_fraction"] is None for r in rr)
            assert scale < 0.1  # the baseline's embeddings are small: relative eps matters
            continue

        # certified fraction: non-increasing in eps, and never above what the attacks leave
        fr = [r["certified_fraction"] for r in rr]
        assert all(a >= b for a, b in zip(fr, fr[1:])), fr
        assert fr[1] > 0 and fr[-1] < fr[0]
        for r in rr:
            assert r["certified_fraction"] <= min(r["pgd_accuracy"], r["fgsm_accuracy"]), r
        # the certificate is taken on a domain that holds the clean inputs, and recomputed
        # independently through Certificate.certified_radius it gives the same fractions
        rho = domain_rms(model)
        assert rr[0]["input_rms"] == pytest.approx(rho)
        cert = certify(model, input_rms=rho)
        assert cert.embedding_in_domain and rr[0]["certified_bound"] == pytest.approx(cert.bound, rel=1e-9)
        with torch.no_grad():
            logits = [model.forward_embeddings(e) for e in embeds]
        top2 = torch.cat([z.topk(2, dim=-1).values.reshape(-1, 2) for z in logits])
        radius = torch.tensor([cert.certified_radius(float(m)) for m in top2[:, 0] - top2[:, 1]])
        correct = torch.cat([(z.argmax(-1) == y).flatten() for z, (_, y) in zip(logits, batches)])
        for r in rr:
            assert r["certified_fraction"] == pytest.approx(((radius > r["eps_abs"]) & correct).float().mean().item(),
                                                            abs=1.5 / correct.numel())
    # with the default cap the bound is the one training reported
    lip_rows = [r for r in rows if r["run"] == runs.lip]
    assert lip_rows[0]["certified_bound"] == pytest.approx(summary(runs.lip)["certified_bound"], rel=1e-5)
    assert [r for r in rows if r["run"] == runs.lip_wide][0]["input_rms"] == pytest.approx(2.0, rel=1e-5)


def test_certified_radius_formula(runs):
    model, cfg, data = R.load_run_data(runs.lip)
    cert = certify(model, input_rms=domain_rms(model))
    x, _ = next(iter(E_analyses._val_batches(cfg, data, 1, 4)))
    with torch.no_grad():
        z = model(x).double()
    r = E_robustness.certified_radius(z, cert.bound)
    assert r.shape == x.shape and r.dtype == torch.float64 and (r >= 0).all()
    top2 = z.topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]
    V = z.shape[-1]
    # docs/certificate.md, Corollary 4: eps < m / (sqrt(2 V) * Lip), per position
    assert torch.allclose(r, margin / (math.sqrt(2 * V) * cert.bound), rtol=1e-12, atol=0)
    assert all(r[b, t].item() == pytest.approx(cert.certified_radius(margin[b, t].item()), rel=1e-12)
               for b in range(2) for t in range(0, x.shape[1], 7))
    tie = torch.zeros(3, V)
    assert (E_robustness.certified_radius(tie, cert.bound) == 0).all()
    for bad in (None, float("nan"), -1.0):
        with pytest.raises(ValueError, match="baseline models have none"):
            E_robustness.certified_radius(z, bad)


def _attack_positions(model64, e, pred, radius, n_per_seq, gen):
    """Replicate each sequence once per chosen position; labels = the clean prediction at
    that position only (-100 elsewhere), so the attack targets exactly that prediction."""
    B, Tn = pred.shape
    picks = []
    for b in range(B):
        ok = (radius[b] > 0).nonzero().flatten()
        picks += [(b, int(t)) for t in ok[torch.randperm(len(ok), generator=gen)[:n_per_seq]]]
    bi = torch.tensor([b for b, _ in picks])
    ti = torch.tensor([t for _, t in picks])
    y = torch.full((len(picks), Tn), -100, dtype=torch.long)
    y[torch.arange(len(picks)), ti] = pred[bi, ti]
    return e[bi], y, bi, ti


def _flips(model64, xe, y, ti, eps, rho, steps=50, restarts=3):
    rows = torch.arange(len(ti))
    target = y[rows, ti]
    flipped = torch.zeros(len(ti), dtype=torch.bool)
    for k in range(restarts):
        xa = E_robustness.pgd_attack(model64, xe, y, eps, steps=steps, domain_rms=rho,
                          generator=torch.Generator().manual_seed(k))
        # the attack is inside the certificate's ball and domain
        assert (E_robustness.token_rms(xa - xe).squeeze(-1) <= eps[:, None] * (1 + 1e-9)).all()
        assert (E_robustness.token_rms(xa) <= rho * (1 + 1e-12)).all()
        with torch.no_grad():
            flipped |= model64.forward_embeddings(xa)[rows, ti].argmax(-1) != target
    return flipped


@pytest.mark.slow
def test_certified_radius_survives_strong_attack(runs):
    """No prediction flips under a 3-restart, 50-step PGD at 0.99x its certified radius;
    with a too small bound (radius 10x, 30x or 100x too large: how loose the certificate is
    depends on the recipe) the same attack flips most of them, so the check has teeth.
    Float64, so rounding cannot fake or hide a flip."""
    for run in (runs.lip, runs.lip_wide):
        model, cfg, data = R.load_run_data(run)
        rho = domain_rms(model)
        bound = certify(model, input_rms=rho).bound
        m64 = copy.deepcopy(model).double()
        for p in m64.parameters():
            p.requires_grad_(False)
        x, _ = next(iter(E_analyses._val_batches(cfg, data, 1, 8)))
        e = m64.embed(x)
        with torch.no_grad():
            z = m64.forward_embeddings(e)
        radius = E_robustness.certified_radius(z, bound)
        xe, y, bi, ti = _attack_positions(m64, e, z.argmax(-1), radius, 6, torch.Generator().manual_seed(0))
        assert len(ti) >= 40
        r = radius[bi, ti]
        flipped = _flips(m64, xe, y, ti, 0.99 * r, rho)
        assert not flipped.any(), f"{run}: {int(flipped.sum())} certified predictions flipped"
        found = []
        for factor in (10, 30, 100):
            wrong = _flips(m64, xe, y, ti, 0.99 * r * factor, rho)
            found.append(int(wrong.sum()))
            if wrong.float().mean() > 0.5:
                break
        assert wrong.float().mean() > 0.5, f"{run}: bound/10,/30,/100 flipped only {found} of {len(ti)}"


def test_pgd_attack_respects_ball_and_domain(runs):
    model, cfg, data = R.load_run_data(runs.lip_wide)
    for p in model.parameters():
        p.requires_grad_(False)
    x, y = next(iter(E_analyses._val_batches(cfg, data, 1, 4)))
    e = model.embed(x).detach()
    rho = domain_rms(model)
    assert torch.equal(E_robustness.pgd_attack(model, e, y, 0.0), e)
    for eps, steps, step in ((0.05, 1, 0.05), (0.05, 10, None), (torch.tensor([0.0, 0.01, 0.1, 3.0]), 5, None)):
        xa = E_robustness.pgd_attack(model, e, y, eps, steps, step, rho, torch.Generator().manual_seed(0))
        bound = torch.as_tensor(eps).reshape(-1, 1)
        moved = E_robustness.token_rms(xa - e).squeeze(-1)
        assert (moved <= bound * (1 + 1e-5) + 1e-7).all()
        assert (E_robustness.token_rms(xa) <= rho * (1 + 1e-5)).all()
        if steps == 1:  # single step: every token moves by exactly eps (inside the domain)
            assert moved.min() > 0.5 * eps
        with torch.no_grad():
            before = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
            after = torch.nn.functional.cross_entropy(model.forward_embeddings(xa).flatten(0, 1), y.flatten())
        assert after > before


# ---------------------------------------------------------------------------
# activations
# ---------------------------------------------------------------------------
def test_activations_cli(runs, tmp_path):
    out = tmp_path / "act"
    assert eval_main(["activations", "--checkpoint", runs.lip, "--baseline", runs.base, "--batches", "2",
                   "--out", str(out)]) == 0
    assert_png(out / "activations.png")
    rows = json.loads((out / "activations.json").read_text())
    assert len(read_csv(out / "activations.csv")) == len(rows)
    for role, run in (("model", runs.lip), ("baseline", runs.base)):
        rr = {r["layer"]: r for r in rows if r["role"] == role}
        assert {r["run"] for r in rows if r["role"] == role} == {run}
        model, cfg, data = R.load_run_data(run)
        layers = [n for n, m in model.named_modules()
                  if n and not isinstance(m, (torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.Sequential))]
        assert sorted(rr) == sorted(layers)
        for r in rr.values():
            assert r["max_abs"] >= r["rms"] > 0, r
            assert 0 <= r["e4m3_saturated_fraction"] <= 1
        # the head row is the logits: compare with a direct computation
        with torch.no_grad():
            z = torch.cat([model(x) for x, _ in E_analyses._val_batches(cfg, data, 2, 16)]).double()
        assert rr["head"]["max_abs"] == pytest.approx(z.abs().max().item(), rel=1e-5)
        assert rr["head"]["rms"] == pytest.approx(z.pow(2).mean().sqrt().item(), rel=1e-4)
        assert rr["head"]["e4m3_saturated_fraction"] == (z.abs() > 448).double().mean().item()


# ---------------------------------------------------------------------------
# frontier
# ---------------------------------------------------------------------------
def test_frontier_cli(runs, tmp_path):
    out = tmp_path / "fr"
    assert eval_main(["frontier", os.path.join(str(runs.root), "lip*"), runs.base, "--out", str(out)]) == 0
    assert_png(out / "frontier.png")
    rows = read_csv(out / "frontier.csv")
    assert sorted(r["run"] for r in rows) == sorted([runs.lip, runs.lip_normalize])  # the baseline has no bound
    for r in rows:
        s = summary(r["run"])
        assert float(r["val_accuracy"]) == pytest.approx(s["val_accuracy"], rel=1e-12)
        assert float(r["certified_bound"]) == pytest.approx(s["certified_bound"], rel=1e-12)
        cfg = json.loads(open(os.path.join(r["run"], "config.json"), encoding="utf-8").read())
        assert (r["constraint"], float(r["sigma_max"])) == (cfg["constraint"], cfg["sigma_max"])
    bounds = {r["constraint"]: float(r["certified_bound"]) for r in rows}
    assert bounds["normalize"] < bounds[summary_cfg(runs.lip)["constraint"]]  # the 0.5 cap certifies less


# ---------------------------------------------------------------------------
# learning-rate sensitivity
# ---------------------------------------------------------------------------
@pytest.mark.slow
def test_lr_sensitivity_cli(runs, tmp_path):
    out = tmp_path / "lrs"
    assert eval_main(["lr-sensitivity", "--data", runs.corpus, "--lrs", "0.5,2", "--sizes", "16x2", "--steps", "3",
                   "--out", str(out)]) == 0
    assert_png(out / "lr_sensitivity.png")
    rows = json.loads((out / "lr_sensitivity.json").read_text())
    assert len(read_csv(out / "lr_sensitivity.csv")) == len(rows) == 4
    base = C.config_from_preset("shakespeare-cpu")
    assert sorted((r["model"], r["lr_multiplier"]) for r in rows) == [
        ("baseline", 0.5), ("baseline", 2.0), ("lipschitz", 0.5), ("lipschitz", 2.0)]
    for r in rows:
        assert (r["d_model"], r["n_layers"], r["status"]) == (16, 2, "completed")
        default = base.baseline_lr if r["model"] == "baseline" else base.lr
        assert r["lr"] == pytest.approx(default * r["lr_multiplier"])
        assert math.isfinite(r["val_loss"]) and r["val_loss"] > 0
        assert math.isfinite(r["attention_logit_max"]) and r["attention_logit_max"] > 0, r
        assert math.isfinite(r["max_abs_logit"]) and r["max_abs_logit"] > 0, r
        assert math.isfinite(r["mean_logit"])
        run_dir = out / f"{r['model']}-d16-L2-x{r['lr_multiplier']:g}"
        assert json.loads((run_dir / "lr_sensitivity.json").read_text()) == r  # the run's own log
        assert (run_dir / "metrics.jsonl").exists()


def test_attention_logits_reproduce_attention(runs):
    """The logits attention_logit_max reports are the ones the modules softmax: rebuilding
    each attention output from them matches the module's own output."""
    for run in (runs.lip, runs.base):
        model, cfg, data = R.load_run_data(run)
        x, _ = next(iter(E_analyses._val_batches(cfg, data, 1, 2)))
        seen = []
        att = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
        handles = [m.register_forward_hook(lambda m, i, o: seen.append((m, i[0], o))) for m in att]
        with torch.no_grad():
            model(x)
        for h in handles:
            h.remove()
        assert len(seen) == cfg.n_layers
        top = -math.inf
        for m, xin, o in seen:
            logits = E_logits.attention_logits(m, xin)
            B, Tn, d = xin.shape
            if hasattr(m, "v"):  # LipschitzAttention
                v, proj, factor = m._heads(m.v(xin)), m.o, m.out_factor
            else:  # BaselineAttention
                v, proj, factor = m.qkv(xin).view(B, Tn, 3, m.n_heads, m.d_head)[:, :, 2].transpose(1, 2), m.o, 1.0
            with torch.no_grad():
                y = proj((torch.softmax(logits, -1) @ v).transpose(1, 2).reshape(B, Tn, d)) * factor
            assert torch.allclose(y, o, rtol=1e-4, atol=1e-6)
            assert torch.isinf(logits[..., 0, 1:]).all()  # causal
            top = max(top, logits.max().item())
        assert E_logits.attention_logit_max(model, x) == top
    with pytest.raises(ValueError, match="no attention module"):
        E_logits.attention_logit_max(torch.nn.Embedding(4, 4), torch.zeros(1, 2, dtype=torch.long))


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------
def test_clear_errors(runs, tmp_path, capsys):
    def fails(argv, *needles):
        assert eval_main(argv + ["--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        for n in needles:
            assert n in err, err

    missing, empty, junk = tmp_path / "missing", tmp_path / "empty", tmp_path / "junk"
    empty.mkdir()
    junk.mkdir()
    (junk / "best.pt").write_bytes(b"not a checkpoint")
    fails(["robustness", "--checkpoint", str(missing)], "--checkpoint", str(missing), "run folder not found")
    fails(["robustness", "--checkpoint", str(empty)], "--checkpoint", "holds no checkpoint")
    fails(["robustness", "--checkpoint", str(junk)], "--checkpoint", "is not a lipschitz-train checkpoint")
    fails(["robustness", "--checkpoint", runs.lip, "--eps", "-0.1"], "--eps")
    fails(["activations", "--checkpoint", runs.lip, "--baseline", str(missing)], "--baseline", "run folder not found")
    fails(["activations", "--checkpoint", str(empty)], "--checkpoint", "holds no checkpoint")
    fails(["frontier", str(missing)], str(missing), "run folder not found")
    fails(["frontier", str(empty)], "no summary.json")
    fails(["frontier", runs.base], "no certified", runs.base)  # a baseline where a certificate is needed
    with pytest.raises(ValueError, match="--baseline"):
        R.load_run_data(str(empty), arg="--baseline")
    assert not (tmp_path / "o" / "robustness.csv").exists()


def test_attention_logits_include_positional_bias():
    import lipschitz_ext.nn as lnn

    torch.manual_seed(2)
    cfg = lnn.GPTConfig(vocab_size=7, d_model=16, n_layers=1, n_heads=2, seq_len=9, pos_bias="learned",
                        zero_init_out=False)
    model = lnn.LipschitzGPT(cfg)
    m = model.blocks[0].attn
    with torch.no_grad():
        m.bias_table.copy_(3 * torch.randn_like(m.bias_table))
    xin = torch.randn(2, 9, 16)
    logits = E_logits.attention_logits(m, xin)
    with torch.no_grad():
        y = m.o((torch.softmax(logits, -1) @ m._heads(m.v(xin))).transpose(1, 2).reshape(2, 9, 16)) * m.out_factor
        assert torch.allclose(y, m(xin), rtol=1e-4, atol=1e-6)
