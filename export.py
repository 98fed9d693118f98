"""Export a trained model, each format checked against it: `uv run export.py runs/demo --format safetensors,onnx,torch-export`."""

from cars.cli import launch

if __name__ == "__main__":
    launch("export")
