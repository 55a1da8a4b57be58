"""`gpuflow train --plot`: the run's loss and held-out accuracy per epoch as a PNG."""

from __future__ import annotations

from typing import Sequence

from ..commandline import CommandError


def require_matplotlib() -> None:
    """CommandError unless matplotlib can be imported (checked before training starts)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CommandError("--plot needs matplotlib, which is not installed.\n"
                           "help: pip install 'gpuflow[plot]', or drop --plot.") from None


def plot_curves(path: str, losses: Sequence[float], accuracies: Sequence[float]) -> None:
    """Write a PNG with the train loss and the held-out accuracy per epoch."""
    require_matplotlib()
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.ticker import MaxNLocator

    epochs = range(1, len(losses) + 1)
    fig = Figure(figsize=(9, 3.5), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, losses, marker="o")
    ax_loss.set(xlabel="epoch", ylabel="mean train loss", title="loss", yscale="log")
    ax_acc.plot(epochs, accuracies, marker="o", color="tab:green")
    ax_acc.set(xlabel="epoch", ylabel="held-out accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.savefig(path, format="png", dpi=100)
