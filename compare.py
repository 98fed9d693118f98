"""The experiment log, generated: `uv run compare.py runs/*` (see --help)."""

from cars.cli import launch

if __name__ == "__main__":
    launch("compare")
