"""The README's Python snippets run, and print what the README says they print."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
GUIDE = README.parent / "docs" / "guide.md"  # the longer explanations moved out of the README


def _blocks(path: pathlib.Path = README) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


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


def test_training_snippet_reshuffles_every_epoch(monkeypatch, tmp_path):
    # Regression: the training snippet made a new Batches(..., seed=0) inside the epoch loop,
    # so every epoch saw the same batch order (Batches reshuffles per (seed, epoch) only when
    # one object is iterated epoch after epoch).
    import numpy as np

    import gpuflow.data

    orders = []

    class Recording(gpuflow.data.Batches):
        def order(self, epoch=None):
            result = super().order(epoch)
            orders.append(result.copy())
            return result

    monkeypatch.setattr(gpuflow.data, "Batches", Recording)
    monkeypatch.chdir(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        exec(_blocks()[2].replace("range(25)", "range(2)").replace('"auto"', '"cpu"'), {})
    assert len(orders) == 2, len(orders)
    assert not np.array_equal(orders[0], orders[1]), "both epochs used the same batch order"


def test_compile_step_snippet_runs_on_jax():
    # The compile_step snippet lives in docs/guide.md ("One compiled step"), run after the
    # README's training snippet, whose graph, opt and batches it uses.
    import pytest
    pytest.importorskip("jax")
    blocks = _blocks()
    snippet = next(b for b in _blocks(GUIDE) if "compile_step" in b)
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(blocks[2].replace("range(25)", "range(0)").replace('"auto"', '"jax:cpu"'),
             namespace)
        exec(snippet, namespace)
    graph, step = namespace["graph"], namespace["step"]
    assert type(step).__name__ == "CompiledStep" and graph.steps > 1
    assert graph.item(namespace["loss_value"]) < 2.3


def test_the_fastest_message_is_the_one_choose_fastest_prints():
    # Regression: the README still quoted the old one-line `device='fastest'` message (no
    # optimizer, rounds, spread or sureness) after choose_fastest began printing them. The
    # quote now lives in docs/guide.md ("Which device, and where two differ").
    from gpuflow.runtime.placement import FastestReport

    text = " ".join(GUIDE.read_text().split())
    quoted = re.search(r"`(gpuflow: device 'fastest' chose [^`]*)`", text).group(1)
    report = FastestReport({"cpu": 1e-3, "torch:cpu": 5e-2}, "cpu", {}, ((64, 64), (64,)),
                           {"cpu": [1e-3] * 5, "torch:cpu": [5e-2] * 5}, {"cpu": 4, "torch:cpu": 4},
                           ("Adam",))

    def skeleton(message: str) -> str:  # the wording, every number replaced
        return re.sub(r"\d+(\.\d+)?", "N", message)

    assert skeleton(quoted) == skeleton(str(report)), (quoted, str(report))


def test_the_readme_is_read_in_five_minutes():
    # Issue 19 item 6: a README a user reads in five minutes (under about 250 lines); the
    # longer explanations, option lists and secondary tables live in docs/. It was 298 lines.
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail into docs/"


def test_the_readmes_pointers_into_docs_exist():
    # Every `docs/X.md` the README names exists, and a section it names there ("Kept
    # buffers") is a heading of that file, so moving text out of the README leaves no dead link.
    text = " ".join(README.read_text().split())
    pointers = re.findall(r"`(docs/[\w-]+\.md)`(?:, \"([^\"]+)\")?", text)
    assert pointers
    for path, section in pointers:
        doc = README.parent / path
        assert doc.is_file(), f"README points to {path}, which does not exist"
        if section:
            headings = re.findall(r"^#+ (.+)$", doc.read_text(), re.M)
            assert any(section in h for h in headings), (path, section, headings)


def test_sequence_snippet_trains_and_samples_the_same_text_for_the_same_seed():
    """The README's GPT snippet (2 steps instead of 300): it trains, and gf.generate with the
    same seed gives the same text again, printed from the corpus's own characters."""
    block = next(b for b in _blocks() if "gf.generate" in b)
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(block.replace("range(300)", "range(2)"), namespace)
    text, vocabulary = out.getvalue()[:-1], namespace["vocabulary"]  # print's own newline
    assert text.startswith("The ") and len(text) == 4 + 60, text
    assert set(text) <= set(vocabulary)
    assert namespace["graph"].steps == 2 and namespace["opt"].t == 2
    again = namespace["gf"].generate(namespace["graph"], namespace["logits"],
                                     [vocabulary.index(c) for c in "The "], 60,
                                     temperature=0.8, top_k=10, seed=0)
    assert "".join(vocabulary[i] for i in again) == text
