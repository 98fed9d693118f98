"""The command line forgives: an unknown flag is one line with the closest one, no flag is an abbreviation of
another, swapped arguments and a mistyped preset are named, and piped output has no progress bars."""

from pathlib import Path

import pytest

from cars.cli import PARSERS, parse_predict, parse_train
from cars.engine import Device
from cars.errors import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]


def error_line(capsys, parse, argv: list[str]) -> str:
    """What a tool prints for a command line it refuses: exactly one line on stderr, exit status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        run_cli(parse, argv)
    assert exit.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    return captured.err.rstrip("\n")


@pytest.mark.parametrize(
    "typed, meant",
    [
        (["--learning-rate", "0.1"], "--lr"),  # timm's and fastai's name
        (["--batch_size", "8"], "--batch-size"),
        (["--wieght-decay", "0.1"], "--weight-decay"),
        (["--epoch", "5"], "--epochs"),  # argparse would have taken it for --epochs
    ],
)
def test_an_unknown_flag_is_one_line_with_the_closest_one(capsys, typed, meant):
    assert error_line(capsys, parse_train, typed) == (
        f"error: unknown flag {typed[0]}; did you mean {meant}? (uv run train.py --help)"
    )


@pytest.mark.parametrize("tool", PARSERS)
def test_no_tool_takes_an_abbreviation_and_every_mistake_is_one_line(capsys, tool):
    parser = PARSERS[tool]()
    assert parser.allow_abbrev is False
    longest = max((o for a in parser._actions for o in a.option_strings if o.startswith("--")), key=len)
    with pytest.raises(SystemExit) as exit:
        parser.parse_args([longest[:-2], "1"])  # --overwri for --overwrite: refused, not guessed
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: unknown flag {longest[:-2]}; did you mean {longest}? (uv run {tool} --help)\n"


def test_swapped_predict_arguments_are_named(tmp_path):
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    with pytest.raises(UserError, match="the arguments look swapped: car.jpg is an image and .*demo a model"):
        parse_predict(["car.jpg", str(tmp_path / "runs" / "demo")])
    assert parse_predict([str(tmp_path / "runs" / "demo"), "car.jpg"]).images == ["car.jpg"]


@pytest.mark.parametrize(
    "typed, meant",
    [
        ("configs/demo.tml", "configs/demo.toml"),
        ("configs/run07.toml", "configs/run07_baseline.toml"),
        ("configs/sweeps/dem.toml", "configs/sweeps/demo.toml"),
    ],
)
def test_a_missing_preset_suggests_the_nearest_one(capsys, monkeypatch, typed, meant):
    import train

    monkeypatch.chdir(ROOT)
    assert error_line(capsys, train.main, ["--config", typed]) == (
        f"error: config file {typed} does not exist; did you mean {meant}?"
    )


def test_piped_output_draws_no_progress_bars():
    """Under pytest stderr is captured, as a log file or a pipe would be."""
    assert Device("cpu").show_progress is False
