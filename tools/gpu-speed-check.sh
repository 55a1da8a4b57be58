#!/usr/bin/env bash
# GPU check for the speed issue, one call on a lent machine (carry .whl): the suite on cuda and
# torch:cuda (cpu too), then `gpuflow bench --device cuda` with W1-W6 against torch CUDA eager,
# and W5-W6 on torch:cuda (issue 10's targets: 1.3x and 1.1x of torch CUDA eager).
set -u
source tools/gpu-env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
git log -1 --format='commit %h %s' 2>/dev/null | tee "$OUT/pytest.txt"
GPUFLOW_TEST_DEVICES=cuda,torch:cuda,cpu timeout 200 python3 -m pytest -q -p no:cacheprovider \
  -x 2>&1 | tee -a "$OUT/pytest.txt" | tail -8
timeout 240 python3 -m gpuflow bench --device cuda --workloads W1,W2,W3,W4,W5,W6 \
  --rounds 5 --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt" | tail -24
timeout 120 python3 -m gpuflow bench --device torch:cuda --workloads W5,W6 --rounds 5 \
  --json "$OUT/bench-torch.json" 2>&1 | tee "$OUT/bench-torch.txt" | tail -16
timeout 40 python3 -m gpuflow train --device cuda 2>&1 | tee "$OUT/train.txt" | tail -3
