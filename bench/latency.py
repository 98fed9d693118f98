"""Inference latency on the CPU: PyTorch eager against ONNX Runtime, the same exported model, side by side in one run.

    uv run python bench/latency.py    # ResNet-50 at 224 px (random weights: speed does not depend on them)
    uv run python bench/latency.py --arch resnet18 --repeats 20

For batch 1 and batch 32: the median time per batch over --repeats runs after warm-up, and images per second.
Both use every core torch and onnxruntime see by default; the last line is the summary.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cars.inference import OnnxRuntimeModel
from cars.models import build_model
from export import write_export


def median_seconds(model, images: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            model(images)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            model(images)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--classes", type=int, default=196)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build_model(args.arch, "none", args.classes).eval()
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "model.onnx"
        write_export("onnx", path, model, torch.randn(2, 3, args.resolution, args.resolution))
        onnx_model = OnnxRuntimeModel(path)
        print(
            f"{args.arch} at {args.resolution} px on the CPU ({torch.get_num_threads()} torch threads), median of "
            f"{args.repeats} runs"
        )
        summary = []
        for batch in (1, 32):
            images = torch.randn(batch, 3, args.resolution, args.resolution)
            eager, ort = median_seconds(model, images, args.repeats), median_seconds(onnx_model, images, args.repeats)
            print(
                f"batch {batch:2d}: PyTorch eager {1000 * eager:7.1f} ms ({batch / eager:6.1f} img/s), "
                f"ONNX Runtime {1000 * ort:7.1f} ms ({batch / ort:6.1f} img/s): {eager / ort:.2f}x",
                flush=True,
            )
            summary.append(
                f"batch {batch}: eager {1000 * eager:.1f} ms, ONNX Runtime {1000 * ort:.1f} ms ({eager / ort:.2f}x)"
            )
    print(f"{args.arch} {args.resolution} px: " + "; ".join(summary))


if __name__ == "__main__":
    main()
