"""The training loop of ``lipschitz-train``: train a Lipschitz transformer, certify it as it goes.

    lipschitz-train                                  # preset shakespeare-cpu, built-in corpus
    lipschitz-train --preset shakespeare --data tinyshakespeare.txt --device cuda
    lipschitz-train --resume runs/shakespeare-cpu    # continue exactly where it stopped
    torchrun --nproc-per-node 2 -m lipschitz_ext.training.loop --preset gpt2-small --data 'fineweb/*.bin'

Read top to bottom: :func:`train` sets a run up (:func:`setup`: config, device, data,
model, optimizer, checkpoint to resume from), runs the loop (:func:`loop`: one optimizer
step per batch, logging, evaluation and checkpoints), and finishes it (:func:`finish`:
final evaluation, sample, summary, plot). The run folder is :mod:`lipschitz_ext.training.run`'s.

With ``--compile model`` (or ``auto`` where it pays: :func:`lipschitz_ext.training.runtime.resolve_compile`)
the training loss, the model's forward and cross-entropy under autocast, goes through
``torch.compile`` once (static shapes: every step has the same ``[batch, seq_len]``) and its
backward through AOTAutograd; the optimizer step stays eager. ``Run.model``, what is saved,
evaluated, certified and sampled, is always the uncompiled module, so checkpoints carry no
``_orig_mod.`` prefix and evaluation gives the eager float32 numbers.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..certify.fp8 import configure_fp8_attention
from ..data import text as data_mod
from ..evaluation.metrics import evaluate, final_protocol_scores, fp8_backend, loss_logit_scale, paper_bound_or_none
from ..evaluation.plots import plot_curves
from ..evaluation.protocols import EVAL_PROTOCOLS, protocol_batches
from ..optim import Muon, NonFiniteGradient
from ..storage.files import CheckpointError, append_metric, read_metrics, atomic_torch_save, atomic_write_text, truncate_metrics, write_json
from ..storage.folder import RunFolderError, held_run_locks, release_run_locks, prepare_out_dir, release_run_folder
from .config import TrainConfig, apply_target_bound, build_model, validate
from .optimizers import all_param_groups, build_optimizer, lr_multiplier, set_lrs
from .run import CHECKPOINT_KEYS, check_weights_fit, checkpoint_dict, resolve_data_path, default_out_dir, format_summary, read_checkpoint
from .runtime import (Dist, StopRequest, compile_counters, init_distributed, resolve_autocast, resolve_compile,
                      resolve_device, training_autocast)
from .sampling import generate


__all__ = ["train", "setup", "loop", "finish", "Run", "RESUME_OVERRIDES", "EXIT_CODES", "training_loss_fn",
           "ns_dtype_of", "RunInterrupted", "RunWriteError"]

#: What may change when a run is resumed (everything else comes from its checkpoint). A
#: changed --compile (like --device) keeps the run going but not bit for bit; a changed
#: --eval-protocol restarts best.pt's comparison (losses of other windows do not compare).
RESUME_OVERRIDES = ("steps", "time_budget", "stop_after", "device", "threads", "eval_every", "log_every", "compile",
                    "eval_protocol")


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (a second one in the loop, or one after it): the run stopped cleanly at a
    checkpoint; ``str()`` says where and how to resume, ``summary`` is what summary.json got."""

    def __init__(self, message: str, summary: dict | None = None):
        super().__init__(message)
        self.message, self.summary = message, summary

    def __str__(self) -> str:
        return self.message


class RunWriteError(RunFolderError):
    """Writing the run folder failed mid-run (full disk, read-only folder): one line saying
    what, and that the last complete checkpoint is intact."""

#: Process exit status of ``lipschitz-train`` per final run status.
EXIT_CODES = {"completed": 0, "time_budget": 0, "paused": 0, "interrupted": 130, "diverged": 1}


@dataclass
class Run:
    """Everything a training run holds while it runs (built by :func:`setup`)."""

    cfg: TrainConfig
    device: torch.device
    dist: Dist
    data: data_mod.TokenData
    model: torch.nn.Module  # the model itself (what is saved, evaluated and certified)
    train_model: torch.nn.Module  # what the forward runs through: the model or its DDP wrapper
    opt: object
    sampler: data_mod.BatchSampler
    out: str
    amp: str  # the resolved --autocast mode
    compile: str = "none"  # the resolved --compile mode
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # (x, y) -> training loss
    step: int = 0
    best_val: float = math.inf
    elapsed0: float = 0.0  # seconds trained before this invocation (resume)
    tokens: int = 0
    t_start: float = field(default_factory=time.time)
    last_eval: dict = field(default_factory=dict)
    last_eval_step: int = -1
    # torch.compile's work in this invocation: frames/graphs/graph_breaks, first_step_seconds
    compile_stats: dict = field(default_factory=dict)
    phase: str = "training loop"  # what the run is doing now, for an interruption's message

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.out, "metrics.jsonl")

    def elapsed(self) -> float:
        """Seconds of training so far, over every invocation of this run."""
        return self.elapsed0 + time.time() - self.t_start

    def checkpoint(self, name: str) -> None:
        """Save ``name`` (``latest.pt`` / ``best.pt``) atomically (rank 0 only)."""
        if self.dist.main:
            atomic_torch_save(checkpoint_dict(
                self.cfg, self.model, self.opt, self.sampler, step=self.step, best_val=self.best_val,
                elapsed=self.elapsed(), tokens=self.tokens, tokenizer=self.data.tokenizer),
                os.path.join(self.out, name))

    def log(self, row: dict) -> None:
        """Append a row to metrics.jsonl (rank 0 only)."""
        if self.dist.main:
            append_metric(self.metrics_path, row)

    def evaluate(self) -> None:
        """Evaluate now, log it, and keep ``best.pt`` at the lowest validation loss."""
        self.last_eval, self.last_eval_step = evaluate(self.model, self.data.val, self.cfg, self.device), self.step
        self.log({"step": self.step, **self.last_eval, "elapsed": self.elapsed()})


def train(cfg: TrainConfig | None = None, resume: str | None = None, quiet: bool = False,
          overrides: dict | None = None) -> dict:
    """Run one training run (``cfg``) or resume the run in folder ``resume`` with its
    saved config, changing only ``overrides`` (keys in RESUME_OVERRIDES); returns the
    summary dict (also written to ``summary.json``)."""
    run = setup(cfg, resume, overrides)
    try:
        status, message = loop(run, quiet)
        return finish(run, status, message, quiet)
    except KeyboardInterrupt:
        raise _interrupted(run) from None
    except OSError as exc:
        raise _write_error(run, exc) from None
    finally:
        if run.dist.main:
            release_run_folder(run.out)


def _resume_hint(run: Run) -> str:
    return f"resume with lipschitz-train --resume {run.out}"


def _interrupted(run: Run) -> RunInterrupted:
    """Ctrl-C during ``run.phase``: summary.json says so (status ``interrupted``, best effort)."""
    latest = os.path.join(run.out, "latest.pt")
    message = (f"interrupted during the {run.phase} at step {run.step}; the last checkpoint is {latest}; "
               f"{_resume_hint(run)} (it finishes what was left)")
    summary = None
    if run.dist.main:
        try:
            summary = _summary(run, "interrupted")
            summary["interrupted_during"] = run.phase
            write_json(os.path.join(run.out, "summary.json"), summary)
        except (OSError, KeyboardInterrupt, ValueError):  # the message still says how to resume
            pass
    # no dist.close() here: its barrier would wait forever for a rank that was not interrupted
    return RunInterrupted(message, summary)


def _write_error(run: Run, exc: OSError) -> RunWriteError:
    """An OSError mid-run as one line: what failed, and that the last checkpoint is intact."""
    what = str(exc.filename or run.out)
    latest = os.path.join(run.out, "latest.pt")
    if os.path.abspath(what).startswith(os.path.abspath(run.out)):
        return RunWriteError(f"cannot write the run folder {run.out} ({what}: {exc.strerror or exc}) during the "
                             f"{run.phase} at step {run.step}; the last complete checkpoint {latest} is intact: "
                             f"make room or make the folder writable, then {_resume_hint(run)}")
    return RunWriteError(f"{what}: {exc.strerror or exc} during the {run.phase} at step {run.step}; the last "
                         f"complete checkpoint {latest} is intact; {_resume_hint(run)}")


def _resumed_config(resume: str, overrides: dict | None) -> tuple[TrainConfig, dict]:
    """The config and checkpoint of the run folder ``resume``, with ``overrides`` applied."""
    bad = set(overrides or {}) - set(RESUME_OVERRIDES)
    if bad:
        raise ValueError(f"--resume keeps the run's config; only {', '.join(RESUME_OVERRIDES)} may change, "
                         f"not {', '.join(sorted(bad))}")
    # latest.pt, or best.pt when latest.pt is unusable (read_checkpoint says so on stderr)
    ckpt, saved, used = read_checkpoint(resume, ("latest", "best"), arg="--resume", required=CHECKPOINT_KEYS)
    latest = os.path.join(resume, "latest.pt")
    if used != latest and os.path.lexists(latest):  # kept for inspection, out of the new latest.pt's way
        aside = f"{latest}.unusable-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
            os.replace(latest, aside)
            print(f"note: --resume {resume}: moved the unusable latest.pt to {aside}", file=sys.stderr)
        except FileNotFoundError:  # another rank of this torchrun moved it first
            pass
    # a run saved before --compile existed ran eager: resume it eager (bit-exact), unless told otherwise
    cfg = TrainConfig(**{"compile": "none", **ckpt["config"], "stop_after": 0, **(overrides or {})})
    cfg.out = resume
    cfg.data = resolve_data_path(cfg.data, resume)  # older run folders stored it as typed
    if ("eval_protocol" in (overrides or {}) and cfg.eval_protocol in EVAL_PROTOCOLS
            and cfg.eval_protocol != ckpt["config"].get("eval_protocol", "spread")):
        ckpt = {**ckpt, "best_val": math.inf}  # best.pt's losses were of other windows
        print(f"note: --resume {resume}: --eval-protocol {cfg.eval_protocol} from here on; best.pt is the best "
              "under it from now", file=sys.stderr)
    return cfg, ckpt


def setup(cfg: TrainConfig | None = None, resume: str | None = None, overrides: dict | None = None) -> Run:
    """Build a run: validated config (``--target-bound`` applied to a new run), device and
    ranks, data, model, optimizer, sampler, run folder, and the state of ``resume``'s
    checkpoint when resuming."""
    before = held_run_locks()
    try:
        locked = None
        if resume:
            if os.environ.get("RANK", "0") == "0" and os.path.isdir(resume):
                locked = prepare_out_dir(resume, resume=True)  # one process per folder, before reading it
            cfg, ckpt = _resumed_config(resume, overrides)
        elif cfg is None:
            raise ValueError("train() needs a config or a run folder to resume")
        else:
            ckpt = None
        return _setup(cfg, ckpt, resume, locked)
    except BaseException:
        release_run_locks(held_run_locks() - before)  # a run that never started holds no folder
        raise


def _setup(cfg: TrainConfig, ckpt: dict | None, resume: str | None, locked: str | None) -> Run:
    validate(cfg)
    if ckpt is None:  # a resumed run's config already holds the scaled head
        cfg = apply_target_bound(cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    dist = init_distributed(device)
    torch.manual_seed(cfg.seed)
    # paths stored absolute, so that --resume and lipschitz-eval work from any directory
    cfg.out = cfg.out or default_out_dir(cfg)
    if locked:
        cfg.out = locked
    elif dist.main:  # refuse a folder it may not write (or another process trains in) before any data or model
        cfg.out = prepare_out_dir(cfg.out, resume=ckpt is not None)
    else:
        cfg.out = os.path.abspath(cfg.out)
    if ckpt is None and not data_mod.is_builtin(cfg.data):
        cfg.data = os.path.abspath(cfg.data)

    data = data_mod.load_data(cfg.data, cfg.tokenizer, cfg.seq_len, cfg.vocab_size)
    _check_eval_protocol(cfg, data, resume)
    if ckpt is not None and ckpt["tokenizer"] != data.tokenizer.to_dict():
        saved = ckpt["tokenizer"]
        raise ValueError(
            f"--resume {resume}: the data's vocabulary ({data.vocab_size} tokens, {data.source}) does not "
            f"match the checkpoint's ({saved.get('kind')}, "
            f"{len(saved.get('chars', '')) or saved.get('vocab_size', 256)} tokens)")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for the fp32 matmuls
        torch.backends.cudnn.allow_tf32 = True
    if ckpt is not None:  # a config that does not describe the saved weights is refused before it is built
        check_weights_fit(cfg, data.vocab_size, ckpt["model"], f"--resume {resume}")
    model = build_model(cfg, data.vocab_size).to(device)
    opt = build_optimizer(model, cfg)
    sampler = data_mod.BatchSampler(data.train, cfg.batch_size, cfg.seq_len, cfg.seed, dist.rank, dist.world_size)
    # Under torchrun gradients are averaged by DDP; the optimizer splits its
    # orthogonalize/constraint work across ranks (lipschitz_ext.optim).
    train_model = model
    if dist.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    run = Run(cfg, device, dist, data, model, train_model, opt, sampler, cfg.out, resolve_autocast(cfg, device),
              resolve_compile(cfg, device))
    run.loss_fn = training_loss_fn(train_model, cfg, run.amp, device, compiled=run.compile == "model")
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sampler.load_state_dict(ckpt["sampler"])
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"--resume {resume}: its checkpoint does not fit the model its config "
                                  f"describes ({str(exc).splitlines()[0]})") from None
        run.step, run.best_val, run.elapsed0, run.tokens = ckpt["step"], ckpt["best_val"], ckpt["elapsed"], ckpt["tokens"]
        _restore_last_eval(run)
    if fp8_backend(model) is not None:  # static q/k/v scales from the certificate (weights capped)

        configure_fp8_attention(model)
    if dist.main:
        os.makedirs(run.out, exist_ok=True)
        write_json(os.path.join(run.out, "config.json"), dataclasses.asdict(cfg))
        truncate_metrics(run.metrics_path, run.step)  # drop rows logged after the checkpoint
    if ckpt is None:
        run.checkpoint("latest.pt")  # a run always has a checkpoint to fall back to
    return run


def _check_eval_protocol(cfg: TrainConfig, data: data_mod.TokenData, resume: str | None) -> None:
    """Refuse at startup an ``--eval-protocol`` the validation split cannot hold (rather than
    at the first evaluation, steps later)."""
    try:
        next(iter(protocol_batches(data.val, cfg.eval_protocol, cfg.seq_len, min(cfg.batch_size, 64),
                                   cfg.eval_batches)))
    except data_mod.DataError as exc:
        how = (f"resume with --resume {resume} --eval-protocol spread (or full)" if resume else
               "use --eval-protocol spread (or full)")
        raise data_mod.DataError(f"--eval-protocol {cfg.eval_protocol}: {exc}; {how}") from None


def training_loss_fn(train_model: torch.nn.Module, cfg: TrainConfig, amp: str, device: torch.device,
                     compiled: bool = False) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss(x [B, T] long, y [B, T] long) -> scalar``: the mean next-token cross-entropy of
    ``loss_logit_scale(cfg) * train_model(x)`` (forward under the resolved autocast ``amp``,
    loss in float32), as one function so that ``compiled=True`` puts the forward and the
    loss (and, through AOTAutograd, their backward) in one ``torch.compile`` graph.

    Compiled with ``dynamic=False``: the training batches all have one shape, so the graph is
    built once at the first call; a different shape would compile a second static graph (the
    run's summary counts the frames compiled, 1 expected). ``train_model`` itself is left
    as it is (no ``_orig_mod`` wrapper on what is saved)."""
    scale = loss_logit_scale(cfg)

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with training_autocast(amp, device):
            logits = train_model(x)
        return F.cross_entropy(scale * logits.flatten(0, 1).float(), y.flatten())

    return torch.compile(loss, dynamic=False) if compiled else loss


def ns_dtype_of(opt) -> str | None:
    """The Newton-Schulz compute dtype of the Muon optimizers of ``opt`` (a build_optimizer
    result), as a name (``"float32"``, ``"bfloat16"``); None when no optimizer orthogonalizes
    (the baseline's AdamW). Read from the optimizer's ``ns_dtype_resolved`` (or ``ns_dtype``)
    attribute where it has one, else ``"float32"`` (the Muon of lipschitz_ext.optim before it
    had the option); several dtypes are joined with ``+``."""
    found = []
    for o in getattr(opt, "optimizers", [opt]):
        if not isinstance(o, Muon):
            continue
        value = next((getattr(o, a) for a in ("ns_dtype_resolved", "ns_dtype") if getattr(o, a, None) is not None),
                     "float32")
        for v in value.values() if isinstance(value, dict) else [value]:
            name = str(v).removeprefix("torch.")
            if name not in found:
                found.append(name)
    return "+".join(found) if found else None


def _restore_last_eval(run: Run) -> None:
    """A resumed run's evaluation at its checkpoint step, from ``metrics.jsonl``: resuming
    a finished run then logs no second final evaluation."""
    if not run.dist.main:
        return
    rows = [r for r in read_metrics(run.metrics_path) if r.get("step") == run.step and "val_loss" in r
            and r.get("protocol", run.cfg.eval_protocol) == run.cfg.eval_protocol]
    if rows:
        run.last_eval = {k: v for k, v in rows[-1].items() if k not in ("step", "elapsed")}
        run.last_eval_step = run.step


def loop(run: Run, quiet: bool = False) -> tuple[str, str]:
    """Train until ``--steps``, the time budget, ``--stop-after``, a signal or a non-finite
    loss; returns ``(status, message)``."""
    cfg, dist, device = run.cfg, run.dist, run.device
    # under a time schedule --steps is only an upper limit: no step total to show
    bar = tqdm(total=None if cfg.schedule == "time" else cfg.steps, initial=run.step,
               disable=quiet or not dist.main, dynamic_ncols=True, desc=os.path.basename(run.out))
    tok_per_step = cfg.batch_size * cfg.seq_len * dist.world_size
    t_window, tokens_window = time.time(), 0
    status, message = "completed", ""
    run.t_start = time.time()
    run.phase = "training loop"
    run.model.train()
    counted = compile_counters()
    with StopRequest() as stop:
        while run.step < cfg.steps:
            if 0 < cfg.stop_after <= run.step:
                status, message = "paused", (f"stopped at step {run.step} (--stop-after); resume with "
                                             f"lipschitz-train --resume {run.out}")
                break
            now = dist.clock(run.elapsed(), cfg.time_budget > 0, device)
            if cfg.time_budget > 0 and now >= cfg.time_budget:
                status, message = "time_budget", f"stopped at the time budget of {cfg.time_budget:.0f} s"
                break

            set_lrs(run.opt, lr_multiplier(cfg, run.step, now))
            x, y = run.sampler.next(device)
            t_step = time.time()
            loss, finite = _loss_and_backward(run, x, y)
            if not finite:
                status = "diverged"
                message = (f"non-finite loss ({loss.item()}) at step {run.step}: stopping; the last good "
                           f"checkpoint is {os.path.join(run.out, 'latest.pt')}")
                break
            if run.compile == "model" and "first_step_seconds" not in run.compile_stats:
                # the compilation happens in the first forward and backward
                run.compile_stats["first_step_seconds"] = time.time() - t_step
            try:
                run.opt.step()
            except NonFiniteGradient as exc:  # a finite loss with a NaN/inf gradient: nothing was changed
                status = "diverged"
                message = (f"{exc} (step {run.step}): stopping; the last good checkpoint is "
                           f"{os.path.join(run.out, 'latest.pt')}")
                break
            run.opt.zero_grad(set_to_none=True)
            run.step += 1
            run.tokens += tok_per_step
            tokens_window += tok_per_step
            bar.update(1)

            if run.step % cfg.log_every == 0 or run.step == cfg.steps:
                t_now = time.time()
                tps = tokens_window / max(t_now - t_window, 1e-9)
                t_window, tokens_window = t_now, 0
                run.log({"step": run.step, "train_loss": loss.item(), "lr": all_param_groups(run.opt)[0]["lr"],
                         "tokens_per_second": tps, "elapsed": run.elapsed()})
                bar.set_postfix(_progress(loss.item(), run.last_eval))
            if run.step % cfg.eval_every == 0 or run.step == cfg.steps:
                run.evaluate()
                if run.last_eval["val_loss"] < run.best_val:
                    run.best_val = run.last_eval["val_loss"]
                    run.checkpoint("best.pt")
                run.checkpoint("latest.pt")
            if stop.signum is not None:
                status = "interrupted"
                message = (f"stopped by signal {stop.signum} at step {run.step}; resume with "
                           f"lipschitz-train --resume {run.out}")
                run.checkpoint("latest.pt")
                break
    bar.close()
    check = getattr(run.opt, "check_nonfinite", None)  # Muon defers its non-finite report (no host sync)
    if check is not None and status != "diverged":
        try:
            check()
        except NonFiniteGradient as exc:
            status, message = "diverged", f"{exc}: stopping; the last good checkpoint is {run.out}/latest.pt"
    now_counted = compile_counters()
    for k, v in now_counted.items():
        run.compile_stats[k] = run.compile_stats.get(k, 0) + v - counted[k]
    return status, message


def _loss_and_backward(run: Run, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The training loss of batch ``x, y`` and whether it is finite; gradients accumulated
    when it is. Under ``--compile auto`` a first compiled step that fails (no C++ compiler
    for CPU inductor, no Triton for CUDA) is redone eager, and the run stays eager, with a
    note on stderr; ``--compile model`` lets the error through."""
    try:
        loss = run.loss_fn(x, y)
        finite = bool(torch.isfinite(loss))
        if finite:
            loss.backward()
        return loss, finite
    except Exception as exc:  # noqa: BLE001 - only a failed first compilation is caught
        first = run.compile == "model" and "first_step_seconds" not in run.compile_stats
        if not (first and run.cfg.compile == "auto"):
            raise
        print(f"note: --compile auto: torch.compile failed ({type(exc).__name__}: "
              f"{(str(exc).strip().splitlines() or [''])[0][:200]}); training eager", file=sys.stderr)
    run.compile, run.compile_stats["fallback"] = "none", True
    run.loss_fn = training_loss_fn(run.train_model, run.cfg, run.amp, run.device, compiled=False)
    run.opt.zero_grad(set_to_none=True)
    return _loss_and_backward(run, x, y)


def _progress(loss: float, last_eval: dict) -> dict[str, str]:
    """The progress bar's postfix: train loss, and the last eval's accuracy and bound."""
    shown = {"loss": f"{loss:.3f}"}
    if last_eval:
        shown["acc"] = f"{last_eval['val_accuracy']:.3f}"
        if last_eval.get("certified_bound") is not None:
            shown["bound"] = f"{last_eval['certified_bound']:.3g}"
    return shown


def _summary(run: Run, status: str, wall: float | None = None) -> dict:
    """The summary of ``run`` as it stands (what summary.json holds); ``wall``: the training
    seconds (default: elapsed so far)."""
    cfg, data, device = run.cfg, run.data, run.device
    ev = run.last_eval
    wall = run.elapsed() if wall is None else wall
    return {
        "status": status, "steps": run.step, "val_accuracy": ev.get("val_accuracy"),
        "val_loss": ev.get("val_loss"), "certified_bound": ev.get("certified_bound"),
        "max_activation": ev.get("max_activation"), "best_val_loss": run.best_val,
        "tokens_per_second": run.tokens / max(wall, 1e-9), "wall_seconds": wall, "tokens": run.tokens,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "model": cfg.model, "preset": cfg.preset, "params": sum(p.numel() for p in run.model.parameters()),
        "data": data.source, "vocab_size": data.vocab_size,
        "autocast": run.amp,  # the precision the training forward ran in
        # requested and resolved --compile, and what dynamo compiled in this invocation
        "compile": {"requested": cfg.compile, "resolved": run.compile, **run.compile_stats},
        "ns_dtype": ns_dtype_of(run.opt),  # Newton-Schulz compute dtype of the Muon steps (None: AdamW)
        "eval_protocol": cfg.eval_protocol,  # the windows of val_accuracy / val_loss above
    }


def finish(run: Run, status: str, message: str, quiet: bool = False) -> dict:
    """Final checkpoint and evaluation, ``sample.txt``, ``summary.json`` and ``curves.png``;
    print the message and summary line; tear down the process group. Returns the summary.
    ``run.phase`` names each step (an interruption's message says which one it cut)."""
    cfg, data, dist, device = run.cfg, run.data, run.dist, run.device
    wall = run.elapsed()  # the training time; the final evaluation is not part of it
    run.phase = "final checkpoint"
    if status == "paused":
        run.checkpoint("latest.pt")
    if status in ("completed", "time_budget"):
        if run.last_eval_step != run.step:
            run.phase = "final evaluation"
            run.evaluate()
        run.checkpoint("latest.pt")
    summary = _summary(run, status, wall)
    if status in ("completed", "time_budget") and dist.main:
        run.phase = "final evaluation"
        summary["protocols"] = final_protocol_scores(run.model, data.val, cfg, device)
        summary["paper_bound"] = paper_bound_or_none(run.model)
    if cfg.target_bound > 0:
        summary["target_bound"] = cfg.target_bound
        summary["head_sigma_max"] = cfg.head_sigma_max
        bound = summary["certified_bound"]
        if bound is not None and bound > cfg.target_bound * (1 + 1e-9):
            message = (message + "\n" if message else "") + (
                f"warning: certified bound {bound:.6g} exceeds --target-bound {cfg.target_bound:g}: "
                f"some matrix ended above its cap (constraint {cfg.constraint})")
    if dist.main:
        if status != "diverged" and cfg.sample_chars > 0 and data.tokenizer.kind != "shards":
            run.phase = "end-of-run sample"
            prompt = torch.as_tensor(data.val[: min(cfg.seq_len, 64)], dtype=torch.long)
            text = generate(run.model, data.tokenizer, prompt, cfg.sample_chars, cfg.seq_len, cfg.seed,
                            logit_scale=loss_logit_scale(cfg))
            atomic_write_text(os.path.join(run.out, "sample.txt"), text + "\n")
        run.phase = "summary"
        write_json(os.path.join(run.out, "summary.json"), summary)
        run.phase = "plot"
        plot_curves(run.out)
        if message:
            print(message, file=sys.stderr)
        if not quiet:
            print(format_summary(run.out, summary))
    dist.close()
    return summary
