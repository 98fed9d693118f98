"""Output folders: which ones may be replaced, and whether a run's process is still alive."""

import dataclasses
import json
import os
import shutil
import socket
from pathlib import Path

from tqdm import tqdm

from cars.config import load_saved
from cars.errors import UserError, printable

# What each tool writes into its output folder. --overwrite replaces a folder only when it holds
# these and nothing else: never a dataset, a checkpoint or a folder of the user's that was named by mistake.
OUTPUTS = {
    "run folder": {
        "config.toml",
        "metrics.csv",
        "param_groups.csv",
        "subset.csv",
        "best.pt",
        "last.pt",
        "curves.png",
        "summary.json",
        "train.log",
        "eval",
        "export",
        "adapter.safetensors",
    },
    "eval folder": {
        "report.md",
        "summary.json",
        "per_class.csv",
        "per_class.png",
        "predictions.csv",
        "confused_pairs.csv",
        "confusion_matrix.csv",
        "confusion.png",
        "gradcam_samples.png",
        "gradcam_worst.png",
        "familiarity.safetensors",
        "calibration.json",
        "reliability.png",
        "risk_coverage.png",
        "transfer",  # the transfer section's files
    },
    "lr_find folder": {"lr_find.csv", "lr_find.png"},
    "interpolate folder": {"interpolation.csv", "interpolation.png", "report.md", "summary.json", "model"},
    "soup folder": {"soup.csv", "best.pt", "config.toml", "report.md", "summary.json", "eval", "export"},
    "data report folder": {
        "report.md",
        "data.json",
        "class_counts.png",
        "sizes.png",
        "duplicates.csv",
        "duplicates.png",
        "samples.png",
        "transferability.csv",
    },
    "export folder": {"model.safetensors", "model.onnx", "model.pt2", "model.json"},
}
SIGNATURE = {
    "run folder": "config.toml",
    "eval folder": "summary.json",
    "lr_find folder": "lr_find.csv",
    "interpolate folder": "interpolation.csv",
    "soup folder": "soup.csv",
    "data report folder": "data.json",
    "export folder": "model.json",
}


def foreign_entries(folder: Path, kind: str) -> list[str]:
    """What in `folder` this project did not write as a `kind` (a temporary file of an interrupted
    atomic write, '.<name>.xxxx', counts as written; so do a run folder's eval-* folders and TensorBoard events)."""
    known = OUTPUTS[kind]
    foreign = []
    for entry in sorted(os.listdir(folder)):
        base = entry[1:].rsplit(".", 1)[0] if entry.startswith(".") else entry
        if base in known or (kind == "run folder" and entry.startswith(("eval-", "events.out.tfevents."))):
            continue
        foreign.append(entry)
    return foreign


def check_folder_free(folder: Path, overwrite: bool, kind: str = "run folder", elsewhere: str = "--run-dir") -> None:
    """A folder with files in it is never replaced without --overwrite, and with it only when it is
    a `kind` this project wrote."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise UserError(f"{folder} is a file, not a folder; choose another {elsewhere}")
    try:
        entries = os.listdir(folder)
    except OSError as error:
        raise UserError(f"cannot read {folder}: {error.strerror}; choose another {elsewhere}") from None
    if not entries:
        return
    if not overwrite:
        raise UserError(
            f"{kind} {folder} already exists; pass --overwrite to replace it or {elsewhere} to choose another"
        )
    foreign = foreign_entries(folder, kind)
    if foreign or SIGNATURE[kind] not in entries:
        what = (
            f"holds {', '.join(repr(e) for e in foreign[:3])}{' and more' if len(foreign) > 3 else ''}, which"
            if foreign
            else "is not one:"
        )
        article = "an" if kind[0] in "aeiou" else "a"
        raise UserError(
            f"{folder} is not {article} {kind} this project wrote ({what} --overwrite would delete); "
            f"refusing to replace it. Choose another {elsewhere}"
        )


def check_writable(folder: Path, elsewhere: str = "--out") -> None:
    """A folder that can be made and written, checked before the slow work that would end by writing it."""
    existing = next(p for p in [folder, *folder.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise UserError(f"cannot write {folder}: {existing} is a file, not a folder; choose another {elsewhere}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(
            f"cannot write {folder}: {existing} is not writable (permission denied); choose another {elsewhere}"
        )


def prepare_folder(folder: Path, overwrite: bool, kind: str = "run folder", elsewhere: str = "--run-dir") -> None:
    """An empty folder to write into (call it once every input has been checked)."""
    check_folder_free(folder, overwrite, kind, elsewhere)
    try:
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    except OSError as error:
        raise UserError(f"cannot write {folder}: {error.strerror or error}; choose another {elsewhere}") from None


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def run_status(summary: dict) -> str:
    """finished, running, or crashed (a run that says it is running but whose process is gone)."""
    status = summary.get("status", "crashed")
    if status != "running":
        return status
    if summary.get("host") != socket.gethostname():
        return "running?"  # another machine's run: cannot check its process
    return "running" if process_alive(int(summary.get("pid", -1))) else "crashed"


def read_summary(run_dir: Path) -> dict:
    """summary.json of a run, {} when it is missing or unreadable (a crash before it was written)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


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


# --- the best epoch -------------------------------------------------------------------------------------------


def evaluated(rows: list[dict]) -> list[dict]:
    """The epochs that were evaluated (all of them unless --eval-every skipped some)."""
    return [r for r in rows if r["eval_acc"] is not None]


def best_row(rows: list[dict]) -> dict | None:
    """The best-epoch rule, which chooses what best.pt holds: the evaluated epoch with the highest eval accuracy, the
    first of equals (a tie is no improvement); None before any."""
    return max(evaluated(rows), key=lambda r: r["eval_acc"], default=None)


def stale_evaluations(rows: list[dict]) -> int:
    """How many evaluations came after the best one (--early-stop counts these)."""
    best = best_row(rows)
    return sum(1 for r in evaluated(rows) if r["epoch"] > best["epoch"]) if best else 0


# knobs that do not change what a run learns: two runs that differ only in these (and the seed) ran one recipe
NOT_THE_RECIPE = {
    "run_dir",
    "sweep",
    "trial",
    "seed",
    "workers",
    "device",
    "cache",
    "save_every_steps",
    "log_every_steps",
    "eval_every",
    "amp",
    "compile",
    "channels_last",
}


def recipe_difference(a: dict, b: dict, *, also: set = frozenset()) -> list[str]:
    """The knobs two saved configs set differently, beyond those that do not change the recipe (and `also`)."""
    return sorted(k for k in set(a) | set(b) if k not in NOT_THE_RECIPE | also and a.get(k) != b.get(k))


def scratch_twin(run_dir: Path) -> Path | None:
    """A finished run folder beside `run_dir` whose recipe differs from its own only in the start weights, which are
    random (--weights none): the same recipe from scratch, to say what pretraining bought. The first by name."""
    try:
        own = dataclasses.asdict(load_saved(run_dir / "config.toml"))
    except (UserError, OSError):
        return None
    for sibling in sorted(p for p in run_dir.parent.iterdir() if p.is_dir() and p != run_dir):
        try:
            other = dataclasses.asdict(load_saved(sibling / "config.toml"))
        except (UserError, OSError):
            continue
        finished = read_summary(sibling).get("status") in ("finished", "stopped early")
        if finished and other["weights"].lower() == "none" and not recipe_difference(own, other, also={"weights"}):
            return sibling
    return None


def eval_folders(checkpoint: Path) -> list[Path]:
    """Where eval.py writes for a checkpoint: <run>/eval (given the run folder), <run>/eval-<stem> (given the file)."""
    return [checkpoint.parent / "eval", checkpoint.parent / f"eval-{checkpoint.stem}"]
