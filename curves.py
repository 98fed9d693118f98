"""curves.py: how much labelled data pretraining saves. Every method of a curves file is trained on 1, 2, 4, ...
images per class, over several seeds; every cell is an ordinary train.py run folder.

    uv run curves.py --config configs/curves/demo.toml       # the cells' study in runs/curves/demo/study.db
    uv run curves.py --config configs/curves/r50.toml --storage postgresql://user:pw@db-host/curves   # per worker

The cells are a grid (method x shots x seed) on an Optuna study with its grid sampler, in the same storages as
sweep.py: workers on several machines share the cells, and a rerun goes on where the last stopped (a cell killed part
way resumes from its last.pt). The worker that finishes the last cell writes curves.csv, curves.png and report.md.
"""

from cars.cli import check_command_line, parse_curves

check_command_line(__name__, parse_curves)  # --help and mistakes answer before the imports below load torch

import signal
import sys
from pathlib import Path

import optuna
from optuna.trial import TrialState

import interpolate
import train
from cars import curves as data_curves
from cars import sweeps
from cars.config import config_flags
from cars.errors import UserError, run_cli
from cars.report import markdown_table, plot_data_curves, write_csv, write_text
from cars.run_state import raise_interrupt
from cars.runs import read_summary, run_status

COLUMNS = [
    "method",
    "shots",
    "images",
    "seed",
    "val_acc",
    "test_acc",
    "test_ece",
    "trained_parameters",
    "status",
    "run_dir",
]


def main(argv=None) -> None:
    args = parse_curves(argv)
    curves = data_curves.load_curves(args.config)
    out = Path(args.out or f"runs/curves/{curves.name}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the curves' cells and files")
    out.mkdir(parents=True, exist_ok=True)
    storage = args.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    study = open_study(curves, storage, args.heartbeat, out)
    signal.signal(signal.SIGTERM, raise_interrupt)  # a scheduler's stop ends a worker as Ctrl-C does
    count = len(curves.cells())
    print(
        f"curves {curves.name}: {len(curves.methods)} methods x {len(curves.shots)} shots x {len(curves.seeds)} seeds "
        f"= {count} cells, in {sweeps.shown(storage)}"
    )
    try:
        finished = run_cells(study, curves, out, heartbeat=args.heartbeat)
    except KeyboardInterrupt:
        print(f"stopped; the finished cells are kept. Go on with: uv run curves.py --config {curves.path}")
        sys.exit(130)
    if not finished:
        print(f"the other cells are running in other workers; the last to finish writes {out / 'report.md'}")
        return
    files = write_results(curves, out)
    cell = curves.cells()[-1]
    print(f"all {count} cells are finished. files: {', '.join(str(out / f) for f in files)}")
    print(f"next: read {out / 'report.md'}; every cell is a run folder: uv run eval.py {curves.run_dir(out, cell)}")


def open_study(curves: data_curves.Curves, storage: str, heartbeat: int, out: Path):
    """The study named after the curves file, over the grid of cells, made by the first worker and joined by the
    others; a worker whose curves file resolves to other recipes, shots or seeds is refused."""
    sweeps.quiet_optuna()
    grid = {"method": [m.name for m in curves.methods], "shots": curves.shots, "seed": curves.seeds}
    study = optuna.create_study(
        study_name=f"curves-{curves.name}",
        storage=sweeps.open_storage(storage, heartbeat),
        direction="maximize",
        sampler=optuna.samplers.GridSampler(grid, seed=0),
        load_if_exists=True,
    )
    sweeps.claim_study(
        study,
        curves.fingerprint(),
        labels={"methods": "the methods", "shots": "the shots", "seeds": "the seeds"},
        storage=storage,
        earlier=sorted(p.name for m in curves.methods if (p := out / m.folder).is_dir()),
        out=out,
        rename="Give the curves their own folder with --out (and --storage, if you gave one)",
    )
    return study


def cell_of(trial) -> tuple:
    return trial.params.get("method"), trial.params.get("shots"), trial.params.get("seed")


def run_cells(study, curves: data_curves.Curves, out: Path, *, heartbeat: int) -> bool:
    """Cells, one after the other, until every cell is finished (True), or the rest run in other workers (False). A
    cell whose worker died runs again: the grid sampler counts a failed cell as visited, so it is queued here."""
    grid = set(curves.cells())
    while True:
        sweeps.fail_stopped_trials(study)
        trials = study.get_trials(deepcopy=False)
        done = {cell_of(t) for t in trials if t.state == TrialState.COMPLETE}
        if grid <= done:
            return True
        active = {cell_of(t) for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)}
        for cell in sorted({cell_of(t) for t in trials if t.state == TrialState.FAIL} - done - active, key=str):
            study.enqueue_trial(
                dict(zip(("method", "shots", "seed"), cell, strict=True)), user_attrs={"note": "runs again"}
            )
            active.add(cell)
        if not grid - done - active and not any(t.state == TrialState.WAITING for t in trials):
            if not sweeps.has_heartbeats(study):
                return False  # a journal file: the other workers finish their own cells
            sweeps.wait_for_others(study, heartbeat)
            continue
        study.optimize(lambda trial: run_cell(trial, study=study, curves=curves, out=out), n_trials=1)


def run_cell(trial, *, study, curves: data_curves.Curves, out: Path) -> float:
    """One cell: train.py on the method's preset with the cell's shots and seed, in <out>/<method>/<shots>/seed-<s>.
    A run folder that finished already (its worker was stopped before it told the study) is not trained again; one
    that was interrupted resumes from its last.pt. Returns the cell's validation accuracy (test where no validation
    split exists)."""
    cell = (
        trial.suggest_categorical("method", [m.name for m in curves.methods]),
        trial.suggest_categorical("shots", curves.shots),
        trial.suggest_categorical("seed", curves.seeds),
    )
    taken = [
        t.number
        for t in study.get_trials(deepcopy=False)
        if cell_of(t) == cell
        and (t.state == TrialState.COMPLETE or (t.state == TrialState.RUNNING and t.number < trial.number))
    ]
    if taken:  # two workers drew one cell at once (the grid sampler cannot rule it out): the later one skips it
        trial.set_user_attr("note", f"skipped: trial {taken[0]} has this cell")
        raise optuna.TrialPruned("duplicate")
    method, run_dir = curves.method(cell[0]), curves.run_dir(out, cell)
    if not curves.runs_at(method, cell[1]):  # no labelled image, and the method trains: nothing to run
        trial.set_user_attr("note", "needs labelled images")
        return 0.0
    trial.set_user_attr("run_dir", str(run_dir))
    trial.set_user_attr("worker", sweeps.worker_name())
    status = run_status(read_summary(run_dir))
    print(f"\ncell {cell[0]}, {data_curves.per_class_words(curves, cell[1])}, seed {cell[2]}: {run_dir}")
    if status in ("interrupted", "crashed") and (run_dir / "last.pt").is_file():
        train.main(["--resume", str(run_dir)])
    elif status != "finished":
        values = {**curves.cell_knobs(method, cell[1], cell[2]), "run_dir": str(run_dir)}
        overwrite = ["--overwrite"] if run_dir.exists() else []  # this cell's own folder, left by a crash
        try:
            train.main(["--config", str(method.base), *config_flags(values), *overwrite])
        except UserError:
            if read_summary(run_dir).get("status") != "diverged":
                raise
            trial.set_user_attr("note", "diverged")  # a result of the cell all the same (data_curves.cell_row)
    if method.wise_ft is not None and read_summary(run_dir).get("status") == "finished":
        mix_with_start(run_dir, method.wise_ft)
    row = data_curves.cell_row(curves, out, cell)
    value = row["val_acc"] if row["val_acc"] != "" else row["test_acc"]
    if value == "":  # diverged before its first evaluation: done, with no accuracy (curves.csv says so)
        trial.set_user_attr("note", "diverged before its first evaluation")
        return 0.0
    return value


def mix_with_start(run_dir: Path, alpha: float) -> None:
    """A WiSE-FT cell: interpolate.py on its fine-tune at alpha (and at the two ends, which its report compares),
    into the run folder's wise-ft/; once (a folder a crash left half-written is written again)."""
    folder = run_dir / data_curves.WISE_FT_FOLDER
    if (folder / "summary.json").is_file():
        return
    mix = [str(run_dir), "--alphas", f"0,{alpha:g},1", "--out", str(folder), "--workers", "0"]
    # in this process, as train.py's cells are: a process of its own spent seconds importing torch again
    interpolate.main([*mix, *(["--overwrite"] if folder.exists() else [])])


def write_results(curves: data_curves.Curves, out: Path) -> list[str]:
    """curves.csv (one row per cell, from its run folder), curves.png and report.md."""
    rows = [data_curves.cell_row(curves, out, cell) for cell in curves.cells()]
    write_csv(out / "curves.csv", rows, COLUMNS)
    series = {
        legend_name(m.name, rows): [
            (s, *p[:2]) for s in curves.shots if (p := data_curves.mean_and_sd(rows, m.name, s))
        ]
        for m in curves.methods
    }
    plot_data_curves(
        series,
        out / "curves.png",
        all_at=round(curves.labelled[curves.shots[-1]] / curves.classes, 1),
        title=f"{curves.name}: test accuracy against labelled data",
    )
    scratch = data_curves.scratch_method(curves)
    validated = any(r["val_acc"] != "" for r in rows)
    calibration = (
        [
            "Expected calibration error on the test split (%, before a temperature: eval.py fits one), mean ± sd, by "
            "training images per class:",
            spread_table(curves, rows, "test_ece"),
        ]
        if any(r["test_ece"] != "" for r in rows)
        else []
    )
    write_text(
        out / "report.md",
        "\n\n".join(
            [
                f"# Data-efficiency curves: `{curves.name}`",
                f"{len(curves.methods)} methods x {len(curves.shots)} shots (training images per class) x "
                f"{len(curves.seeds)} seeds (seeds {', '.join(map(str, curves.seeds))}: each cell's training seed and "
                f"the draw of its images). Each cell's epoch was chosen on "
                + (
                    "a validation split; its test accuracy is below."
                    if validated
                    else "nothing: the last epoch's test accuracy is below."
                ),
                "![accuracy against training images per class](curves.png)",
                "Test accuracy (%), mean ± sd over the seeds, by training images per class:",
                spread_table(curves, rows, "test_acc"),
                *calibration,
                *(
                    []
                    if scratch
                    else ["No method starts from random weights, so pretraining's advantage is not measured: add one."]
                ),
                "\n".join(data_curves.sentences(curves, rows, scratch)),
                "Every cell is a run folder (`curves.csv` names them): `uv run eval.py` and `uv run compare.py` read "
                "them.",
            ]
        )
        + "\n",
    )
    return ["curves.csv", "curves.png", "report.md"]


def legend_name(name: str, rows: list[dict]) -> str:
    """A method's name with the parameters its cells trained (the most any of them did): what its accuracy cost."""
    trained = [r["trained_parameters"] for r in rows if r["method"] == name and r["trained_parameters"] != ""]
    if not trained:
        return name
    count = max(trained)
    return f"{name} ({count / 1e6:.2f} M trained)" if count >= 1e5 else f"{name} ({count:,} trained)"


def spread_table(curves: data_curves.Curves, rows: list[dict], key: str) -> str:
    """A method per row, a shots value per column: the mean ± sd over the seeds of the column `key` of curves.csv."""
    return markdown_table(
        ["method", *[str(s) for s in curves.shots]],
        [
            [
                m.name,
                *[
                    data_curves.spread_words(p, len(curves.seeds))
                    if (p := data_curves.mean_and_sd(rows, m.name, s, key))
                    else ""
                    for s in curves.shots
                ],
            ]
            for m in curves.methods
        ],
    )


if __name__ == "__main__":
    run_cli(main)
