"""The README's Python snippets run as written (epochs shortened, the CPU for 'auto')."""

from __future__ import annotations

import os
import re

import numpy as np

import gpuflow.data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocks() -> list[str]:
    with open(os.path.join(REPO, "README.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def test_readme_snippets_run_and_reshuffle_every_epoch(tmp_path, monkeypatch, capsys):
    # Regression: the training snippet made a new Batches(..., seed=0) inside the epoch loop,
    # so every epoch saw the same batch order (Batches reshuffles per (seed, epoch) only when
    # one object is iterated epoch after epoch).
    orders = []

    class Recording(gpuflow.data.Batches):
        def order(self, epoch=None):
            result = super().order(epoch)
            orders.append(result.copy())
            return result

    monkeypatch.setattr(gpuflow.data, "Batches", Recording)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in _blocks():
        code = block.replace("range(25)", "range(2)").replace('device="auto"', 'device="cpu"')
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert len(orders) == 2, len(orders)
    assert not np.array_equal(orders[0], orders[1]), "both epochs used the same batch order"
    assert "2.4999498960133932" in capsys.readouterr().out
