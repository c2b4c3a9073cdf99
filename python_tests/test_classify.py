"""Certified MLP classifiers: data readers, model, certificate, attack, training, command.

Data sets are tiny files generated here in the exact formats (IDX, CIFAR-10 binary and
python batches); references are float64 SVDs and direct formulas.
"""

from __future__ import annotations

import json
import math
import os
import pickle

import numpy as np
import pytest
import torch

import lipschitz_ext
from lipschitz_ext.certify import certified_accuracy, certified_radii, l2_bound, pgd_l2, soundness_check
from lipschitz_ext.training.classifier_config import ClassifyConfig, build_classifier, build_classifier_optimizer, classify_config, linear_decay
from lipschitz_ext.nn.losses import classification_loss
from lipschitz_ext.training.classifier import train_classifier
from lipschitz_ext.cli.classify import main as classify_main
from lipschitz_ext.data.images import ImageDataError, RestrictedUnpickler, load_cifar10, load_image_data, read_idx
from lipschitz_ext.nn.classifier import LipschitzMLPClassifier, MaxMin
from lipschitz_ext.optim import NonFiniteGradient
from image_samples import blobs, idx_bytes, make_idx_set


# ---------------------------------------------------------------------------
# generated files
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    return make_idx_set(tmp_path_factory.mktemp("fmnist"))


# ---------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
def test_idx_set_reads_raw_and_gz(tmp_path, gz):
    d = make_idx_set(tmp_path, 40, 12, gz=gz)
    data = load_image_data("fashion-mnist", d)
    x, y = blobs(40, 0)
    assert data.train_x.dtype == torch.uint8 and tuple(data.train_x.shape) == (40, 784)
    assert torch.equal(data.train_x, torch.from_numpy(x)) and torch.equal(data.train_y, torch.from_numpy(y).long())
    assert tuple(data.test_x.shape) == (12, 784) and data.num_classes == 10


def test_idx_corrupt_files(tmp_path):
    d = make_idx_set(tmp_path, 20, 8, gz=False)
    lab = os.path.join(d, "train-labels-idx1-ubyte")
    img = os.path.join(d, "train-images-idx3-ubyte")
    good_lab, good_img = open(lab, "rb").read(), open(img, "rb").read()
    # wrong magic: a labels file where images belong
    open(img, "wb").write(good_lab)
    with pytest.raises(ImageDataError, match="magic"):
        load_image_data("fashion-mnist", d)
    # truncated body
    open(img, "wb").write(good_img[:-5])
    with pytest.raises(ImageDataError, match="truncated"):
        load_image_data("fashion-mnist", d)
    # truncated header
    open(img, "wb").write(good_img[:10])
    with pytest.raises(ImageDataError, match="truncated header"):
        read_idx(img, 3)
    open(img, "wb").write(good_img)
    # label out of range
    y = np.frombuffer(good_lab[8:], dtype=np.uint8).copy()
    y[3] = 10
    open(lab, "wb").write(idx_bytes(y))
    with pytest.raises(ImageDataError, match="label 10 at index 3"):
        load_image_data("fashion-mnist", d)
    # counts that differ
    open(lab, "wb").write(idx_bytes(y[:-1] % 10))
    with pytest.raises(ImageDataError, match="holds 20 images but .* 19 labels"):
        load_image_data("fashion-mnist", d)


def test_missing_data_says_where_to_get_it(tmp_path):
    with pytest.raises(ImageDataError, match="folder not found"):
        load_image_data("mnist", str(tmp_path / "nope"))
    with pytest.raises(ImageDataError, match=r"train-images-idx3-ubyte\[\.gz\].*--data"):
        load_image_data("fashion-mnist", str(tmp_path))
    with pytest.raises(ImageDataError, match="choose from"):
        load_image_data("svhn", str(tmp_path))


def _cifar_records(n, seed):
    g = np.random.default_rng(seed)
    return g.integers(0, 256, (n, 3072)).astype(np.uint8), g.integers(0, 10, n).astype(np.uint8)


def test_cifar10_binary(tmp_path):
    d = tmp_path / "cifar-10-batches-bin"
    d.mkdir()
    expect = []
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        x, y = _cifar_records(3, i)
        expect.append((x, y))
        (d / f"{name}.bin").write_bytes(np.concatenate([y[:, None], x], axis=1).tobytes())
    data = load_cifar10(str(tmp_path))
    assert tuple(data.train_x.shape) == (15, 3072) and tuple(data.test_x.shape) == (3, 3072)
    assert torch.equal(data.test_x, torch.from_numpy(expect[5][0]))
    assert torch.equal(data.train_y[:3], torch.from_numpy(expect[0][1]).long())
    raw = (d / "test_batch.bin").read_bytes()
    (d / "test_batch.bin").write_bytes(raw[:-7])
    with pytest.raises(ImageDataError, match="whole number"):
        load_cifar10(str(tmp_path))
    bad = bytearray(raw)
    bad[0] = 11
    (d / "test_batch.bin").write_bytes(bytes(bad))
    with pytest.raises(ImageDataError, match="label 11"):
        load_cifar10(str(tmp_path))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar10_python_restricted_unpickler(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        x, y = _cifar_records(2, i)
        (d / name).write_bytes(pickle.dumps({b"data": x, b"labels": [int(v) for v in y], b"batch_label": b"x"}))
    data = load_cifar10(str(tmp_path))
    assert tuple(data.train_x.shape) == (10, 3072)
    (d / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}))
    with pytest.raises(ImageDataError, match="refused to load"):
        load_cifar10(str(tmp_path))
    with pytest.raises(pickle.UnpicklingError):
        import io
        RestrictedUnpickler(io.BytesIO(pickle.dumps(_Evil()))).load()
    (d / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}))
    with pytest.raises(ImageDataError, match="2 images but 1 labels"):
        load_cifar10(str(tmp_path))


# ---------------------------------------------------------------------------
# model, bound, radii, attack
# ---------------------------------------------------------------------------
def test_maxmin_is_a_pairwise_sort():
    x = torch.randn(5, 8, dtype=torch.float64)
    out = MaxMin()(x)
    a, b = x[:, 0::2], x[:, 1::2]
    assert torch.equal(out[:, :4], torch.maximum(a, b)) and torch.equal(out[:, 4:], torch.minimum(a, b))
    assert torch.allclose(out.norm(dim=1), x.norm(dim=1))


def _model(act="relu", seed=0, scale=1.5, bias=True):
    torch.manual_seed(seed)
    m = LipschitzMLPClassifier(784, [32, 32], 10, bias=bias, activation=act)
    with torch.no_grad():
        for lin in m.layers:
            lin.weight.mul_(scale)
            if lin.bias is not None:
                lin.bias.normal_(0, 0.1)
        m.set_mean(torch.rand(784))
    return m.eval()


@pytest.mark.parametrize("act", ["relu", "maxmin"])
def test_bound_and_radii_against_svd(act):
    m = _model(act)
    ref = math.prod(float(torch.linalg.svdvals(W.detach().double())[0]) for W in m.weights())
    L = l2_bound(m)
    assert ref <= L <= ref * (1 + 1e-6)
    x, y = blobs(64, 3)
    x, y = torch.from_numpy(x), torch.from_numpy(y).long()
    radius, correct, L2 = certified_radii(m, x, y)
    z = m.double()(x.double() / 255)
    top = z.gather(1, y[:, None]).squeeze(1)
    other = z.scatter(1, y[:, None], -math.inf).amax(1)
    expect = ((top - other) / (math.sqrt(2) * ref)).clamp_min(0) * (top > other)
    assert torch.equal(correct, top > other)
    # the sound radius is the formula's minus a rounding margin far below any radius of interest
    assert (radius <= expect + 1e-15).all() and torch.allclose(radius, expect, atol=1e-9)
    acc = certified_accuracy(radius, correct, [0.0001, 1e9])
    assert acc["1e+09"] == 0.0 and acc["0.0001"] == pytest.approx(float(((expect > 1e-4) & correct).double().mean()))


def _trained_tiny(steps=60):
    x, y = blobs(512, 5)
    x, y = torch.from_numpy(x), torch.from_numpy(y).long()
    cfg = classify_config("certified", widths=[32, 32], steps=steps, lr=0.05, margin_eps=0.5, batch_size=64)
    m = build_classifier(cfg, 784, 10, x.float().mean(0) / 255)
    opt = build_classifier_optimizer(m, cfg)
    for s in range(steps):
        idx = torch.randint(0, 512, (64,), generator=torch.Generator().manual_seed(s))
        loss = classification_loss(m(x[idx].float() / 255), y[idx], loss="margin_ce", logit_scale=16,
                                   margin_eps=0.5, lipschitz=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval(), x, y


def test_bound_refuses_what_the_weights_do_not_show():
    m = _model()
    h = m.layers[-1].register_forward_hook(lambda mod, inp, out: out * 100)
    with pytest.raises(ValueError, match="forward hook"):
        l2_bound(m)
    h.remove()
    l2_bound(m)
    m.layers[-1] = torch.nn.Sequential(m.layers[-1], torch.nn.Linear(10, 10))  # an unknown wrapper
    with pytest.raises(ValueError, match="does not know"):
        l2_bound(m)


def test_attack_never_flips_a_certified_prediction():
    m, x, y = _trained_tiny()
    assert l2_bound(m) <= 1.0 + 1e-3  # hard cap 1 per layer
    xs, ys = x[:96], y[:96]
    res = soundness_check(m, xs, ys, steps=30, restarts=3)
    assert res["certified"] > 40 and res["flipped"] == 0
    # the attack is strong enough to matter: well beyond the radii it flips most predictions
    radius, correct, _ = certified_radii(m, xs, ys)
    fooled = pgd_l2(m, xs, ys, radius * 4 + 2.0, steps=30, restarts=2)
    assert fooled[correct].double().mean() > 0.5


def test_margin_loss_is_ce_with_shifted_logits():
    z = torch.randn(6, 10, dtype=torch.float64)
    y = torch.tensor([0, 3, 9, 1, 1, 5])
    shift = math.sqrt(2) * 2.0 * 0.5
    ref = torch.nn.functional.cross_entropy(4 * (z + shift * (1 - torch.eye(10, dtype=torch.float64)[y])), y)
    got = classification_loss(z, y, loss="margin_ce", logit_scale=4, margin_eps=0.5, lipschitz=2.0)
    assert torch.allclose(got, ref)
    assert torch.allclose(classification_loss(z, y, loss="ce", logit_scale=4),
                          torch.nn.functional.cross_entropy(4 * z, y))


def test_linear_decay():
    assert linear_decay(0, 0.0, time_budget=10) == 1.0
    assert linear_decay(99, 5.0, steps=10, time_budget=10) == pytest.approx(0.5)
    assert linear_decay(5, 123.0, steps=10) == pytest.approx(0.5)
    assert linear_decay(20, 0.0, steps=10) == 0.0


@pytest.mark.parametrize("opt", ["muon", "adamw"])
@pytest.mark.parametrize("constraint", ["hard_cap", "soft_cap", "normalize", "orthogonal", "svd_cap", "hammer",
                                        "weight_decay", "spectral_weight_decay", "none"])
def test_every_constraint_trains(opt, constraint):
    cfg = ClassifyConfig(optimizer=opt, constraint=constraint, widths=[16], steps=3, cap=2.0, weight_decay=0.1,
                         lr=0.02 if opt == "muon" else 1e-3).validate()
    m = build_classifier(cfg, 784, 10)
    o = build_classifier_optimizer(m, cfg)
    x = torch.rand(32, 784)
    y = torch.randint(0, 10, (32,))
    for _ in range(3):
        o.zero_grad()
        classification_loss(m(x), y, loss="ce").backward()
        o.step()
    sig = [float(torch.linalg.svdvals(W.detach().double())[0]) for W in m.weights()]
    assert all(math.isfinite(s) for s in sig)
    if constraint in ("hard_cap", "normalize", "orthogonal", "svd_cap", "soft_cap"):
        assert max(sig) <= 2.0 * 1.02


@pytest.mark.parametrize("opt", ["muon", "adamw"])
def test_nonfinite_gradient_changes_nothing(opt):
    cfg = ClassifyConfig(optimizer=opt, constraint="hard_cap", widths=[16], steps=3, cap=1.0,
                         lr=0.02 if opt == "muon" else 1e-3).validate()
    m = build_classifier(cfg, 784, 10)
    o = build_classifier_optimizer(m, cfg)
    x, y = torch.rand(32, 784), torch.randint(0, 10, (32,))
    classification_loss(m(x), y, loss="ce").backward()
    m.weights()[0].grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(NonFiniteGradient):
        o.step()
    assert all(torch.equal(a, p) for a, p in zip(before, m.parameters()))


# ---------------------------------------------------------------------------
# the run folder and the command
# ---------------------------------------------------------------------------
@pytest.mark.slow
def test_train_run_folder_load_run_and_resume(idx_dir, tmp_path):
    out = str(tmp_path / "run")
    cfg = classify_config("certified", data=idx_dir, out=out, widths=[32], steps=12, batch_size=64,
                          attack_examples=16, attack_steps=5, attack_restarts=2, eval_every=0.0, threads=1)
    s = train_classifier(cfg, quiet=True)
    for f in ("config.json", "metrics.jsonl", "summary.json", "latest.pt", "model.pt", "curves.png"):
        assert os.path.exists(os.path.join(out, f)), f
    assert s["steps"] == 12 and s["soundness"]["flipped"] == 0
    for key in ("clean_accuracy", "certified_bound", "certified_accuracy", "pgd_accuracy"):
        assert key in s
    assert set(s["certified_accuracy"]) == {"0.1", "0.25", "0.5", "1", "1.58"}
    run = lipschitz_ext.load_run(out)
    assert isinstance(run.model, LipschitzMLPClassifier)
    assert l2_bound(run.model) == pytest.approx(s["certified_bound"])
    # resume with a longer step limit continues from the checkpoint
    s2 = train_classifier(resume=out, quiet=True, overrides={"steps": 20})
    assert s2["steps"] == 20
    with pytest.raises(ValueError, match="cannot change"):
        train_classifier(resume=out, quiet=True, overrides={"lr": 1.0})
    # the run folder is never overwritten
    with pytest.raises(ValueError, match="existing run folder"):
        train_classifier(cfg, quiet=True)


def test_classifier_checkpoints_are_read_safely(tmp_path):
    """A classifier run's checkpoint is read as run checkpoints are: weights only (a pickled
    object that would run code is refused, not run), regular files only."""
    from lipschitz_ext.training.classifier import _read_ckpt
    from lipschitz_ext.storage.files import CheckpointError

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"model": Payload(), "hyperparameters": {}}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="refused"):
        _read_ckpt(str(tmp_path / "model.pt"))
    assert not marker.exists()
    os.mkfifo(tmp_path / "fifo.pt")
    with pytest.raises(CheckpointError, match="not a regular file"):
        _read_ckpt(str(tmp_path / "fifo.pt"))


def test_cli_train_certify_attack(idx_dir, tmp_path, capsys):
    out = str(tmp_path / "cli")
    rc = classify_main(["train", "--data", idx_dir, "--out", out, "--steps", "6", "--widths", "16",
                        "--batch-size", "32", "--attack-examples", "8", "--attack-steps", "3", "--quiet"])
    assert rc == 0
    assert json.load(open(os.path.join(out, "config.json")))["task"] == "classify"
    capsys.readouterr()
    assert classify_main(["certify", out]) == 0
    res = json.loads(capsys.readouterr().out)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert res["certified_accuracy"] == summary["certified_accuracy"]
    assert classify_main(["attack", out, "--examples", "8", "--steps", "3", "--restarts", "1"]) == 0


def test_cli_errors(tmp_path, capsys):
    assert classify_main(["train", "--data", str(tmp_path / "none"), "--time-budget", "5",
                          "--out", str(tmp_path / "o")]) == 2
    assert "folder not found" in capsys.readouterr().err
    assert classify_main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "o2")]) == 2
    assert "time budget" in capsys.readouterr().err
    assert classify_main(["train", "--constraint", "bogus", "--time-budget", "1"]) == 2
    assert "--constraint" in capsys.readouterr().err
    assert classify_main(["certify", str(tmp_path)]) == 2
    assert "not a lipschitz-classify run" in capsys.readouterr().err
    assert classify_main(["train", "--resume", str(tmp_path)]) == 2
    assert "not a lipschitz-classify run" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_writes_frontier(idx_dir, tmp_path):
    out = str(tmp_path / "sweep")
    rc = classify_main(["sweep", "--data", idx_dir, "--out", out, "--steps", "4", "--widths", "16",
                        "--batch-size", "32", "--optimizers", "muon,adamw", "--constraints", "hard_cap,weight_decay",
                        "--caps", "1", "--muon-lrs", "0.05", "--adamw-lrs", "0.001", "--weight-decays", "0.1",
                        "--quiet"])
    assert rc == 0
    rows = json.load(open(os.path.join(out, "frontier.json")))
    assert len(rows) == 4 and os.path.exists(os.path.join(out, "frontier.png"))
    assert {(r["optimizer"], r["constraint"]) for r in rows} == {("muon", "hard_cap"), ("muon", "weight_decay"),
                                                                ("adamw", "hard_cap"), ("adamw", "weight_decay")}


def test_paper_cifar10_preset_on_generated_files(tmp_path):
    d = tmp_path / "cifar-10-batches-bin"
    d.mkdir()
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        x, y = _cifar_records(8, i)
        (d / f"{name}.bin").write_bytes(np.concatenate([y[:, None], x], axis=1).tobytes())
    cfg = classify_config("paper-cifar10", data=str(tmp_path), out=str(tmp_path / "run"), steps=2, batch_size=8,
                          attack_examples=0)
    assert (cfg.dataset, cfg.widths, cfg.bias, cfg.activation, cfg.init, cfg.center) == \
        ("cifar10", [256, 256], False, "relu", "paper", False)
    s = train_classifier(cfg, quiet=True)
    run = lipschitz_ext.load_run(str(tmp_path / "run"))
    assert run.model.in_features == 3072 and s["steps"] == 2
    # the paper's init: first layer zero, the others orthogonal scaled by sqrt(fan_out / fan_in)
    m = build_classifier(cfg, 3072, 10)
    assert float(m.layers[0].weight.detach().abs().max()) == 0.0
    sv = torch.linalg.svdvals(m.layers[2].weight.double())
    assert torch.allclose(sv, torch.full_like(sv, math.sqrt(10 / 256)), rtol=1e-5)


def _peer_module():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "bench", "peer_torchlip.py")
    spec = importlib.util.spec_from_file_location("peer_torchlip", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_peer_skips_without_torchlip(monkeypatch, tmp_path, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "deel", None)  # import deel.torchlip now fails
    assert _peer_module().main(["--out", str(tmp_path / "p"), "--time-budget", "1"]) == 0
    assert "not installed; skipped" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "p")


def test_peer_conversion_keeps_the_logits():
    torchlip = pytest.importorskip("deel.torchlip")
    torch.manual_seed(0)
    net = torchlip.Sequential(torchlip.SpectralLinear(784, 16), torchlip.GroupSort2(),
                              torchlip.SpectralLinear(16, 8), torchlip.GroupSort2(), torchlip.SpectralLinear(8, 10))
    vanilla = net.vanilla_export().eval()
    mean = torch.rand(784)
    model = _peer_module()._convert(vanilla, mean)
    x = torch.rand(20, 784)
    assert torch.allclose(vanilla(x - mean), model(x), atol=1e-5)


def test_distribution_folder_is_the_default(idx_dir, monkeypatch):
    from lipschitz_ext.data import images as image_data

    monkeypatch.setitem(image_data.DEFAULT_DIRS, "fashion-mnist", idx_dir)
    assert image_data.default_data_dir("fashion-mnist") == idx_dir
    assert load_image_data("fashion-mnist").train_x.shape[0] == 512
    monkeypatch.setitem(image_data.DEFAULT_DIRS, "fashion-mnist", idx_dir + "-absent")
    with pytest.raises(ImageDataError, match="no --data folder given"):
        load_image_data("fashion-mnist")
