"""The experiment log, generated: `uv run compare.py runs/*` (see --help)."""

from cars.compare import main
from cars.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
