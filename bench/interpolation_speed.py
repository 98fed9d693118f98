"""The 11-point interpolation curve against one eval.py, side by side in one run.

    uv run bench/interpolation_speed.py RUN [--rounds 2]

Times `interpolate.py RUN` (alpha = 0, 0.1, ..., 1 on every split it scores) and `eval.py RUN --transfer off
--num-gradcam 0` in alternation, each in a fresh process as a user runs them, after one untimed run of each (which
fills the preprocessing cache). Prints the median wall time of each and their ratio; the target is at most 12x.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(command: list[str]) -> float:
    began = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp())
    python = [sys.executable]
    commands = {
        "interpolate.py (11 points)": [*python, str(ROOT / "interpolate.py"), args.run, "--out", str(scratch / "i")],
        "eval.py": [*python, str(ROOT / "eval.py"), args.run, "--out", str(scratch / "e"), "--transfer", "off"],
    }
    commands["eval.py"] += ["--num-gradcam", "0"]
    times = {name: [] for name in commands}
    for round_ in range(args.rounds + 1):
        for name, command in commands.items():
            seconds = timed([*command, "--overwrite"])
            if round_:  # the first round fills the cache
                times[name].append(seconds)
    interpolation, evaluation = (statistics.median(times[name]) for name in commands)
    print(f"interpolate.py: {interpolation:.1f} s, eval.py: {evaluation:.1f} s (medians of {args.rounds} runs each)")
    print(f"ratio {interpolation / evaluation:.1f}x (target: at most 12x)")


if __name__ == "__main__":
    main()
