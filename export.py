"""Export a trained model as model.safetensors + model.json: `uv run export.py runs/demo`."""

from cars.errors import run_cli
from cars.export import main

if __name__ == "__main__":
    run_cli(main)
