"""gpuflow.distributed: 2-rank runs under mpiexec against one process trained in this test.

The MPI runs start `mpiexec -n 2 python tests/distributed_script.py ...` with a bounded timeout,
so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

import gpuflow as gf
from gpuflow.data import Batches
from gpuflow.distributed import Context, shard_bounds

sys.path.insert(0, os.path.dirname(__file__))
import distributed_script as script  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(__file__), "distributed_script.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 60


def _mpiexec() -> str | None:
    """The mpiexec beside this Python (the `mpich` wheel's), else the one on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.access(here, os.X_OK) else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
needs_mpi = pytest.mark.skipif(
    importlib.util.find_spec("mpi4py") is None or MPIEXEC is None,
    reason="needs mpi4py and mpiexec (pip install 'gpuflow[mpi]')")


def _clean_env() -> dict[str, str]:
    """This environment without any MPI launcher's variables, one BLAS thread per process."""
    env = {k: v for k, v in os.environ.items()
           if k not in gf.distributed.LAUNCHER_VARIABLES and not k.startswith(("PMI", "OMPI_"))}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def run(*args: str, ranks: int | None = 2) -> subprocess.CompletedProcess:
    """Run the script under `mpiexec -n ranks` (plain python if ranks is None), bounded by
    TIMEOUT_S; on a timeout the whole process group is killed and the test fails."""
    command = [sys.executable, SCRIPT, *args]
    if ranks is not None:
        command = [MPIEXEC, "-n", str(ranks), *command]
    return launch(command)


def launch(command: list[str]) -> subprocess.CompletedProcess:
    """Run `command` bounded by TIMEOUT_S, killing its whole process group on a timeout."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_clean_env(), start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # mpiexec and every rank under it
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(command)} hung for {TIMEOUT_S} s; output:\n{out}")
    return subprocess.CompletedProcess(command, proc.returncode, out, None)


def check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"{' '.join(result.args)} failed:\n{result.stdout}"


def reference(optimizer: str, batch_size: int, epochs: int) -> dict[str, np.ndarray]:
    """One process, the concatenated global batches: what every rank must end with."""
    X, y = script.data()
    graph = script.model()
    script.train(graph, script.OPTIMIZERS[optimizer](graph),
                 Batches(X, y, batch_size, seed=script.DATA_SEED), epochs)
    return script.parameters(graph)


def assert_close(actual: dict, expected: dict, where: str, rtol: float = 1e-12) -> None:
    for name, want in expected.items():
        got = actual[name]
        err = np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-300))
        assert np.allclose(got, want, rtol=rtol, atol=0), (
            f"{where}: {name} differs, max relative error {err:.3g}; "
            f"first values {got.ravel()[:3]} vs {want.ravel()[:3]}")


# -- one process: no launcher, no mpi4py, nothing changes --------------------------------------
def test_not_launched_is_one_rank_without_mpi4py():
    code = ("import sys, gpuflow; ctx = gpuflow.distributed.init(); "
            "print(ctx.rank, ctx.size, ctx.local_rank, ctx.comm, 'mpi4py' in sys.modules, "
            "'cupy' in sys.modules, ctx.device_spec('cuda'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_clean_env(), timeout=TIMEOUT_S, check=True).stdout.split()
    assert out == ["0", "1", "0", "None", "False", "False", "cuda"]


def test_one_rank_context_changes_nothing():
    X, y = script.data()
    graph = script.model()
    ctx = Context()
    before = script.parameters(graph)
    ctx.broadcast_parameters(graph)
    xb, yb = ctx.shard(X, y)
    assert xb is not None and len(xb) == len(X)
    graph.step(xb, yb)
    grads = {p: p.gradients[p] for p in graph.parameters}
    ctx.allreduce_gradients(graph)
    assert all(p.gradients[p] is g for p, g in grads.items())
    assert_close(script.parameters(graph), before, "one-rank broadcast", rtol=0)
    assert ctx.allreduce_scalar(2.5) == 2.5 and ctx.is_root


@pytest.mark.parametrize("total", [1, 2, 3, 7, 8, 512, 513])
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_shard_bounds_cover_the_batch_once(total, size):
    if total < size:
        with pytest.raises(gf.DataError, match="cannot give each"):
            Context(0, size).shard(np.zeros(total), np.zeros(total))
        return
    bounds = [shard_bounds(total, r, size) for r in range(size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    counts = [stop - start for start, stop in bounds]
    assert max(counts) - min(counts) <= 1


def test_sharded_batches_refuse_a_last_batch_smaller_than_the_ranks():
    X, y = script.data()  # 35 samples: batches of 17 leave 1 for 2 ranks
    with pytest.raises(gf.DataError, match="drop_last=True"):
        Context(0, 2).batches(X, y, 17)
    assert len(Context(0, 2).batches(X, y, 17, drop_last=True)) == 2


# -- two ranks ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> list[dict[str, np.ndarray]]:
    """Every rank's parameters after the `train` runs (SGD/Adam x batch 7/8 x flat/each)."""
    out = tmp_path_factory.mktemp("train")
    check(run("train", str(out)))
    ranks = [dict(np.load(out / f"rank{r}.npz")) for r in range(2)]
    assert [int(r.pop("size")) for r in ranks] == [2, 2]
    return ranks


@needs_mpi
@pytest.mark.parametrize("flat", ["flat", "each"])
@pytest.mark.parametrize("batch_size", [7, 8])  # 7 splits 4 + 3; 8 ends each epoch with 3
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_two_ranks_match_one_process(trained, optimizer, batch_size, flat):
    expected = reference(optimizer, batch_size, epochs=1)  # 5 steps
    for rank, params in enumerate(trained):
        key = f"{optimizer}-{batch_size}-{flat}/"
        got = {k[len(key):]: v for k, v in params.items() if k.startswith(key)}
        assert_close(got, expected, f"rank {rank}, {key}")


@needs_mpi
def test_flattened_and_per_parameter_allreduce_agree(trained):
    for params in trained:
        for key, value in params.items():
            if "-flat/" in key:
                other = params[key.replace("-flat/", "-each/")]
                assert np.array_equal(value, other), f"{key}: flat and per-parameter differ"


@needs_mpi
@pytest.mark.parametrize("first, second", [(2, 1), (None, 2)],
                         ids=["2-ranks-then-1", "1-process-then-2-ranks"])
def test_checkpoint_resumes_across_rank_counts(tmp_path, first, second):
    ckpt = tmp_path / "ckpt.safetensors"
    check(run("phase1", str(ckpt), ranks=first))
    check(run("phase2", str(ckpt), str(tmp_path), ranks=second))
    expected = reference("adam", 7, epochs=2)  # 10 steps
    for rank in range(second):
        params = dict(np.load(tmp_path / f"rank{rank}.npz"))
        assert int(params.pop("size")) == second
        assert_close(params, expected, f"resumed on rank {rank} of {second}")


@needs_mpi
def test_a_dead_rank_stops_the_others():
    result = run("die")  # rank 1 calls os._exit(1) at step 2; rank 0 waits in the allreduce
    assert result.returncode != 0, result.stdout


@needs_mpi
def test_a_raising_rank_aborts_the_others_with_a_clear_message():
    result = run("raise")
    assert result.returncode != 0, result.stdout
    assert "RuntimeError: rank 1 fails on purpose" in result.stdout
    assert "gpuflow.distributed: rank 1 of 2 stopped on RuntimeError" in result.stdout
    assert "MPI_Abort" in result.stdout


ABORT_CHILD = r"""
import fcntl, os, struct, sys, termios
from gpuflow.distributed import mpi

class Comm:  # stands in for COMM_WORLD: records what the launcher had not yet read at Abort
    def Abort(self, code):
        unread = [struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, bytes(4)))[0]
                  for fd in (1, 2)]
        with open(sys.argv[1], "w") as f:
            f.write(f"{unread[0]} {unread[1]}")
        os._exit(code)

mpi.abort_on_exception(Comm(), 1, 2)
sys.stdout.write("printed before the error, no newline")  # still in Python's buffer
open(sys.argv[2], "w").close()  # tells the parent that the raise comes next
raise RuntimeError("rank 1 fails on purpose")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="FIONREAD on a pipe: Linux")
def test_abort_waits_until_the_launcher_has_read_the_message(tmp_path):
    # mpiexec kills every rank at MPI_Abort, and its proxy forwards only what it has read from
    # the rank's pipes by then: under load the traceback and the message were cut short. The
    # parent here plays a slow proxy, reading nothing for a second after the raise.
    report, ready = tmp_path / "unread", tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", ABORT_CHILD, str(report), str(ready)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**_clean_env(), "PYTHONPATH": REPO})
    try:
        for _ in range(600):
            if ready.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        time.sleep(1.0)
        out, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        proc.kill()
    assert proc.returncode == 1, (out, err)
    assert report.read_text() == "0 0", (
        f"bytes of (stdout, stderr) the launcher had not read when MPI_Abort was called: "
        f"{report.read_text()}")
    assert out == "printed before the error, no newline"
    assert "RuntimeError: rank 1 fails on purpose" in err, err
    assert "gpuflow.distributed: rank 1 of 2 stopped on RuntimeError" in err, err


@needs_mpi
def test_gpuflow_train_under_mpiexec_matches_one_process(tmp_path):
    args = ["-m", "gpuflow", "train", "--epochs", "2", "--dtype", "float64", "--hidden", "16",
            "--device", "cpu", "--quiet"]
    two = launch([MPIEXEC, "-n", "2", sys.executable, *args[:-1], "--save",
                  str(tmp_path / "two.safetensors")])
    one = launch([sys.executable, *args[:-1], "--save", str(tmp_path / "one.safetensors")])
    check(two)
    check(one)
    assert "data-parallel over 2 MPI ranks, devices cpu, cpu" in two.stdout, two.stdout
    assert two.stdout.count("final test accuracy") == 1, "only rank 0 prints"
    final = [line for line in one.stdout.splitlines() if line.startswith("final")]
    assert final and final[0] in two.stdout, (one.stdout, two.stdout)
    a = load_file(tmp_path / "two.safetensors")
    b = load_file(tmp_path / "one.safetensors")
    names = [k for k in a if k.startswith("param/")]
    assert names and sorted(names) == sorted(k for k in b if k.startswith("param/"))
    for k in names:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-12, atol=1e-15, err_msg=k)
