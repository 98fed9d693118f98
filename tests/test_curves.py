"""curves.py: the curves file's checks, the report's sentences on known numbers, and a grid whose worker is killed
(kill -9) part way and whose rerun finishes it without training a finished cell again."""

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import write_hub_folder
from test_models import place_in_torchvision_cache

import curves as curves_tool
from cars import curves
from cars.errors import UserError
from cars.runs import read_summary

ROOT = Path(__file__).resolve().parents[1]
PRESET = """data = "{data}"
arch = "resnet18"
weights = "{weights}"
resolution = 32
batch_size = 6
epochs = 2
lr = 0.01
workers = 0
"""
CURVES = """shots = {shots}
seeds = {seeds}
[fixed]
val_split = 0.25
[methods]
fine-tune = "pretrained.toml"
scratch = "scratch.toml"
"""


@pytest.fixture(scope="module")
def curves_dir(tmp_path_factory):
    """Two presets (resnet18 at 32 px, two epochs: about a second a cell) on a 3-class dataset with 8 training images
    a class, 6 of them left after the validation split; and a folder to write curves files into beside them."""
    root = tmp_path_factory.mktemp("curves")
    data = write_hub_folder(root / "data", per_class=(8, 3))
    for name, weights in (("pretrained", "IMAGENET1K_V1"), ("scratch", "none")):
        (root / f"{name}.toml").write_text(PRESET.format(data=data, weights=weights))
    return root


def curves_file(folder: Path, name: str, shots: str = '[1, "all"]', extra: str = "", seeds: str = "[0, 1]") -> Path:
    path = folder / f"{name}.toml"
    path.write_text(CURVES.format(shots=shots, seeds=seeds) + extra)
    return path


@pytest.mark.parametrize(
    "shots, extra, message",
    [
        ("[1, 7]", "", "shots 7 is more than the 6 training images of the smallest class"),
        ("[4, 2]", "", "shots must rise, each once"),
        ('["all", 2]', "", 'with "all" last'),
        ("[0]", "", "whole numbers > 0"),
        ("[1]", "probe = { base = 'scratch.toml', seed = 3 }\n", "seed is set by curves.py for every cell"),
        ("[1]", "typo = 'nowhere.toml'\n", "preset nowhere.toml"),
        ("[1]", "probe = { base = 'scratch.toml', lr = 'fast' }\n", "lr must be float"),
    ],
)
def test_a_bad_curves_file_is_one_line_before_anything_runs(curves_dir, tmp_path, shots, extra, message):
    path = curves_file(curves_dir, "bad", shots, extra)
    with pytest.raises(UserError, match=message):
        curves_tool.main(["--config", str(path), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_the_report_says_where_pretraining_s_advantage_falls_under_5_points(tmp_path):
    """Known numbers: the fine-tune leads scratch by 30, 10 and then 4 points; the probe never falls under 5."""
    method = {name: curves.Method(name, tmp_path / f"{name}.toml", {}) for name in ("fine-tune", "probe", "scratch")}
    grid = curves.Curves("known", tmp_path / "known.toml", list(method.values()), [1, 4, "all"], [0, 1], {}, 10)
    grid.labelled = {1: 10, 4: 40, "all": 190}
    means = {"fine-tune": [50, 70, 84], "probe": [60, 80, 90], "scratch": [20, 60, 80]}
    rows = [
        {"method": name, "shots": shots, "seed": seed, "test_acc": acc + (1 if seed else -1)}
        for name, accs in means.items()
        for shots, acc in zip(grid.shots, accs)
        for seed in grid.seeds
    ]
    assert curves.mean_and_sd(rows, "fine-tune", 4) == (70, pytest.approx(2**0.5), 2)
    fine_tune, probe, scratch = curves.sentences(grid, rows, method["scratch"])
    assert fine_tune == (
        "- **fine-tune** (fine-tune.toml): 50.0 ± 1.4 % test accuracy with 1 image per class (10 labelled images), "
        "84.0 ± 1.4 % with all 190 labelled images. Its advantage over scratch falls under 5 points at all 190 "
        "labelled images: +4.0 points."
    )
    assert probe.endswith(
        "Its advantage over scratch stays above 5 points at every shots value; the smallest: +10.0 points with all "
        "190 labelled images."
    )
    assert "advantage" not in scratch


def test_a_killed_curves_worker_resumes_without_training_a_finished_cell_again(curves_dir, tmp_path):
    """A worker is killed (kill -9) as its second cell starts. The same command run again finishes the grid: the
    finished cell is not trained again, the killed one goes on from its last.pt, every cell is done exactly once, and
    curves.csv, curves.png and report.md describe all of them."""
    place_in_torchvision_cache("resnet18", "IMAGENET1K_V1")
    path, out = curves_file(curves_dir, "grid", seeds="[1]"), tmp_path / "grid"  # 4 cells
    command = ["--config", str(path), "--out", str(out), "--heartbeat", "1"]
    worker = subprocess.Popen(
        [sys.executable, str(ROOT / "curves.py"), *command],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines = []
    for line in worker.stdout:
        lines.append(line)
        if line.startswith("epoch   1/") and sum(x.startswith("cell ") for x in lines) == 2:
            worker.send_signal(signal.SIGKILL)  # in the second cell's second epoch
            break
    worker.communicate(timeout=60)
    first_cell = next(x for x in lines if x.startswith("cell ")).rstrip().rpartition(": ")[2]
    assert read_summary(Path(first_cell))["status"] == "finished", "".join(lines)
    first_log = (Path(first_cell) / "train.log").read_text()

    curves_tool.main(command)

    grid = curves.load_curves(str(path))
    assert (Path(first_cell) / "train.log").read_text() == first_log, "the finished cell was not trained again"
    study = optuna.load_study(study_name="curves-grid", storage=f"sqlite:///{out / 'study.db'}")
    done = [curves_tool.cell_of(t) for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))]
    assert sorted(done, key=str) == sorted(grid.cells(), key=str), "every cell once"
    rows = list(csv.DictReader((out / "curves.csv").open()))
    assert [(r["method"], r["shots"], r["seed"]) for r in rows] == [(m, str(s), str(d)) for m, s, d in grid.cells()]
    assert all(r["status"] == "finished" and 0 <= float(r["test_acc"]) <= 100 and r["val_acc"] for r in rows)
    assert {(r["shots"], r["images"], r["seed"]) for r in rows} == {("1", "3", "1"), ("all", "18", "1")}
    resumed = [r for r in rows if "resuming after epoch 1" in (out / r["run_dir"] / "train.log").read_text()]
    assert len(resumed) == 1, "the killed cell went on from its last.pt"
    report = (out / "report.md").read_text()
    assert "Its advantage over scratch" in report and "1 image per class (3 labelled images)" in report
    assert (out / "curves.png").stat().st_size > 10_000


def test_the_curves_presets_load():
    """Every method of every shipped curves file is a valid run at both ends of its shots; the demo's shots fit its
    data (Stanford Cars is not opened offline)."""
    for path in sorted((ROOT / "configs" / "curves").glob("*.toml")):
        grid = curves.read_curves(str(path))
        assert [m.name for m in grid.methods] == ["fine-tune", "linear probe", "scratch"], path
        assert curves.scratch_method(grid).name == "scratch" and len(grid.seeds) >= 3
    demo = curves.load_curves(str(ROOT / "configs" / "curves" / "demo.toml"))
    assert demo.labelled == {1: 10, 2: 20, 4: 40, 8: 80, 16: 160, "all": 190} and demo.classes == 10
