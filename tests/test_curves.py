"""curves.py: the curves file's checks, the report's sentences on known numbers, and a grid whose worker is killed
(kill -9) part way and whose rerun finishes it without training a finished cell again."""

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
from conftest import write_hub_folder
from test_models import place_in_torchvision_cache

import curves as curves_tool
from cars import curves, data
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
        ("[-1]", "", "whole numbers >= 0"),
        ("[0]", "", "needs a method that reads no training image"),
        ("[1]", "probe = { base = 'scratch.toml', wise_ft = 2 }\n", "wise_ft is the mixing alpha"),
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
        for shots, acc in zip(grid.shots, accs, strict=True)
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
    grid.shots = [4]  # one shots value (the shift lesson's grids): said once
    assert curves.sentences(grid, rows, None)[0] == (
        "- **fine-tune** (fine-tune.toml): 70.0 ± 1.4 % test accuracy with 4 images per class (40 labelled images)."
    )


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
    for row in rows:  # each cell's expected calibration error, as its train.py measured it on the test split
        assert float(row["test_ece"]) == round(read_summary(out / row["run_dir"])["test_ece_of_best"], 2)
    assert {(r["shots"], r["images"], r["seed"]) for r in rows} == {("1", "3", "1"), ("all", "18", "1")}
    resumed = [r for r in rows if "resuming after epoch 1" in (out / r["run_dir"] / "train.log").read_text()]
    assert len(resumed) == 1, "the killed cell went on from its last.pt"
    report = (out / "report.md").read_text()
    assert "Its advantage over scratch" in report and "1 image per class (3 labelled images)" in report
    assert "Expected calibration error on the test split" in report
    assert (out / "curves.png").stat().st_size > 10_000


SHIFT_ARMS = ["first stage", "middle stage", "last stage", "BN-only", "LoRA", "head alone", "everything"]


def test_the_ladder_has_a_zero_shot_rung_at_no_labels_and_a_wise_ft_rung(curves_dir, tmp_path):
    """A random CLIP (the demo CLIP's shape, a whole-CLIP checkpoint) as the start: its zero-shot rung runs at 0 and
    at 1 labelled image a class with the same result (it reads none), a training rung has no result at 0, and the
    WiSE-FT rung scores its fine-tune mixed halfway with the zero-shot start, as interpolate.py measured it."""
    import torch

    from cars.starts import clip_model

    torch.manual_seed(0)
    torch.save(clip_model("open_clip:demo-clip", source=None).state_dict(), tmp_path / "clip.pth")
    preset = PRESET.format(data=curves_dir / "data", weights=tmp_path / "clip.pth").replace(
        'arch = "resnet18"', 'arch = "open_clip:demo-clip"\nhead = "zero-shot"'
    )
    (tmp_path / "clip.toml").write_text(
        preset.replace("resolution = 32", "resolution = 64").replace("epochs = 2", "epochs = 0")
    )
    (tmp_path / "ladder.toml").write_text(
        "shots = [0, 1]\nseeds = [0]\n[fixed]\nval_split = 0.25\n[methods]\nzero-shot = 'clip.toml'\n"
        "fine-tune = { base = 'clip.toml', epochs = 1 }\nWiSE-FT = { base = 'clip.toml', epochs = 1, wise_ft = 0.5 }\n"
    )
    out = tmp_path / "out"
    curves_tool.main(["--config", str(tmp_path / "ladder.toml"), "--out", str(out)])
    with open(out / "curves.csv", newline="") as file:
        rows = {(r["method"], r["shots"]): r for r in csv.DictReader(file)}
    zero = rows["zero-shot", "0"]
    assert zero["test_acc"] != "" and zero["test_acc"] == rows["zero-shot", "1"]["test_acc"]
    assert zero["trained_parameters"] == "0" and zero["status"] == "finished"
    assert rows["fine-tune", "0"]["status"] == "needs labelled images" and rows["fine-tune", "0"]["test_acc"] == ""
    assert not (out / "fine-tune" / "0-shot").exists()
    mixed = out / rows["WiSE-FT", "1"]["run_dir"] / "wise-ft" / "interpolation.csv"
    with open(mixed, newline="") as file:
        halfway = next(
            r
            for r in csv.DictReader(file)
            if r["alpha"] == "0.5" and r["split"] == "test" and r["batch_norm"] == "interpolated"
        )
    assert float(rows["WiSE-FT", "1"]["test_acc"]) == round(float(halfway["accuracy"]), 2)
    assert (out / "curves.png").is_file() and "zero-shot" in (out / "report.md").read_text()


def test_the_curves_presets_load():
    """Every method of every shipped curves file is a valid run at both ends of its shots; the demo's shots fit its
    data (Stanford Cars is not opened offline)."""
    for name in ("demo", "r50"):
        grid = curves.read_curves(str(ROOT / "configs" / "curves" / f"{name}.toml"))
        assert [m.name for m in grid.methods] == ["fine-tune", "linear probe", "scratch"], name
        assert curves.scratch_method(grid).name == "scratch" and len(grid.seeds) >= 3
    demo = curves.load_curves(str(ROOT / "configs" / "curves" / "demo.toml"))
    assert demo.labelled == {1: 10, 2: 20, 4: 40, 8: 80, 16: 160, "all": 190} and demo.classes == 10
    # the ladder: the same seven rungs on the demo's CLIP and on CLIP ViT-B/16, from no labelled image
    rungs = ["zero-shot", "prototypes", "linear probe", "LoRA", "LP-FT", "full fine-tune", "WiSE-FT"]
    for name in ("ladder_demo", "ladder_clip"):
        grid = curves.read_curves(str(ROOT / "configs" / "curves" / f"{name}.toml"))
        assert [m.name for m in grid.methods] == rungs and grid.shots[0] == 0, name
        assert [m.name for m in grid.methods if grid.runs_at(m, 0)] == ["zero-shot"]
        assert grid.method("WiSE-FT").wise_ft == 0.5
    ladder = curves.load_curves(str(ROOT / "configs" / "curves" / "ladder_demo.toml"))
    assert ladder.labelled == {0: 0, 1: 10, 4: 40, 16: 160}
    # the shift lesson: one grid per shift, the same seven arms over three seeds, from the demo's fine-tuned model
    shifts = sorted((ROOT / "configs" / "curves").glob("shift_*.toml"))
    assert [p.stem for p in shifts] == ["shift_input_demo", "shift_output_demo"]
    for path in shifts:
        grid = curves.read_curves(str(path))
        assert [m.name for m in grid.methods] == SHIFT_ARMS and grid.shots == [5] and grid.seeds == [0, 1, 2]
        assert {m.knobs["weights"] for m in grid.methods} == {"runs/demo/best.pt"}


def test_the_shift_lesson_s_targets_are_the_demo_s_images_shifted_one_way_each():
    """The input-level shift keeps every label and changes every image; the output-level shift keeps every image
    (the same JPEG bytes) and calls each car by the next class's name."""
    plain, noisy, relabelled = (data.open_source(d) for d in ("demo", "demo-input-shift", "demo-output-shift"))
    assert plain[-1] == noisy[-1] == relabelled[-1]  # the class names
    for split in (0, 1):  # train, test
        clean, shifted, renamed = plain[split], noisy[split], relabelled[split]
        assert shifted.labels == clean.labels
        assert renamed.labels == [(y + 1) % 10 for y in clean.labels]
        for i in (0, len(clean) - 1):
            assert renamed.dataset[i]["image"]["bytes"] == clean.dataset[i]["image"]["bytes"]
            pixels = [np.asarray(s.open(i).convert("RGB"), dtype=np.float32) for s in (clean, shifted)]
            assert pixels[0].shape == pixels[1].shape and np.abs(pixels[0] - pixels[1]).mean() > 20


@pytest.mark.parametrize(
    "seeds, extra, message",
    [
        # D8: a method that holds out another validation split draws its cells from another pool of images
        ("[0, 1]", "other = { base = 'scratch.toml', val_split = 0.5 }\n", "hold out different validation splits"),
        # D13: every seed is checked, not only the first and the last
        ("[0, 4294967296, 1]", "", "seed 4294967296 is outside 0..4294967295"),
        # D14: a name with no letter or digit gives no folder
        ("[0, 1]", '"!!!" = "scratch.toml"\n', "the method name '!!!' has no letter or digit"),
    ],
)
def test_curves_files_that_could_not_make_one_curve_are_refused_naming_the_file(
    curves_dir, tmp_path, seeds, extra, message
):
    path = curves_file(curves_dir, "refused", "[1, 2]", extra, seeds=seeds)
    with pytest.raises(UserError, match=message) as refused:
        curves_tool.main(["--config", str(path), "--out", str(tmp_path / "out")])
    assert str(path) in str(refused.value)
    assert not (tmp_path / "out").exists()


def diverged_cell(folder: Path, *, selected_on: str, accuracies: list[float] | None) -> None:
    """A cell's run folder as train.py leaves a run that diverged after these evaluated epochs (none: in its first)."""
    from cars.report import METRIC_COLUMNS, write_csv, write_json

    folder.mkdir(parents=True)
    write_json(folder / "summary.json", {"status": "diverged", "selected_on": selected_on, "epochs_done": 3})
    if accuracies is not None:
        rows = [
            dict(epoch=i + 1, lr=0.1, train_loss=1.0, train_acc=50.0, eval_loss=1.0, eval_acc=acc, seconds=1.0)
            for i, acc in enumerate(accuracies)
        ]
        write_csv(folder / "metrics.csv", rows, METRIC_COLUMNS)


def test_a_diverged_cell_is_never_scored_on_an_epoch_chosen_on_test_and_dropped_cells_are_counted(tmp_path):
    """Known numbers. Without a validation split, a diverged cell whose test accuracies were 30, 70, 40 scores the 40
    of its last epoch, not the 70 that test would choose; with one, it keeps its best validation accuracy and has no
    test accuracy; a cell that diverged in its first epoch has none and does not stop curves.csv. The mean says on how
    many seeds it stands."""
    method = curves.Method("m", tmp_path / "m.toml", {})
    grid = curves.Curves("known", tmp_path / "known.toml", [method], [1], [0, 1, 2], {1: 3})
    out = tmp_path / "out"
    diverged_cell(grid.run_dir(out, ("m", 1, 0)), selected_on="test", accuracies=[30.0, 70.0, 40.0])
    diverged_cell(grid.run_dir(out, ("m", 1, 1)), selected_on="val", accuracies=[55.0, 60.0, 20.0])
    diverged_cell(grid.run_dir(out, ("m", 1, 2)), selected_on="test", accuracies=None)
    rows = [curves.cell_row(grid, out, cell) for cell in grid.cells()]
    assert [(r["val_acc"], r["test_acc"], r["status"]) for r in rows] == [
        ("", 40.0, "diverged"),
        (60.0, "", "diverged"),
        ("", "", "diverged"),
    ]
    rows.append({**rows[0], "seed": 3, "test_acc": 50.0})  # a fourth seed's cell, to give the mean a spread
    point = curves.mean_and_sd(rows, "m", 1)
    assert point == (45.0, pytest.approx(50**0.5), 2)
    assert curves.spread_words(point, 4) == "45.0 ± 7.1 (n=2 of 4)"
    assert curves.spread_words(point, 2) == "45.0 ± 7.1"


def test_a_cell_that_diverges_in_its_first_epoch_does_not_stop_the_curves(curves_dir, tmp_path):
    """A method at lr 1e30 diverges in its first epoch, before any metrics.csv: the grid still finishes, its cell is
    in curves.csv without an accuracy, and the table says on how many seeds each mean stands."""
    place_in_torchvision_cache("resnet18", "IMAGENET1K_V1")
    extra = "exploding = { base = 'pretrained.toml', lr = 1e30, epochs = 1 }\n"
    path = curves_file(curves_dir, "exploding", '["all"]', extra, seeds="[0]")
    path.write_text(path.read_text().replace('scratch = "scratch.toml"\n', ""))
    out = tmp_path / "out"
    curves_tool.main(["--config", str(path), "--out", str(out)])
    rows = {r["method"]: r for r in csv.DictReader((out / "curves.csv").open())}
    assert rows["exploding"]["status"] == "diverged" and rows["exploding"]["test_acc"] == ""
    assert not (out / rows["exploding"]["run_dir"] / "metrics.csv").exists()
    assert rows["fine-tune"]["status"] == "finished" and rows["fine-tune"]["test_acc"] != ""
    report = (out / "report.md").read_text()
    assert "**exploding**: no finished cell." in report
