"""The per-batch pieces of training and evaluation: the device, one training step, the running totals of an
epoch, predictions and evaluation. train.py's loop calls them; nothing here calls back into it."""

import sys
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cars.errors import UserError
from cars.transforms import normalize

# CPUs autocast to bfloat16: float32's range, so no loss scaling; GPUs to float16, with loss scaling
AMP_DTYPES = {"cuda": torch.float16, "mps": torch.float16, "cpu": torch.bfloat16}


@dataclass
class Device:
    """Where batches run, and how: memory format and mixed precision."""

    type: str  # cuda, mps or cpu
    channels_last: bool = False
    amp: bool = False
    # progress bars on a terminal only: piped into a log they are a redraw a line; one process of a torchrun job
    show_progress: bool = field(default_factory=lambda: sys.stderr.isatty())

    @classmethod
    def for_run(cls, cfg, device_type: str, show_progress: bool = True) -> "Device":
        return cls(
            device_type,
            channels_last=cfg.speedup_on("channels_last", device_type),
            amp=cfg.speedup_on("amp", device_type),
            show_progress=show_progress and sys.stderr.isatty(),
        )

    @property
    def amp_dtype(self) -> torch.dtype:
        return AMP_DTYPES[self.type]

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model onto the device, in the memory format its input will have."""
        return model.to(self.type, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)

    def autocast(self):
        return torch.autocast(self.type, dtype=self.amp_dtype) if self.amp else nullcontext()

    def scaler(self) -> torch.amp.GradScaler:
        """Loss scaling keeps float16 gradients from underflowing; bfloat16 and float32 need none."""
        return torch.amp.GradScaler(self.type, enabled=self.amp and self.amp_dtype == torch.float16)

    def describe(self, compiled: bool) -> str:
        amp = f"on ({str(self.amp_dtype).removeprefix('torch.')} autocast)" if self.amp else "off"
        return (
            f"{self.type}: mixed precision {amp}, torch.compile {'on' if compiled else 'off'}, "
            f"channels-last {'on' if self.channels_last else 'off'}"
        )

    def batches(self, loader, *, description: str = ""):
        """One pass over a loader: its readable batches (a batch of only unreadable images is None), put on the device,
        with a progress bar on a terminal."""
        bar = tqdm(loader, desc=description, leave=False, dynamic_ncols=True, disable=not self.show_progress)
        return (self.put(*batch) for batch in bar if batch is not None)

    def put(self, images, labels):
        """A batch of uint8 pixels onto the device, then made the model's input there: converting
        and normalising on the GPU is cheaper than in the loader, and bytes cross the bus faster.
        (A float batch is taken as already normalised.)"""
        images = images.to(self.type, non_blocking=True)
        if images.dtype == torch.uint8:
            images = normalize(images)
        return self.formatted(images), labels.to(self.type, non_blocking=True)

    def formatted(self, images: torch.Tensor) -> torch.Tensor:
        """Every batch in one memory format (a compiled model guards on strides: another layout would recompile it)."""
        return images.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)


class Diverged(UserError):
    """The training loss stopped being a finite number: the lr is too high for this model and batch."""


@dataclass
class Progress:
    """Where a training epoch stands: saved with a mid-epoch checkpoint, restored on resume."""

    lr: float  # at the start of the epoch, for its metrics row
    steps: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    term_sums: dict[str, float] = field(default_factory=dict)  # the method's extra loss terms, summed like the loss

    def result(self) -> "EpochResult":
        seen = max(self.seen, 1)
        terms = {name: total / seen for name, total in self.term_sums.items()}
        return EpochResult(self.loss_sum / seen, 100 * self.correct / seen, self.seen, terms)


@dataclass
class EpochResult:
    loss: float
    accuracy: float  # percent
    images: int  # how many were seen (fewer than the split when unreadable ones were skipped)
    terms: dict[str, float] = field(default_factory=dict)  # the method's extra loss terms, per image


def average_over_processes(result: EpochResult, world) -> EpochResult:
    """One process's training loss and accuracy -> the whole job's, weighted by images seen."""
    parts = world.all({"loss": result.loss, "accuracy": result.accuracy, "images": result.images, **result.terms})
    images = sum(p["images"] for p in parts)

    def mean(key: str) -> float:
        return sum(p[key] * p["images"] for p in parts) / max(images, 1)

    return EpochResult(mean("loss"), mean("accuracy"), images, {name: mean(name) for name in result.terms})


def train_step(model, batch, optimizer, scaler, device: Device, *, objective, mixer=None, step: int = 0):
    """One optimisation step on one batch (the epoch's `step`-th), minimising `objective` (cars/finetune.py: the
    cross-entropy and the method's terms, built once in setup). Returns the cross-entropy, the logits, the true labels
    (MixUp and CutMix blend the targets the loss sees, not these) and the method's terms."""
    images, labels = device.put(*batch)
    targets = labels
    if mixer is not None:
        images, targets = mixer(images, labels, step)
    with device.autocast():
        loss, cross_entropy, logits, terms = objective(model, images, targets)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return cross_entropy, logits, labels, terms


class RunningTotals:
    """An epoch's loss sum, correct count and first non-finite loss, kept on the device: adding a step
    to them makes the host wait for nothing. `settle` reads them (one wait) into a Progress."""

    def __init__(self, progress: Progress, device_type: str, term_names: list[str] = ()):
        # float32: Apple's MPS has no float64. The correct count is an int64, so the accuracy stays exact
        self.loss_sum = torch.tensor(progress.loss_sum, dtype=torch.float32, device=device_type)
        self.term_sums = {
            name: torch.tensor(progress.term_sums.get(name, 0.0), dtype=torch.float32, device=device_type)
            for name in term_names
        }
        self.correct = torch.tensor(progress.correct, dtype=torch.int64, device=device_type)
        self.bad_step = torch.tensor(-1, device=device_type)  # the first step whose loss was not finite
        self.bad_loss = torch.tensor(0.0, device=device_type)

    def add(self, step: int, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, terms: dict) -> None:
        loss = loss.detach()
        self.loss_sum += loss.float() * len(labels)
        for name, value in terms.items():
            self.term_sums[name] += value.detach().float() * len(labels)
        self.correct += (logits.detach().argmax(1) == labels).sum()
        # the whole loss that was minimised: a method's term can stop being finite while the cross-entropy still is
        whole = loss.float() + sum(value.detach().float() for value in terms.values())
        first = (self.bad_step < 0) & ~torch.isfinite(whole)
        self.bad_step = torch.where(first, step, self.bad_step)
        self.bad_loss = torch.where(first, whole, self.bad_loss)

    def settle(self, progress: Progress, lr: float) -> None:
        """Into `progress`; a loss that stopped being finite raises Diverged (nothing after it could be trusted)."""
        # one read for all four; float32 holds every whole number up to 2**24 exactly, so the step and the count
        # (an epoch's images in one process) come back exact
        bad_step, loss_sum, correct, bad_loss, *term_sums = torch.stack(
            [self.bad_step.float(), self.loss_sum, self.correct.float(), self.bad_loss, *self.term_sums.values()]
        ).tolist()
        if bad_step >= 0:
            raise Diverged(
                f"the training loss became {bad_loss} at step {int(bad_step) + 1} "
                f"(lr {lr:.3g}); lower --lr, check --lr-scaling, or try lr_find.py"
            )
        progress.loss_sum, progress.correct = loss_sum, int(correct)
        progress.term_sums = dict(zip(self.term_sums, term_sums, strict=True))


@torch.no_grad()
def collect_logits(model, loader, device: Device, *, description: str = "eval", pad_to: int | None = None):
    """Logits and labels for every readable image of the loader, in order, on the CPU. With
    `pad_to`, a smaller (last) batch is padded to that size and the padding's logits dropped, so a
    compiled model sees one shape only and never recompiles."""
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in device.batches(loader, description=description):
        count = len(images)
        if pad_to and count < pad_to:
            images = device.formatted(torch.cat([images, images.new_zeros((pad_to - count, *images.shape[1:]))]))
        with device.autocast():
            logits = model(images)[:count]
        all_logits.append(logits.float().cpu())
        all_labels.append(labels.cpu())
    if not all_logits:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(all_logits), torch.cat(all_labels)


def evaluate(
    model, loader, device: Device, *, description: str = "eval", world=None, pad_to: int | None = None
) -> EpochResult:
    """Loss and accuracy over the loader; under torchrun, over every process's share together."""
    logits, labels = collect_logits(model, loader, device, description=description, pad_to=pad_to)
    if world is not None:
        logits, labels = world.gather(logits, labels)
    if len(labels) == 0:
        return EpochResult(float("nan"), 0.0, 0)
    loss = F.cross_entropy(logits, labels).item()
    # counted, not a float32 mean: 270 of 300 is 90.0
    accuracy = 100 * (logits.argmax(1) == labels).sum().item() / len(labels)
    return EpochResult(loss, accuracy, len(labels))
