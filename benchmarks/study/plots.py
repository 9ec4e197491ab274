"""PNG pictures of a study: a tuned run's hyperparameter trajectories, validation loss per epoch.

matplotlib is an optional extra (`pip install -e .[benchmarks]`), imported only here, when a
picture is drawn.
"""

from __future__ import annotations

import math
from typing import Sequence

from study.arms import ARMS

_PANEL_COLUMNS = 4


class MissingMatplotlib(RuntimeError):
    """Plotting was asked for without matplotlib installed."""


def pyplot():
    """matplotlib.pyplot with a file-only backend, or MissingMatplotlib naming the extra."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingMatplotlib("the study's pictures need matplotlib: pip install -e '.[benchmarks]'"
                                " (or pip install matplotlib)") from None
    return plt


def plot_trajectories(entry: dict, path: str) -> None:
    """One small panel per hyperparameter of a tuned run's `trajectory`, against weight steps."""
    trajectory = entry.get("trajectory") or []
    if not trajectory:
        raise ValueError(f"the {entry['arm']} run of seed {entry['seed']} has no trajectory.")
    plt = pyplot()
    names = [key for key in trajectory[0] if key != "step"]
    rows = math.ceil(len(names) / _PANEL_COLUMNS)
    columns = min(len(names), _PANEL_COLUMNS)
    figure, axes = plt.subplots(rows, columns, figsize=(3.0 * columns, 2.2 * rows), squeeze=False)
    steps = [point["step"] for point in trajectory]
    for axis, name in zip(axes.flat, names):
        axis.plot(steps, [point[name] for point in trajectory], linewidth=1.2,
                  marker="." if len(steps) < 30 else None)
        axis.set_title(name, fontsize=9)
        axis.tick_params(labelsize=7)
    for axis in list(axes.flat)[len(names):]:
        axis.set_visible(False)
    figure.supxlabel("weight step", fontsize=9)
    figure.suptitle(f"{entry['experiment']}: hyperparameters of the {entry['arm']} run, "
                    f"seed {entry['seed']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_val_losses(runs: Sequence[dict], path: str) -> None:
    """Validation loss per epoch of every run, one colour per arm."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7.0, 4.5))
    colours = {arm: f"C{index}" for index, arm in enumerate(ARMS)}
    labelled = set()
    for entry in runs:
        losses = entry.get("val_losses") or []
        if not losses:
            continue
        arm = entry["arm"]
        axis.plot(range(1, len(losses) + 1), losses, color=colours[arm],
                  linewidth=0.8 if arm == "random" else 1.5,
                  alpha=0.5 if arm == "random" else 1.0,
                  label=None if arm in labelled else arm)
        labelled.add(arm)
    axis.xaxis.get_major_locator().set_params(integer=True)
    axis.set_xlabel("epoch")
    axis.set_ylabel("validation loss")
    axis.set_title(f"{runs[0]['experiment']}: validation loss per epoch" if runs else "")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
