"""Explain a trained model: `uv run eval.py runs/demo` (see --help)."""

from cars.cli import launch

if __name__ == "__main__":
    launch("eval")
