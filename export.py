"""Export a trained model as model.safetensors + model.json: `uv run export.py runs/demo`."""

from cars.cli import launch

if __name__ == "__main__":
    launch("export")
