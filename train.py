"""Fine-tune a pretrained model on Stanford Cars: the training recipe, top to bottom.

    uv run train.py --config configs/demo.toml       # the offline demo (see --help for every flag)
    torchrun --nproc_per_node 4 train.py --config configs/run07_baseline.toml

`main` runs the recipe: `setup` builds the run, `train` is the epoch loop, `train_epoch` the step loop inside it,
and `finish` writes the summary. The pieces they call live in cars/: the step and evaluation in cars/engine.py,
the checkpoints in cars/run_state.py, the resume rules in cars/resume.py. `--weights demo-pretrained` first runs
this same recipe once on the demo's source task (`pretrain_on_demo_source`): the offline stand-in for ImageNet.
"""

from cars.cli import check_command_line, parse_train

check_command_line(__name__, parse_train)  # --help and mistakes answer before the imports below load torch

import math
import os
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from cars import analysis, calibration, demo, demo_clip, methods
from cars.checkpoint import load_checkpoint, save_checkpoint, unwrap
from cars.config import Config, config_flags
from cars.data import run_splits
from cars.demo import DEMO_PRETRAINED, demo_pretrained_path
from cars.distributed import check_job, init_world
from cars.engine import (
    Device,
    Diverged,
    EpochResult,
    Progress,
    RunningTotals,
    average_over_processes,
    collect_logits,
    evaluate,
    train_step,
)
from cars.errors import UserError, run_cli
from cars.files import made_once
from cars.finetune import check_start
from cars.loaders import run_eval_loader, start_epoch, train_loader
from cars.methods import PARAM_GROUP_COLUMNS, needs_start, param_group_rows, set_trainable
from cars.models import build_model, check_resolution
from cars.optim import ema_decay, head_lr, make_ema, make_optimizer, make_scheduler
from cars.report import METRIC_COLUMNS, plot_curves, write_csv
from cars.resume import check_same_classes, resolve_run, resumed_step
from cars.run_state import ADAPTER, Run, log_start, restore, save_best, save_last, supervised, write_summary
from cars.runs import RunLog, best_row, duration, prepare_folder, read_summary, run_status, stale_evaluations
from cars.runtime import check_compiler, pick_device, seed_everything, seed_process, worker_count
from cars.transforms import batch_mixer

PROGRESS_SECONDS = 0.5  # how often the progress bar reads the loss and accuracy (each read waits for the device)


def main(argv=None, *, after_evaluation=None, resume_advice: str | None = None) -> None:
    """`after_evaluation(epoch, eval_acc)`, when given, is asked after every evaluated epoch whether to stop the run
    there (sweep.py's pruner answers); a run it stops is marked pruned. `resume_advice` replaces the advice an
    interrupted run prints (the demo's pretraining is resumed by the command that started it)."""
    args = parse_train(argv)
    # the command that reproduces the run, also when another tool calls main (sweep.py's trials)
    run = setup(args, command=[Path(sys.argv[0]).name, *sys.argv[1:]] if argv is None else ["train.py", *argv])
    with supervised(run, resume_advice=resume_advice):
        train_result, eval_result, stopped = train(run, after_evaluation) if run.cfg.epochs else untrained(run)
    summary = finish(run, train_result, eval_result)
    if stopped:
        summary.update(status=stopped, epochs_done=run.epoch)
    write_summary(run, summary)


def train(run: Run, after_evaluation=None) -> tuple[EpochResult, EpochResult | None, str | None]:
    """The epoch loop: train, evaluate when due, then write the epoch's files and its line in train.log.
    Returns the last epoch's training and evaluation results, and why the run ended before its last epoch ("stopped
    early" by --early-stop, "pruned" by `after_evaluation`) or None."""
    cfg, log, eval_name = run.cfg, run.log, run.splits.eval_name
    started = plotted = time.time()
    for epoch in range(run.first_epoch, cfg.epochs + 1):
        run.epoch, epoch_start = epoch, time.time()
        if cfg.freeze_epochs and epoch == cfg.freeze_epochs + 1:
            log(f"epoch {epoch}: unfreezing the backbone; all layers train from now on")
        if not (run.progress and epoch == run.first_epoch):  # a mid-epoch resume keeps the row its epoch began with
            run.group_rows += param_group_rows(run.optimizer, epoch)
            if run.world.main:
                write_csv(run.run_dir / "param_groups.csv", run.group_rows, PARAM_GROUP_COLUMNS)
        progress = train_epoch(run, epoch)
        train_result = average_over_processes(progress.result(), run.world)
        eval_result = None
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            eval_result = evaluate(
                run.eval_model,
                run.eval_batches,
                run.device,
                description=eval_name,
                world=run.world,
                pad_to=run.eval_pad_to,
            )
            if eval_result.images and not math.isfinite(eval_result.loss):  # the last steps blew the weights up
                raise Diverged(
                    f"the {eval_name} loss became {eval_result.loss} after epoch {epoch} (lr {progress.lr:.3g}): the "
                    "weights stopped being usable; lower --lr, check --lr-scaling, or try lr_find.py"
                )
        row = dict(
            epoch=epoch,
            lr=progress.lr,
            train_loss=train_result.loss,
            train_acc=train_result.accuracy,
            seconds=None,
            eval_loss=eval_result.loss if eval_result else None,
            eval_acc=eval_result.accuracy if eval_result else None,
            **train_result.terms,  # the method's extra loss terms, per image
        )
        run.rows.append(row)
        improved = best_row(run.rows) is row  # strictly better than every earlier evaluation
        row["seconds"] = round(time.time() - epoch_start, 2)

        # TensorBoard: what metrics.csv holds, at the step the epoch ended (written before last.pt, so that a resume
        # from the previous epoch drops these events and writes them again)
        if run.board:
            for key in ("lr", "train_loss", "train_acc", "eval_loss", "eval_acc", *train_result.terms):
                if row[key] is not None:
                    run.board.add_scalar(
                        f"epoch/{key.replace('eval', eval_name)}", row[key], epoch * len(run.train_batches)
                    )
            run.board.flush()
        # the epoch's files. best.pt comes before last.pt: last.pt's history names the new best epoch, so an
        # interruption between the two must find best.pt ahead (this epoch is trained again on resume), never behind
        if improved:
            save_best(run, epoch)
        save_last(run, epoch)
        if run.world.main:
            write_csv(run.run_dir / "metrics.csv", run.rows, [*METRIC_COLUMNS, *run.objective.names])
        if run.world.main and (time.time() - plotted > 30 or epoch == cfg.epochs):  # a plot costs about a second
            plot_curves(
                run.rows, run.run_dir / "curves.png", eval_name, title=f"{run.preset}: {cfg.arch} {cfg.resolution}px"
            )
            plotted = time.time()

        eta = (time.time() - started) / (epoch - run.first_epoch + 1) * (cfg.epochs - epoch)
        evaluation = (
            f"{eval_name} loss {eval_result.loss:.4f} acc {eval_result.accuracy:5.2f}%"
            if eval_result
            else f"{eval_name} not evaluated"
        )
        log(
            f"epoch {epoch:3d}/{cfg.epochs} lr {row['lr']:.4g} | train loss {train_result.loss:.4f} "
            f"acc {train_result.accuracy:5.2f}% | {evaluation} | {row['seconds']:.1f}s | ETA {duration(eta)}"
            + (" *" if improved else "")
        )
        if (
            cfg.early_stop
            and eval_result is not None
            and epoch < cfg.epochs
            and stale_evaluations(run.rows) >= cfg.early_stop
        ):
            log(
                f"stopping early after epoch {epoch}: {cfg.early_stop} evaluations without a better {eval_name} "
                "accuracy "
                f"(--early-stop {cfg.early_stop}). To go on: uv run train.py --resume {run.run_dir} --early-stop N"
            )
            return train_result, eval_result, "stopped early"
        if (
            after_evaluation
            and eval_result is not None
            and after_evaluation(epoch, row["eval_acc"])  # told every evaluation, the last one too
            and epoch < cfg.epochs
        ):
            log(
                f"pruned after epoch {epoch}: the sweep's pruner stopped this trial ({eval_name} accuracy "
                f"{row['eval_acc']:.2f}%)"
            )
            return train_result, eval_result, "pruned"
    return train_result, eval_result, None


def untrained(run: Run) -> tuple[EpochResult, EpochResult, None]:
    """--epochs 0: the network as setup made it (its start, with a zero-shot or prototypes head) evaluated once as
    epoch 0 and saved as best.pt. No image is trained on; eval.py, predict.py and the page read the folder like any
    run's."""
    began, eval_name = time.time(), run.splits.eval_name
    eval_result = evaluate(
        run.eval_model, run.eval_batches, run.device, description=eval_name, world=run.world, pad_to=run.eval_pad_to
    )
    row = dict(epoch=0, lr=0.0, train_loss=None, train_acc=None, seconds=round(time.time() - began, 2))
    run.rows.append({**row, "eval_loss": eval_result.loss, "eval_acc": eval_result.accuracy})
    save_best(run, 0)
    save_last(run, 0)
    if run.world.main:
        write_csv(run.run_dir / "metrics.csv", run.rows, [*METRIC_COLUMNS, *run.objective.names])
    run.log(
        f"epoch 0 (--epochs 0: no image trained on) | {eval_name} loss {eval_result.loss:.4f} acc "
        f"{eval_result.accuracy:5.2f}%"
    )
    return EpochResult(loss=0.0, accuracy=0.0, images=0), eval_result, None


def train_epoch(run: Run, epoch: int) -> Progress:
    """The step loop: one pass over the training batches (the rest of them, after a mid-epoch checkpoint). The
    scheduler and the EMA advance every step. A step never makes the host wait for the device: the loss and the
    correct count add up on the device, and are read for the progress bar, a mid-epoch checkpoint and the end.
    Returns this process's sums for the epoch, and the lr it started with."""
    cfg, steps_per_epoch = run.cfg, len(run.train_batches)
    # a fresh epoch, with the lr it starts at for its row of metrics.csv; or the rest of one a checkpoint kept
    progress = run.progress or Progress(lr=head_lr(run.optimizer))
    run.progress = None
    start_epoch(run.train_batches, epoch=epoch, seed=cfg.seed, done_steps=progress.steps)
    if run.mixer:
        run.mixer.epoch = epoch  # each batch's MixUp or CutMix depends on (seed, epoch, step) too
    run.model.train()
    run.objective.train()
    # after train(): what is frozen keeps its BatchNorm statistics
    set_trainable(cfg, run.raw_model, backbone_frozen=epoch <= cfg.freeze_epochs)
    totals = RunningTotals(progress, run.device.type, run.objective.names)
    bar = tqdm(
        run.train_batches,
        desc=f"epoch {epoch}/{cfg.epochs}",
        leave=False,
        dynamic_ncols=True,
        disable=not run.device.show_progress,
    )
    read_at = time.monotonic()
    for batch in bar:
        if batch is None:  # every image of the batch was unreadable and skipped
            continue
        loss, logits, labels, terms = train_step(
            run.model,
            batch,
            run.optimizer,
            run.scaler,
            run.device,
            objective=run.objective,
            mixer=run.mixer,
            step=progress.steps,
        )
        totals.add(progress.steps, loss, logits, labels, terms)
        run.scheduler.step()
        if run.ema:
            run.ema.update_parameters(run.raw_model)
        progress.steps += 1
        progress.seen += len(labels)
        lr = head_lr(run.optimizer)

        mid_epoch_save = (
            cfg.save_every_steps and progress.steps % cfg.save_every_steps == 0 and progress.steps < steps_per_epoch
        )
        if mid_epoch_save or time.monotonic() - read_at > PROGRESS_SECONDS:
            totals.settle(progress, lr)  # raises Diverged when the loss stopped being finite
            bar.set_postfix(
                loss=f"{progress.loss_sum / progress.seen:.3f}", acc=f"{100 * progress.correct / progress.seen:.1f}%"
            )
            read_at = time.monotonic()
        if mid_epoch_save:  # last.pt keeps the previous epoch's end and this epoch's progress
            save_last(run, epoch - 1, progress)
        if run.board and cfg.log_every_steps and progress.steps % cfg.log_every_steps == 0:  # TensorBoard, per step
            step = (epoch - 1) * steps_per_epoch + progress.steps
            run.board.add_scalar("step/train_loss", loss.item(), step)
            run.board.add_scalar("step/lr", lr, step)
    totals.settle(progress, head_lr(run.optimizer))
    return progress


def setup(args, *, command: list[str]) -> Run:
    """Check every input, build the data, the model and its optimisation state, and only then touch the run folder."""
    cfg, preset, run_dir, resumed = resolve_run(args)  # with --resume, the checkpoint to go on from
    if cfg.weights == DEMO_PRETRAINED and not resumed:
        pretrain_on_demo_source(cfg)
    device_type = pick_device(cfg.device)
    check_job(cfg, device_type)
    world = init_world(device_type)  # one process, or one of torchrun's
    device = Device.for_run(cfg, device_type, show_progress=world.main)
    compiled = cfg.speedup_on("compile", device_type)
    if compiled:
        check_compiler(device_type)
    seed_everything(cfg.seed)

    splits = run_splits(cfg)
    if resumed:
        check_same_classes(resumed, splits.class_names, data=cfg.data, run_dir=run_dir)
    # a resumed run gets its weights from last.pt; it rebuilds its start only when the loss reads it (L2-SP, DELTA)
    from_start = not resumed or needs_start(cfg)
    raw_model = build_model(
        cfg.arch,
        cfg.weights if from_start else "none",
        len(splits.class_names),
        cfg.dropout,
        resolution=cfg.resolution,
    )
    check_resolution(raw_model, cfg.arch, cfg.resolution)
    # what the run started from, recorded in its checkpoints (a resume takes it from last.pt, and checks it)
    fingerprint = None
    if cfg.weights.lower() != "none" and from_start:
        recorded = resumed.get("start_fingerprint") if resumed else None
        fingerprint = check_start(raw_model, recorded=recorded, weights=cfg.weights, run_dir=run_dir)
    methods.adapt(cfg, raw_model)  # the methods' changes to the network (LoRA's adapters), before anything else
    seed_process(cfg.seed, world.rank)
    workers = worker_count(cfg.workers)
    # from the preprocessing cache (the first run on a dataset fills it), or with --cache off decoded by worker
    # processes
    train_batches = train_loader(
        splits.train, cfg, workers=workers, device_type=device_type, rank=world.rank, world=world.size
    )
    eval_batches = run_eval_loader(
        splits.eval, cfg, workers=workers, device_type=device_type, rank=world.rank, world=world.size
    )
    raw_model = device.place(raw_model)
    if cfg.sync_bn and world.size > 1:
        raw_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
    # the method (cars/methods.py): what its declarations need (a frozen start, the probe), and the loss
    method = methods.prepare(
        cfg,
        raw_model,
        train_split=splits.train,
        class_names=splits.class_names,
        eval_loader=lambda split: run_eval_loader(split, cfg, workers=workers, device_type=device_type),
        device=device,
        learned=resumed.get("method", {}) if resumed else None,
        world_size=world.size,
    )
    ema = make_ema(raw_model, ema_decay(cfg, len(train_batches))) if cfg.ema else None
    optimizer = make_optimizer(cfg, raw_model, extra=method.objective.param_groups(cfg))
    scheduler = make_scheduler(cfg, optimizer, steps_per_epoch=len(train_batches))

    model = raw_model
    if world.size > 1:  # gradients averaged over processes; a frozen backbone leaves parameters without gradients
        model = DistributedDataParallel(
            raw_model,
            device_ids=[world.local_rank] if device_type == "cuda" else None,
            find_unused_parameters=cfg.freeze_epochs > 0,
        )
    if compiled:
        model = torch.compile(model)
    eval_model = ema.module if ema else raw_model if world.size > 1 else model
    # one input shape throughout: let cuDNN pick its fastest kernels
    torch.backends.cudnn.benchmark = device_type == "cuda"
    run = Run(
        cfg=cfg,
        preset=preset,
        run_dir=run_dir,
        splits=splits,
        world=world,
        device=device,
        raw_model=raw_model,
        model=model,
        eval_model=eval_model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=device.scaler(),
        ema=ema,
        mixer=batch_mixer(cfg.mixup, cfg.cutmix, len(splits.class_names), cfg.seed),
        train_batches=train_batches,
        eval_batches=eval_batches,
        workers=workers,
        objective=method.objective,
        start_fingerprint=fingerprint,
        start_head=method.start_head,
        parameters=methods.parameter_counts(cfg, raw_model),
    )
    if resumed:
        restore(run, resumed)  # before the run folder is touched: a resume that fails changes nothing

    world.barrier()  # every process has checked the run folder before the main one replaces it
    if world.main:
        if not resumed:
            prepare_folder(run_dir, args.overwrite)
        cfg.save(run_dir / "config.toml")  # on resume, records an extended --epochs
        if cfg.train_per_class or cfg.train_fraction < 1:  # which training images the subset holds
            rows = [
                dict(index=i, label=label) for i, label in zip(splits.train.indices, splits.train.labels, strict=True)
            ]
            write_csv(run_dir / "subset.csv", rows, ["index", "label"])
    world.barrier()
    run.log = RunLog(run_dir / "train.log", enabled=world.main)
    log_start(run, command=command, compiled=compiled)
    for line in method.log:
        run.log(line)
    if world.main:  # after a resume, events past the checkpoint (an interrupted epoch's steps) are dropped
        run.board = SummaryWriter(
            str(run_dir), purge_step=resumed_step(resumed, len(train_batches)) + 1 if resumed else None
        )
    if resumed:
        run.log(f"resuming after epoch {resumed['epoch']} of {cfg.epochs}")
    else:
        save_last(run, epoch=0)  # resumable even if the first epoch never ends
    return run


def finish(run: Run, train_result: EpochResult, eval_result: EpochResult) -> dict:
    """The run's summary: best and final accuracy, skipped images, and with --val-split the test accuracy of the best
    epoch."""
    cfg, rows, log, eval_name = run.cfg, run.rows, run.log, run.splits.eval_name
    best = best_row(rows)
    total = sum(r["seconds"] for r in rows)
    summary = {
        "status": "finished",
        "epochs": cfg.epochs,
        "seconds": round(total, 1),
        "selected_on": eval_name,
        "best_epoch": int(best["epoch"]),
        "best_eval_acc": best["eval_acc"],
        "final_eval_acc": rows[-1]["eval_acc"],
        "eval_images": eval_result.images,
        "parameters": run.parameters[0],
        "trainable_parameters": run.parameters[1],
    }
    # the last epoch's count: of the images it drew (a ragged last batch is not drawn), those that could not be read
    skipped = {
        "train": run.train_batches.batch_sampler.images_per_epoch - train_result.images if cfg.epochs else 0,
        eval_name: len(run.splits.eval) - eval_result.images,
    }
    if any(skipped.values()):
        summary["skipped_images"] = skipped
        log(f"skipped unreadable images: {skipped}")
    log(
        f"done in {duration(total)}: best {eval_name} accuracy {best['eval_acc']:.2f}% at epoch {int(best['epoch'])} "
        f"(final epoch {rows[-1]['eval_acc']:.2f}%)"
    )
    if (
        run.splits.test is not None and cfg.final_test and run.world.main
    ):  # the val split chose the epoch; the test split is looked at only now
        best_model = unwrap(run.eval_model)  # uncompiled: the test split is seen once
        best_model = methods.merged(best_model) if methods.is_adapted(best_model) else best_model  # as best.pt is
        best_model.load_state_dict(load_checkpoint(run.run_dir / "best.pt")["model"])
        test_batches = run_eval_loader(run.splits.test, cfg, workers=run.workers, device_type=run.device.type)
        logits, labels = collect_logits(best_model, test_batches, run.device, description="test")
        summary["test_acc_of_best"] = analysis.topk_accuracy(logits, labels, 1) if len(labels) else 0.0
        log(f"test accuracy of the best epoch (chosen on val): {summary['test_acc_of_best']:.2f}%")
        if len(labels):  # how far its probabilities are from their accuracy, before a temperature (eval.py fits one)
            summary["test_ece_of_best"] = calibration.scores(logits, labels)["ece"]
            log(f"expected calibration error on the test split: {summary['test_ece_of_best']:.1f} %")
    adapter = run.run_dir / ADAPTER
    if adapter.is_file():  # what a LoRA run trained, alone: the adapters and the head
        megabytes = {path.name: path.stat().st_size / 2**20 for path in (adapter, run.run_dir / "best.pt")}
        summary["adapter_megabytes"] = round(megabytes[ADAPTER], 3)
        log(f"{ADAPTER}: {megabytes[ADAPTER]:.2f} MB, beside best.pt's {megabytes['best.pt']:.2f} MB")
    log(f"run folder: {run.run_dir} (best.pt, last.pt, metrics.csv, curves.png)")
    return summary


def pretrain_on_demo_source(cfg: Config) -> None:
    """Make the demo-pretrained weights of `cfg.arch`, once: train it from scratch with configs/demo_source.toml on
    the source task (on the fine-tune's device, cache and workers), then keep its final weights as a plain state dict
    in torchvision's form, with their own head. An interrupted pretraining goes on where it stopped next time."""
    if cfg.arch == demo.DEMO_CLIP_ARCH:  # a CLIP, made by a recipe of its own: contrastive, on captioned drawings
        return demo_clip.ensure_made()
    arch, weights_file = cfg.arch, demo_pretrained_path(cfg.arch)
    if weights_file.is_file():
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one process must make them, not every one of torchrun's
        raise UserError(
            f"the demo-pretrained weights for {arch} are not made yet; run uv run train.py --config configs/demo.toml "
            f"--arch {arch} once without torchrun (it makes them in {weights_file.parent}), then torchrun again"
        )
    run_dir = demo.demo_pretraining_run(arch)
    with made_once(weights_file, "the demo-pretrained weights") as to_make:
        if not to_make:
            return
        speed = config_flags({"device": cfg.device, "cache": cfg.cache, "workers": cfg.workers})
        again = "run the interrupted command again: the pretraining goes on where it stopped, then the fine-tune starts"
        if run_status(read_summary(run_dir)) in ("interrupted", "crashed") and (run_dir / "last.pt").is_file():
            print(f"going on with the interrupted pretraining of {arch} on the demo's source task in {run_dir}")
            main(["--resume", str(run_dir), *speed], resume_advice=again)
        else:
            print(f"pretraining {arch} on the demo's source task, once; the weights go to {weights_file}")
            recipe = ["--config", str(demo.SOURCE_RECIPE), "--arch", arch, "--run-dir", str(run_dir), "--overwrite"]
            main([*recipe, *speed], resume_advice=again)
        save_weights_file(run_dir, weights_file)
    print(f"pretrained: {weights_file}; now the fine-tune")


def save_weights_file(run_dir: Path, weights_file: Path) -> None:
    """The final weights of the run in `run_dir` (last.pt's model) as a bare state dict, written atomically."""
    save_checkpoint(weights_file, load_checkpoint(run_dir / "last.pt")["model"])


if __name__ == "__main__":
    run_cli(main)
