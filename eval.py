"""Explain a trained model: `uv run eval.py runs/demo` (see --help)."""

from cars.errors import run_cli
from cars.evaluate import main

if __name__ == "__main__":
    run_cli(main)
