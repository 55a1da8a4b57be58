"""Sampling from a trained language model: a prompt continued token by token, as nanoGPT's
`generate` (crop the context, the last position's logits / temperature, top-k, sample).

The sampling runs on the host with a seeded NumPy generator, so one seed gives the same text
from the same logits: the same text on the same device (another device's logits may differ in
the last bits, and so pick another token where two are nearly tied).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from .errors import GraphError, check_int
from .host import to_numpy
from .nodes.positions import Positions


def generate(graph: Any, logits: Any, prompt: Any, n: int, *, temperature: float = 1.0,
             top_k: int | None = None, seed: int = 0, context: int | None = None) -> np.ndarray:
    """`prompt` (integer ids, (T,) or (N, T)) followed by `n` sampled ids: a host int64
    array of shape (T + n,) or (N, T + n).

    Each step runs `graph` forward (evaluation mode: no dropout) from the ids so far, the last
    `context` of them (default: the length of the model's position table, e.g.
    gf.layers.gpt's `context`; all of them for a model without one, such as an LSTM), up to
    `logits` (N, T, vocab); divides the last position's logits by `temperature` (0: the most
    likely id, no sampling), keeps the `top_k` largest (all if None) and draws the next id from
    their softmax with a NumPy generator seeded by `seed`.
    """
    where = "generate"
    n = check_int(n, "n", 0, where=where, error=GraphError)
    if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
            or not (math.isfinite(temperature) and temperature >= 0)):
        raise GraphError(f"{where}: temperature={temperature!r} must be a finite number >= 0."
                         "\nhelp: e.g. temperature=0.8 (lower: surer text; 0: always the most "
                         "likely id).")
    if top_k is not None:
        top_k = check_int(top_k, "top_k", 1, where=where, error=GraphError)
    ids = np.asarray(to_numpy(prompt))
    if ids.dtype.kind not in "iu" or ids.ndim not in (1, 2) or not ids.size:
        raise GraphError(f"{where}: the prompt has dtype {ids.dtype} and shape {ids.shape}; "
                         "expected integer ids, (T,) or (N, T), at least one.\nhelp: encode "
                         "the prompt with the vocabulary the model was trained on.")
    single = ids.ndim == 1
    ids = ids.astype(np.int64).reshape(1, -1) if single else ids.astype(np.int64)
    if context is None:
        context = next((node.inbound_nodes[1].value.shape[0] for node in graph.nodes
                        if isinstance(node, Positions)), None)
    elif not isinstance(context, numbers.Integral) or context < 1:
        raise GraphError(f"{where}: context={context!r} must be a positive integer.\nhelp: "
                         "the model's context length, or None.")
    rng = np.random.default_rng(seed)
    for _ in range(n):
        window = ids if context is None else ids[:, -context:]
        last = np.asarray(to_numpy(graph.run(logits, window)), dtype=np.float64)[:, -1, :]
        ids = np.concatenate([ids, _draw(rng, last, temperature, top_k)[:, None]], axis=1)
    return ids[0] if single else ids


def _draw(rng: np.random.Generator, z: np.ndarray, temperature: float,
          top_k: int | None) -> np.ndarray:
    """One id per row of the logits z (N, vocab)."""
    if temperature == 0:
        return z.argmax(axis=-1)
    z = z / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.sort(z, axis=-1)[:, -top_k, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    cdf = np.cumsum(p / p.sum(axis=-1, keepdims=True), axis=-1)
    u = rng.random((z.shape[0], 1))
    return np.minimum((cdf < u).sum(axis=-1), z.shape[-1] - 1)  # inverse CDF
