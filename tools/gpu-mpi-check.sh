#!/usr/bin/env bash
# The MPI part of the GPU checks: MPICH from its wheel (pip --target drops the wheel's lib/,
# so unpack it by hand and point mpi4py at its libmpi), then the distributed tests and
# `mpiexec -n 2 gpuflow train --device cuda:0` (two ranks on one GPU: host-staged MPI).
set -u
source tools/gpu-env.sh
python3 -c "from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0])" 2>&1 | tee "$OUT/mpi.txt"
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_distributed.py tests/test_examples.py \
  tests/test_devices.py -k "distributed or miniflow_nn or loads_no_gpu" 2>&1 | tee -a "$OUT/mpi.txt" | tail -5
echo "== two ranks on cuda:0"
timeout 60 mpiexec -n 2 python3 -m gpuflow train --device cuda:0 --epochs 5 2>&1 | tee -a "$OUT/mpi.txt" | tail -9
echo "== one process on cuda:0"
timeout 30 python3 -m gpuflow train --device cuda:0 --epochs 5 --quiet 2>&1 | tee -a "$OUT/mpi.txt"
