#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (see ../shared/gpu/README.md).
# Carry .whl/ (see tools/gpu-env.sh).
# Writes logs to $OUT (or ./gpu-out). Usage: bash tools/gpu-check.sh
set -u
source tools/gpu-env.sh
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import cupy, torch, numpy; print('cupy', cupy.__version__, 'torch', torch.__version__, 'numpy', numpy.__version__)"
  python3 -m gpuflow devices
} 2>&1 | tee "$OUT/gpu.txt"
echo "== tests (cuda, torch:cuda, cpu), all but the MPI ones"
GPUFLOW_TEST_DEVICES=cuda,torch:cuda,cpu timeout 220 python3 -m pytest -q -p no:cacheprovider \
  --ignore=tests/test_distributed.py 2>&1 | tee "$OUT/pytest.txt" | tail -8
echo "== gpuflow train --device cuda"
timeout 60 python3 -m gpuflow train --device cuda 2>&1 | tee "$OUT/train.txt" | tail -5
echo "== gpuflow bench --device cuda"
timeout 150 python3 -m gpuflow bench --device cuda --rounds 5 --json "$OUT/bench.json" \
  2>&1 | tee "$OUT/bench.txt" | tail -18
echo "== MPI: tests, and mpiexec -n 2 gpuflow train --device cuda:0 (one GPU: host-staged)"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_distributed.py 2>&1 \
  | tee "$OUT/mpi.txt" | tail -4
timeout 60 mpiexec -n 2 python3 -m gpuflow train --device cuda:0 --epochs 5 2>&1 \
  | tee -a "$OUT/mpi.txt" | tail -6
timeout 30 python3 -m gpuflow train --device cuda:0 --epochs 5 --quiet 2>&1 | tee -a "$OUT/mpi.txt"
