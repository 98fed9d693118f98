"""What a training run holds (`Run`, built by train.py's setup), and its two checkpoints: best.pt, the weights
to use, and last.pt, everything needed to go on exactly."""

import dataclasses
import math
import os
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
from torch.utils.tensorboard import SummaryWriter

from cars.checkpoint import save_checkpoint, unwrap
from cars.config import Config
from cars.data import Splits
from cars.distributed import World, shutdown
from cars.engine import Device, Diverged, Progress
from cars.errors import UserError
from cars.files import atomic_write, interrupts_held
from cars.loaders import CachedLoader
from cars.methods import adapter_state, base_lr, is_adapted, merged_state, subset_words
from cars.optim import ema_decay, load_scaler_state
from cars.report import write_json
from cars.runs import RunLog
from cars.runtime import restore_rng, rng_state

ADAPTER = "adapter.safetensors"  # a run with LoRA: its adapters and head, beside best.pt


@dataclass(kw_only=True)
class Run:
    """Everything a training run holds. Three names for the model, each made once in setup:
    `raw_model` is the plain network whose weights the optimizer trains; `model` runs the training steps (the
    raw model under DistributedDataParallel and torch.compile, when they are on); `eval_model` is evaluated and
    kept in best.pt (the EMA of the weights with --ema, else the model)."""

    cfg: Config
    preset: str
    run_dir: Path
    splits: Splits
    world: World
    device: Device
    raw_model: torch.nn.Module
    model: torch.nn.Module
    eval_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: torch.optim.swa_utils.AveragedModel | None
    mixer: object  # MixUp or CutMix of whole batches, or None
    train_batches: object
    eval_batches: object
    workers: int
    objective: torch.nn.Module  # finetune.Objective: the loss with the method's terms
    log: RunLog | None = None  # made once every input, the checkpoint of a resume included, has been checked
    board: SummaryWriter | None = None  # TensorBoard events in the run folder (the main process only)
    rows: list[dict] = field(default_factory=list)  # metrics.csv, one row per epoch done
    group_rows: list[dict] = field(default_factory=list)  # param_groups.csv, a row per group at each epoch's start
    first_epoch: int = 1
    epoch: int = 1  # the epoch in progress
    progress: Progress | None = None  # where a mid-epoch checkpoint left the first epoch to run
    # what last.pt holds: its epoch, and the steps of the next epoch a mid-epoch save kept
    saved: tuple[int, int] = (0, 0)
    # finetune.start_fingerprint of the weights the run started from (None from random weights): eval.py's transfer
    # lens checks that the start it rebuilds is this one
    start_fingerprint: str | None = None
    # the head a method wrote before training (LP-FT's probe, a zero-shot or prototypes head: weight, bias, kind):
    # interpolate.py's alpha = 0 end uses it
    start_head: dict | None = None
    parameters: tuple[int, int] = (0, 0)  # (all of the network's, those that train): summary.json and compare.py

    @property
    def eval_pad_to(self) -> int | None:
        """A compiled model sees one batch shape only: when it is also the one evaluated, the last eval batch is padded
        to the batch size."""
        # the evaluated model is the one that trains (one process, no EMA), and that one is wrapped: compiled
        compiled_and_evaluated = self.eval_model is self.model and self.model is not self.raw_model
        return self.cfg.batch_size if compiled_and_evaluated else None

    @property
    def keeps_raw(self) -> bool:
        """Whether last.pt keeps the weights that train beside best.pt's: the EMA's average is evaluated instead, and
        a network with adapters is kept merged (every tool loads that), its adapters apart to go on training."""
        return self.ema is not None or is_adapted(self.raw_model)

    @property
    def status(self) -> dict:
        """summary.json while training: compare.py tells a running run from a crashed one by a live process on this
        host."""
        return {
            "status": "running",
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "epochs": self.cfg.epochs,
            "selected_on": self.splits.eval_name,
        }


def best_checkpoint(run: Run, epoch: int) -> dict:
    """What best.pt holds, and last.pt too: the evaluated weights, as the plain network (LoRA's adapters merged in),
    and what they need to be used."""
    evaluated = unwrap(run.eval_model)
    return {
        "model": merged_state(evaluated) if is_adapted(evaluated) else evaluated.state_dict(),
        "config": dataclasses.asdict(run.cfg),
        "class_names": run.splits.class_names,
        "epoch": epoch,
        "metric": run.rows[-1]["eval_acc"] if run.rows else None,
        "metric_name": f"{run.splits.eval_name}_acc",
        "start_fingerprint": run.start_fingerprint,
        "start_head": run.start_head,
    }


def save_best(run: Run, epoch: int) -> None:
    """best.pt, and with adapters the adapter alone beside it (adapter.safetensors: what the method trained)."""
    if not run.world.main:
        return
    save_checkpoint(run.run_dir / "best.pt", best_checkpoint(run, epoch))
    evaluated = unwrap(run.eval_model)
    if is_adapted(evaluated):
        tensors = {k: v.contiguous() for k, v in adapter_state(evaluated).items()}
        atomic_write(run.run_dir / ADAPTER, lambda file: file.write(safetensors.torch.save(tensors)))


def save_last(run: Run, epoch: int, progress: Progress | None = None) -> None:
    """last.pt: the whole state of the run where `epoch` ended, or where the next epoch's `progress` stands: what
    `restore` needs to go on exactly. Every process takes part: each one's random streams are saved."""
    state = {
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": run.world.all(rng_state()),
        "history": run.rows,
        "param_groups": run.group_rows,
        "method": run.objective.learned(),
        "progress": dataclasses.asdict(progress) if progress else None,
    }
    if run.keeps_raw:  # "model" holds the EMA's or the merged weights; the ones that train are needed to go on
        state["raw_model"] = run.raw_model.state_dict()
    if run.ema:
        state["ema"] = run.ema.state_dict()
    with interrupts_held():  # an interrupt then reports the epoch last.pt holds
        if run.world.main:
            save_checkpoint(run.run_dir / "last.pt", {**best_checkpoint(run, epoch), **state})
        run.saved = (epoch, progress.steps if progress else 0)


def restore(run: Run, checkpoint: dict) -> None:
    """save_last's twin: the weights, optimizer, schedule, AMP scaler, EMA, random streams, metrics and data
    position. A checkpoint that does not fit is one clear line, before the run folder is touched."""
    try:
        run.raw_model.load_state_dict(checkpoint["raw_model" if run.keeps_raw else "model"])
        run.optimizer.load_state_dict(checkpoint["optimizer"])
        run.scheduler.load_state_dict(checkpoint["scheduler"])
        load_scaler_state(run.scaler, checkpoint["scaler"])
        if run.ema:
            run.ema.load_state_dict(checkpoint["ema"])
        restore_rng(checkpoint["rng"], run.world.rank)
        run.rows = checkpoint["history"]
        run.group_rows = checkpoint.get("param_groups", [])
        run.start_fingerprint = checkpoint.get("start_fingerprint")
        run.start_head = checkpoint.get("start_head")
        run.first_epoch = run.epoch = checkpoint["epoch"] + 1
        run.saved = (checkpoint["epoch"], (checkpoint.get("progress") or {}).get("steps") or 0)
        run.progress = Progress(**checkpoint["progress"]) if checkpoint.get("progress") else None  # a mid-epoch one
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as error:
        detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise UserError(
            f"{run.run_dir / 'last.pt'} does not fit this run ({detail}); it is damaged or was written by "
            f"another recipe. Nothing in {run.run_dir} was changed"
        ) from None


@contextmanager
def supervised(run: Run, *, resume_advice: str | None = None):
    """The run's bookkeeping around its epochs: summary.json says "running" while they run, and how they ended when
    they did not finish (interrupted, diverged, crashed); Ctrl-C or SIGTERM (a scheduler's stop, kill) exits 130
    with the advice to resume (`resume_advice`, or train.py --resume). TensorBoard and the process group are closed
    whatever happens."""
    write_summary(run, run.status)
    previous_sigterm = (
        signal.signal(signal.SIGTERM, raise_interrupt)
        if threading.current_thread() is threading.main_thread()
        else None
    )
    try:
        yield
    except KeyboardInterrupt:  # every file on disk is complete (atomic writes): say how to go on
        saved_epoch, saved_steps = run.saved
        write_summary(run, {**run.status, "status": "interrupted", "epochs_done": saved_epoch})
        run.log(
            f"interrupted in epoch {run.epoch}; last.pt holds epoch {saved_epoch}"
            + (f" and {saved_steps} steps of epoch {saved_epoch + 1} (--save-every-steps)" if saved_steps else "")
            + ". "
            + (resume_advice or f"Resume with: uv run train.py --resume {run.run_dir}")
        )
        sys.exit(130)
    except Diverged as error:
        write_summary(run, {**run.status, "status": "diverged", "epochs_done": run.epoch - 1})
        run.log(f"diverged in epoch {run.epoch}: {error}")
        raise UserError(
            f"training diverged in epoch {run.epoch}: {error}. best.pt and last.pt from before are intact"
        ) from None
    except BaseException:  # anything else: the run is not left marked running
        write_summary(run, {**run.status, "status": "crashed", "epochs_done": run.epoch - 1})
        raise
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
        if run.board:
            run.board.close()
        shutdown(run.world)


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def write_summary(run: Run, summary: dict) -> None:
    if run.world.main:
        write_json(run.run_dir / "summary.json", summary)


def log_start(run: Run, *, command: list[str], compiled: bool) -> None:
    """train.log's first lines: the device, the command, the data, the recipe and the input pipeline."""
    cfg, log, splits, world = run.cfg, run.log, run.splits, run.world
    log(run.device.describe(compiled))
    log(f"$ {' '.join(command)}")
    log(
        f"run folder {run.run_dir}; data {cfg.data}: {len(splits.train)} train / {len(splits.eval)} {splits.eval_name} "
        f"images, {len(splits.class_names)} classes"
    )
    log(
        f"{cfg.arch} ({cfg.weights} weights), {cfg.resolution} px, batch {cfg.batch_size}, {cfg.optimizer} lr "
        f"{cfg.lr:g}, "
        f"{cfg.scheduler} schedule, {cfg.epochs} epochs"
        + (f", {world.size} processes of {cfg.batch_size // world.size} images each" if world.size > 1 else "")
    )
    if cfg.train_per_class or cfg.train_fraction < 1:
        log(f"training on a subset: {subset_words(cfg)} (subset seed {cfg.subset_seed}); the images are in subset.csv")
    if isinstance(run.train_batches, CachedLoader):
        kept = f"their longer side at most {cfg.cache_side} px (lossy)" if cfg.cache_side else "at native size"
        log(
            f"input: preprocessing cache in {run.train_batches.dataset.cache.folder.parent} (training images kept "
            f"{kept}, "
            "each crop resized on the device)"
        )
    else:
        log(f"input: no cache, {run.workers} workers decode every image every epoch")
    if cfg.lr_scaling == "linear":
        log(f"linear lr scaling: lr {cfg.lr:g} x batch {cfg.batch_size} / 128 = {base_lr(cfg):g}")
    if run.ema:
        steps_per_epoch = len(run.train_batches)
        decay, steps = ema_decay(cfg, steps_per_epoch), cfg.epochs * steps_per_epoch
        log(
            f"EMA of the weights: decay {decay:.6g} per step, a half-life of "
            f"{math.log(0.5) / math.log(decay) / steps_per_epoch:.3g} epochs; the first step's weights keep a share of "
            f"{decay ** (steps - 1):.3g} after all {steps} steps"
        )
