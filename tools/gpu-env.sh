# Sourced by the tools/gpu-*.sh scripts on a lent GPU machine: installs the carried wheels
# into /tmp/site, unpacks MPICH (pip --target drops the wheel's lib/) and points mpi4py at it.
# Make .whl/ here first: `../shared/gpu/prepare-wheels`, then (mpi4py's wheel is tagged
# manylinux1, which prepare-wheels does not ask for):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
#     -d .whl mpi4py mpich
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
python3 -m zipfile -e .whl/mpich-*.whl /tmp/mpich >/dev/null || exit 1
MPICH=$(echo /tmp/mpich/mpich-*.data/data); chmod +x "$MPICH"/bin/*
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PATH=$MPICH/bin:$PATH
export MPI4PY_LIBMPI=$MPICH/lib/libmpi.so.12 MPI4PY_MPIABI=mpich LD_LIBRARY_PATH=$MPICH/lib
