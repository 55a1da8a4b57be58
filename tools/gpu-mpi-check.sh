#!/usr/bin/env bash
# The MPI part of the GPU checks: MPICH from its wheel (pip --target drops the wheel's lib/,
# so unpack it by hand and point mpi4py at its libmpi), then the distributed tests and
# `mpiexec -n 2 gpuflow train --device cuda:0` (two ranks on one GPU: host-staged MPI).
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
python3 -m zipfile -e .whl/mpich-*.whl /tmp/mpich >/dev/null || exit 1
MPICH=$(echo /tmp/mpich/mpich-*.data/data); chmod +x "$MPICH"/bin/*
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PATH=$MPICH/bin:$PATH
export MPI4PY_LIBMPI=$MPICH/lib/libmpi.so.12 MPI4PY_MPIABI=mpich LD_LIBRARY_PATH=$MPICH/lib
python3 -c "from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0])" 2>&1 | tee "$OUT/mpi.txt"
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_distributed.py tests/test_examples.py \
  tests/test_devices.py -k "distributed or miniflow_nn or loads_no_gpu" 2>&1 | tee -a "$OUT/mpi.txt" | tail -5
echo "== two ranks on cuda:0"
timeout 60 mpiexec -n 2 python3 -m gpuflow train --device cuda:0 --epochs 5 2>&1 | tee -a "$OUT/mpi.txt" | tail -9
echo "== one process on cuda:0"
timeout 30 python3 -m gpuflow train --device cuda:0 --epochs 5 --quiet 2>&1 | tee -a "$OUT/mpi.txt"
