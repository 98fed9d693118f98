"""Classify your own car photos: `uv run predict.py runs/demo car.jpg --topk 5` (see --help)."""

from cars.errors import run_cli
from cars.predict import main

if __name__ == "__main__":
    run_cli(main)
