"""Every knob of a run in one dataclass.

Precedence: the defaults below (= run 7 of the original experiment log), then a TOML preset (`--config`),
then command-line flags. The resolved config is saved in the run folder as config.toml.
"""

import argparse
import dataclasses
import difflib
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from cars.errors import UserError, flag
from cars.files import atomic_write

# amp, compile, channels_last: auto is on with CUDA, where they pay, and off elsewhere (on a CPU compiling
# costs a minute or more up front, and bfloat16 is slow without bfloat16 units); on and off apply on every
# device. A bare --amp means on.
SWITCH = ["auto", "on", "off"]
DEVICES = ["auto", "cuda", "mps", "cpu"]  # auto: CUDA, then MPS, then CPU


# train.py --help's argument groups, in this order: each knob below names its group
GROUPS = {
    "data": "what to train on",
    "model": "the network and where it starts",
    "optimisation": "the optimizer, the loss, what trains",
    "method": "the fine-tuning method: what trains, the lr per block, extra loss terms (docs/explanation/methods.md)",
    "schedule": "the lr over time, and how long",
    "augmentation": "the training crops, and what else is done to them",
    "speed": "the device and how fast it runs",
    "output": "the run folder, its checkpoints and logs",
}


def knob(group: str, default, help: str, choices=None, *, metavar=None, shown_default=None):
    """A Config field and its train.py flag. `shown_default` is what --help prints for a default that is not a value
    (an empty string meaning "chosen at run time")."""
    assert group in GROUPS
    return field(
        default=default,
        metadata=dict(group=group, help=help, choices=choices, metavar=metavar, shown_default=shown_default),
    )


@dataclass
class Config:
    data: str = knob(
        "data",
        "tanganke/stanford_cars",
        "hub id, local folder (save_to_disk, parquet, ImageFolder, devkit), 'demo', 'demo-source', or the demo under "
        "a shift: 'demo-input-shift', 'demo-output-shift'",
        metavar="SOURCE",
    )
    val_split: float = knob(
        "data",
        0.0,
        "hold out this stratified fraction of train to choose the best epoch (0: use the test split, as the original "
        "experiments did)",
        metavar="FRACTION",
    )
    split_seed: int = knob(
        "data",
        0,
        "seed of the --val-split draw, apart from --seed: runs that differ only in --seed are chosen on the same "
        "images",
    )
    train_per_class: int = knob(
        "data",
        0,
        "train on exactly K images of every class, drawn after any --val-split (0: all); nested: the K images are "
        "inside the 2K of the same --subset-seed",
        metavar="K",
    )
    train_fraction: float = knob(
        "data",
        1.0,
        "train on this fraction of every class's images (at least one), drawn like --train-per-class (1: all)",
        metavar="F",
    )
    subset_seed: int = knob(
        "data", 0, "seed of the --train-per-class or --train-fraction draw, apart from --seed", metavar="S"
    )
    skip_bad_images: bool = knob(
        "data", False, "skip unreadable images (and count them) instead of stopping at the first one"
    )
    arch: str = knob(
        "model",
        "resnet50",
        "any torchvision classification model, e.g. resnet18/34/50/101, efficientnet_b0..b4; timm:NAME, any timm "
        "model with its weights tag (timm:convnext_tiny.fb_in22k); open_clip:MODEL/PRETRAINED, a CLIP's image tower "
        "(open_clip:ViT-B-16/openai; the demo's own small CLIP: open_clip:demo-clip)",
        metavar="ARCH",
    )
    weights: str = knob(
        "model",
        "DEFAULT",
        "torchvision weights name (IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT; for a timm or open_clip start DEFAULT is "
        "the weights its name gives), 'demo-pretrained' (pretrained offline on the demo's source task), 'none', or a "
        "state-dict file",
        metavar="WEIGHTS",
    )
    dropout: float = knob("model", 0.0, "dropout probability before the new classification head", metavar="P")
    head: str = knob(
        "model",
        "new",
        "the head the run starts with: new (random), zero-shot (a CLIP start's text embeddings of the class names), "
        "prototypes (the class means of the start's features on the training images); with --epochs 0 it is the "
        "model, no image trained on",
        ["new", "zero-shot", "prototypes"],
    )
    optimizer: str = knob("optimisation", "sgd", "optimizer", ["sgd", "adamw"])
    lr: float = knob("optimisation", 0.1, "learning rate (of the head when --backbone-lr-mult is not 1)", metavar="LR")
    batch_size: int = knob(
        "optimisation",
        128,
        "images per optimisation step, over all processes (torchrun splits it, so the lr needs no change)",
    )
    lr_scaling: str = knob(
        "optimisation",
        "none",
        "linear: lr x batch-size/128, lesson 4 of the original write-up (batch and lr go together)",
        ["none", "linear"],
    )
    momentum: float = knob("optimisation", 0.9, "SGD momentum", metavar="M")
    weight_decay: float = knob("optimisation", 1e-4, "weight decay", metavar="WD")
    norm_weight_decay: float = knob(
        "optimisation",
        -1.0,
        "weight decay of normalisation layers' weights and of every bias, as torchvision's --norm-weight-decay (-1: "
        "the same as --weight-decay, as in the original runs)",
        metavar="WD",
    )
    label_smoothing: float = knob("optimisation", 0.0, "label smoothing of the training loss", metavar="EPS")
    freeze_epochs: int = knob("optimisation", 0, "two-stage training: only the new head trains for the first N epochs")
    backbone_lr_mult: float = knob("optimisation", 1.0, "differential lr: backbone lr = lr x this", metavar="MULT")
    ema: bool = knob("optimisation", False, "keep an exponential moving average of the weights; evaluate and save it")
    ema_half_life: float = knob(
        "optimisation",
        1.0,
        "EMA half-life in epochs: the weights of this many epochs ago count half as much as the newest",
        metavar="EPOCHS",
    )
    ema_decay: float = knob(
        "optimisation",
        0.0,
        "EMA decay per optimisation step, instead of --ema-half-life (0: from the half-life)",
        metavar="DECAY",
    )
    probe_init: bool = knob(
        "method",
        False,
        "LP-FT (Kumar et al. 2022): first fit the new head as a logistic-regression probe on the start's frozen "
        "features of the training images, then fine-tune everything from there",
    )
    layer_decay: float = knob(
        "method",
        1.0,
        "layer-wise lr decay: a block k blocks below the head (the stem one block, each residual block one) trains at "
        "lr x D^k (1: off)",
        metavar="D",
    )
    train_blocks: str = knob(
        "method",
        "",
        "surgical fine-tuning (Lee et al. 2023): only these blocks or stages train, plus the head, e.g. layer4, "
        "'stem,layer1' or layer4.2 (head: the head alone, a linear probe); the rest stay frozen with their BatchNorm "
        "statistics",
        metavar="NAMES",
        shown_default="all",
    )
    train_params: str = knob(
        "method",
        "all",
        "norm: only the normalisation layers' scales and shifts train (BN-only, Frankle et al. 2021); bias: only the "
        "biases (BitFit, Ben Zaken et al. 2022); the head always trains",
        ["all", "norm", "bias"],
    )
    lora: int = knob(
        "method",
        0,
        "LoRA (Hu et al. 2021, through peft): the rank R of low-rank updates W + (alpha/R) B A of the target layers; "
        "the rest of the backbone stays frozen, its BatchNorm statistics too (0: off)",
        metavar="R",
    )
    lora_alpha: float = knob(
        "method", 0.0, "LoRA's alpha: the updates are scaled by alpha/R (0: alpha = R, a scale of 1)", metavar="A"
    )
    lora_targets: str = knob(
        "method",
        "",
        "the layers LoRA adapts: stages or blocks (as --train-blocks names them; every linear layer and ungrouped "
        "convolution inside) or layers by name",
        metavar="NAMES",
        shown_default="the last two stages",
    )
    l2sp: float = knob(
        "method",
        0.0,
        "L2-SP (Li et al. 2018): add alpha/2 x ||w - w0||^2 of the backbone to its start; the weight decay then "
        "applies to the head only (0: off)",
        metavar="ALPHA",
    )
    delta: float = knob(
        "method",
        0.0,
        "DELTA (Li et al. 2019): add alpha x the distance of the stages' feature maps to the start's, weighted by "
        "channel attention (0: off)",
        metavar="ALPHA",
    )
    bss: float = knob(
        "method",
        0.0,
        "BSS (Chen et al. 2019): add eta x the k smallest squared singular values of the batch's features (0: off)",
        metavar="ETA",
    )
    bss_k: int = knob("method", 1, "BSS: how many of the smallest singular values are shrunk", metavar="K")
    co_tuning: float = knob(
        "method",
        0.0,
        "Co-Tuning (You et al. 2020): also train the start's own source head on p(source class | target class), "
        "weighted by lambda (0: off); needs a start with its source head (ImageNet, demo-pretrained)",
        metavar="LAMBDA",
    )
    epochs: int = knob("schedule", 90, "number of epochs")
    scheduler: str = knob("schedule", "step", "lr schedule, updated every step", ["step", "cosine"])
    warmup_epochs: int = knob("schedule", 0, "linear lr warmup over the first N epochs, before the schedule")
    step_size: int = knob("schedule", 30, "step schedule: epochs between lr drops")
    gamma: float = knob("schedule", 0.1, "step schedule: factor of each lr drop", metavar="FACTOR")
    early_stop: int = knob(
        "schedule", 0, "stop after N evaluations without a better eval accuracy (0: off); the run stays resumable"
    )
    resolution: int = knob(
        "augmentation",
        224,
        "training crop size in px; eval resizes to resolution*256/224 and centre-crops; a timm or open_clip start "
        "takes its own size when neither the preset nor this flag sets one",
    )
    interpolation: str = knob(
        "augmentation",
        "bilinear",
        "the filter every resize uses (training crops and eval), antialiased as PIL's; a timm or open_clip start takes "
        "the one its weights were trained with when neither the preset nor this flag sets one",
        ["bilinear", "bicubic"],
    )
    train_crop: str = knob(
        "augmentation",
        "random-resized",
        "random-resized: RandomResizedCrop; resize-randomcrop: Resize(resolution*256/224) + RandomCrop",
        ["random-resized", "resize-randomcrop"],
    )
    crop_scale: float = knob(
        "augmentation", 0.08, "smallest RandomResizedCrop area, as a fraction of the image", metavar="FRACTION"
    )
    augment: str = knob(
        "augmentation",
        "basic",
        "basic: crop + flip; heavy: adds rotation, colour jitter, random erasing; trivialaugment: adds "
        "TrivialAugmentWide",
        ["basic", "heavy", "trivialaugment"],
    )
    color_jitter: float = knob(
        "augmentation",
        0.0,
        "extra colour jitter strength (brightness, contrast, saturation), 0: off",
        metavar="STRENGTH",
    )
    random_erasing: float = knob(
        "augmentation", 0.0, "probability of RandomErasing on each training image", metavar="P"
    )
    mixup: float = knob(
        "augmentation", 0.0, "MixUp alpha, 0: off (with --cutmix too, each batch gets one of the two)", metavar="ALPHA"
    )
    cutmix: float = knob("augmentation", 0.0, "CutMix alpha, 0: off", metavar="ALPHA")
    device: str = knob("speed", "auto", "where to train (auto: CUDA, then MPS, then CPU)", DEVICES)
    amp: str = knob(
        "speed",
        "auto",
        "mixed precision: float16 autocast and loss scaling on CUDA and MPS, bfloat16 autocast on a CPU",
        SWITCH,
    )
    compile: str = knob("speed", "auto", "torch.compile the model (inductor; on a CPU it needs a C++ compiler)", SWITCH)
    channels_last: str = knob("speed", "auto", "channels-last memory format of the model and its input", SWITCH)
    sync_bn: bool = knob(
        "speed", False, "with torchrun on GPUs: BatchNorm statistics over the global batch, not each GPU's share"
    )
    workers: int = knob(
        "speed",
        -1,
        "processes that decode images: the cache's one-time build, or every epoch with --cache off (-1: one per core, "
        "at most 8)",
    )
    cache: str = knob(
        "speed",
        "auto",
        "preprocessing cache: every image decoded once and kept as pixels. auto ($CARS_CACHE/pixels, or "
        "~/.cache/transfer-stanford-cars/pixels), a folder, or off (decode every image every epoch)",
        metavar="auto|DIR|off",
    )
    cache_side: int = knob(
        "speed",
        0,
        "0: the cache keeps training images at native size (the original pipeline's pixels); N: a smaller, lossy "
        "copy, longer side at most N px",
    )
    run_dir: str = knob("output", "", "run folder", metavar="DIR", shown_default="runs/<preset name>")
    seed: int = knob("output", 0, "random seed of the run: initialisation, batch order, augmentation")
    eval_every: int = knob("output", 1, "evaluate every N epochs (and always after the last one)")
    final_test: bool = knob(
        "output",
        True,
        "with --val-split: evaluate the best epoch on the test split once training ends (sweep trials do not: no "
        "trial may see the test split)",
    )
    save_every_steps: int = knob(
        "output", 0, "also write last.pt every N steps within an epoch, for long epochs (0: at epoch ends only)"
    )
    log_every_steps: int = knob(
        "output", 50, "TensorBoard: also the training loss and lr every N steps (0: once per epoch only)"
    )
    sweep: str = knob(
        "output",
        "",
        "the sweep folder this run is a trial of (sweep.py sets it; recorded, not used)",
        metavar="DIR",
        shown_default="none",
    )
    trial: int = knob("output", -1, "its trial number in that sweep (sweep.py sets it; recorded, not used)")

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            if f.type is float and not math.isfinite(getattr(self, f.name)):
                raise UserError(f"--{flag(f.name)} must be a finite number, got {getattr(self, f.name)}")
        for name in ("seed", "split_seed", "subset_seed"):
            if not 0 <= getattr(self, name) < 2**32:
                raise UserError(f"--{flag(name)} must be in 0..{2**32 - 1} (NumPy's range), got {getattr(self, name)}")
        if self.batch_size == 1:
            raise UserError("--batch-size must be at least 2: BatchNorm cannot normalise over one image")
        if self.workers > 64:
            raise UserError(
                f"--workers {self.workers} is more than 64 processes, each holding a copy of the data pipeline; "
                f"use -1 (one per core) or a number up to 64"
            )
        if not self.cache.strip():
            raise UserError("--cache is empty; give auto, a folder, or off")
        positive = ["batch_size", "resolution", "lr", "step_size", "eval_every", "ema_half_life"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"--{flag(name)} must be positive, got {getattr(self, name)}")
        non_negative = [
            "momentum",
            "weight_decay",
            "gamma",
            "epochs",
            "freeze_epochs",
            "backbone_lr_mult",
            "color_jitter",
            "dropout",
            "mixup",
            "cutmix",
            "warmup_epochs",
            "save_every_steps",
            "cache_side",
            "early_stop",
            "log_every_steps",
            "train_per_class",
            "lora_alpha",
            "l2sp",
            "delta",
            "bss",
            "co_tuning",
        ]
        for name in non_negative:
            if getattr(self, name) < 0:
                raise UserError(f"--{flag(name)} must not be negative, got {getattr(self, name)}")
        if self.norm_weight_decay < 0 and self.norm_weight_decay != -1:
            raise UserError(
                "--norm-weight-decay must be 0 or more, or -1 for the same as --weight-decay; got "
                f"{self.norm_weight_decay}"
            )
        if not 0 <= self.val_split < 1:
            raise UserError(f"--val-split must be in [0, 1), got {self.val_split}")
        for name in ("dropout", "label_smoothing", "random_erasing", "ema_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"--{flag(name)} must be in [0, 1), got {getattr(self, name)}")
        if self.epochs == 0 and self.head == "new":
            raise UserError(
                "--epochs 0 trains nothing, and a new head is random; give it a head that needs no training, "
                "--head zero-shot or --head prototypes, or train for some epochs"
            )
        # with --epochs 0 nothing trains: a preset's warmup and frozen epochs have nothing to act on
        if self.epochs and self.warmup_epochs >= self.epochs:
            raise UserError(f"--warmup-epochs ({self.warmup_epochs}) must be smaller than --epochs ({self.epochs})")
        if self.epochs and self.freeze_epochs >= self.epochs:
            raise UserError(
                f"--freeze-epochs ({self.freeze_epochs}) must be smaller than --epochs ({self.epochs}), or nothing but "
                "the head is ever trained"
            )
        if not 0 < self.train_fraction <= 1:
            raise UserError(f"--train-fraction must be in (0, 1], got {self.train_fraction}")
        if self.train_per_class and self.train_fraction < 1:
            raise UserError("--train-per-class and --train-fraction both choose the training images; use one of them")
        self.check_method()
        if not 0 < self.crop_scale <= 1:
            raise UserError(f"--crop-scale must be in (0, 1], got {self.crop_scale}")
        if 0 < self.cache_side < self.resolution:
            raise UserError(
                f"--cache-side ({self.cache_side}) must be at least --resolution ({self.resolution}), or 0 for the "
                "default"
            )
        if self.resolution < 32:
            raise UserError(f"--resolution must be at least 32, got {self.resolution}")
        defaults = Config()
        for name, applies, when in APPLIES_ONLY:  # a knob that would be silently ignored is refused instead
            if getattr(self, name) != getattr(defaults, name) and not applies(self):
                raise UserError(
                    f"--{flag(name)} {getattr(self, name)} does nothing without {when}; drop it or add {when}"
                )
        for f in dataclasses.fields(self):
            choices = f.metadata["choices"]
            if choices and getattr(self, f.name) not in choices:
                raise UserError(f"--{flag(f.name)} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}")
        return self

    def check_method(self) -> None:
        """The fine-tuning method's knobs, and the ones that cannot go together."""
        if not 0 < self.layer_decay <= 1:
            raise UserError(f"--layer-decay must be in (0, 1] (1: off), got {self.layer_decay}")
        if self.bss_k < 1:
            raise UserError(f"--bss-k must be at least 1, got {self.bss_k}")
        for name in ("train_blocks", "lora_targets"):
            if getattr(self, name).strip() and not re.split(r"[,\s]+", getattr(self, name).strip())[0]:
                raise UserError(
                    f"--{flag(name)} {getattr(self, name)!r} names no block; name blocks or stages, e.g. layer4 or "
                    "'stem,layer1', or leave it out"
                )
        if self.lora < 0:
            raise UserError(f"--lora must be a rank of 1 or more (0: off), got {self.lora}")
        if self.bss and self.bss_k >= self.batch_size:
            raise UserError(
                f"--bss-k {self.bss_k} would shrink every singular value of a batch of {self.batch_size} images (it "
                f"has at most {self.batch_size}), not the smallest few; choose --bss-k below {self.batch_size} (the "
                "paper's is 1)"
            )
        from cars import methods  # the declarations' own rules (it imports torch: after the command line is read)

        methods.check(self)

    @property
    def held_out(self) -> tuple:
        """What says which images choose the epoch: two configs with the same held_out choose on the same images (the
        same validation split, or the same test split)."""
        return (self.data, self.val_split, self.split_seed if self.val_split else None)

    def speedup_on(self, name: str, device_type: str) -> bool:
        """Whether the switch `name` (amp, compile, channels_last) is on for this device."""
        return getattr(self, name) == "on" or (getattr(self, name) == "auto" and device_type == "cuda")

    def save(self, path: Path) -> None:
        atomic_write(path, lambda file: file.write(tomli_w.dumps(dataclasses.asdict(self)).encode()))


APPLIES_ONLY = [  # (knob, whether it has an effect in a config, what it needs)
    ("crop_scale", lambda c: c.train_crop == "random-resized", "--train-crop random-resized"),
    ("step_size", lambda c: c.scheduler == "step", "--scheduler step"),
    ("gamma", lambda c: c.scheduler == "step", "--scheduler step"),
    ("momentum", lambda c: c.optimizer == "sgd", "--optimizer sgd"),
    ("ema_half_life", lambda c: c.ema and not c.ema_decay, "--ema (and no --ema-decay)"),
    ("split_seed", lambda c: c.val_split > 0, "--val-split"),
    ("bss_k", lambda c: c.bss > 0, "--bss"),
    ("lora_alpha", lambda c: c.lora > 0, "--lora"),
    ("lora_targets", lambda c: c.lora > 0, "--lora"),
    ("subset_seed", lambda c: c.train_per_class or c.train_fraction < 1, "--train-per-class or --train-fraction"),
    ("final_test", lambda c: c.val_split > 0, "--val-split"),
]


def config_flags(values: dict) -> list[str]:
    """The train.py flags that set these knobs: add_config_flags read backwards."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    flags = []
    for name, value in values.items():
        if fields[name].type is bool:
            flags.append(f"--{flag(name)}" if value else f"--no-{flag(name)}")
        else:
            flags += [f"--{flag(name)}", str(value)]  # str of a float is its shortest exact form
    return flags


def from_dict(values: dict, source: str) -> dict:
    """Check keys and types of a preset against Config; return the checked values."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    checked = {}
    for key, value in values.items():
        if key not in fields:
            raise UserError(
                f"{source}: unknown key {key!r}; known keys are the flags of train.py --help with '_' for '-'"
            )
        expected = fields[key].type
        if fields[key].metadata["choices"] is SWITCH and isinstance(value, bool):
            value = "auto" if value else "off"  # written before on/auto/off: true meant "with CUDA", which is auto
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not expected:
            raise UserError(f"{source}: {key} must be {expected.__name__}, got {value!r}")
        checked[key] = value
    return checked


def nearest_preset(path: str) -> str | None:
    """The shipped preset closest to a mistyped one (configs/demo.tml, demo.toml, run07.toml), in the configs folder
    the path names (configs/sweeps/...) or else in configs/."""
    root, typed = Path(__file__).resolve().parents[1], Path(path)
    folder = root / typed.parent
    if not (typed.parts[:1] == ("configs",) and folder.is_dir()):
        folder = root / "configs"
    presets = {p.stem: p for p in sorted(folder.glob("*.toml"))}
    stem = typed.stem
    guess = next((name for name in presets if stem and name.startswith(stem)), None)
    guess = guess or next(iter(difflib.get_close_matches(stem, presets, n=1, cutoff=0.6)), None)
    if guess is None:
        return None
    return str(presets[guess].relative_to(root)) if Path.cwd() == root else str(presets[guess])


def load_toml(path: str) -> dict:
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        guess = nearest_preset(path)
        raise UserError(f"config file {path} does not exist" + (f"; did you mean {guess}?" if guess else "")) from None
    except OSError as error:
        raise UserError(
            f"cannot read config file {path}: {error.strerror}; give a TOML file such as configs/demo.toml"
        ) from None
    if data.startswith(b"\xef\xbb\xbf"):
        raise UserError(
            f"config file {path} starts with a byte-order mark (some Windows editors add one); save it as UTF-8 "
            "without BOM"
        )
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(
            f"config file {path} is not text (not UTF-8); give a TOML file such as configs/demo.toml"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"config file {path} is not valid TOML: {error}") from None


def add_config_flags(parser: argparse.ArgumentParser, only=None) -> dict:
    """One flag per Config field (or per field in `only`), in GROUPS' argument groups; unset flags stay out of the
    namespace so presets show through. Returns the groups by name, for a tool to add its own flags to."""
    defaults = Config()
    groups = {name: parser.add_argument_group(f"{name}: {what}") for name, what in GROUPS.items()}
    for f in dataclasses.fields(Config):
        if only is not None and f.name not in only:
            continue
        meta, default = f.metadata, getattr(defaults, f.name)
        group = groups[meta["group"]]
        shown = meta["shown_default"] or ({True: "on", False: "off"}[default] if f.type is bool else default)
        options = dict(default=argparse.SUPPRESS, help=f"{meta['help']} (default: {shown})")
        if f.type is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif meta["choices"] is SWITCH:  # --amp (on), --amp auto|on|off, --no-amp (off)
            options.update(
                nargs="?",
                const="on",
                choices=SWITCH,
                help=f"{meta['help']}; --{flag(f.name)} alone: on (default: auto, on with CUDA only)",
            )
        else:
            options.update(type=f.type, choices=meta["choices"])
            options["metavar"] = meta["metavar"] or ("N" if f.type is int else None)
        group.add_argument(f"--{flag(f.name)}", **options)
        if meta["choices"] is SWITCH:
            group.add_argument(
                f"--no-{flag(f.name)}",
                dest=f.name,
                action="store_const",
                const="off",
                default=argparse.SUPPRESS,
                help=f"the same as --{flag(f.name)} off",
            )
    return groups  # argparse leaves a group without flags out of --help


def resolve(args: argparse.Namespace) -> tuple[Config, str]:
    """Defaults, then the preset, then flags. Returns the config and the preset's name."""
    values, name = {}, "default"
    if getattr(args, "config", None):
        values = from_dict(load_toml(args.config), args.config)
        name = Path(args.config).stem
    names = {f.name for f in dataclasses.fields(Config)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    from cars import starts

    arch = values.get("arch", Config.arch)
    if starts.is_library(arch):  # what neither the preset nor a flag sets: the start's own size and filter
        values = {**starts.own_preprocessing(arch), **values}
    return Config(**values).validate(), name


def from_saved(values) -> Config | None:
    """The Config a checkpoint saved (its "config"), or None when it holds none of this version."""
    if not isinstance(values, dict) or not values:
        return None
    try:
        return Config(**from_dict(values, "the checkpoint's config"))
    except (UserError, TypeError):
        return None


def load_saved(path: Path) -> Config:
    """The config a run folder was trained with. A run saved before --split-seed existed drew its validation split
    with --seed: it keeps that split."""
    values = from_dict(load_toml(str(path)), str(path))
    if values.get("val_split") and "split_seed" not in values:
        values["split_seed"] = values.get("seed", 0)
    return Config(**values)
