#!/usr/bin/env bash
# The GPU check for a lent H100/H200 (issue 8), one prepared script under 8 minutes.
# Installs nothing: the machine's python3 already holds torch, triton, numba, pyarrow, pytest and
# hypothesis; sterling runs from src/. Results land in $OUT (default runs/gpu):
#   gpu.txt (the card), tests.log (the Triton kernel tests on CUDA), bench.log and gpu.json
#   (sterling's Triton scan vs plain PyTorch on the GPU vs the bandwidth floor, with recall).
# Usage: bash bench/gpu.sh            (N=20000000 bash bench/gpu.sh for 20M items)
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
timeout 180 $PY -m pytest -q -p no:cacheprovider tests/ops/test_ivf_scan_triton.py 2>&1 | tail -5 | tee "$OUT/tests.log"
timeout 330 $PY -m sterling.bench.gpu --n "${N:-10000000}" --d 128 --nlist 4096 --batches 16,256 --ks 1024,2048 \
    --nprobes "${NPROBES:-16,64,256}" --repeats 5 --json "$OUT/gpu.json" 2>&1 | tee "$OUT/bench.log"
