"""Data-efficiency curves: a curves file, its grid of cells (method x shots x seed), and what the finished cells say.
curves.py runs the cells with train.py's recipe, on an Optuna study as sweep.py does.

A curves file names the methods (each a preset, optionally with knobs over it), the shots (training images per class;
"all" for every one) and the seeds:

    shots = [1, 2, 4, 8, 16, "all"]
    seeds = [0, 1, 2]                 # each cell's --seed and --subset-seed
    [fixed]                           # knobs every cell sets
    val_split = 0.2                   # cells are chosen on a validation split where one exists
    [methods]
    fine-tune = "../demo.toml"
    "linear probe" = { base = "../demo.toml", train_blocks = "head" }
    scratch = "../demo_scratch.toml"  # a method from random weights: the reference of pretraining's advantage

The ladder from no labels to a full fine-tune (configs/curves/ladder_demo.toml) adds two things: shots 0 (no
labelled image: only a method that reads no training image runs there, a zero-shot head with epochs = 0; the others
have no cell result at 0), and a WiSE-FT method, `{ base = ..., wise_ft = 0.5 }`: each cell's fine-tune mixed with
its start at that alpha by interpolate.py, and the mixture scored.
"""

import csv
import dataclasses
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from cars.config import Config, from_dict, load_toml
from cars.errors import UserError
from cars.report import read_metrics
from cars.runs import best_row, evaluated, read_summary

# set by curves.py for every cell
PER_CELL = {"train_per_class", "train_fraction", "subset_seed", "seed", "run_dir", "sweep", "trial", "overwrite"}
ADVANTAGE = 5.0  # points: where pretraining's advantage is said to fall away
WISE_FT_FOLDER = "wise-ft"  # a WiSE-FT cell's interpolate.py output, inside its run folder


@dataclass
class Method:
    name: str
    base: Path  # the preset
    knobs: dict  # over the preset: the curves file's [fixed], then the method's own
    wise_ft: float | None = None  # WiSE-FT: each cell's fine-tune mixed with its start at this alpha, and scored

    @property
    def folder(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


@dataclass
class Curves:
    name: str
    path: Path
    methods: list[Method]
    shots: list  # positive ints, increasing, and maybe "all" last
    seeds: list[int]
    labelled: dict  # shots -> training images in all (for "all": the whole training split)
    classes: int = 0

    def values(self, method: Method, shots, seed: int) -> dict:
        """A cell's config: the method's preset, its knobs, then the cell's shots and seed."""
        preset = from_dict(load_toml(str(method.base)), str(method.base))
        return {**preset, **self.cell_knobs(method, shots, seed)}

    def cell_knobs(self, method: Method, shots, seed: int) -> dict:
        if shots in ("all", 0):  # every training image, or none read: nothing to draw
            return {**method.knobs, "seed": seed}
        return {**method.knobs, "train_per_class": shots, "subset_seed": seed, "seed": seed}

    def cells(self) -> list[tuple[str, object, int]]:
        return [(m.name, shots, seed) for m in self.methods for shots in self.shots for seed in self.seeds]

    def method(self, name: str) -> Method:
        return next(m for m in self.methods if m.name == name)

    def runs_at(self, method: Method, shots) -> bool:
        """Whether a method has cells at these shots: at 0 only a method that reads no training image."""
        return shots != 0 or not reads_images(Config(**self.values(method, "all", self.seeds[0])))

    def run_dir(self, out: Path, cell: tuple) -> Path:
        name, shots, seed = cell
        return out / self.method(name).folder / ("all" if shots == "all" else f"{shots}-shot") / f"seed-{seed}"

    def fingerprint(self) -> dict:
        """What the curves are: every method's resolved recipe (without the per-cell values), the shots and seeds."""

        def recipe(method: Method) -> dict:
            values = dataclasses.asdict(Config(**self.values(method, "all", 0)))
            mixed = {} if method.wise_ft is None else {"wise_ft": method.wise_ft}  # a rung scored after the run
            return {**{k: v for k, v in values.items() if k not in PER_CELL}, **mixed}

        return {
            "methods": {m.name: recipe(m) for m in self.methods},
            "shots": [str(s) for s in self.shots],
            "seeds": list(self.seeds),
        }


def load_curves(path: str) -> Curves:
    """The curves file, every cell's config checked against Config, and the shots against the data, before anything
    runs."""
    curves = read_curves(path)
    curves.labelled, curves.classes = labelled_images(curves)
    return curves


def read_curves(path: str) -> Curves:
    """The curves file, every cell's config checked against Config (the data is not opened)."""
    raw = load_toml(path)
    where = Path(path)
    unknown = set(raw) - {"shots", "seeds", "fixed", "methods"}
    if unknown:
        raise UserError(
            f"{path}: unknown key {sorted(unknown)[0]!r}; a curves file has shots, seeds, [fixed] and [methods]"
        )
    for table in ("fixed", "methods"):
        if not isinstance(raw.get(table, {}), dict):
            raise UserError(f"{path}: {table} must be a table ([{table}] with one entry a line), got {raw[table]!r}")
    fixed = from_dict(raw.get("fixed", {}), f"{path} [fixed]")
    methods = [method(name, spec, fixed, where) for name, spec in raw.get("methods", {}).items()]
    if not methods:
        raise UserError(f'{path}: [methods] is empty; name at least one, e.g. fine-tune = "../demo.toml"')
    nameless = next((m.name for m in methods if not m.folder), None)
    if nameless is not None:
        raise UserError(
            f"{path}: the method name {nameless!r} has no letter or digit to name its folder of cells; name it with "
            'words, e.g. "fine-tune"'
        )
    if len({m.folder for m in methods}) < len(methods):
        raise UserError(f"{path}: two methods' names make the same folder name; name them apart")
    shots, seeds = check_shots(raw.get("shots"), path), raw.get("seeds", [0, 1, 2])
    if not isinstance(seeds, list) or not seeds or not all(type(s) is int and s >= 0 for s in seeds):
        raise UserError(f"{path}: seeds must be a list of whole numbers >= 0, e.g. seeds = [0, 1, 2], got {seeds!r}")
    if len(set(seeds)) < len(seeds):
        raise UserError(f"{path}: seeds lists a seed twice: {seeds}")
    too_large = next((s for s in seeds if s >= 2**32), None)
    if too_large is not None:  # each is a cell's --seed and --subset-seed
        raise UserError(f"{path}: seed {too_large} is outside 0..{2**32 - 1} (NumPy's range); list smaller seeds")
    curves = Curves(where.stem, where, methods, shots, seeds, {})
    held_out = {m.name: Config(**curves.values(m, "all", seeds[0])).held_out for m in methods}
    other = next((m.name for m in methods if held_out[m.name] != held_out[methods[0].name]), None)
    if other is not None:  # a curve compares methods trained on one pool of images, chosen on one split
        raise UserError(
            f"{path}: methods {methods[0].name!r} and {other!r} hold out different validation splits (data, val_split, "
            f"split_seed: {held_out[methods[0].name]} and {held_out[other]}); their cells would draw their images "
            "from different pools and be chosen on different images. Set val_split (and split_seed) once in [fixed]"
        )
    for m in methods:
        for count in [s for s in shots if curves.runs_at(m, s)]:
            try:
                Config(**curves.values(m, count, seeds[0])).validate()
            except UserError as error:
                raise UserError(f"{path}: method {m.name!r} with shots {count!r} is not a valid run: {error}") from None
    return curves


def method(name: str, spec, fixed: dict, where: Path) -> Method:
    """A method: a preset's path (relative to the curves file), or a table with base and knobs over it."""
    source = f"{where} [methods] {name}"
    if isinstance(spec, str):
        spec = {"base": spec}
    wise_ft = spec.get("wise_ft") if isinstance(spec, dict) else None
    if wise_ft is not None and (
        isinstance(wise_ft, bool) or not isinstance(wise_ft, int | float) or not 0 < wise_ft < 1
    ):
        raise UserError(
            f"{source}: wise_ft is the mixing alpha, a number between 0 and 1 (WiSE-FT's 0.5), got {wise_ft!r}"
        )
    if not isinstance(spec, dict) or not isinstance(spec.get("base"), str):
        raise UserError(
            f'{source}: a method is a preset, e.g. "../demo.toml", or a table with base and knobs, e.g. '
            '{ base = "../demo.toml", train_blocks = "head" }'
        )
    base = (where.parent / spec["base"]).resolve()
    if not base.is_file():
        raise UserError(f"{source}: preset {spec['base']} ({base}) does not exist")
    knobs = {**fixed, **from_dict({k: v for k, v in spec.items() if k not in ("base", "wise_ft")}, source)}
    set_per_cell = sorted(set(knobs) & PER_CELL)
    if set_per_cell:
        raise UserError(
            f"{source}: {set_per_cell[0]} is set by curves.py for every cell (shots and seeds); leave it out"
        )
    return Method(name, base, knobs, wise_ft)


def reads_images(cfg: Config) -> bool:
    """Whether a run reads its training images: one that trains, or whose head is their prototypes."""
    return cfg.epochs > 0 or cfg.head == "prototypes"


def check_shots(shots, path) -> list:
    example = 'e.g. shots = [1, 2, 4, 8, 16, "all"] (0: no labelled image, for zero-shot)'
    if not isinstance(shots, list) or not shots:
        raise UserError(f"{path}: shots must list training images per class, {example}")
    counts = [s for s in shots if s != "all"]
    if not all(type(s) is int and s >= 0 for s in counts) or shots.count("all") > 1:
        raise UserError(f'{path}: shots are whole numbers >= 0 and at most one "all", {example}; got {shots!r}')
    if counts != sorted(set(counts)) or ("all" in shots and shots[-1] != "all"):
        raise UserError(f'{path}: shots must rise, each once, with "all" last, {example}; got {shots!r}')
    return shots


def labelled_images(curves: Curves) -> tuple[dict, int]:
    """Training images per shots value, in all, and the number of classes; a shots value above the smallest class
    (after any validation split) is refused here, before any cell runs."""
    from cars.data import load_splits

    totals = {}
    for m in curves.methods:
        cfg = Config(**curves.values(m, "all", curves.seeds[0]))
        train = load_splits(cfg.data, cfg.val_split, cfg.split_seed).train
        labels = list(train.labels)
        per_class = [labels.count(c) for c in sorted(set(labels))]
        largest = max((s for s in curves.shots if s != "all"), default=0)
        if largest > min(per_class):
            raise UserError(
                f"{curves.path}: shots {largest} is more than the {min(per_class)} training images of the smallest "
                f"class of {cfg.data}{' after the validation split' if cfg.val_split else ''} (method {m.name!r}); "
                f'list shots up to {min(per_class)}, and "all"'
            )
        totals[m.name] = {s: len(labels) if s == "all" else s * len(per_class) for s in curves.shots}
    if 0 in curves.shots and not any(curves.runs_at(m, 0) for m in curves.methods):
        raise UserError(
            f"{curves.path}: shots 0 (no labelled image) needs a method that reads no training image, e.g. "
            '{ base = "../demo_zero_shot.toml" } (a zero-shot head, epochs = 0); every method here trains'
        )
    first = next(iter(totals.values()))
    if any(t != first for t in totals.values()):
        raise UserError(f"{curves.path}: the methods train on different data; a curve compares methods on the same")
    return first, len(per_class)


# --- what the finished cells say ---------------------------------------------------------------------------------


def cell_row(curves: Curves, out: Path, cell: tuple) -> dict:
    """A row of curves.csv from a cell's run folder: validation accuracy of the chosen epoch where a validation split
    chose it, and test accuracy (of that epoch; without a validation split, of the last epoch: nothing was chosen on
    test). A diverged cell is never scored on an epoch chosen on test: with a validation split it has the validation
    accuracy of its best epoch before it diverged and no test accuracy (the test split was not read); without one,
    the test accuracy of its last epoch before it diverged. A cell that diverged before its first evaluation has
    none."""
    name, shots, seed = cell
    run_dir = curves.run_dir(out, cell)
    summary = read_summary(run_dir)
    validated = summary.get("selected_on") == "val"
    val_acc, test_acc, test_ece = None, None, None
    method = curves.method(name)
    if not curves.runs_at(method, shots):
        summary = {"status": "needs labelled images"}
    elif method.wise_ft is not None and summary.get("status") == "finished":
        val_acc, test_acc, test_ece = mixed_scores(run_dir, method.wise_ft)
    elif summary.get("status") == "diverged":
        metrics = run_dir / "metrics.csv"
        evaluated_rows = evaluated(read_metrics(metrics)) if metrics.is_file() else []
        if evaluated_rows:
            if validated:
                val_acc = best_row(evaluated_rows)["eval_acc"]
            else:
                test_acc = evaluated_rows[-1]["eval_acc"]
    elif validated:
        val_acc, test_acc = summary.get("best_eval_acc"), summary.get("test_acc_of_best")
        test_ece = summary.get("test_ece_of_best")  # read with the test accuracy, once
    else:
        test_acc = summary.get("final_eval_acc")
    return {
        "method": name,
        "shots": shots,
        "images": curves.labelled[shots],
        "seed": seed,
        "val_acc": rounded(val_acc),
        "test_acc": rounded(test_acc),
        "test_ece": rounded(test_ece),
        "trained_parameters": summary.get("trainable_parameters", ""),
        "status": summary.get("status", ""),
        "run_dir": str(run_dir.relative_to(out)),
    }


def mixed_scores(run_dir: Path, alpha: float) -> tuple:
    """A WiSE-FT cell's validation accuracy, test accuracy and test ECE at `alpha` (its BatchNorm statistics
    interpolated too), from interpolate.py's interpolation.csv in the run folder: (None, None, None) before it ran."""
    found = {}
    table = run_dir / WISE_FT_FOLDER / "interpolation.csv"
    if table.is_file():
        with open(table, newline="") as file:
            for row in csv.DictReader(file):
                if float(row["alpha"]) == alpha and row["batch_norm"] == "interpolated":
                    found[row["split"]] = (float(row["accuracy"]), float(row["ece"]))
    test = found.get("test", (None, None))
    return found.get("val", (None,))[0], test[0], test[1]


def rounded(percent: float | None):
    return "" if percent is None else round(percent, 2)


def mean_and_sd(rows: list[dict], name: str, shots, key: str = "test_acc") -> tuple[float, float, int] | None:
    """A method's mean and sd over its seeds at one shots value, of the column `key`, and how many seeds have it."""
    values = [r[key] for r in rows if r["method"] == name and r["shots"] == shots and r[key] != ""]
    if not values:
        return None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def spread_words(point: tuple[float, float, int], seeds: int) -> str:
    """'mean ± sd', and how many seeds it stands on when cells dropped out (diverged before their first evaluation,
    or with no test accuracy)."""
    mean, sd, count = point
    return f"{mean:.1f} ± {sd:.1f}" + (f" (n={count} of {seeds})" if count < seeds else "")


def per_class_words(curves: Curves, shots) -> str:
    if shots == 0:
        return "no labelled image"
    if shots == "all":
        return f"all {curves.labelled['all']} labelled images"
    return f"{shots} image{'s' if shots > 1 else ''} per class ({curves.labelled[shots]} labelled images)"


def sentences(curves: Curves, rows: list[dict], scratch: Method | None) -> list[str]:
    """One sentence per method: where its curve starts and ends, and for a pretrained method the fewest labelled
    images at which its advantage over the method from random weights falls under ADVANTAGE points."""
    lines = []
    for m in curves.methods:
        points = [(s, mean_and_sd(rows, m.name, s)) for s in curves.shots]
        points = [(s, p) for s, p in points if p]
        if not points:
            lines.append(f"- **{m.name}**: no finished cell.")
            continue
        (first, low), (last, high) = points[0], points[-1]
        seeds = len(curves.seeds)
        line = f"- **{m.name}** ({m.base.name}): {spread_words(low, seeds)} % test accuracy with " + (
            f"{per_class_words(curves, first)}, {spread_words(high, seeds)} % with {per_class_words(curves, last)}."
            if last != first
            else f"{per_class_words(curves, first)}."
        )
        if scratch is not None and m is not scratch:
            advantages = [(s, p[0] - q[0]) for s, p in points if (q := mean_and_sd(rows, scratch.name, s)) is not None]
            under = next(((s, a) for s, a in advantages if a < ADVANTAGE), None)
            if under:
                line += (
                    f" Its advantage over {scratch.name} falls under {ADVANTAGE:g} points at "
                    f"{per_class_words(curves, under[0])}: {under[1]:+.1f} points"
                    + (f", {scratch.name} is ahead there." if under[1] < 0 else ".")
                )
            elif advantages:
                smallest = min(advantages, key=lambda item: item[1])
                line += (
                    f" Its advantage over {scratch.name} stays above {ADVANTAGE:g} points at every shots value; "
                    f"the smallest: {smallest[1]:+.1f} points with {per_class_words(curves, smallest[0])}."
                )
        lines.append(line)
    return lines


def scratch_method(curves: Curves) -> Method | None:
    """The method that starts from random weights (the first, if several)."""
    return next((m for m in curves.methods if Config(**curves.values(m, "all", 0)).weights.lower() == "none"), None)
