"""Where the project keeps what it computes once: the demo dataset and the preprocessing cache."""

import os
from pathlib import Path

WEIGHTS_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")  # a --weights value ending so names a file


def cache_home() -> Path:
    """$CARS_CACHE, or ~/.cache/transfer-stanford-cars (the demo dataset lives here too)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "transfer-stanford-cars"
    return Path(os.environ.get("CARS_CACHE") or default)
