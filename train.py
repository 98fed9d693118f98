"""Fine-tune an ImageNet-pretrained model on Stanford Cars: `uv run train.py --help`."""

from cars.errors import run_cli
from cars.train import main

if __name__ == "__main__":
    run_cli(main)
