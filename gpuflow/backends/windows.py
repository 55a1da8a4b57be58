"""Window helpers for libraries whose arrays take slice assignment (NumPy, CuPy, torch): the
in-place col2im their `Ops.col2im` runs (gpuflow.nodes.conv keeps the portable, write-free one)."""

from __future__ import annotations

from typing import Any


def col2im_in_place(parts: list, kw: int, sh: int, sw: int, out: Any) -> Any:
    """out = 0, then parts[i * kw + j] (N, C, Ho, Wo) added into out's strided slice of offset
    (i, j): for libraries whose arrays take slice assignment (NumPy, CuPy, torch)."""
    out[...] = 0
    ho, wo = parts[0].shape[2:]
    for k, part in enumerate(parts):
        i, j = divmod(k, kw)
        out[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw] += part
    return out
