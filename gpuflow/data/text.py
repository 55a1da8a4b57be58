"""Character-level text: a corpus as integer ids, and its (x, y) windows for next-character
training, with a held-out tail."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import DataError, check_int
from .batches import Batches

__all__ = ["PYTHON_DOCS", "SequenceBatches", "load_text"]

PYTHON_DOCS = "python-docs"


def load_text(source: "str | os.PathLike[str]" = PYTHON_DOCS, *,
              vocabulary: str | None = None) -> tuple[np.ndarray, str]:
    """A text as character ids: returns (ids, vocabulary).

    source: "python-docs" (the default), the text of CPython's own `pydoc_data.topics` (the
    help pages `help("if")` shows: about 465,000 characters of English and code that ship
    with every Python; nothing is downloaded), the `topics` dict's texts joined by blank lines
    in the sorted order of its keys; or the path of a UTF-8 text file.
    vocabulary: a str of the distinct characters in code point order; ids: int64 (len(text),),
    text[i] == vocabulary[ids[i]], so `"".join(vocabulary[i] for i in ids)` decodes.
    vocabulary: None (the text's own), or a model's vocabulary to encode the text with (a
    resumed run, a model trained on another text): a character outside it is a DataError.
    Raises DataError naming the file if it is missing, empty or not UTF-8 text.
    """
    if isinstance(source, str) and source == PYTHON_DOCS:
        text, name = _python_docs(), "pydoc_data.topics"
    else:
        text, name = _read_text(source), os.fspath(source)
    if not text:
        raise DataError(f"{name}: the text is empty (0 characters).\nhelp: pass a file with "
                        f"some text, or the default corpus source={PYTHON_DOCS!r}.")
    own = "".join(sorted(set(text)))
    if vocabulary is None:
        vocabulary = own
    elif not isinstance(vocabulary, str) or not vocabulary or (
            "".join(sorted(set(vocabulary))) != vocabulary):
        raise DataError(f"load_text: vocabulary {vocabulary!r:.40} is not a str of distinct "
                        "characters in code point order.\nhelp: pass the vocabulary "
                        "load_text returned.")
    else:
        outside = sorted(set(own) - set(vocabulary))
        if outside:
            raise DataError(f"{name}: {len(outside)} character(s) are not in the vocabulary "
                            f"of {len(vocabulary)}, e.g. {''.join(outside[:5])!r}.\nhelp: "
                            "use the text the model was trained on, or train a new model.")
    codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    table = np.frombuffer(vocabulary.encode("utf-32-le"), dtype="<u4")
    return np.searchsorted(table, codes).astype(np.int64), vocabulary


def _python_docs() -> str:
    """pydoc_data.topics' texts, joined in the sorted order of their keys."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions split it off (e.g. a python3-doc package)
        raise DataError(f"pydoc_data.topics: this Python has no pydoc_data module ({exc}).\n"
                        "help: install your distribution's full Python (pydoc_data ships with "
                        "CPython), or pass the path of a UTF-8 text file.") from exc
    return "\n\n".join(topics[key] for key in sorted(topics))


def _read_text(source: Any) -> str:
    """The UTF-8 text of the file `source`; DataError naming it otherwise."""
    try:
        path = os.fspath(source)
    except TypeError:
        raise DataError(f"load_text: source {source!r:.60} is neither {PYTHON_DOCS!r} nor a "
                        "path.\nhelp: pass a file path (str or pathlib.Path).") from None
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: no such file.\nhelp: check the path, or use the default "
                        f"corpus source={PYTHON_DOCS!r}.") from exc
    except IsADirectoryError as exc:
        raise DataError(f"{path}: is a folder, expected a UTF-8 text file.\n"
                        "help: pass the path of one text file.") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc}.\nhelp: check the file's "
                        "permissions.") from exc
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start} of {len(blob)} is "
                        f"{blob[exc.start]:#04x}): a binary file?\nhelp: pass a text file, "
                        "or convert it to UTF-8 first.") from exc
    if "\x00" in text:
        raise DataError(f"{path}: holds NUL bytes (the first at byte {blob.index(0)} of "
                        f"{len(blob)}): a binary file, not text.\nhelp: pass a UTF-8 text "
                        "file.")
    return text


class SequenceBatches(Batches):
    """(x, y) windows of a sequence of ids for next-token training: x = ids[s : s + context],
    y = ids[s + 1 : s + context + 1], as (batch, context) int64 arrays.

    The last `held_out` fraction of the ids (0.1 by default; 0 for none) is held out: the
    training windows never reach into it, and `held_out_batches()` iterates its windows in
    order. The training part is cut into non-overlapping windows, `context` apart, from an
    offset drawn each epoch (so that each epoch's windows differ), and each epoch visits them
    in a fresh order; both are a function of (seed, epoch) only, so `state_dict()` resumes the
    same batches (as `Batches`, whose options and iteration rules these are). device: None
    (host arrays) or a gpuflow Device to put each batch on (ids keep their integer dtype).
    A context longer than the training part (or than the held-out tail) is a DataError.
    """

    def __init__(self, ids: Any, context: int, batch_size: int, *, seed: int = 0,
                 held_out: float = 0.1, shuffle: bool = True, drop_last: bool = False,
                 device: Any = None) -> None:
        where = "SequenceBatches"
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise DataError(f"{where}: ids have shape {ids.shape} and dtype {ids.dtype}; "
                            "expected a 1-D integer array.\nhelp: pass the ids of "
                            "gpuflow.data.load_text().")
        context = check_int(context, "context", 1, where=where, error=DataError)
        if (isinstance(held_out, bool) or not isinstance(held_out, numbers.Real)
                or not 0.0 <= float(held_out) < 1.0):
            raise DataError(f"{where}: held_out is {held_out!r}, expected a fraction with "
                            "0 <= held_out < 1.\nhelp: e.g. held_out=0.1 (the last 10%).")
        n_held = math.ceil(float(held_out) * len(ids))
        self.ids, self.context = ids.astype(np.int64, copy=False), context
        self.n_train = len(ids) - n_held
        for part, n in (("training part", self.n_train), ("held-out tail", n_held)):
            if n < context + 1 and (n or part == "training part"):  # no tail: held_out=0
                raise DataError(
                    f"{where}: context={context} needs {context + 1} ids a window (x and y "
                    f"shifted by one), but the {part} has {n} ({len(ids)} ids, held_out="
                    f"{held_out!r}).\nhelp: use a shorter context, more text, or another "
                    "held_out.")
        windows = (self.n_train - 1) // context
        # Batches' checks and iteration rules, over the window numbers (as both X and y)
        window_numbers = np.arange(windows)
        Batches.__init__(self, window_numbers, window_numbers, batch_size, shuffle=shuffle,
                         seed=seed, drop_last=drop_last, device=device)
        self.slack = self.n_train - 1 - windows * context  # the room for an epoch's offset
        self.held_out_windows = max(0, (n_held - 1) // context)

    def offset(self, epoch: int | None = None) -> int:
        """Where epoch's windows start (default: the current epoch), from (seed, epoch)."""
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle or not self.slack:
            return 0
        return int(np.random.default_rng([self.seed, epoch, 1]).integers(self.slack + 1))

    def _run(self, order: np.ndarray) -> Iterator[tuple[Any, Any]]:
        start = self.offset()
        for i in range(0, len(self) * self.batch_size, self.batch_size):
            yield self._windows(start + order[i:i + self.batch_size] * self.context)
        self.epoch += 1

    def held_out_batches(self) -> Iterator[tuple[Any, Any]]:
        """The held-out tail's non-overlapping windows in order, batch_size at a time (the
        last batch may be smaller); nothing if held_out=0."""
        starts = self.n_train + np.arange(self.held_out_windows) * self.context
        for i in range(0, len(starts), self.batch_size):
            yield self._windows(starts[i:i + self.batch_size])

    def _windows(self, starts: np.ndarray) -> tuple[Any, Any]:
        """(x, y) for windows starting at `starts`, on the device if one was given."""
        index = starts[:, None] + np.arange(self.context + 1)
        windows = self.ids[index]
        x, y = np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])
        if self.device is not None:
            return self.device.put(x), self.device.put(y)
        return x, y
