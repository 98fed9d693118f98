"""Run the docs' commands in order, as a new user would: the README's quick start in a fresh clone of this
repository; then, in another, the tutorial's and each how-to's in the order the README lists them. Not part of the
test suite (it takes minutes); run it before a doc change lands.

    uv run docs/check_commands.py                # every runnable command, train.py's shortened to --epochs 3
    uv run docs/check_commands.py --list         # only print what would run, and what is skipped and why
    uv run docs/check_commands.py --epochs 30    # train.py's commands at their own epochs (30: the demo's)

A command is every line of a fenced block that starts with `uv run TOOL.py`. Those that need what this machine may not
have are skipped with the reason: Stanford Cars or ImageNet weights from the network, a GPU (torchrun, --device
cuda), a database server, or a placeholder such as RUN or USER. The one setting that shortens the run is --epochs,
appended to each train.py command (a later flag wins over the preset's epochs).
"""

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEEDS = [  # (pattern in the command, why it is skipped)
    (r"torchrun|--device cuda|--nproc", "needs GPUs"),
    (r"postgresql://|USER|PASSWORD|HOST", "needs a database server"),
    (r"\b(RUN|RUN_DIR|DIR|FILE|PATH|N)\b|\.\.\.|<|data/cars", "a placeholder to fill in"),
    (
        r"tanganke|stanford|IMAGENET|configs/run|configs/plus|r50|devkit|/path/|runs/run0|runs/default",
        "needs the network or the real data",
    ),
    (r"^uv run app\.py", "serves until Ctrl-C (tests/test_app.py opens it in a browser)"),
    (r"^uv run docs/", "one of the docs' own tools"),
]
DEMO = r"demo|examples/|runs/"  # what runs offline: the demo's data, presets and runs


def paths() -> list[list[Path]]:
    """The two ways in, each run in its own fresh clone: the README's quick start; and the tutorial, then the how-tos
    in the README's order (they build on the tutorial's runs)."""
    readme = (ROOT / "README.md").read_text()
    how_tos = list(dict.fromkeys(re.findall(r"\]\((docs/how-to/[\w-]+\.md)\)", readme)))
    return [[ROOT / "README.md"], [ROOT / "docs" / "tutorial.md", *(ROOT / path for path in how_tos)]]


def commands(path: Path) -> list[str]:
    """The `uv run TOOL.py ...` lines of the fenced blocks, comments dropped."""
    found, fenced = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        words = line.split("#")[0].strip()
        if fenced and re.match(r"uv run [\w/]+\.py\b", words):
            found.append(words)
    return found


def skipped(command: str) -> str | None:
    for pattern, why in NEEDS:
        if re.search(pattern, command):
            return why
    tool, *rest = command.split()[2:]
    if tool in ("train.py", "eval.py", "sweep.py", "inspect_data.py", "lr_find.py") and not re.search(DEMO, command):
        return "needs the network or the real data"
    return None


def sorted_glob(folder: Path, pattern: str) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.glob(pattern)) or [pattern]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the commands and what is skipped; run nothing")
    parser.add_argument("--epochs", type=int, default=3, help="appended to every train.py command (default: 3)")
    args = parser.parse_args()
    failed = []
    for documents in paths():
        work = Path(tempfile.mkdtemp(prefix="cars-docs-")) / "repo"
        if not args.list:
            subprocess.run(["git", "clone", "-q", str(ROOT), str(work)], check=True)
            print(f"working in {work}")
        failed += run_in_order(documents, work, epochs=args.epochs, dry=args.list)
    if failed:
        sys.exit("commands that failed:\n" + "\n".join(failed))


def run_in_order(documents: list[Path], work: Path, *, epochs: int, dry: bool) -> list[str]:
    """Every command of the documents in order, in `work`; returns those that failed."""
    failed = []
    for path, command in [(document, command) for document in documents for command in commands(document)]:
        where = path.relative_to(ROOT)
        why = skipped(command)
        if why:
            print(f"skip  {where}: {command}  ({why})")
            continue
        # the shell's globs (runs/*), as the shell would expand them in the work folder
        words = [w for word in shlex.split(command)[2:] for w in (sorted_glob(work, word) if "*" in word else [word])]
        if words[0] == "train.py" and "--resume" not in words:
            words += ["--epochs", str(epochs)]
        print(f"run   {where}: uv run {' '.join(words)}", flush=True)
        if dry:
            continue
        began = time.perf_counter()
        done = subprocess.run([sys.executable, *words], cwd=work, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or [""]
            print(f"  FAILED (exit {done.returncode}): {last[0]}")
            failed.append(f"{where}: {command}")
        else:
            print(f"  ok in {time.perf_counter() - began:.0f} s")
    return failed


if __name__ == "__main__":
    main()
