"""Find a learning rate before a run is wasted: `uv run lr_find.py --config configs/run07_baseline.toml`."""

from cars.cli import launch

if __name__ == "__main__":
    launch("lr_find")
