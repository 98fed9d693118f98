"""Fine-tune an ImageNet-pretrained model on Stanford Cars: `uv run train.py --help`."""

from cars.cli import launch

if __name__ == "__main__":
    launch("train")
