"""The README's Python snippets run, and print what the README says they print."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_miniflow_snippet_prints_what_the_readme_shows():
    block = _blocks()[0]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(block, {})
    printed = out.getvalue().split()
    shown = re.findall(r"# ([^\n]+)", block)
    assert printed[0] == shown[1].split()[0], (printed, shown)
    assert " ".join(printed[1:]) == "[[5.01028709e-05] [1.00205742e-04]]", printed


def test_custom_node_and_training_snippets_run():
    blocks = _blocks()
    namespace: dict = {}
    exec("from gpuflow import *\n" + blocks[1], namespace)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(blocks[2].replace("range(25)", "range(2)").replace('"auto"', '"cpu"'), {})
    losses = [float(line.split()[1]) for line in out.getvalue().splitlines()]
    assert len(losses) == 2 and losses[1] < losses[0], losses
