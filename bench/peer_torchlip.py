"""deel-torchlip's multiclass recipe on the same data and wall time as ``lipschitz-classify``.

    python bench/peer_torchlip.py --data DIR --time-budget 600 --out runs/peer-torchlip

Installs nothing: without ``deel-torchlip`` (``pip install --no-deps deel-torchlip``; it
needs only torch and numpy) it prints a message and exits 0.

The peer's recipe, with its own layers and loss: ``SpectralLinear`` layers (spectral
normalisation + Bjorck orthonormalisation, so each is 1-Lipschitz), ``GroupSort2``
activations, the same widths as ours (784-256-256-10, biases on: the library's default)
and the same input centring, trained with Adam on ``HKRMulticlassLoss(alpha, min_margin)``;
the lr decays linearly to zero at the time budget and batches come in the same order as
``lipschitz-classify``'s. Its certificate is the library's premise, a 1-Lipschitz network:
radius ``margin / sqrt(2)`` (``certified_accuracy_nominal``). We also certify the exported
weights with our sound routine (``certified_accuracy``: the same float64 bound, radii and
PGD-l2 attack as ``lipschitz-classify``), after converting the network to a
:class:`~lipschitz_ext.nn.classifier.LipschitzMLPClassifier` with MaxMin (a column
permutation of each next layer: GroupSort2 writes (min, max) pairs, MaxMin all maxima then
all minima); the conversion is checked to give the same logits.

Writes ``OUT/result.json`` and ``OUT/model.pt`` (the converted weights).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

import torch


def _convert(vanilla: torch.nn.Sequential, mean: torch.Tensor):
    """The exported torchlip network as a LipschitzMLPClassifier (maxmin, biases)."""
    from lipschitz_ext.nn.classifier import LipschitzMLPClassifier

    lins = [m for m in vanilla if isinstance(m, torch.nn.Linear)]
    widths = [lin.out_features for lin in lins[:-1]]
    model = LipschitzMLPClassifier(lins[0].in_features, widths, lins[-1].out_features, bias=True,
                                   activation="maxmin", constrained=True, mean=mean)
    with torch.no_grad():
        for k, (ours, theirs) in enumerate(zip(model.layers, lins)):
            W = theirs.weight.detach().clone()
            if k > 0:  # columns: GroupSort2 gives (min, max) per pair, MaxMin maxima then minima
                d = W.shape[1]
                W = torch.cat([W[:, 1::2], W[:, 0::2]], dim=1)
                assert W.shape[1] == d
            ours.weight.copy_(W)
            ours.bias.copy_(theirs.bias.detach())
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--data", default=None)
    ap.add_argument("--time-budget", type=float, default=600.0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--widths", default="256,256")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--alpha", type=float, default=0.98, help="HKR: weight of the hinge against the KR term")
    ap.add_argument("--min-margin", type=float, default=1.41,
                    help="HKR hinge margin between the true and any other logit (sqrt(2) * radius 1.0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--attack-examples", type=int, default=1000)
    args = ap.parse_args(argv)
    try:
        from deel import torchlip
    except ImportError:
        print("peer_torchlip: deel-torchlip is not installed; skipped (pip install --no-deps deel-torchlip)")
        return 0
    import lipschitz_ext  # noqa: F401
    from lipschitz_ext.certify.classifier import DEFAULT_RADII, certified_accuracy, evaluate_classifier, pixels
    from lipschitz_ext.training.classifier import batch_indices
    from lipschitz_ext.training.classifier_config import linear_decay
    from lipschitz_ext.data.images import load_image_data
    from lipschitz_ext.storage.folder import prepare_out_dir
    from lipschitz_ext.storage.files import write_json

    out = prepare_out_dir(args.out)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = load_image_data(args.dataset, args.data)
    x, y = pixels(data.train_x), data.train_y
    mean = x.mean(0)
    x = x - mean
    widths = [int(w) for w in args.widths.split(",")]
    dims = [data.in_features, *widths, data.num_classes]
    layers = []
    for k, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(torchlip.SpectralLinear(a, b))
        if k + 2 < len(dims):
            layers.append(torchlip.GroupSort2())
    net = torchlip.Sequential(*layers)
    loss_fn = torchlip.HKRMulticlassLoss(alpha=args.alpha, min_margin=args.min_margin)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    step, elapsed = 0, 0.0
    net.train()
    while elapsed < args.time_budget:
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = args.lr * linear_decay(step, elapsed, time_budget=args.time_budget)
        idx = batch_indices(step, x.shape[0], args.batch_size, args.seed)
        target = torch.nn.functional.one_hot(y[idx], data.num_classes).float()
        loss = loss_fn(net(x[idx]), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        elapsed += time.perf_counter() - t0
        if step % 500 == 0:
            print(f"step {step} {elapsed:.0f}s loss {float(loss.detach()):.4f}", file=sys.stderr)
    net.eval()
    vanilla = net.vanilla_export().eval()
    model = _convert(vanilla, mean)
    xt = pixels(data.test_x)
    with torch.no_grad():
        z_theirs = vanilla(xt - mean)
        z_ours = model(xt)
    gap = float((z_theirs - z_ours).abs().max())
    if gap > 1e-4:
        raise SystemExit(f"peer_torchlip: the converted network differs from torchlip's by {gap}")
    margin = z_theirs.gather(1, data.test_y[:, None]).squeeze(1) - \
        z_theirs.scatter(1, data.test_y[:, None], -math.inf).amax(1)
    nominal = certified_accuracy(margin.double().clamp_min(0) / math.sqrt(2), margin > 0, DEFAULT_RADII)
    res = {"recipe": "deel-torchlip SpectralLinear + GroupSort2 + HKRMulticlassLoss, Adam",
           "steps": step, "wall_seconds": round(elapsed, 2), "split": "test",
           **evaluate_classifier(model, data.test_x, data.test_y, radii=DEFAULT_RADII,
                                 attack_examples=args.attack_examples, seed=args.seed),
           "certified_accuracy_nominal": nominal, "conversion_max_logit_gap": gap,
           "args": vars(args), "environment": {"torch": torch.__version__, "deel_torchlip": torchlip.__version__,
                                               "threads": torch.get_num_threads(),
                                               "cpu": platform.processor() or platform.machine()}}
    torch.save({"model": model.state_dict(), "hyperparameters": model.hyperparameters()},
               os.path.join(out, "model.pt"))
    write_json(os.path.join(out, "result.json"), res)
    cert = ", ".join(f"{r}: {100 * a:.1f}%" for r, a in res["certified_accuracy"].items())
    print(f"{out}: {step} steps in {elapsed:.0f} s | test accuracy {100 * res['clean_accuracy']:.2f}% | "
          f"sound bound {res['certified_bound']:.4g} | certified: {cert}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
