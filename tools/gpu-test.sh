#!/usr/bin/env bash
# Short GPU re-check: the whole suite on cuda, torch:cuda and cpu, then gpuflow train --device cuda.
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
python3 -m zipfile -e .whl/mpich-*.whl /tmp/mpich >/dev/null || exit 1
MPICH=$(echo /tmp/mpich/mpich-*.data/data); chmod +x "$MPICH"/bin/*
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PATH=$MPICH/bin:$PATH
export MPI4PY_LIBMPI=$MPICH/lib/libmpi.so.12 MPI4PY_MPIABI=mpich LD_LIBRARY_PATH=$MPICH/lib
git log -1 --format='commit %h %s' 2>/dev/null | tee "$OUT/pytest.txt"
GPUFLOW_TEST_DEVICES=cuda,torch:cuda,cpu timeout 240 python3 -m pytest -q -p no:cacheprovider \
  2>&1 | tee -a "$OUT/pytest.txt" | tail -6
timeout 60 python3 -m gpuflow train --device cuda 2>&1 | tee "$OUT/train.txt" | tail -3
