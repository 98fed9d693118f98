"""The docs are tested like the code: their links and pictures resolve, the flag reference is what the parsers say,
every flag has help, and the README's quick start is what the tests run."""

import importlib.util
import re
from pathlib import Path

import pytest
from conftest import quick_start

from cars.cli import PARSERS

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)|<img [^>]*src=\"([^\"]+)\"")


def prose(markdown: str) -> str:
    """The text outside code blocks and code spans, where a link is a link."""
    markdown = re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", markdown)


def anchors(page: Path) -> set[str]:
    """The anchors a code host gives the page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.*)$", prose(page.read_text()), flags=re.M)
    code_headings = re.findall(r"^#+ (.*`.*)$", page.read_text(), flags=re.M)  # a heading may hold code
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings + code_headings}


def test_the_docs_are_where_the_issue_put_them():
    for page in (
        "tutorial.md",
        "reference/flags.md",
        "reference/files.md",
        "reference/checkpoints.md",
        "benchmarks.md",
    ):
        assert (ROOT / "docs" / page).is_file(), page
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150, "the README is a landing page"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_and_picture_resolves(page):
    targets = [a or b for a, b in LINK.findall(prose(page.read_text()))]
    for target in targets:
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.relative_to(ROOT)}: {target} does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{page.relative_to(ROOT)}: {target} names no heading of {path}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_no_placeholder_is_taken_for_an_html_tag(page):
    """`<run>/eval` outside code renders as "/eval": a code host drops the tag it thinks `<run>` is."""
    tags = re.findall(r"<(?!img |p>|/p>|!--)[A-Za-z/][^>]*>", prose(page.read_text()))
    assert not tags, f"{page.relative_to(ROOT)}: {tags} would vanish; put them in `code`"


def test_every_picture_in_docs_figures_is_shown_somewhere():
    shown = "".join(page.read_text() for page in PAGES)
    unused = [p.name for p in (ROOT / "docs" / "figures").iterdir() if f"figures/{p.name}" not in shown]
    assert not unused, f"pictures no page shows: {unused}"


def test_the_flag_reference_is_what_the_parsers_say():
    spec = importlib.util.spec_from_file_location("make_reference", ROOT / "docs" / "make_reference.py")
    make_reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_reference)
    assert make_reference.main(["--check"]) == 0, "run: uv run docs/make_reference.py"
    reference = (ROOT / "docs" / "reference" / "flags.md").read_text()
    for tool, make in PARSERS.items():
        assert f"## {tool}" in reference
        for action in make()._actions:
            for option in action.option_strings:
                assert option in reference, f"{tool} {option} is not in the reference"


@pytest.mark.parametrize("tool", PARSERS)
def test_every_flag_has_help_with_its_default_written_one_way(tool):
    parser = PARSERS[tool]()
    for action in parser._actions:
        if action.dest == "help":
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{tool} {name} has no help"
        assert "see above" not in action.help and not re.search(r"\(default [^:]", action.help), (tool, name)
        twin = action.option_strings and action.option_strings[0].startswith("--no-") and action.const == "off"
        if action.option_strings and not twin and not action.required:
            assert re.search(r"\(default: [^)]+\)$", action.help), f"{tool} {name}: help ends without (default: X)"
    assert "examples:" in parser.epilog and f"docs/reference/flags.md#{tool.replace('.', '')}" in parser.epilog
    assert f"{tool.replace('.', '')}" in anchors(ROOT / "docs" / "reference" / "flags.md")


def test_lr_find_lists_only_the_flags_it_uses_and_refuses_the_others_in_one_line():
    from cars.cli import LR_FIND_KNOBS, parse_lr_find
    from cars.errors import UserError

    listed = PARSERS["lr_find.py"]().format_help()
    assert "--batch-size" in listed and "--arch" in listed and "--epochs" not in listed and "--scheduler" not in listed
    for flags in (["--epochs", "3"], ["--scheduler=cosine"], ["--no-ema"], ["--lr", "0.1"]):
        with pytest.raises(UserError, match=f"^{flags[0].split('=')[0]} is a train.py flag that the range test"):
            parse_lr_find(flags)
    assert parse_lr_find(["--batch-size", "8", "--seed", "3"]).batch_size == 8
    assert "lr" not in LR_FIND_KNOBS and "epochs" not in LR_FIND_KNOBS


def test_the_quick_start_is_the_demo_the_tests_run():
    commands = quick_start()
    assert commands == {
        "train.py": ["--config", "configs/demo.toml"],
        "eval.py": ["runs/demo"],
        "predict.py": ["runs/demo", "examples/car.png", "--cam", "cams/"],
    }
    assert (ROOT / "examples" / "car.png").is_file(), "the README's photo is shipped"
    tests = (ROOT / "tests" / "test_train.py").read_text()
    for tool in commands:  # each is run by a test there, from the README's words
        assert f'quick_start()["{tool}"]' in tests


def test_the_real_run_of_the_quick_start_is_run_7_of_the_original_experiment_log():
    """`uv run train.py` with no flags: the defaults are configs/run07_baseline.toml, the recipe of 89.38 %."""
    import tomllib

    from cars import config as config_module
    from cars.cli import parse_train

    readme = (ROOT / "README.md").read_text()
    assert "uv run train.py                     # Stanford Cars from the hub, run 7's recipe" in readme
    defaults, preset = config_module.resolve(parse_train([]))
    run7 = tomllib.loads((ROOT / "configs" / "run07_baseline.toml").read_text())
    assert preset == "default" and all(getattr(defaults, key) == value for key, value in run7.items())
    assert "89.38" in readme and "run 7" in readme


def test_the_shipped_photos_are_the_demo_generator_s():
    """examples/ holds what cars.demo.draw_example draws, pixel for pixel (PNG: lossless)."""
    from PIL import Image

    from cars.demo import EXAMPLES, draw_example

    assert sorted(p.name for p in (ROOT / "examples").glob("*.png")) == sorted(EXAMPLES)
    for name in EXAMPLES:
        with Image.open(ROOT / "examples" / name) as shipped:
            assert shipped.convert("RGB").tobytes() == draw_example(name).convert("RGB").tobytes(), name
            assert shipped.width >= 190
