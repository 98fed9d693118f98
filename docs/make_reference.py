"""Write docs/reference/flags.md from the tools' own parsers, so that the reference cannot drift from --help.

uv run docs/make_reference.py           # rewrite docs/reference/flags.md
uv run docs/make_reference.py --check   # exit 1 if it differs from what the parsers say (the tests run this)
"""

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cars.cli import PARSERS  # noqa: E402 (after the path: the script runs from anywhere)

OUT = ROOT / "docs" / "reference" / "flags.md"
DEFAULT = re.compile(r"\s*\(default: (.*)\)$")


def flag_cell(action: argparse.Action) -> str:
    """How the flag is typed: `--lr LR`, `--amp [auto|on|off]`, `--ema / --no-ema`, `MODEL`."""
    if not action.option_strings:
        return (action.metavar or action.dest) + (" ..." if action.nargs in ("+", "*") else "")
    names = " / ".join(action.option_strings)
    if action.nargs == 0:
        return names
    value = action.metavar or ("|".join(map(str, action.choices)) if action.choices else action.dest.upper())
    return f"{names} [{value}]" if action.nargs == "?" else f"{names} {value}"


def cell(text: str) -> str:
    """Text in a table cell, as written: no `<run>` taken for an HTML tag, no `*` for emphasis, no `|` ending it."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("*", "\\*").replace("|", "\\|")


def code(text: str) -> str:
    return f"`{text}`".replace("|", "\\|") if text else ""


def tool_section(tool: str, parser: argparse.ArgumentParser) -> str:
    lines = [f"## {tool}", "", " ".join(parser.description.split()), ""]
    for group in parser._action_groups:  # argparse keeps a parser's groups here, in --help's order
        actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        title = {"positional arguments": "arguments", "options": "options"}.get(group.title, group.title)
        lines += [f"### {title}", "", "| flag | default | what |", "|---|---|---|"]
        for action in actions:
            help, default = action.help, ""
            found = DEFAULT.search(help)
            if found:
                help, default = help[: found.start()], found.group(1)
            lines.append(f"| {code(flag_cell(action))} | {code(default)} | {cell(help)} |")
        lines.append("")
    examples = parser.epilog.split("\n\n")[0].splitlines()[1:]
    lines += ["Examples:", "", "```", *(example.strip() for example in examples), "```", ""]
    return "\n".join(lines)


def reference() -> str:
    head = [
        "# Every tool's flags",
        "",
        "Generated from the tools' parsers by `uv run docs/make_reference.py`; a test fails when this page and",
        "`--help` disagree. train.py's flags are also the keys of a TOML preset (`_` for `-`), and lr_find.py takes",
        "the ones a range test uses.",
        "",
        " · ".join(f"[{tool}](#{tool.replace('.', '')})" for tool in PARSERS),
        "",
    ]
    return "\n".join(head) + "\n" + "\n".join(tool_section(tool, make()) for tool, make in PARSERS.items())


def main(argv=None) -> int:
    check = "--check" in (argv if argv is not None else sys.argv[1:])
    text = reference()
    if check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} differs from the parsers; run: uv run docs/make_reference.py")
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
