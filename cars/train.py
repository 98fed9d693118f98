"""Fine-tune an ImageNet model on Stanford Cars; readable top to bottom in `main`."""

import argparse
import dataclasses
import math
import os
import random
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from cars import config as config_module
from cars.checkpoint import load_checkpoint, save_checkpoint, unwrap
from cars.cache import CachedLoader, eval_loader, train_cache_side, train_loader
from cars.data import load_splits
from cars.distributed import init_world, shutdown, world_size
from cars.engine import Device, Diverged, EpochResult, Progress, evaluate, train_one_epoch
from cars.errors import UserError, printable
from cars.models import backbone_parameters, build_model, check_resolution, head_parameters, make_ema
from cars.report import METRIC_COLUMNS, evaluated, plot_curves, write_csv, write_json
from cars.runs import check_folder_free, prepare_folder, read_summary, run_status
from cars.transforms import batch_mixer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Fine-tune an ImageNet-pretrained model on Stanford Cars. Defaults are the seed's run 7 "
        "(ResNet-50, SGD lr 0.1, lr /10 every 30 epochs, 90 epochs, batch 128, 224 px).",
    )
    parser.add_argument("--config", help="TOML preset (e.g. configs/demo.toml); flags override its values")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run folder instead of refusing")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last.pt, with its own config")
    config_module.add_config_flags(parser)
    return parser.parse_args(argv)


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if not available[name]:
        raise UserError(f"--device {name} is not available on this machine; use --device auto")
    return name


def worker_count(workers: int) -> int:
    """--workers: -1 means one per CPU core, at most 8."""
    return min(8, os.cpu_count() or 1) if workers < 0 else workers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def base_lr(cfg) -> float:
    """--lr, scaled by batch/128 with --lr-scaling linear (lr 0.1 was tuned for batch 128)."""
    return cfg.lr * cfg.batch_size / 128 if cfg.lr_scaling == "linear" else cfg.lr


def make_optimizer(cfg, model) -> torch.optim.Optimizer:
    """Two parameter groups so the backbone can learn slower than the new head (--backbone-lr-mult)."""
    lr = base_lr(cfg)
    groups = [
        {"params": backbone_parameters(model), "lr": lr * cfg.backbone_lr_mult, "name": "backbone"},
        {"params": head_parameters(model), "lr": lr, "name": "head"},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg, steps_per_epoch: int):
    """The learning rate as a multiple of the base lr after `step` optimisation steps:
    linear warmup first, then the step decay (/10 every 30 epochs) or a cosine down to 0."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    total = cfg.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.scheduler == "step":
            return cfg.gamma ** (step // (cfg.step_size * steps_per_epoch))
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return factor


def ema_decay(cfg, steps_per_epoch: int) -> float:
    """The EMA's decay per step. A fixed decay ignores the run's length: 0.9998 over run 7's 5,670
    steps would leave 32 % of the starting weights in the average. A half-life in epochs fits any
    run: after h epochs a weight counts half, so decay ** (h * steps_per_epoch) = 1/2."""
    return cfg.ema_decay or 0.5 ** (1 / (cfg.ema_half_life * steps_per_epoch))


def make_scheduler(cfg, optimizer, steps_per_epoch: int):
    """Stepped after every optimisation step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch))


def rng_state() -> dict:
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class RunLog:
    """Prints a line (above any progress bar) and keeps it in the run folder's train.log.
    Under torchrun only the main process has one; the others stay quiet."""

    def __init__(self, path: Path, enabled: bool = True):
        self.file = open(path, "a", buffering=1, errors="backslashreplace") if enabled else None

    def __call__(self, line: str = "") -> None:
        line = printable(line)
        if self.file:
            tqdm.write(line)
            self.file.write(line + "\n")


RESUMABLE_FLAGS = {"epochs", "workers", "device", "save_every_steps", "cache", "eval_every"}  # the only flags that may come with --resume: none changes the recipe


def resolve_run(args) -> tuple[config_module.Config, str, Path, dict | None]:
    """The config, preset name, run folder, and (with --resume) the checkpoint to continue from."""
    if not args.resume:
        cfg, preset = config_module.resolve(args)
        run_dir = Path(cfg.run_dir or f"runs/{preset}")
        check_folder_free(run_dir, args.overwrite)  # fail before any slow work
        return dataclasses.replace(cfg, run_dir=str(run_dir)), preset, run_dir, None
    run_dir = Path(args.resume)
    if not (run_dir / "last.pt").is_file() or not (run_dir / "config.toml").is_file():
        raise UserError(f"{run_dir} has no last.pt and config.toml to resume from; give the run folder of an interrupted run")
    if args.config or args.overwrite:
        raise UserError("--resume continues a run with its own config.toml; drop --config and --overwrite")
    summary = read_summary(run_dir)
    if run_status(summary) == "running":  # two writers would leave the run inconsistent
        raise UserError(f"{run_dir} is still being trained by process {summary['pid']} on {summary['host']}; "
                        f"wait for it to end or stop it (kill {summary['pid']}), then resume")
    if not os.access(run_dir, os.W_OK):
        raise UserError(f"cannot write {run_dir}: permission denied; resume where you may write (copy the run folder)")
    saved = config_module.load_saved(run_dir / "config.toml")
    given = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(saved)}}
    changed = sorted(k for k, v in given.items() if k not in RESUMABLE_FLAGS and v != getattr(saved, k))
    if changed:
        flags = ", ".join("--" + config_module.flag(k) for k in changed)
        raise UserError(f"{flags} would change the recipe of {run_dir}; --resume only takes --epochs (to extend), --workers, --device, "
                        "--save-every-steps, --cache and --eval-every. "
                        "Start a new run (--run-dir) to change the recipe")
    cfg = dataclasses.replace(saved, **{k: given[k] for k in RESUMABLE_FLAGS & set(given)}).validate()
    if cfg.scheduler == "cosine" and cfg.epochs != saved.epochs:  # the step schedule does not depend on the length
        raise UserError(f"--epochs {cfg.epochs} would change the cosine schedule of {run_dir}, which is laid over its {saved.epochs} epochs: "
                        "the lr would jump. To train on, start a new run from its weights: "
                        f"--weights {run_dir / 'last.pt'} --run-dir NEW_RUN")
    checkpoint = load_checkpoint(run_dir / "last.pt")
    if checkpoint.get("epoch", 0) >= cfg.epochs:
        raise UserError(f"{run_dir} already trained {checkpoint['epoch']} of {cfg.epochs} epochs; pass --epochs N to extend it")
    return cfg, run_dir.name, run_dir, checkpoint


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    numpy_state = dict(state["numpy"], state=dict(state["numpy"]["state"], key=state["numpy"]["state"]["key"].numpy().astype(np.uint32)))
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict) -> None:
    """A run saved without mixed precision (on a CPU) has an empty scaler state; resumed with it (on
    a GPU), the scaler starts afresh, as it would have on the first step."""
    if state:
        scaler.load_state_dict(state)


def average_over_processes(result: EpochResult, world) -> EpochResult:
    """One process's training loss and accuracy -> the whole job's, weighted by images seen."""
    parts = world.all({"loss": result.loss, "accuracy": result.accuracy, "images": result.images})
    images = sum(p["images"] for p in parts)
    mean = lambda key: sum(p[key] * p["images"] for p in parts) / max(images, 1)  # noqa: E731
    return EpochResult(mean("loss"), mean("accuracy"), images)


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg, preset, run_dir, resumed = resolve_run(args)
    device_type = pick_device(cfg.device)
    on_cuda = device_type == "cuda"
    processes = world_size()
    if cfg.batch_size % processes:  # checked before joining the others: a refused process must not leave them waiting
        raise UserError(f"--batch-size {cfg.batch_size} is the global batch; it must divide evenly over {processes} processes")
    if cfg.sync_bn and processes > 1 and not on_cuda:
        raise UserError("--sync-bn needs CUDA (NCCL); on CPUs drop it")
    world = init_world(device_type)  # one process, or one of torchrun's
    device = Device(device_type, channels_last=cfg.channels_last and on_cuda, amp=cfg.amp and on_cuda, show_progress=world.main)
    seed_everything(cfg.seed)

    # Data and model first: every input is checked before the run folder is touched.
    splits = load_splits(cfg.data, cfg.val_split, cfg.seed)
    if resumed and resumed.get("class_names") != splits.class_names:
        raise UserError(f"the classes of {cfg.data} changed since {run_dir} was trained ({len(resumed.get('class_names') or [])} then, "
                        f"{len(splits.class_names)} now); resume on the same dataset, or start a new run")
    model = build_model(cfg.arch, "none" if resumed else cfg.weights, len(splits.class_names), cfg.dropout)
    check_resolution(model, cfg.arch, cfg.resolution)
    workers = worker_count(cfg.workers)
    # batches from the preprocessing cache (the first run on a dataset fills it), or with --cache off decoded by worker processes
    train_batches = train_loader(splits.train, cfg, workers, device_type, world.rank, world.size)
    eval_batches = eval_loader(splits.eval, cfg.resolution, cfg.cache, cfg.skip_bad_images, cfg.batch_size, workers, device_type,
                               world.rank, world.size)
    world.barrier()  # every process has checked the run folder before the main one replaces it
    if world.main:
        if not resumed:
            prepare_folder(run_dir, args.overwrite)
        cfg.save(run_dir / "config.toml")  # on resume, records an extended --epochs
    world.barrier()
    log = RunLog(run_dir / "train.log", enabled=world.main)
    log(f"$ {' '.join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)])}")
    log(f"run folder {run_dir}; data {cfg.data}: {len(splits.train)} train / {len(splits.eval)} {splits.eval_name} images, "
        f"{len(splits.class_names)} classes")
    log(f"{cfg.arch} ({cfg.weights} weights), {cfg.resolution} px, batch {cfg.batch_size}, {cfg.optimizer} lr {cfg.lr:g}, "
        f"{cfg.scheduler} schedule, {cfg.epochs} epochs on {device_type} "
        f"(amp {device.amp}, compile {cfg.compile and on_cuda}, channels_last {device.channels_last})"
        + (f", {world.size} processes of {cfg.batch_size // world.size} images each" if world.size > 1 else ""))
    log(f"input: preprocessing cache in {train_batches.dataset.cache.folder.parent} (training images kept at {train_cache_side(cfg)} px, "
        "cropped on the device)" if isinstance(train_batches, CachedLoader) else f"input: no cache, {workers} workers decode every image every epoch")
    if cfg.lr_scaling == "linear":
        log(f"linear lr scaling: lr {cfg.lr:g} x batch {cfg.batch_size} / 128 = {base_lr(cfg):g}")

    model = model.to(device_type, memory_format=torch.channels_last if device.channels_last else torch.preserve_format)
    if cfg.sync_bn and world.size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer, steps_per_epoch=len(train_batches))
    scaler = torch.amp.GradScaler(device_type, enabled=device.amp)
    ema = None
    if cfg.ema:  # when on, the EMA weights are evaluated and kept
        decay, steps = ema_decay(cfg, len(train_batches)), cfg.epochs * len(train_batches)
        ema = make_ema(model, decay)
        log(f"EMA of the weights: decay {decay:.6g} per step, a half-life of {math.log(0.5) / math.log(decay) / len(train_batches):.3g} "
            f"epochs; the first step's weights keep a share of {decay ** (steps - 1):.3g} after all {steps} steps")
    mixer = batch_mixer(cfg.mixup, cfg.cutmix, len(splits.class_names))
    rows = []
    if resumed:
        model.load_state_dict(resumed["raw_model" if ema else "model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        load_scaler_state(scaler, resumed["scaler"])
        if ema:
            ema.load_state_dict(resumed["ema"])
        restore_rng(resumed["rng"])
        rows = resumed["history"]
        log(f"resuming after epoch {resumed['epoch']} of {cfg.epochs}")
    trained = model
    if world.size > 1:  # gradients averaged over processes; a frozen backbone leaves parameters without gradients
        trained = DistributedDataParallel(model, device_ids=[world.local_rank] if on_cuda else None,
                                          find_unused_parameters=cfg.freeze_epochs > 0)
    if cfg.compile and on_cuda:
        trained = torch.compile(trained)
    if on_cuda:
        torch.backends.cudnn.benchmark = True

    def save_last(epoch: int, kept_model, progress: Progress | None = None) -> dict:
        """last.pt: everything needed to go on exactly where `epoch` ended, or where the next epoch's
        `progress` stands (written by the main process)."""
        checkpoint = {"model": unwrap(kept_model).state_dict(), "config": dataclasses.asdict(cfg), "class_names": splits.class_names,
                      "epoch": epoch, "metric": rows[-1]["eval_acc"] if rows else None, "metric_name": f"{splits.eval_name}_acc"}
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                 "rng": rng_state(), "history": rows, "progress": dataclasses.asdict(progress) if progress else None}
        if ema:  # "model" holds the EMA weights; the raw ones are needed to go on training
            state.update(raw_model=unwrap(model).state_dict(), ema=ema.state_dict())
        if world.main:
            save_checkpoint(run_dir / "last.pt", {**checkpoint, **state})
        return checkpoint

    first_epoch = resumed["epoch"] + 1 if resumed else 1
    progress = Progress(**resumed["progress"]) if resumed and resumed.get("progress") else None  # a mid-epoch checkpoint

    def save_within_epoch(epoch_progress: Progress) -> None:
        if cfg.save_every_steps and epoch_progress.steps % cfg.save_every_steps == 0 and epoch_progress.steps < len(train_batches):
            save_last(epoch - 1, ema.module if ema else model, epoch_progress)

    if not resumed:
        save_last(0, ema.module if ema else model)  # resumable even if the first epoch never ends
    # compare.py tells a running run from a crashed one by this: a live process on this host
    status = {"status": "running", "pid": os.getpid(), "host": socket.gethostname(), "epochs": cfg.epochs, "selected_on": splits.eval_name}
    write_summary = (lambda summary: write_json(run_dir / "summary.json", summary)) if world.main else (lambda summary: None)
    write_summary(status)
    previous_sigterm = signal.signal(signal.SIGTERM, raise_interrupt) if threading.current_thread() is threading.main_thread() else None
    best = max(evaluated(rows), key=lambda r: r["eval_acc"]) if evaluated(rows) else None
    eval_model = ema.module if ema else unwrap(trained) if world.size > 1 else trained  # what is evaluated and kept
    pad_to = cfg.batch_size if eval_model is trained and trained is not model else None  # compiled: one eval shape only
    started, plotted, epoch = time.time(), time.time(), first_epoch
    try:
        for epoch in range(first_epoch, cfg.epochs + 1):
            epoch_start = time.time()
            train_batches.generator.manual_seed(cfg.seed * 1_000_003 + epoch)  # the data order depends on the epoch alone
            train_batches.dataset.epoch = epoch  # and so does each image's augmentation
            progress = progress or Progress(lr=optimizer.param_groups[-1]["lr"])  # a fresh epoch, or the rest of one
            train_batches.batch_sampler.skip = progress.steps
            frozen = epoch <= cfg.freeze_epochs
            if cfg.freeze_epochs and epoch == cfg.freeze_epochs + 1:
                log(f"epoch {epoch}: unfreezing the backbone; all layers train from now on")
            train = train_one_epoch(trained, train_batches, optimizer, scaler, device, scheduler, ema, mixer, cfg.label_smoothing,
                                    frozen_backbone=frozen, description=f"epoch {epoch}/{cfg.epochs}", progress=progress,
                                    on_step=save_within_epoch)
            lr, progress = progress.lr, None
            train = average_over_processes(train, world)
            result = None
            if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
                result = evaluate(eval_model, eval_batches, device, description=splits.eval_name, world=world, pad_to=pad_to)
            seconds = time.time() - epoch_start
            rows.append(dict(epoch=epoch, lr=lr, train_loss=train.loss, train_acc=train.accuracy, seconds=round(seconds, 2),
                             eval_loss=result.loss if result else None, eval_acc=result.accuracy if result else None))

            improved = result is not None and (best is None or result.accuracy > best["eval_acc"])
            checkpoint = save_last(epoch, eval_model)
            if improved:
                best = rows[-1]
            if improved and world.main:
                save_checkpoint(run_dir / "best.pt", checkpoint)
            if world.main:
                write_csv(run_dir / "metrics.csv", rows, METRIC_COLUMNS)
            if world.main and (time.time() - plotted > 30 or epoch == cfg.epochs):  # a plot costs about a second
                plot_curves(rows, run_dir / "curves.png", splits.eval_name, title=f"{preset}: {cfg.arch} {cfg.resolution}px")
                plotted = time.time()

            eta = (time.time() - started) / (epoch - first_epoch + 1) * (cfg.epochs - epoch)
            evaluation = f"{splits.eval_name} loss {result.loss:.4f} acc {result.accuracy:5.2f}%" if result else f"{splits.eval_name} not evaluated"
            log(f"epoch {epoch:3d}/{cfg.epochs} lr {lr:.4g} | train loss {train.loss:.4f} acc {train.accuracy:5.2f}% | "
                f"{evaluation} | {seconds:.1f}s | ETA {duration(eta)}" + (" *" if improved else ""))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: every file on disk is complete (atomic writes); say how to go on
        write_summary({**status, "status": "interrupted", "epochs_done": epoch - 1})
        log(f"interrupted in epoch {epoch}; last.pt holds epoch {epoch - 1}"
            + (f" and the first steps of epoch {epoch} (--save-every-steps)" if cfg.save_every_steps else "")
            + f". Resume with: uv run train.py --resume {run_dir}")
        sys.exit(130)
    except Diverged as error:
        write_summary({**status, "status": "diverged", "epochs_done": epoch - 1})
        log(f"diverged in epoch {epoch}: {error}")
        raise UserError(f"training diverged in epoch {epoch}: {error}. best.pt and last.pt from before are intact") from None
    except BaseException:  # anything else: the run is not left marked running
        write_summary({**status, "status": "crashed", "epochs_done": epoch - 1})
        raise
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
        shutdown(world)

    total = sum(r["seconds"] for r in rows)
    summary = {"status": "finished", "epochs": cfg.epochs, "seconds": round(total, 1), "selected_on": splits.eval_name,
               "best_epoch": int(best["epoch"]), "best_eval_acc": best["eval_acc"], "final_eval_acc": rows[-1]["eval_acc"],
               "eval_images": result.images if epoch >= first_epoch else None}
    if epoch >= first_epoch:  # this process trained at least one epoch: it knows what it skipped
        # the last epoch's count: of the images it drew (a ragged last batch is not drawn), those that could not be read
        skipped = {"train": train_batches.batch_sampler.images_per_epoch - train.images, splits.eval_name: len(splits.eval) - result.images}
        if any(skipped.values()):
            summary["skipped_images"] = skipped
            log(f"skipped unreadable images: {skipped}")
    log(f"done in {duration(total)}: best {splits.eval_name} accuracy {best['eval_acc']:.2f}% at epoch {int(best['epoch'])} "
        f"(final epoch {rows[-1]['eval_acc']:.2f}%)")
    if splits.test is not None and world.main:  # the held-out val split chose the epoch; the test split was never looked at until now
        final_model = ema.module if ema else model
        unwrap(final_model).load_state_dict(load_checkpoint(run_dir / "best.pt")["model"])
        test_batches = eval_loader(splits.test, cfg.resolution, cfg.cache, cfg.skip_bad_images, cfg.batch_size, workers, device_type)
        test = evaluate(final_model, test_batches, device, "test")
        summary["test_acc_of_best"] = test.accuracy
        log(f"test accuracy of the best epoch (chosen on val): {test.accuracy:.2f}%")
    write_summary(summary)
    log(f"run folder: {run_dir} (best.pt, last.pt, metrics.csv, curves.png)")
