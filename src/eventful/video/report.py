"""What a video run reports: the JSON document and the summary table."""

from __future__ import annotations

import dataclasses
import statistics
from collections import Counter
from dataclasses import dataclass

from eventful.video.runner import RunResult


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def run_report(result: RunResult) -> dict:
    """The JSON document of `eventful run --json`.

    gops: 1e9 multiply-accumulates per frame of the whole model, averaged over all frames (the
    first included); head_gops: the part of it the head (a decoder, a classifier) ran;
    ms_per_frame: median wall time of the model over the frames after the first (decoding and
    preprocessing apart: `pipeline`); updated_fraction: mean
    fraction of tokens processed by the token-wise layers. Dense timing and fidelity need
    --compare and are null without it. policy: the policy in force at the first frame;
    budget_schedule: the (frame, policy) changes asked for. Per frame: the policy in force,
    its budget (budget_gops for an OpsBudget, budget_ms for a LatencyBudget, else null) and
    the events (drift-control refreshes, resolution resets) at that frame.
    estimated_cosine: the engine's own estimate of the feature cosine to the dense model,
    per frame and as mean and minimum over the frames that have one (null where none has).
    precision: that of the encoder's linear layers. The fidelity reference is the float32 dense
    model at every precision; dense_same_precision (with --compare at a precision other than
    fp32, else null): the dense model at the run's precision, its time and its feature cosine to
    the float32 dense model, which says what the precision alone costs.
    """
    frames = result.frames
    compare = result.compare
    size = result.model.input_size
    drift = result.drift
    estimated = [f.estimated_cosine for f in frames if f.estimated_cosine is not None]
    return {
        "video": result.video,
        "frames": len(frames),
        "frames_failed": result.frames_failed,
        "model": result.model.name,
        "input_size": [size, size],
        "tokens": result.tokens,
        "policy": frames[0].policy if frames else repr(result.policy),
        "budget_schedule": [[frame, repr(policy)] for frame, policy in result.schedule],
        "level": result.level,
        "precision": result.precision,
        "device": result.device,
        "notes": result.notes,
        "drift": None if drift is None else dataclasses.asdict(drift),
        "events": dict(Counter(event.kind for f in frames for event in f.events)),
        "pipeline": {
            "decode_ms_per_frame": result.median_ms(part="decode"),
            "preprocess_ms_per_frame": result.median_ms(part="preprocess"),
        },
        "dense": {
            "gops_per_frame": _mean([f.dense_macs / 1e9 for f in frames]),
            "head_gops_per_frame": _mean([f.head_dense_macs / 1e9 for f in frames]),
            "ms_per_frame": result.median_ms(dense=True) if compare else None,
        },
        "dense_same_precision": _same_precision(result),
        "eventful": {
            "gops_per_frame": _mean([f.macs / 1e9 for f in frames]),
            "head_gops_per_frame": _mean([f.head_macs / 1e9 for f in frames]),
            "ms_per_frame": result.median_ms(),
            "updated_fraction": _mean([f.updated_fraction for f in frames]),
            "estimated_cosine_mean": _mean(estimated),
            "estimated_cosine_min": min(estimated, default=None),
        },
        "fidelity": {
            "feature_cosine_mean": _mean([f.feature_cosine for f in frames]) if compare else None,
            "feature_cosine_min": (
                min(f.feature_cosine for f in frames) if compare and frames else None
            ),
            "saliency_mae": _mean([f.saliency_mae for f in frames]) if compare else None,
        },
        "per_frame": [
            {
                "index": f.index,
                "gops": f.macs / 1e9,
                "head_gops": f.head_macs / 1e9,
                "updated_fraction": f.updated_fraction,
                "feature_cosine": f.feature_cosine,
                "saliency_mae": f.saliency_mae,
                "estimated_cosine": f.estimated_cosine,
                "ms": f.ms,
                "dense_ms": f.dense_ms,
                "dense_same_precision_ms": f.same_precision_ms,
                "dense_same_precision_cosine": f.same_precision_cosine,
                "policy": f.policy,
                "budget_gops": f.budget_gops,
                "budget_ms": f.budget_ms,
                "events": [
                    {"stream": event.stream, "kind": event.kind, "value": event.value}
                    for event in f.events
                ],
            }
            for f in frames
        ],
    }


def _same_precision(result: RunResult) -> dict | None:
    cosines = [f.same_precision_cosine for f in result.frames if f.same_precision_cosine]
    if not cosines:
        return None
    return {
        "precision": result.precision,
        "ms_per_frame": result.median_ms(part="same_precision"),
        "feature_cosine_mean": _mean(cosines),
        "feature_cosine_min": min(cosines),
    }


@dataclass
class Summary:
    """What the summary table of a run shows, for any renderer."""

    title: str  # model, video, frames, input size, tokens, policy, level
    columns: tuple[str, ...]
    rows: list[tuple[str, ...]]  # one cell per column
    notes: list[str]  # the report's notes, then the refreshes and resets by kind


def summary(report: dict) -> Summary:
    """The summary table of a run report: ops, time, tokens updated and fidelity, dense
    against eventful."""
    dense, eventful, fidelity = report["dense"], report["eventful"], report["fidelity"]
    pipeline = report["pipeline"]

    def number(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    def ratio(
        dense_value: float | None, eventful_value: float | None, better: str, worse: str
    ) -> str:
        if not dense_value or not eventful_value:
            return ""
        if dense_value >= eventful_value:
            return f"{dense_value / eventful_value:.2f}x {better}"
        return f"{eventful_value / dense_value:.2f}x {worse}"

    rows = [
        (
            "GMACs / frame",
            number(dense["gops_per_frame"], 3),
            number(eventful["gops_per_frame"], 3),
            ratio(dense["gops_per_frame"], eventful["gops_per_frame"], "fewer ops", "more ops"),
        ),
        (
            "  of which head",
            number(dense["head_gops_per_frame"], 3),
            number(eventful["head_gops_per_frame"], 3),
            ratio(
                dense["head_gops_per_frame"],
                eventful["head_gops_per_frame"],
                "fewer ops",
                "more ops",
            ),
        ),
        (
            "model ms / frame",
            number(dense["ms_per_frame"], 1),
            number(eventful["ms_per_frame"], 1),
            ratio(dense["ms_per_frame"], eventful["ms_per_frame"], "faster", "slower"),
        ),
        (
            "decode + preprocess ms",
            "",
            f"{number(pipeline['decode_ms_per_frame'], 1)} + "
            f"{number(pipeline['preprocess_ms_per_frame'], 1)}",
            "per frame, either model",
        ),
        ("tokens updated", "100%", f"{eventful['updated_fraction']:.1%}", ""),
    ]
    same = report.get("dense_same_precision")
    if same is not None:
        rows.insert(
            3,  # after the model's time
            (
                f"  dense at {same['precision']}",
                number(same["ms_per_frame"], 1),
                number(eventful["ms_per_frame"], 1),
                ratio(same["ms_per_frame"], eventful["ms_per_frame"], "faster", "slower")
                + f"; dense {same['precision']} cosine {same['feature_cosine_mean']:.4f}",
            ),
        )
    if not dense["head_gops_per_frame"]:
        rows.pop(1)  # a bare encoder: no head
    if fidelity["feature_cosine_mean"] is not None:
        rows.append(
            (
                "feature cosine",
                "",
                f"mean {fidelity['feature_cosine_mean']:.4f}",
                f"min {fidelity['feature_cosine_min']:.4f}",
            )
        )
    if eventful["estimated_cosine_mean"] is not None:
        rows.append(
            (
                "estimated cosine",
                "",
                f"mean {eventful['estimated_cosine_mean']:.4f}",
                f"min {eventful['estimated_cosine_min']:.4f}",
            )
        )
    if fidelity["saliency_mae"] is not None:
        rows.append(("saliency MAE", "", f"{fidelity['saliency_mae']:.4f}", ""))
    title = (
        f"{report['model']} on {report['video']}: {report['frames']} frames "
        f"({report['frames_failed']} failed), {report['input_size'][0]}x"
        f"{report['input_size'][1]}, {report['tokens']} tokens, {report['policy']}, "
        f"level {report['level']}, precision {report.get('precision', 'fp32')}"
    )
    events = ", ".join(f"{count} {kind}" for kind, count in report["events"].items())
    notes = [*report["notes"], *([f"refreshes and resets: {events}"] if events else [])]
    return Summary(title, ("", "dense", "eventful", ""), rows, notes)


def summary_table(report: dict) -> str:
    """The summary table of a run report as plain text, for logs and pipes."""
    table = summary(report)
    rows = [table.columns, *table.rows]
    widths = [max(len(row[column]) for row in rows) for column in range(len(table.columns))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return "\n".join([table.title, *lines, *table.notes])
