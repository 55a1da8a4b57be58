#!/usr/bin/env bash
# GPU check for the speed issue, one call on a lent machine (carry .whl): the suite on cuda and
# torch:cuda (cpu too), then `gpuflow bench --device cuda` with W1-W4 against torch CUDA eager.
set -u
source tools/gpu-env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
git log -1 --format='commit %h %s' 2>/dev/null | tee "$OUT/pytest.txt"
GPUFLOW_TEST_DEVICES=cuda,torch:cuda,cpu timeout 200 python3 -m pytest -q -p no:cacheprovider \
  -x 2>&1 | tee -a "$OUT/pytest.txt" | tail -8
timeout 240 python3 -m gpuflow bench --device cuda --workloads W1,W2,W3,W4 --rounds 5 \
  --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt" | tail -22
timeout 40 python3 -m gpuflow train --device cuda 2>&1 | tee "$OUT/train.txt" | tail -3
