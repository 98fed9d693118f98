"""Know your data before you train: `uv run inspect_data.py --data demo` (see --help)."""

from cars.cli import launch

if __name__ == "__main__":
    launch("inspect_data")
