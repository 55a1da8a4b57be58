#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (see ../shared/gpu/README.md):
#   run with the wheels from ../shared/gpu/prepare-wheels carried in .whl/.
# Writes logs to $OUT (or ./gpu-out). Usage: bash tools/gpu-check.sh [quick|full]
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import cupy, torch, numpy; print('cupy', cupy.__version__, 'torch', torch.__version__, 'numpy', numpy.__version__)" | tee -a "$OUT/gpu.txt"
python3 -c "import gpuflow as gf; print(gf.available_devices()); print(gf.get_device('cuda').describe()); print(gf.get_device('auto'))" 2>&1 | tee -a "$OUT/gpu.txt"
mode=${1:-quick}
if [ "$mode" = quick ]; then
  GPUFLOW_TEST_DEVICES=cuda,torch:cuda timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_nodes.py 2>&1 | tee "$OUT/pytest.txt" | tail -15
else
  GPUFLOW_TEST_DEVICES=cuda,torch:cuda,cpu timeout 400 python3 -m pytest -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest.txt" | tail -25
fi
if [ -f gpuflow/cli.py ]; then
  timeout 120 python3 -m gpuflow train --device cuda 2>&1 | tail -8 | tee "$OUT/train.txt"
fi
if [ -f gpuflow/bench.py ] && [ "$mode" = full ]; then
  timeout 300 python3 -m gpuflow bench --device cuda --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt" | tail -30
fi
