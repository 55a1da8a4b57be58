"""Packaging: what the README's install commands give a user."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _pip_has_python_option() -> bool:
    """pip >= 22.3 can install into another interpreter (`pip --python`)."""
    import pip

    major, minor = (int(part) for part in pip.__version__.split(".")[:2])
    return (major, minor) >= (22, 3)


@pytest.mark.skipif(not _pip_has_python_option(), reason="needs pip >= 22.3 (pip --python)")
def test_editable_install_wins_over_the_clone_folder_next_to_a_script(tmp_path):
    """README: `pip install -e '.[test]'` in a clone named gpuflow/, then a script saved next
    to the clone folder. Python puts the script's folder first on sys.path, where the clone
    folder (no __init__.py) is a namespace package `gpuflow`; the installed package must win.
    A real editable install into a fresh venv (about 10 s; no network: no deps, no isolation).

    The venv builds with the setuptools of the environment the tests run in, which the test
    extra brings (`pip install -e '.[test]'`: setuptools>=77, as pyproject.toml's
    build-system needs for `license = "MIT"`); a fresh virtual environment of Python 3.11
    has setuptools 65.5, of 3.12 none."""
    import importlib.metadata

    setuptools = importlib.metadata.version("setuptools")
    assert int(setuptools.split(".")[0]) >= 77, (
        f"setuptools {setuptools} cannot build this project (pyproject.toml needs >= 77); "
        "pip install -e '.[test]' installs it")
    clone = tmp_path / "gpuflow"
    clone.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, clone / name)
    shutil.copytree(REPO / "gpuflow", clone / "gpuflow",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    # The venv sees the packages of the environment these tests run in (numpy, setuptools),
    # after its own (the editable install's .pth sorts first): system_site_packages would
    # give the base interpreter's instead, which in a virtual environment has neither.
    inner = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                            "['purelib'])"], capture_output=True, text=True, check=True)
    outer = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    Path(inner.stdout.strip(), "zz_tests_environment.pth").write_text("\n".join(outer) + "\n")
    env = {k: v for k, v in os.environ.items()
           if k != "PYTHONPATH" and not k.startswith("GPUFLOW_")}
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-index",
         "--no-deps", "--no-build-isolation", "-e", str(clone)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    script = tmp_path / "train_mine.py"
    script.write_text("import gpuflow\nprint(gpuflow.__file__)\nprint(gpuflow.Input.__name__)\n")
    run = subprocess.run([str(python), str(script)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    where, name = run.stdout.split()
    assert Path(where) == clone / "gpuflow" / "__init__.py" and name == "Input"
