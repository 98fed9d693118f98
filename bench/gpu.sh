#!/usr/bin/env bash
# Every benchmark on a CUDA machine, in about 5-8 minutes; one summary table at the end.
#   bash bench/gpu.sh            (after `uv sync`; writes its logs to bench/results/)
# Record what it prints, with the date and the hardware, in docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
log=bench/results/gpu-$(date +%Y%m%d-%H%M%S)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$log.hardware"
echo "$(nproc) CPU cores" | tee -a "$log.hardware"

uv run python bench/input_pipeline.py --images 1024 2>&1 | grep -v "it/s\]" | tee "$log.input"
uv run python bench/train_throughput.py --arch resnet50 --resolution 224 --batch-size 128 2>&1 | grep -v "it/s\]" | tee "$log.resnet50"
uv run python bench/train_throughput.py --arch resnet50 --resolution 224 --batch-size 128 --no-compile 2>&1 | grep -v "it/s\]" | tee "$log.resnet50-eager"

echo
echo "| benchmark | result |"
echo "|---|---|"
echo "| hardware | $(head -1 "$log.hardware"), $(nproc) cores |"
echo "| input pipeline (bench/input_pipeline.py) | $(tail -1 "$log.input") |"
echo "| training, compiled (bench/train_throughput.py) | $(tail -1 "$log.resnet50") |"
echo "| training, eager | $(tail -1 "$log.resnet50-eager") |"
