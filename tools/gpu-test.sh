#!/usr/bin/env bash
# Short GPU re-check: the whole suite on cuda, torch:cuda and cpu, then gpuflow train --device cuda.
set -u
source tools/gpu-env.sh
git log -1 --format='commit %h %s' 2>/dev/null | tee "$OUT/pytest.txt"
GPUFLOW_TEST_DEVICES=cuda,torch:cuda,cpu timeout 240 python3 -m pytest -q -p no:cacheprovider \
  2>&1 | tee -a "$OUT/pytest.txt" | tail -6
timeout 60 python3 -m gpuflow train --device cuda 2>&1 | tee "$OUT/train.txt" | tail -3
