"""The transfer ledger: every host<->device copy and synchronisation a `Device` makes, counted.

`Device.put`, `Device.to_host` and `Device.synchronize` record into `LEDGER`; tests and the
bench read it, and strict mode (GPUFLOW_STRICT_TRANSFERS=1, or `Graph(strict=True)`)
turns an unexpected transfer inside a training step into a `TransferError`.

What strict mode can see: the copies and syncs a `Device` makes (on host devices, `cpu`,
`torch:cpu`, `jax:cpu`, `to_host` and `synchronize` move nothing and record nothing), and what
a device's `forbid_sync()` adds: CuPy's `allow_synchronize(False)`, and on array_api_strict a
node's own `float(x)`, `int(x)`, `bool(x)` of a device array (counted here as a d2h copy). A
node's own reads on torch or JAX arrays go around gpuflow and are not seen.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import TransferError


class TransferLedger:
    """Counts host<->device copies (calls and bytes) and synchronisations.

    In strict mode, a transfer or sync that nobody allowed raises `TransferError`. The executor
    allows the batch upload and an explicit read of the loss; everything else after warm-up is
    a stall the user did not ask for.
    """

    def __init__(self) -> None:
        self._allowed = 0    # > 0 inside a batch upload or a loss read
        self._enforcing = 0  # > 0 inside a strict step after warm-up
        # One reusable (re-entrant) context object each: a step enters them every time.
        self._allow_context = _Count(self, "_allowed")
        self._enforce_context = _Count(self, "_enforcing")
        self.reset()

    @staticmethod
    def strict_default() -> bool:
        """Whether GPUFLOW_STRICT_TRANSFERS asks for strict mode."""
        return os.environ.get("GPUFLOW_STRICT_TRANSFERS", "") not in ("", "0")

    def reset(self) -> None:
        """Zero every counter."""
        self.h2d_calls = self.h2d_bytes = 0
        self.d2h_calls = self.d2h_bytes = 0
        self.syncs = 0

    def snapshot(self) -> dict[str, int]:
        """The counters as a dict."""
        return {"h2d_calls": self.h2d_calls, "h2d_bytes": self.h2d_bytes,
                "d2h_calls": self.d2h_calls, "d2h_bytes": self.d2h_bytes, "syncs": self.syncs}

    def allowed(self) -> "_Count":
        """Context in which strict mode lets transfers through (a batch upload, a loss read)."""
        return self._allow_context

    def enforcing(self) -> "_Count":
        """Context in which every transfer or sync not `allowed` raises (strict mode)."""
        return self._enforce_context

    def record(self, kind: str, nbytes: int, device: Any, what: str) -> None:
        """Count one transfer or sync; in strict mode, refuse it unless allowed."""
        if self._enforcing and not self._allowed:
            raise TransferError(
                f"strict transfer mode: {kind} of {nbytes} bytes on {device.name} "
                f"({what}), outside a batch upload or loss read; this stalls a GPU training "
                "loop.\n"
                "help: keep values on the device, feed batches through Input.value or "
                "Graph.step, read the loss once per step, or turn strict mode off "
                "(GPUFLOW_STRICT_TRANSFERS=0).")
        if kind == "h2d":
            self.h2d_calls += 1
            self.h2d_bytes += nbytes
        elif kind == "d2h":
            self.d2h_calls += 1
            self.d2h_bytes += nbytes
        else:
            self.syncs += 1


class _Count:
    def __init__(self, ledger: TransferLedger, counter: str) -> None:
        self.ledger = ledger
        self.counter = counter

    def __enter__(self) -> None:
        setattr(self.ledger, self.counter, getattr(self.ledger, self.counter) + 1)

    def __exit__(self, *exc: object) -> None:
        setattr(self.ledger, self.counter, getattr(self.ledger, self.counter) - 1)


LEDGER = TransferLedger()
