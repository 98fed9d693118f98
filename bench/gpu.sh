#!/usr/bin/env bash
# Everything a GPU can tell us, in at most about 8 minutes; one summary table at the end.
#   bash bench/gpu.sh            (after `uv sync`; writes its logs to bench/results/)
# Record what it prints, with the date and the hardware, in docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
log=bench/results/gpu-$(date +%Y%m%d-%H%M%S)
quiet() { grep -v "it/s\]\|s/it\]" || true; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$log.hardware"
echo "$(nproc) CPU cores" | tee -a "$log.hardware"

uv run python bench/input_pipeline.py --images 1024 2>&1 | quiet | tee "$log.input"
# the extra augmentation, image by image against the whole batch, on the GPU
uv run python bench/augment.py 2>&1 | quiet | tee "$log.augment"
# eager against compiled + AMP + channels-last, each end to end and on synthetic batches, and eval
uv run python bench/train_throughput.py --arch resnet50 --resolution 224 --batch-size 128 2>&1 | quiet | tee "$log.224"
uv run python bench/train_throughput.py --arch resnet50 --resolution 448 --batch-size 64 --steps 40 2>&1 | quiet | tee "$log.448"
# the demo on the GPU, 2 epochs, as a user runs it (auto: compile, AMP, channels-last on)
uv run train.py --config configs/demo.toml --epochs 2 --run-dir bench/results/demo-gpu --overwrite 2>&1 | quiet | tee "$log.demo"
# no recompiles, and the host waits of a training step, on CUDA
uv run python bench/cuda_checks.py 2>&1 | quiet | tee "$log.checks"

echo
echo "| benchmark | result |"
echo "|---|---|"
echo "| hardware | $(head -1 "$log.hardware"), $(nproc) cores |"
echo "| input pipeline (bench/input_pipeline.py) | $(tail -1 "$log.input") |"
echo "| extra augmentation (bench/augment.py) | $(tail -1 "$log.augment") |"
echo "| training and eval, 224 px (bench/train_throughput.py) | $(tail -1 "$log.224") |"
echo "| training and eval, 448 px | $(tail -1 "$log.448") |"
echo "| demo, 2 epochs on the GPU | $(grep '^done in' "$log.demo") |"
echo "| CUDA checks (bench/cuda_checks.py) | $(tail -1 "$log.checks") |"
