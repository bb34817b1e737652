"""A PNG of ops and fidelity per frame of a video run."""

from __future__ import annotations

from pathlib import Path


def plot_run(report: dict, path: str | Path) -> None:
    """Two panels: GMACs per frame (eventful against dense) and fidelity per frame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = report["per_frame"]
    index = [f["index"] for f in frames]
    figure, (ops_axis, fidelity_axis) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ops_axis.plot(index, [f["gops"] for f in frames], label="eventful")
    ops_axis.axhline(report["dense"]["gops_per_frame"], color="grey", linestyle="--", label="dense")
    ops_axis.set_ylabel("GMACs per frame")
    ops_axis.set_ylim(bottom=0)
    ops_axis.legend(loc="upper right")
    ops_axis.set_title(
        f"{report['model']}, {report['policy']}, level {report['level']}: "
        f"{report['video'].rsplit('/', 1)[-1]}"
    )
    fidelity_axis.plot(index, [f["updated_fraction"] for f in frames], label="tokens updated")
    if report["fidelity"]["feature_cosine_mean"] is not None:
        fidelity_axis.plot(index, [f["feature_cosine"] for f in frames], label="feature cosine")
    if report["fidelity"]["saliency_mae"] is not None:
        fidelity_axis.plot(index, [f["saliency_mae"] for f in frames], label="saliency MAE")
    fidelity_axis.set_ylim(0, 1.02)
    fidelity_axis.set_xlabel("frame")
    fidelity_axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
