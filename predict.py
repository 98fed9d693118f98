"""Classify your own car photos: `uv run predict.py runs/demo car.jpg --topk 5` (see --help)."""

from cars.cli import launch

if __name__ == "__main__":
    launch("predict")
