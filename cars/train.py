"""train.py: fine-tune an ImageNet model on Stanford Cars. `main` reads top to bottom: start, the epochs, the finish."""

import dataclasses
import functools
import math
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

from cars import config as config_module
from cars.checkpoint import load_checkpoint, save_checkpoint, unwrap
from cars.cli import parse_train
from cars.data import Splits, load_splits
from cars.distributed import World, init_world, shutdown, world_size
from cars.engine import Device, Diverged, EpochResult, Progress, evaluate, train_one_epoch
from cars.errors import UserError
from cars.loaders import CachedLoader, eval_loader, train_loader
from cars.models import build_model, check_resolution
from cars.optim import base_lr, ema_decay, load_scaler_state, make_ema, make_optimizer, make_scheduler
from cars.report import METRIC_COLUMNS, best_row, evaluated, plot_curves, write_csv, write_json
from cars.runs import RunLog, check_folder_free, duration, prepare_folder, read_summary, run_status
from cars.runtime import check_compiler, pick_device, restore_rng, rng_state, seed_everything, seed_process, worker_count
from cars.transforms import batch_mixer

RESUMABLE_FLAGS = {"epochs", "workers", "device", "save_every_steps", "cache", "eval_every", "early_stop", "log_every_steps",
                   "amp", "compile", "channels_last"}  # the only flags that may come with --resume: none changes the recipe


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
                        "--save-every-steps, --cache, --eval-every, --early-stop and --log-every-steps. "
                        "Start a new run (--run-dir) to change the recipe")
    cfg = dataclasses.replace(saved, **{k: given[k] for k in RESUMABLE_FLAGS & set(given)}).validate()
    if cfg.scheduler == "cosine" and cfg.epochs != saved.epochs:  # the step schedule does not depend on the length
        raise UserError(f"--epochs {cfg.epochs} would change the cosine schedule of {run_dir}, which is laid over its {saved.epochs} epochs: "
                        "the lr would jump. To train on, start a new run from its weights: "
                        f"--weights {run_dir / 'last.pt'} --run-dir NEW_RUN")
    checkpoint = load_checkpoint(run_dir / "last.pt")
    check_best_matches_history(run_dir, checkpoint)
    if checkpoint.get("epoch", 0) >= cfg.epochs:
        raise UserError(f"{run_dir} already trained {checkpoint['epoch']} of {cfg.epochs} epochs; pass --epochs N to extend it")
    return cfg, run_dir.name, run_dir, checkpoint


def check_best_matches_history(run_dir: Path, checkpoint: dict) -> None:
    """best.pt must hold the best epoch of last.pt's history, or an epoch after last.pt (written just before an
    interruption, and trained again on resume). Anything else would make summary.json and compare.py name one model
    while eval, export and the app use another."""
    best = best_row(checkpoint.get("history") or [])
    best_epoch = load_checkpoint(run_dir / "best.pt").get("epoch") if (run_dir / "best.pt").is_file() else None
    if best is None or best_epoch == best["epoch"] or (best_epoch or 0) > checkpoint.get("epoch", 0):
        return
    raise UserError(f"{run_dir / 'best.pt'} holds epoch {best_epoch} but the run's records name epoch {int(best['epoch'])} as the best "
                    "(an older version could be interrupted between the two files); its best weights are lost. Start a new run "
                    f"from its last weights instead: --weights {run_dir / 'last.pt'} --run-dir NEW_RUN")


def average_over_processes(result: EpochResult, world) -> EpochResult:
    """One process's training loss and accuracy -> the whole job's, weighted by images seen."""
    parts = world.all({"loss": result.loss, "accuracy": result.accuracy, "images": result.images})
    images = sum(p["images"] for p in parts)
    mean = lambda key: sum(p[key] * p["images"] for p in parts) / max(images, 1)  # noqa: E731
    return EpochResult(mean("loss"), mean("accuracy"), images)


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@dataclass
class Run:
    """Everything a training run holds, built once by `start` and used by the loop."""

    cfg: config_module.Config
    preset: str
    run_dir: Path
    splits: Splits
    world: World
    device: Device
    log: RunLog | None  # made once every input, the checkpoint of a resume included, has been checked
    model: torch.nn.Module  # the plain model, whose raw weights train
    trained: torch.nn.Module  # what runs the training steps: the model, under DDP and torch.compile when on
    evaluated: torch.nn.Module  # what is evaluated and kept in best.pt: the EMA of the weights when on
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: torch.optim.swa_utils.AveragedModel | None
    mixer: object
    train_batches: object
    eval_batches: object
    workers: int
    board: SummaryWriter | None  # TensorBoard events in the run folder (the main process only)
    rows: list[dict] = field(default_factory=list)  # metrics.csv, one row per epoch done
    first_epoch: int = 1
    progress: Progress | None = None  # where a mid-epoch checkpoint left the first epoch to run
    saved: tuple[int, int] = (0, 0)  # what last.pt holds: its epoch, and the steps of the next epoch a mid-epoch save kept

    @property
    def best(self) -> dict | None:
        return best_row(self.rows)


def start(args, argv) -> Run:
    """Check every input, then make the run folder, the model, the data and the optimisation state."""
    cfg, preset, run_dir, resumed = resolve_run(args)
    device_type = pick_device(cfg.device)
    on_cuda = device_type == "cuda"
    processes = world_size()
    if cfg.batch_size % processes:  # checked before joining the others: a refused process must not leave them waiting
        raise UserError(f"--batch-size {cfg.batch_size} is the global batch; it must divide evenly over {processes} processes")
    if cfg.skip_bad_images and cfg.cache == "off" and processes > 1:  # only the cache knows the unreadable images before the steps
        raise UserError("--skip-bad-images under torchrun needs the preprocessing cache, which finds unreadable images before "
                        "training so that every process skips the same steps; drop --cache off")
    if cfg.sync_bn and processes > 1 and not on_cuda:
        raise UserError("--sync-bn needs CUDA (NCCL); on CPUs drop it")
    world = init_world(device_type)  # one process, or one of torchrun's
    device = Device.for_run(cfg, device_type, show_progress=world.main)
    compiled = cfg.speedup_on("compile", device_type)
    if compiled:
        check_compiler(device_type)
    seed_everything(cfg.seed)

    # Data and model first: every input is checked before the run folder is touched.
    splits = load_splits(cfg.data, cfg.val_split, cfg.split_seed)
    if resumed and resumed.get("class_names") != splits.class_names:
        raise UserError(f"the classes of {cfg.data} changed since {run_dir} was trained ({len(resumed.get('class_names') or [])} then, "
                        f"{len(splits.class_names)} now); resume on the same dataset, or start a new run")
    model = build_model(cfg.arch, "none" if resumed else cfg.weights, len(splits.class_names), cfg.dropout)
    check_resolution(model, cfg.arch, cfg.resolution)
    seed_process(cfg.seed, world.rank)
    workers = worker_count(cfg.workers)
    # batches from the preprocessing cache (the first run on a dataset fills it), or with --cache off decoded by worker processes
    train_batches = train_loader(splits.train, cfg, workers, device_type, world.rank, world.size)
    eval_batches = eval_loader(splits.eval, cfg.resolution, cfg.cache, cfg.skip_bad_images, cfg.batch_size, workers, device_type,
                               world.rank, world.size)
    model = device.place(model)
    if cfg.sync_bn and world.size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer, steps_per_epoch=len(train_batches))
    scaler = device.scaler()
    ema = None
    if cfg.ema:  # when on, the EMA weights are evaluated and kept
        ema = make_ema(model, ema_decay(cfg, len(train_batches)))
    trained = model
    if world.size > 1:  # gradients averaged over processes; a frozen backbone leaves parameters without gradients
        trained = DistributedDataParallel(model, device_ids=[world.local_rank] if on_cuda else None,
                                          find_unused_parameters=cfg.freeze_epochs > 0)
    if compiled:
        trained = torch.compile(trained)
    torch.backends.cudnn.benchmark = on_cuda  # one input shape throughout: let cuDNN pick its fastest kernels
    run = Run(cfg, preset, run_dir, splits, world, device, None, model, trained,
              evaluated=ema.module if ema else unwrap(trained) if world.size > 1 else trained, optimizer=optimizer, scheduler=scheduler,
              scaler=scaler, ema=ema, mixer=batch_mixer(cfg.mixup, cfg.cutmix, len(splits.class_names), cfg.seed),
              train_batches=train_batches, eval_batches=eval_batches, workers=workers, board=None)
    if resumed:  # before the run folder is touched: a resume that fails changes nothing
        try:
            restore_state(run, resumed)
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as error:
            detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise UserError(f"{run_dir / 'last.pt'} does not fit this run ({detail}); it is damaged or was written by another "
                            f"recipe. Nothing in {run_dir} was changed") from None

    world.barrier()  # every process has checked the run folder before the main one replaces it
    if world.main:
        if not resumed:
            prepare_folder(run_dir, args.overwrite)
        cfg.save(run_dir / "config.toml")  # on resume, records an extended --epochs
    world.barrier()
    run.log = log = RunLog(run_dir / "train.log", enabled=world.main)
    log(device.describe(compiled))
    log(f"$ {' '.join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)])}")
    log(f"run folder {run_dir}; data {cfg.data}: {len(splits.train)} train / {len(splits.eval)} {splits.eval_name} images, "
        f"{len(splits.class_names)} classes")
    log(f"{cfg.arch} ({cfg.weights} weights), {cfg.resolution} px, batch {cfg.batch_size}, {cfg.optimizer} lr {cfg.lr:g}, "
        f"{cfg.scheduler} schedule, {cfg.epochs} epochs"
        + (f", {world.size} processes of {cfg.batch_size // world.size} images each" if world.size > 1 else ""))
    kept = f"their longer side at most {cfg.cache_side} px (lossy)" if cfg.cache_side else "at native size"
    log(f"input: preprocessing cache in {train_batches.dataset.cache.folder.parent} (training images kept {kept}, each crop resized "
        "on the device)" if isinstance(train_batches, CachedLoader) else f"input: no cache, {workers} workers decode every image every epoch")
    if cfg.lr_scaling == "linear":
        log(f"linear lr scaling: lr {cfg.lr:g} x batch {cfg.batch_size} / 128 = {base_lr(cfg):g}")
    if ema:
        decay, steps = ema_decay(cfg, len(train_batches)), cfg.epochs * len(train_batches)
        log(f"EMA of the weights: decay {decay:.6g} per step, a half-life of {math.log(0.5) / math.log(decay) / len(train_batches):.3g} "
            f"epochs; the first step's weights keep a share of {decay ** (steps - 1):.3g} after all {steps} steps")
    if world.main:  # after a resume, events past the checkpoint (an interrupted epoch's steps) are dropped; those at its
        # own step (the epoch it ended, logged at that step) belong to it and stay
        run.board = SummaryWriter(str(run_dir), purge_step=resumed_step(resumed, len(train_batches)) + 1 if resumed else None)
    if resumed:
        log(f"resuming after epoch {resumed['epoch']} of {cfg.epochs}")
    else:
        save_last(run, epoch=0)  # resumable even if the first epoch never ends
    return run


def model_part(run: Run, epoch: int) -> dict:
    """What best.pt holds, and last.pt too: the evaluated weights and what they need to be used."""
    return {"model": unwrap(run.evaluated).state_dict(), "config": dataclasses.asdict(run.cfg), "class_names": run.splits.class_names,
            "epoch": epoch, "metric": run.rows[-1]["eval_acc"] if run.rows else None, "metric_name": f"{run.splits.eval_name}_acc"}


def save_last(run: Run, epoch: int, progress: Progress | None = None) -> None:
    """last.pt: the whole state of the run where `epoch` ended, or where the next epoch's `progress`
    stands: what restore_state needs to go on exactly."""
    checkpoint = model_part(run, epoch)
    state = {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
             "rng": run.world.all(rng_state()), "history": run.rows, "progress": dataclasses.asdict(progress) if progress else None}
    if run.ema:  # "model" holds the EMA weights; the raw ones are needed to go on training
        state.update(raw_model=unwrap(run.model).state_dict(), ema=run.ema.state_dict())
    if run.world.main:
        save_checkpoint(run.run_dir / "last.pt", {**checkpoint, **state})
    run.saved = (epoch, progress.steps if progress else 0)


def restore_state(run: Run, checkpoint: dict) -> None:
    """save_last's twin: the weights, optimizer, schedule, AMP scaler, EMA, RNGs, metrics and data position."""
    run.model.load_state_dict(checkpoint["raw_model" if run.ema else "model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    load_scaler_state(run.scaler, checkpoint["scaler"])
    if run.ema:
        run.ema.load_state_dict(checkpoint["ema"])
    restore_rng(checkpoint["rng"], run.world.rank)
    run.rows = checkpoint["history"]
    run.first_epoch = checkpoint["epoch"] + 1
    run.saved = (checkpoint["epoch"], (checkpoint.get("progress") or {}).get("steps") or 0)
    run.progress = Progress(**checkpoint["progress"]) if checkpoint.get("progress") else None  # a mid-epoch checkpoint


def resumed_step(checkpoint: dict, steps_per_epoch: int) -> int:
    """The global step a checkpoint stands at: its epochs, and the steps of a mid-epoch checkpoint."""
    return checkpoint["epoch"] * steps_per_epoch + ((checkpoint.get("progress") or {}).get("steps") or 0)


def log_step(run: Run, epoch: int, steps: int, loss: float, lr: float) -> None:
    """TensorBoard, every --log-every-steps steps: the training loss and lr of this step."""
    if run.board:
        step = (epoch - 1) * len(run.train_batches) + steps
        run.board.add_scalar("step/train_loss", loss, step)
        run.board.add_scalar("step/lr", lr, step)


def log_epoch(run: Run, row: dict) -> None:
    """TensorBoard, every epoch: what metrics.csv holds, at the step the epoch ended (logged before
    last.pt is written, so a resume from the previous epoch drops it and logs it again)."""
    if run.board:
        for key in ("lr", "train_loss", "train_acc", "eval_loss", "eval_acc"):
            if row[key] is not None:
                run.board.add_scalar(f"epoch/{key.replace('eval', run.splits.eval_name)}", row[key], row["epoch"] * len(run.train_batches))
        run.board.flush()


def stale_evaluations(rows: list[dict]) -> int:
    """How many evaluations came after the best one (--early-stop counts these)."""
    best = best_row(rows)
    return sum(1 for r in evaluated(rows) if r["epoch"] > best["epoch"]) if best else 0


def train_and_evaluate(run: Run, epoch: int) -> tuple[EpochResult, EpochResult | None]:
    """One epoch: its training steps (the rest of them, after a mid-epoch checkpoint), then the evaluation when due."""
    cfg = run.cfg
    run.train_batches.batch_sampler.generator.manual_seed(cfg.seed * 1_000_003 + epoch)  # the data order depends on the epoch alone
    run.train_batches.dataset.epoch = epoch  # and so does each image's augmentation
    if run.mixer:
        run.mixer.epoch = epoch  # and each batch's MixUp or CutMix
    progress = run.progress or Progress(lr=run.optimizer.param_groups[-1]["lr"])  # a fresh epoch, or the rest of one
    run.progress = None
    run.train_batches.batch_sampler.skip = progress.steps
    if cfg.freeze_epochs and epoch == cfg.freeze_epochs + 1:
        run.log(f"epoch {epoch}: unfreezing the backbone; all layers train from now on")
    train = train_one_epoch(run.trained, run.train_batches, run.optimizer, run.scaler, run.device, run.scheduler, run.ema, run.mixer,
                            cfg.label_smoothing, frozen_backbone=epoch <= cfg.freeze_epochs, description=f"epoch {epoch}/{cfg.epochs}",
                            progress=progress, save_every=cfg.save_every_steps, save=functools.partial(save_last, run, epoch - 1),
                            log_every=cfg.log_every_steps, log=functools.partial(log_step, run, epoch))
    train = average_over_processes(train, run.world)
    result = None
    if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
        compiled = run.evaluated is run.trained and run.trained is not run.model
        result = evaluate(run.evaluated, run.eval_batches, run.device, description=run.splits.eval_name, world=run.world,
                          pad_to=cfg.batch_size if compiled else None)  # a compiled model sees one eval shape only
    run.rows.append(dict(epoch=epoch, lr=progress.lr, train_loss=train.loss, train_acc=train.accuracy, seconds=None,
                         eval_loss=result.loss if result else None, eval_acc=result.accuracy if result else None))
    return train, result


def record(run: Run, improved: bool) -> None:
    """The epoch's files: best.pt when the eval accuracy improved, then last.pt, then metrics.csv. best.pt comes
    first: last.pt's history names the new best epoch, so an interruption between the two must find best.pt ahead
    (this epoch is trained again on resume), never behind."""
    epoch = run.rows[-1]["epoch"]
    if improved and run.world.main:
        save_checkpoint(run.run_dir / "best.pt", model_part(run, epoch))
    save_last(run, epoch)
    if run.world.main:
        write_csv(run.run_dir / "metrics.csv", run.rows, METRIC_COLUMNS)


def main(argv=None) -> None:
    args = parse_train(argv)
    run = start(args, argv)
    cfg, log = run.cfg, run.log
    # compare.py tells a running run from a crashed one by this: a live process on this host
    status = {"status": "running", "pid": os.getpid(), "host": socket.gethostname(), "epochs": cfg.epochs, "selected_on": run.splits.eval_name}
    write_summary = (lambda summary: write_json(run.run_dir / "summary.json", summary)) if run.world.main else (lambda summary: None)
    write_summary(status)
    previous_sigterm = signal.signal(signal.SIGTERM, raise_interrupt) if threading.current_thread() is threading.main_thread() else None
    started = plotted = time.time()
    epoch, train, result, stopped_early = run.first_epoch, None, None, False
    try:
        for epoch in range(run.first_epoch, cfg.epochs + 1):
            epoch_start = time.time()
            train, result = train_and_evaluate(run, epoch)
            improved = run.best is run.rows[-1]  # strictly better than every earlier evaluation
            seconds = run.rows[-1]["seconds"] = round(time.time() - epoch_start, 2)
            log_epoch(run, run.rows[-1])
            record(run, improved)
            if run.world.main and (time.time() - plotted > 30 or epoch == cfg.epochs):  # a plot costs about a second
                plot_curves(run.rows, run.run_dir / "curves.png", run.splits.eval_name, title=f"{run.preset}: {cfg.arch} {cfg.resolution}px")
                plotted = time.time()
            eta = (time.time() - started) / (epoch - run.first_epoch + 1) * (cfg.epochs - epoch)
            name = run.splits.eval_name
            evaluation = f"{name} loss {result.loss:.4f} acc {result.accuracy:5.2f}%" if result else f"{name} not evaluated"
            log(f"epoch {epoch:3d}/{cfg.epochs} lr {run.rows[-1]['lr']:.4g} | train loss {train.loss:.4f} acc {train.accuracy:5.2f}% | "
                f"{evaluation} | {seconds:.1f}s | ETA {duration(eta)}" + (" *" if improved else ""))
            if cfg.early_stop and result is not None and epoch < cfg.epochs and stale_evaluations(run.rows) >= cfg.early_stop:
                stopped_early = True
                log(f"stopping early after epoch {epoch}: {cfg.early_stop} evaluations without a better {run.splits.eval_name} accuracy "
                    f"(--early-stop {cfg.early_stop}). To go on: uv run train.py --resume {run.run_dir} --early-stop N")
                break
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: every file on disk is complete (atomic writes); say how to go on
        saved_epoch, saved_steps = run.saved
        write_summary({**status, "status": "interrupted", "epochs_done": saved_epoch})
        log(f"interrupted in epoch {epoch}; last.pt holds epoch {saved_epoch}"
            + (f" and {saved_steps} steps of epoch {saved_epoch + 1} (--save-every-steps)" if saved_steps else "")
            + f". Resume with: uv run train.py --resume {run.run_dir}")
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
        if run.board:
            run.board.close()
        shutdown(run.world)
    summary = finish(run, train, result)
    if stopped_early:
        summary.update(status="stopped early", epochs_done=epoch)
    write_summary(summary)


def finish(run: Run, train: EpochResult, result: EpochResult) -> dict:
    """The run's summary: best and final accuracy, skipped images, and with --val-split the test accuracy of the best epoch."""
    cfg, rows, best, log, name = run.cfg, run.rows, run.best, run.log, run.splits.eval_name
    total = sum(r["seconds"] for r in rows)
    summary = {"status": "finished", "epochs": cfg.epochs, "seconds": round(total, 1), "selected_on": name, "best_epoch": int(best["epoch"]),
               "best_eval_acc": best["eval_acc"], "final_eval_acc": rows[-1]["eval_acc"], "eval_images": result.images}
    # the last epoch's count: of the images it drew (a ragged last batch is not drawn), those that could not be read
    skipped = {"train": run.train_batches.batch_sampler.images_per_epoch - train.images, name: len(run.splits.eval) - result.images}
    if any(skipped.values()):
        summary["skipped_images"] = skipped
        log(f"skipped unreadable images: {skipped}")
    log(f"done in {duration(total)}: best {name} accuracy {best['eval_acc']:.2f}% at epoch {int(best['epoch'])} "
        f"(final epoch {rows[-1]['eval_acc']:.2f}%)")
    if run.splits.test is not None and run.world.main:  # the held-out val split chose the epoch; the test split was never looked at until now
        final_model = unwrap(run.evaluated)
        final_model.load_state_dict(load_checkpoint(run.run_dir / "best.pt")["model"])
        test_batches = eval_loader(run.splits.test, cfg.resolution, cfg.cache, cfg.skip_bad_images, cfg.batch_size, run.workers,
                                   run.device.type)
        test = evaluate(final_model, test_batches, run.device, "test")
        summary["test_acc_of_best"] = test.accuracy
        log(f"test accuracy of the best epoch (chosen on val): {test.accuracy:.2f}%")
    log(f"run folder: {run.run_dir} (best.pt, last.pt, metrics.csv, curves.png)")
    return summary
