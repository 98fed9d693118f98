"""Step time of each fine-tuning method against plain fine-tuning, measured side by side in one run.

    uv run bench/method_speed.py [--arch resnet18] [--resolution 64] [--batch-size 32] [--steps 20] [--rounds 3]

Builds each method's run with train.py's own setup (on the demo's data, from torchvision-shaped weights of the
architecture when they are in torchvision's cache, else demo-pretrained for the demo's ShuffleNet) and times its
training steps on the same batches, already on the device: the step and the method's loss terms, nothing of the input
pipeline. The methods take turns over several rounds, so that a slow patch of the machine hits all of them; each
method's time is its median step over every round. Prints the ratio to plain fine-tuning, with the issue's target.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import train  # noqa: E402
from cars.engine import train_step  # noqa: E402
from cars.finetune import stages  # noqa: E402
from cars.methods import set_trainable  # noqa: E402
from cars.models import build_model  # noqa: E402

METHODS = {  # name: (flags, the most it may cost against plain fine-tuning)
    "plain": ([], 1.0),
    "layer decay 0.8": (["--layer-decay", "0.8"], 1.05),
    "surgical (last stage)": (["--train-blocks", "LAST"], 1.05),
    "BN-only": (["--train-params", "norm"], 1.05),
    "BitFit": (["--train-params", "bias"], 1.05),
    "LoRA rank 4": (["--lora", "4"], 1.05),
    "L2-SP 0.01": (["--l2sp", "0.01"], 1.05),
    "BSS 0.001": (["--bss", "0.001"], 1.3),
    "Co-Tuning 2.3": (["--co-tuning", "2.3"], 1.2),
    "DELTA 0.01": (["--delta", "0.01"], 1.7),
}


def wait(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="shufflenet_v2_x0_5")
    parser.add_argument("--weights", default="demo-pretrained")
    parser.add_argument("--resolution", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp())
    recipe = ["--data", "demo", "--arch", args.arch, "--weights", args.weights, "--workers", "0"]
    recipe += ["--resolution", str(args.resolution), "--batch-size", str(args.batch_size), "--device", args.device]
    runs = {}
    for name, (flags, _) in METHODS.items():
        if "LAST" in flags:
            flags = ["--train-blocks", stages(build_model(args.arch, "none", 10))[-1][0]]
        argv = [*recipe, *flags, "--run-dir", str(scratch / name.replace(" ", "_"))]
        runs[name] = train.setup(train.parse_train(argv), command=["train.py"])
    first = next(iter(runs.values()))
    batches = [
        first.device.put(*batch) for batch, _ in zip(first.train_batches, range(4), strict=False) if batch is not None
    ]
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            run.model.train()
            run.objective.train()
            set_trainable(run.cfg, run.raw_model)
            for step in range(args.steps + 2):
                batch = batches[step % len(batches)]
                wait(run.device.type)
                began = time.perf_counter()
                train_step(run.model, batch, run.optimizer, run.scaler, run.device, objective=run.objective)
                wait(run.device.type)
                if step >= 2:  # the first steps of a round warm the caches
                    times[name].append(time.perf_counter() - began)
    plain = statistics.median(times["plain"])
    device = first.device.type
    print(
        f"\n{args.arch} at {args.resolution} px, batch {args.batch_size}, on {device} "
        f"({torch.get_num_threads()} threads)"
    )
    print(f"{args.rounds} rounds of {args.steps} steps per method, median step time\n")
    print("| method | step | against plain | target |")
    print("|---|---|---|---|")
    for name, (_, target) in METHODS.items():
        median = statistics.median(times[name])
        print(f"| {name} | {1000 * median:.1f} ms | {median / plain:.2f}x | at most {target:g}x |")


if __name__ == "__main__":
    main()
