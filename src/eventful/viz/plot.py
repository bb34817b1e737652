"""A plot of ops and fidelity per frame of a video run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLOT_SUFFIXES = (".png", ".pdf", ".svg")  # the formats `plot_run` is tested to write

EVENT_COLOURS = {
    "scene_cut": "tab:red",
    "error": "tab:purple",
    "periodic": "tab:olive",
    "resolution": "black",
}


def plot_run(report: dict, path: str | Path) -> None:
    """Save `run_figure(report)` to `path` (any of `PLOT_SUFFIXES`)."""
    run_figure(report).savefig(path, dpi=100)


def run_figure(report: dict) -> Figure:
    """GMACs per frame (eventful against dense, and the ops budget in force), fidelity per
    frame (tokens updated; with a comparison the feature cosine and saliency MAE; the
    engine's estimated cosine, dashed, where it gives one) and, under a latency budget, ms per
    frame against it; refreshes and resets are vertical lines on every panel."""
    from matplotlib.figure import Figure  # matplotlib only where a plot is asked for

    frames = report["per_frame"]
    index = [f["index"] for f in frames]
    latency = any(f["budget_ms"] is not None for f in frames)
    figure = Figure(figsize=(9, 8.5 if latency else 6))
    axes = figure.subplots(3 if latency else 2, 1, sharex=True)
    ops_axis, fidelity_axis = axes[0], axes[1]
    ops_axis.plot(index, [f["gops"] for f in frames], label="eventful")
    ops_axis.axhline(report["dense"]["gops_per_frame"], color="grey", linestyle="--", label="dense")
    _budget_line(ops_axis, index, [f["budget_gops"] for f in frames], "ops budget")
    ops_axis.set_ylabel("GMACs per frame")
    ops_axis.set_ylim(bottom=0)
    ops_axis.set_title(
        f"{report['model']}, {report['policy']}, level {report['level']}: "
        f"{report['video'].rsplit('/', 1)[-1]}"
    )
    fidelity_axis.plot(
        index, [f["updated_fraction"] for f in frames], color="tab:blue", label="tokens updated"
    )
    if report["fidelity"]["feature_cosine_mean"] is not None:
        fidelity_axis.plot(
            index, [f["feature_cosine"] for f in frames], color="tab:orange", label="feature cosine"
        )
    if report["eventful"]["estimated_cosine_mean"] is not None:
        estimated = [f["estimated_cosine"] for f in frames]
        fidelity_axis.plot(
            index,
            [float("nan") if value is None else value for value in estimated],
            color="tab:orange",
            linestyle="--",
            label="estimated cosine",
        )
    if report["fidelity"]["saliency_mae"] is not None:
        fidelity_axis.plot(
            index, [f["saliency_mae"] for f in frames], color="tab:green", label="saliency MAE"
        )
    fidelity_axis.set_ylim(0, 1.02)
    fidelity_axis.legend(loc="lower right")
    if latency:
        time_axis = axes[2]
        time_axis.plot(index, [f["ms"] for f in frames], label="eventful")
        _budget_line(time_axis, index, [f["budget_ms"] for f in frames], "latency budget")
        time_axis.set_ylabel("ms per frame")
        time_axis.set_ylim(bottom=0)
        time_axis.legend(loc="upper right")
    axes[-1].set_xlabel("frame")
    _event_lines(axes, frames)
    ops_axis.legend(loc="upper right")
    figure.tight_layout()
    return figure


def _budget_line(axis, index: list[int], budget: list[float | None], label: str) -> None:
    """The budget in force as a step line; absent where no budget of this kind is in force."""
    if any(value is not None for value in budget):
        values = [float("nan") if value is None else value for value in budget]
        axis.step(index, values, where="post", color="tab:green", linestyle=":", label=label)


def _event_lines(axes, frames: list[dict]) -> None:
    """A vertical line on every panel at each refresh or reset, one legend entry per kind."""
    labelled = set()
    for frame in frames:
        for event in frame["events"]:
            kind = event["kind"]
            for axis in axes:
                label = kind if axis is axes[0] and kind not in labelled else None
                axis.axvline(
                    frame["index"], color=EVENT_COLOURS.get(kind, "grey"), alpha=0.5, label=label
                )
            labelled.add(kind)
