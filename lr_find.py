"""Find a learning rate before a run is wasted: `uv run lr_find.py --config configs/run07_baseline.toml`."""

from cars.errors import run_cli
from cars.lr_find import main

if __name__ == "__main__":
    run_cli(main)
