"""The `eventful` command: what `run` and `demo` write, and one-line errors for bad input.

Every run uses the real DINOv2 ViT-S/14 saliency model on a few frames of real or generated
video; the bad inputs are files made here with PyAV.
"""

import dataclasses
import json
import os
import statistics
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

import eventful

av = pytest.importorskip("av")
pytest.importorskip("matplotlib")

from matplotlib.colors import to_hex  # noqa: E402

from eventful import cli  # noqa: E402
from eventful.video import runner  # noqa: E402
from eventful.viz.plot import EVENT_COLOURS, PLOT_SUFFIXES, plot_run, run_figure  # noqa: E402
from eventful.viz.video import VIDEO_SUFFIXES, SideBySideWriter  # noqa: E402
from eventful.zoo import ZooModel  # noqa: E402
from tests.helpers import assert_one_line_error, invoke  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FILE_SIGNATURES = {".png": PNG_SIGNATURE, ".pdf": b"%PDF", ".svg": b"<?xml"}


def lines_by_label(axis) -> dict:
    """The labelled lines of a matplotlib axis, by label."""
    return {
        line.get_label(): line for line in axis.get_lines() if not line.get_label().startswith("_")
    }


def vertical_lines(axis) -> list[tuple[float, str]]:
    """(x, colour) of each vertical line across an axis (`axvline`), in drawing order."""
    return [
        (line.get_xdata()[0], to_hex(line.get_color()))
        for line in axis.get_lines()
        if len(line.get_xdata()) == 2 and line.get_xdata()[0] == line.get_xdata()[1]
    ]


# --- videos made for the tests -------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("videos")


@pytest.fixture(scope="module")
def damaged_clip(clip, files) -> Path:
    """bikes.mp4 with 2000 random bytes at 2% of the file: frames 0-2 decode, then 2 fail."""
    data = bytearray(clip.read_bytes())
    offset = len(data) // 50
    data[offset : offset + 2000] = np.random.default_rng(0).bytes(2000)
    path = files / "damaged.mp4"
    path.write_bytes(bytes(data))
    return path


def _encode(container, stream, frames) -> None:
    for frame in frames:
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def _video_stream(container, codec: str, width: int, height: int):
    stream = container.add_stream(codec, rate=25)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    return stream


def _noise(width: int, height: int, count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        yield av.VideoFrame.from_ndarray(pixels, format="rgb24")


@pytest.fixture(scope="module")
def audio_only(files) -> Path:
    """A WAV file: a container with one audio stream and no video stream."""
    path = files / "tone.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000, layout="mono")
        frames = []
        for _ in range(3):
            frame = av.AudioFrame.from_ndarray(
                np.zeros((1, 800), np.int16), format="s16", layout="mono"
            )
            frame.sample_rate = 8000
            frames.append(frame)
        _encode(container, stream, frames)
    return path


@pytest.fixture(scope="module")
def undecodable(files) -> Path:
    """An MKV with an MPEG-4 video stream whose every packet is random bytes."""
    path = files / "garbage.mkv"
    rng = np.random.default_rng(1)
    with av.open(str(path), "w") as container:
        stream = _video_stream(container, "mpeg4", 64, 64)
        for frame in [*_noise(64, 64, 5), None]:
            for packet in stream.encode(frame):
                junk = av.Packet(rng.bytes(packet.size))
                junk.stream, junk.pts, junk.dts = packet.stream, packet.pts, packet.dts
                junk.time_base = packet.time_base
                container.mux(junk)
    return path


@pytest.fixture(scope="module")
def resolution_change(files) -> Path:
    """A raw H.264 stream: 3 frames of 320x240, then 3 frames of 160x128."""
    if "libx264" not in av.codecs_available:
        pytest.skip("this PyAV has no libx264 encoder")
    parts = []
    for width, height in [(320, 240), (160, 128)]:
        part = files / f"part-{width}x{height}.h264"
        with av.open(str(part), "w", format="h264") as container:
            stream = _video_stream(container, "libx264", width, height)
            _encode(container, stream, _noise(width, height, 3, seed=width))
        parts.append(part.read_bytes())
    path = files / "two-sizes.h264"
    path.write_bytes(b"".join(parts))
    return path


# --- the happy path: one compared run with every output, checked from several sides ----------


@pytest.fixture(scope="module")
def compared_run(clip, tmp_path_factory):
    folder = tmp_path_factory.mktemp("compared")
    paths = {kind: folder / f"run.{kind}" for kind in ("json", "png", "mp4")}
    outcome = invoke(
        "run", clip, "--compare", "--max-frames", 4,
        "--json", paths["json"], "--plot", paths["png"], "--viz", paths["mp4"],
    )  # fmt: skip
    return outcome, paths


@pytest.fixture(scope="module")
def compared_report(compared_run) -> dict:
    outcome, paths = compared_run
    assert outcome.code == 0, outcome.err
    return json.loads(paths["json"].read_text())


def test_compared_run_exits_0_and_prints_the_summary_table(compared_run):
    outcome, paths = compared_run
    assert outcome.code == 0, outcome.err
    assert "Traceback" not in outcome.err
    for fragment in ("GMACs / frame", "fewer ops", "ms / frame", "feature cosine", "saliency MAE"):
        assert fragment in outcome.out
    assert "of which head" in outcome.out  # the saliency decoder's share of the ops
    assert "decode + preprocess ms" in outcome.out  # apart from the model's time
    assert "4 frames (0 failed), 224x224" in outcome.out
    assert f"report: {paths['json']}" in outcome.out
    # Not a terminal: one plain progress line, after the last frame, of the container's count.
    (line,) = outcome.err.splitlines()
    assert line.startswith("frame 4/4 | elapsed ")
    assert " fps | tokens updated " in line


def test_compared_report_has_every_documented_key(compared_report, clip):
    report = compared_report
    assert report["video"] == str(clip)
    assert report["model"] == "dinov2-saliency"
    assert report["input_size"] == [224, 224]
    assert report["tokens"] == 1 + (224 // 14) ** 2
    assert report["policy"] == "TopFraction(0.25)"
    assert report["level"] == "exact"
    assert report["frames"] == 4
    assert report["frames_failed"] == 0
    assert set(report["dense"]) >= {"gops_per_frame", "ms_per_frame"}
    assert set(report["eventful"]) >= {"gops_per_frame", "ms_per_frame", "updated_fraction"}
    assert set(report["fidelity"]) >= {"feature_cosine_mean", "feature_cosine_min", "saliency_mae"}
    assert set(report["pipeline"]) == {"decode_ms_per_frame", "preprocess_ms_per_frame"}
    assert all(value > 0 for value in report["pipeline"].values())
    assert len(report["per_frame"]) == 4
    for index, frame in enumerate(report["per_frame"]):
        assert set(frame) >= {"index", "gops", "head_gops", "updated_fraction", "feature_cosine"}
        assert frame["index"] == index


def test_compared_report_counts_the_whole_model_with_its_head(compared_report):
    dense, eventful = compared_report["dense"], compared_report["eventful"]
    # The saliency decoder: three transposed convolutions and a 1x1 convolution, at 224 x 224
    # from the 16 x 16 patch grid of DINOv2-S/14 (384 channels), as `layer_macs` counts them.
    head = 16 * 16 * 384 * 256 * 16 + 32 * 32 * 256 * 128 * 16 + 64 * 64 * 128 * 64 * 16
    head += 32 * 32 * 256 + 64 * 64 * 128 + 128 * 128 * 64  # biases
    head += 128 * 128 * 64 + 128 * 128  # the 1x1 convolution and its bias
    assert dense["head_gops_per_frame"] == pytest.approx(head / 1e9)
    frames = compared_report["per_frame"]
    assert frames[0]["head_gops"] == pytest.approx(head / 1e9)  # the first frame is dense
    assert all(frame["head_gops"] > 0 for frame in frames[1:])
    assert 0 < eventful["head_gops_per_frame"] < dense["head_gops_per_frame"]


def test_compared_report_averages_ops_and_updates_over_all_frames(compared_report):
    report, frames = compared_report, compared_report["per_frame"]
    gops = [frame["gops"] for frame in frames]
    updated = [frame["updated_fraction"] for frame in frames]
    assert report["eventful"]["gops_per_frame"] == pytest.approx(statistics.fmean(gops))
    assert report["eventful"]["updated_fraction"] == pytest.approx(statistics.fmean(updated))
    assert updated[0] == pytest.approx(1.0)  # the first frame is processed densely
    assert gops[0] == pytest.approx(report["dense"]["gops_per_frame"])
    assert all(0 < fraction < 1 for fraction in updated[1:])
    assert report["dense"]["gops_per_frame"] > report["eventful"]["gops_per_frame"]


def test_compared_report_times_both_models_and_measures_fidelity(compared_report):
    report = compared_report
    assert report["dense"]["ms_per_frame"] > 0
    assert report["eventful"]["ms_per_frame"] > 0
    fidelity = report["fidelity"]
    assert 0 < fidelity["feature_cosine_min"] <= fidelity["feature_cosine_mean"] <= 1
    cosines = [frame["feature_cosine"] for frame in report["per_frame"]]
    assert fidelity["feature_cosine_min"] == pytest.approx(min(cosines))
    assert fidelity["feature_cosine_mean"] == pytest.approx(statistics.fmean(cosines))
    assert fidelity["saliency_mae"] is not None
    assert 0 <= fidelity["saliency_mae"] < 1


def test_compared_report_carries_the_shipped_fidelity_estimate_of_each_frame(compared_report):
    frames, eventful = compared_report["per_frame"], compared_report["eventful"]
    estimates = [frame["estimated_cosine"] for frame in frames]
    assert estimates[0] == 1.0  # a dense step leaves nothing unprocessed
    assert all(0 <= value <= 1 for value in estimates)
    assert eventful["estimated_cosine_mean"] == pytest.approx(statistics.fmean(estimates))
    assert eventful["estimated_cosine_min"] == pytest.approx(min(estimates))


def test_a_run_without_a_calibrated_estimate_says_so_and_leaves_the_estimate_null(
    clip, tmp_path, monkeypatch
):
    monkeypatch.setattr(ZooModel, "fidelity_estimate", lambda self, levels: None)
    path = tmp_path / "run.json"
    outcome = invoke("run", clip, "--max-frames", 2, "--json", path)
    assert outcome.code == 0, outcome.err
    report = json.loads(path.read_text())
    assert report["eventful"]["estimated_cosine_mean"] is None
    assert report["eventful"]["estimated_cosine_min"] is None
    assert all(frame["estimated_cosine"] is None for frame in report["per_frame"])
    note = "no fidelity estimate is calibrated for dinov2-saliency at level exact"
    assert note in report["notes"]
    assert note in outcome.out


def test_plot_option_writes_a_png(compared_run):
    _, paths = compared_run
    assert paths["png"].read_bytes().startswith(PNG_SIGNATURE)


def test_compared_plot_draws_ops_and_the_fidelity_curves_and_no_budget_or_event(compared_report):
    report, frames = compared_report, compared_report["per_frame"]
    figure = run_figure(report)
    assert len(figure.axes) == 2  # no latency budget: no time panel
    ops_axis, fidelity_axis = figure.axes
    ops = lines_by_label(ops_axis)
    assert set(ops) == {"eventful", "dense"}
    assert list(ops["eventful"].get_ydata()) == pytest.approx([f["gops"] for f in frames])
    assert list(ops["dense"].get_ydata()) == pytest.approx([report["dense"]["gops_per_frame"]] * 2)
    fidelity = lines_by_label(fidelity_axis)
    assert set(fidelity) == {"tokens updated", "feature cosine", "saliency MAE", "estimated cosine"}
    cosines = [f["feature_cosine"] for f in frames]
    assert list(fidelity["feature cosine"].get_ydata()) == pytest.approx(cosines)
    assert list(fidelity["saliency MAE"].get_ydata()) == pytest.approx(
        [f["saliency_mae"] for f in frames]
    )
    assert vertical_lines(ops_axis) == vertical_lines(fidelity_axis) == []


@pytest.mark.parametrize("suffix", PLOT_SUFFIXES)
def test_plot_is_written_in_every_format_the_plot_option_accepts(compared_report, tmp_path, suffix):
    path = tmp_path / f"run{suffix}"
    plot_run(compared_report, path)
    assert path.read_bytes().startswith(FILE_SIGNATURES[suffix])


@pytest.mark.parametrize("suffix", VIDEO_SUFFIXES)
def test_side_by_side_video_is_written_in_every_container_the_viz_option_accepts(tmp_path, suffix):
    path = tmp_path / f"run{suffix}"
    writer = SideBySideWriter(path, 28, fps=25)
    for level in (0.0, 0.5, 1.0):
        writer.write(np.zeros((28, 28, 3), np.uint8), torch.full((28, 28), level), None)
    writer.close()
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    assert [(frame.width, frame.height) for frame in frames] == [(3 * 28, 28)] * 3


def test_viz_option_writes_a_three_panel_video_with_one_frame_per_input_frame(compared_run):
    _, paths = compared_run
    with av.open(str(paths["mp4"])) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 4
    assert {(frame.width, frame.height) for frame in frames} == {(3 * 224, 224)}


# --- other successful runs ---------------------------------------------------------------


def test_run_without_compare_reports_null_dense_timing_and_fidelity(clip, tmp_path):
    report_path = tmp_path / "run.json"
    outcome = invoke("run", clip, "--size", 112, "--max-frames", 3, "--json", report_path)
    assert outcome.code == 0, outcome.err
    report = json.loads(report_path.read_text())
    assert report["dense"]["ms_per_frame"] is None
    assert report["dense"]["gops_per_frame"] > 0  # counted, not measured: always there
    assert report["eventful"]["ms_per_frame"] > 0
    assert all(value is None for value in report["fidelity"].values())
    assert all(frame["feature_cosine"] is None for frame in report["per_frame"])
    assert "feature cosine" not in outcome.out
    assert report["input_size"] == [112, 112]  # a multiple of the patch: kept as asked
    assert report["notes"] == []


def test_a_float32_run_reports_its_precision_and_no_second_dense_model(compared_report):
    assert compared_report["precision"] == "fp32"
    assert compared_report["dense_same_precision"] is None
    assert all(f["dense_same_precision_ms"] is None for f in compared_report["per_frame"])


def test_an_int8_run_compares_with_float32_dense_and_reports_dense_at_int8(clip, tmp_path):
    report_path = tmp_path / "run.json"
    outcome = invoke(
        "run", clip, "--size", 112, "--max-frames", 3, "--compare", "--precision", "int8",
        "--json", report_path,
    )  # fmt: skip
    assert outcome.code == 0, outcome.err
    report = json.loads(report_path.read_text())
    assert report["precision"] == "int8"
    same = report["dense_same_precision"]
    assert same["precision"] == "int8" and same["ms_per_frame"] > 0
    assert 0.99 < same["feature_cosine_min"] <= same["feature_cosine_mean"] < 1.0
    assert report["fidelity"]["feature_cosine_mean"] < 1.0  # against float32 dense
    assert all(f["dense_same_precision_cosine"] is not None for f in report["per_frame"])
    assert "precision int8" in outcome.out and "dense at int8" in outcome.out


def test_auto_precision_reports_what_it_picked(clip, tmp_path, monkeypatch):
    from eventful.core import precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    report_path = tmp_path / "run.json"
    outcome = invoke(
        "run", clip, "--size", 56, "--max-frames", 2, "--precision", "auto", "--json", report_path
    )
    assert outcome.code == 0, outcome.err
    assert json.loads(report_path.read_text())["precision"] == "bf16"
    assert "precision bf16" in outcome.out


def test_bf16_without_native_bfloat16_is_a_one_line_error(clip, monkeypatch):
    from eventful.core import precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    outcome = invoke("run", clip, "--precision", "bf16")
    assert_one_line_error(outcome, 1, "precision 'bf16' needs native bfloat16 matmuls")


def test_precision_with_iared2_is_a_one_line_error(clip, tmp_path):
    weights = tmp_path / "interpreters.pt"
    weights.write_bytes(b"")
    outcome = invoke("run", clip, "--method", "iared2", "--weights", weights, "--precision", "int8")
    assert_one_line_error(outcome, 1, "--precision applies to --method eventful only")


def test_a_cosine_policy_keeps_the_estimate_at_its_target_on_every_frame(clip, tmp_path):
    report_path = tmp_path / "run.json"
    outcome = invoke(
        "run", clip, "--max-frames", 4, "--policy", "cosine:0.99", "--no-drift-control",
        "--json", report_path,
    )  # fmt: skip
    assert outcome.code == 0, outcome.err
    report = json.loads(report_path.read_text())
    assert report["policy"] == "Fidelity(0.99)"
    frames = report["per_frame"][1:]  # the first is dense
    assert all(frame["estimated_cosine"] >= 0.99 - 1e-9 for frame in frames)
    assert all(0 < frame["updated_fraction"] < 1 for frame in frames)


def test_a_cosine_policy_for_a_model_without_an_estimate_is_a_one_line_error(clip):
    outcome = invoke("run", clip, "--model", "vit-s16", "--size", 64, "--policy", "cosine:0.98")
    assert_one_line_error(outcome, 1, "needs a fidelity estimate")
    assert "calibrate_fidelity_estimate" in outcome.err


def test_topk_policy_at_tokenwise_level_updates_k_tokens_per_frame_after_the_first(clip, tmp_path):
    report_path = tmp_path / "run.json"
    outcome = invoke(
        "run", clip, "--size", 112, "--max-frames", 3,
        "--policy", "topk:10", "--level", "tokenwise", "--json", report_path,
    )  # fmt: skip
    assert outcome.code == 0, outcome.err
    report = json.loads(report_path.read_text())
    assert report["policy"] == "TopK(10)"
    assert report["level"] == "tokenwise"
    assert report["tokens"] == 1 + 8 * 8
    updated = [frame["updated_fraction"] for frame in report["per_frame"]]
    assert updated[0] == pytest.approx(1.0)
    assert updated[1:] == pytest.approx([10 / report["tokens"]] * 2)


def test_corrupted_packets_are_skipped_counted_and_decoding_goes_on(damaged_clip, tmp_path):
    report_path = tmp_path / "run.json"
    outcome = invoke("run", damaged_clip, "--size", 112, "--max-frames", 5, "--json", report_path)
    assert outcome.code == 0, outcome.err
    assert "Traceback" not in outcome.err
    report = json.loads(report_path.read_text())
    assert report["frames_failed"] > 0
    assert report["frames"] == 5  # the frames after the damage still decode
    assert [frame["index"] for frame in report["per_frame"]] == list(range(5))
    assert f"5 frames ({report['frames_failed']} failed)" in outcome.out


def test_resolution_change_mid_video_resets_the_stream_and_is_reported(resolution_change, tmp_path):
    report_path = tmp_path / "run.json"
    outcome = invoke(
        "run", resolution_change, "--size", 112, "--no-drift-control", "--json", report_path
    )
    assert outcome.code == 0, outcome.err
    report = json.loads(report_path.read_text())
    assert report["frames"] == 6
    assert report["frames_failed"] == 0
    assert any("resolution changed" in note for note in report["notes"])
    assert "resolution changed from 320x240 to 160x128" in outcome.out
    updated = [frame["updated_fraction"] for frame in report["per_frame"]]
    assert updated[3] == pytest.approx(1.0)  # the first frame of the new size is dense again
    assert updated[4] < 1
    # A raw H.264 stream does not say how many frames it holds: the progress has no total.
    (line,) = outcome.err.splitlines()
    assert line.startswith("frame 6 | elapsed ")


def test_size_off_the_patch_grid_is_rounded_down_to_it_with_a_note(clip, tmp_path):
    report_path = tmp_path / "run.json"
    outcome = invoke("run", clip, "--size", 100, "--max-frames", 1, "--json", report_path)
    assert outcome.code == 0, outcome.err
    report = json.loads(report_path.read_text())
    note = (
        "input size 100 is not a multiple of the 14-pixel patch: frames are letterboxed to "
        "98x98 (7x7 patches)"
    )
    assert report["input_size"] == [98, 98]
    assert report["tokens"] == 1 + 7 * 7
    assert report["notes"] == [note]
    assert outcome.err.splitlines()[0] == f"eventful: note: {note}"  # before the first frame
    assert note in outcome.out  # and again under the summary table
    assert "1 frames (0 failed), 98x98" in outcome.out


def test_demo_writes_json_png_and_mp4_with_fidelity(clip, tmp_path):  # clip: skip without it
    output = tmp_path / "demo"
    outcome = invoke("demo", "--output", output, "--max-frames", 2)
    assert outcome.code == 0, outcome.err
    report = json.loads((output / "demo.json").read_text())
    assert report["frames"] == 2
    assert all(value is not None for value in report["fidelity"].values())
    assert (output / "demo.png").read_bytes().startswith(PNG_SIGNATURE)
    with av.open(str(output / "demo.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 2


# --- budgets, schedules and drift control --------------------------------------------------
# At --size 112 (65 tokens) the model costs 1.42 GMACs per frame densely, 0.026 at k = 1.


@pytest.fixture(scope="module")
def scheduled_run(clip, tmp_path_factory):
    folder = tmp_path_factory.mktemp("scheduled")
    paths = {kind: folder / f"run.{kind}" for kind in ("json", "png")}
    outcome = invoke(
        "run", clip, "--size", 112, "--max-frames", 12, "--policy", "ops:0.6",
        "--budget-schedule", "6:ops:0.3", "--refresh", 4, "--scene-cut", 50,
        "--error-bound", 1e9, "--content-change", "off", "--escalation", "off",
        "--json", paths["json"], "--plot", paths["png"],
    )  # fmt: skip
    assert outcome.code == 0, outcome.err
    return outcome, json.loads(paths["json"].read_text()), paths["png"]


def test_budget_schedule_changes_the_budget_in_force_at_its_frames(scheduled_run):
    _, report, _ = scheduled_run
    frames = report["per_frame"]
    assert report["policy"] == "OpsBudget(0.6)"
    assert report["budget_schedule"] == [[6, "OpsBudget(0.3)"]]
    assert [f["budget_gops"] for f in frames] == [0.6] * 6 + [0.3] * 6
    assert [f["policy"] for f in frames] == ["OpsBudget(0.6)"] * 6 + ["OpsBudget(0.3)"] * 6
    assert all(f["budget_ms"] is None for f in frames)
    # The cost follows the budget: the frames after the change cost less than those before.
    incremental = [f["gops"] for f in frames if f["updated_fraction"] < 1]
    assert max(incremental[-3:]) < min(incremental[1:3])


def test_refresh_option_runs_a_dense_frame_every_n_frames_and_reports_it(scheduled_run):
    outcome, report, _ = scheduled_run
    frames = report["per_frame"]
    assert report["drift"] == {
        "refresh_every": 4,
        "error_bound": 1e9,
        "scene_cut_factor": 50.0,
        "content_change": None,
        "escalation_bound": None,
        "escalation_max_tokens": None,
    }
    assert report["events"] == {"periodic": 2}
    assert [f["index"] for f in frames if f["events"]] == [4, 8]
    assert frames[4]["events"] == [{"stream": 0, "kind": "periodic", "value": None}]
    dense = [f["index"] for f in frames if f["updated_fraction"] == pytest.approx(1.0)]
    assert dense == [0, 4, 8]
    assert "refreshes and resets: 2 periodic" in outcome.out


def test_a_run_without_drift_options_uses_the_default_drift_control_and_estimates(clip, tmp_path):
    report_path = tmp_path / "run.json"
    outcome = invoke("run", clip, "--size", 112, "--max-frames", 4, "--json", report_path)
    assert outcome.code == 0, outcome.err
    report = json.loads(report_path.read_text())
    assert report["drift"] == dataclasses.asdict(eventful.DEFAULT_DRIFT)
    estimates = [frame["estimated_cosine"] for frame in report["per_frame"]]
    assert estimates[0] == 1.0 and all(0 < value < 1 for value in estimates[1:])


def test_no_drift_control_runs_without_refreshes_or_escalation(clip, tmp_path):
    report_path = tmp_path / "run.json"
    outcome = invoke(
        "run", clip, "--size", 112, "--max-frames", 4, "--no-drift-control", "--json", report_path
    )
    assert outcome.code == 0, outcome.err
    assert json.loads(report_path.read_text())["drift"] is None


def test_scheduled_run_plots_a_png(scheduled_run):
    _, _, plot = scheduled_run
    assert plot.read_bytes().startswith(PNG_SIGNATURE)


def test_scheduled_plot_draws_the_ops_budget_in_force_and_a_marker_per_refresh(scheduled_run):
    _, report, _ = scheduled_run
    figure = run_figure(report)
    assert len(figure.axes) == 2  # an ops budget only: no latency panel
    budget = lines_by_label(figure.axes[0])["ops budget"]
    assert list(budget.get_ydata()) == pytest.approx([0.6] * 6 + [0.3] * 6)
    assert budget.get_drawstyle() == "steps-post"
    assert "feature cosine" not in lines_by_label(figure.axes[1])  # no --compare
    periodic = EVENT_COLOURS["periodic"]
    for axis in figure.axes:
        assert vertical_lines(axis) == [(4, to_hex(periodic)), (8, to_hex(periodic))]


def test_latency_budget_is_reported_per_frame_and_plotted(clip, tmp_path):
    report_path, plot_path = tmp_path / "run.json", tmp_path / "run.png"
    outcome = invoke(
        "run", clip, "--size", 112, "--max-frames", 3, "--policy", "latency:100000",
        "--json", report_path, "--plot", plot_path,
    )  # fmt: skip
    assert outcome.code == 0, outcome.err
    frames = json.loads(report_path.read_text())["per_frame"]
    assert [f["budget_ms"] for f in frames] == [100000.0] * 3
    # 100 s per frame leaves room for every token on every frame.
    assert [f["updated_fraction"] for f in frames] == pytest.approx([1.0] * 3)
    assert plot_path.read_bytes().startswith(PNG_SIGNATURE)
    figure = run_figure(json.loads(report_path.read_text()))
    assert len(figure.axes) == 3  # the latency panel under the ops and fidelity panels
    time_axis = lines_by_label(figure.axes[2])
    assert list(time_axis["latency budget"].get_ydata()) == [100000.0] * 3
    assert list(time_axis["eventful"].get_ydata()) == pytest.approx([f["ms"] for f in frames])
    assert "ops budget" not in lines_by_label(figure.axes[0])


def test_resolution_change_is_reported_as_an_event_of_its_frame(resolution_change, tmp_path):
    report_path = tmp_path / "run.json"
    outcome = invoke("run", resolution_change, "--size", 112, "--json", report_path)
    assert outcome.code == 0, outcome.err
    report = json.loads(report_path.read_text())
    # Drift control may also refresh on these frames of pure noise; the reset is one event.
    resets = [
        (frame["index"], event)
        for frame in report["per_frame"]
        for event in frame["events"]
        if event["kind"] == "resolution"
    ]
    assert resets == [(3, {"stream": 0, "kind": "resolution", "value": None})]
    assert report["events"]["resolution"] == 1


# --- bad input: one line on stderr, a non-zero exit code, never a traceback ---------------


def test_missing_file_is_a_one_line_error(tmp_path):
    outcome = invoke("run", tmp_path / "absent.mp4")
    assert_one_line_error(outcome, 1, "no such file")


def test_text_file_named_like_a_video_is_a_one_line_error(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_text("not a video\n")
    assert_one_line_error(invoke("run", path), 1, "cannot read")


def test_random_bytes_are_a_one_line_error(tmp_path):
    path = tmp_path / "x.mp4"
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    assert_one_line_error(invoke("run", path), 1, "cannot read")


def test_file_without_video_stream_is_a_one_line_error(audio_only):
    assert_one_line_error(invoke("run", audio_only), 1, "has no video stream")


def test_video_with_no_decodable_frame_is_a_one_line_error(undecodable):
    assert_one_line_error(invoke("run", undecodable), 1, "could be decoded")


def test_unknown_model_is_a_one_line_error_listing_the_known_models(clip):
    outcome = invoke("run", clip, "--model", "foo")
    assert_one_line_error(outcome, 1, "unknown model 'foo'")
    assert "dinov2-saliency" in outcome.err


@pytest.mark.parametrize(
    ("policy", "fragment"),
    [
        ("topk:abc", "'abc' is not an integer"),
        ("banana", "malformed policy 'banana'"),
        ("fraction:2", "fraction in (0, 1]"),
    ],
)
def test_malformed_policy_is_a_one_line_error(clip, policy, fragment):
    assert_one_line_error(invoke("run", clip, "--policy", policy), 1, fragment)


def test_zero_max_frames_is_a_one_line_error(clip):
    assert_one_line_error(invoke("run", clip, "--max-frames", 0), 1, "--max-frames")


def test_unknown_level_is_an_argument_error_with_exit_code_2(clip):
    assert_one_line_error(invoke("run", clip, "--level", "bogus"), 2, "invalid choice: 'bogus'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_device_without_cuda_is_a_one_line_error(clip):
    assert_one_line_error(invoke("run", clip, "--device", "cuda"), 1, "no CUDA device")


def test_console_command_reports_bad_input_in_one_line_without_traceback(audio_only):
    done = subprocess.run(
        [sys.executable, "-m", "eventful.cli", "run", str(audio_only)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [f"eventful: error: {audio_only} has no video stream"]
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (["--budget-schedule", "5:ops:1,3:ops:1"], "budget schedule frame 3 follows frame 5"),
        (["--budget-schedule", "5:ops:1,5:ops:0.5"], "budget schedule frame 5 appears twice"),
        (["--budget-schedule=-1:ops:1"], "budget schedule frame -1 is negative"),
        (["--budget-schedule", "soon:ops:1"], "malformed budget schedule entry 'soon:ops:1'"),
        (["--budget-schedule", "5:banana"], "malformed policy 'banana'"),
        (["--policy", "ops:0"], "OpsBudget expects a positive, finite budget"),
        (["--policy", "latency:-5"], "LatencyBudget expects a positive, finite budget"),
        (["--refresh", 0], "refresh_every must be a positive integer or None, got 0"),
        (["--scene-cut", 1], "scene_cut_factor must be > 1 (a finite number) or None, got 1.0"),
        (["--error-bound", -1], "error_bound must be >= 0 (a finite number) or None, got -1.0"),
        (["--escalation-max-tokens", 0], "escalation_max_tokens must be a positive integer"),
        (
            ["--escalation", "off", "--escalation-max-tokens", 40],
            "escalation_max_tokens=40 needs an escalation_bound",
        ),
        (
            ["--no-drift-control", "--refresh", 30, "--scene-cut", "off"],
            "--no-drift-control turns drift control off, but --refresh, --scene-cut also given",
        ),
    ],
)
def test_bad_budget_and_drift_options_are_one_line_errors(clip, options, fragment):
    assert_one_line_error(invoke("run", clip, *options), 1, fragment)


def test_ops_budget_above_the_dense_cost_is_a_one_line_error(clip):
    outcome = invoke("run", clip, "--size", 112, "--policy", "ops:5")
    assert_one_line_error(outcome, 1, "OpsBudget(5.0) exceeds the 1.42242 GMACs per frame")


def test_non_integer_refresh_is_an_argument_error_with_exit_code_2(clip):
    outcome = invoke("run", clip, "--refresh", "often")
    assert_one_line_error(outcome, 2, "expected an integer or 'off', got 'often'")


# --- output paths: checked before the model loads --------------------------------------------


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: what is refused must be refused before it."""

    def load_model(*_):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "load_model", load_model)


@pytest.mark.parametrize(
    ("option", "name", "expected"),
    [
        ("--json", "run.txt", "expected a file name ending in .json, got .txt"),
        ("--plot", "run.jpg", "expected a file name ending in .png, .pdf or .svg, got .jpg"),
        ("--viz", "run.gif", "expected a file name ending in .mp4, .mkv, .mov or .avi, got .gif"),
        ("--viz", "run", "expected a file name ending in .mp4, .mkv, .mov or .avi, got no suffix"),
    ],
)
def test_output_with_a_wrong_suffix_is_refused_before_the_model_loads(
    clip, tmp_path, no_model, option, name, expected
):
    path = tmp_path / name
    assert_one_line_error(invoke("run", clip, option, path), 1, f"{option} {path}: {expected}")


@pytest.mark.parametrize(
    ("option", "name"), [("--json", "r.json"), ("--plot", "r.png"), ("--viz", "r.mp4")]
)
def test_output_in_a_missing_folder_is_refused_before_the_model_loads(
    clip, tmp_path, no_model, option, name
):
    path = tmp_path / "absent" / name
    fragment = f"{option} {path}: the folder {path.parent} does not exist"
    assert_one_line_error(invoke("run", clip, option, path), 1, fragment)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_output_in_a_read_only_folder_is_refused_before_the_model_loads(clip, tmp_path, no_model):
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o500)
    path = folder / "run.json"
    fragment = f"--json {path}: the folder {folder} is not writable"
    assert_one_line_error(invoke("run", clip, "--json", path), 1, fragment)


def test_output_path_that_is_a_folder_is_refused_before_the_model_loads(clip, tmp_path, no_model):
    path = tmp_path / "run.json"
    path.mkdir()
    assert_one_line_error(invoke("run", clip, "--json", path), 1, "is a folder; expected a file")


def test_demo_checks_its_outputs_before_the_model_loads(clip, tmp_path, no_model):
    path = tmp_path / "demo.txt"
    outcome = invoke("demo", "--output", tmp_path / "demo", "--json", path)
    assert_one_line_error(outcome, 1, f"--json {path}: expected a file name ending in .json")


# --- the command's own options ------------------------------------------------------------


def test_version_option_prints_the_installed_package_version():
    outcome = invoke("--version")
    assert outcome.code == 0
    assert outcome.out == f"eventful {metadata.version('eventful')}\n"


@pytest.mark.parametrize("command", ["run", "demo"])
def test_help_states_the_default_of_every_option(command):
    outcome = invoke(command, "--help")
    assert outcome.code == 0
    options = outcome.out.split("options:")[1]
    # An entry starts at a line "  -x, --xyz ..." and runs until the next one.
    entries = [entry for entry in options.split("\n  -") if entry.strip()]
    assert len(entries) > 10
    for entry in entries:
        if not entry.startswith("h, --help"):
            assert "(default:" in entry, entry


def test_demo_has_no_compare_option_since_it_always_compares():
    assert "--compare" not in invoke("demo", "--help").out
    assert_one_line_error(invoke("demo", "--compare"), 2, "unrecognized arguments: --compare")


def test_demo_max_frames_and_all_frames_exclude_each_other():
    outcome = invoke("demo", "--max-frames", 5, "--all-frames")
    assert_one_line_error(
        outcome, 2, "argument --all-frames: not allowed with argument --max-frames"
    )


@pytest.mark.parametrize(
    ("options", "frames"),
    [([], cli.DEMO_FRAMES), (["--max-frames", 1], 1), (["--all-frames"], None)],
)
def test_demo_runs_its_default_frame_count_unless_told_otherwise(
    clip, tmp_path, monkeypatch, options, frames
):
    asked = []

    def run_video(*_, max_frames, **__):  # the demo's frame count, without running it
        asked.append(max_frames)
        raise RuntimeError("stopped by the test")

    monkeypatch.setattr(runner, "run_video", run_video)
    outcome = invoke("demo", "--output", tmp_path, "--size", 28, *options)
    assert_one_line_error(outcome, 1, "stopped by the test")
    assert asked == [frames]


def test_threads_option_sets_torch_threads_for_the_run_and_restores_them(clip, monkeypatch):
    during = []
    run_video = runner.run_video

    def recording(*args, **kwargs):
        during.append(torch.get_num_threads())
        return run_video(*args, **kwargs)

    monkeypatch.setattr(runner, "run_video", recording)
    before = torch.get_num_threads()
    threads = 1 if before != 1 else 2
    try:
        outcome = invoke("run", clip, "--size", 28, "--max-frames", 1, "--threads", threads)
        assert outcome.code == 0, outcome.err
        assert during == [threads]
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


def test_profile_prints_where_the_time_of_a_frame_goes(clip):
    outcome = invoke("run", clip, "--max-frames", 3, "--compare", "--profile")
    assert outcome.code == 0, outcome.err
    lines = outcome.out.splitlines()
    start = lines.index("where the time goes: mean over 3 frames, the first included")
    rows = {line.split()[0]: line.split()[1:] for line in lines[start + 2 :]}
    assert set(rows) == {
        "decode", "preprocess", "drift", "encoder", "head", "count", "estimate", "dense",
        "eventful",
    }  # fmt: skip
    shares = [int(rows[name][1].rstrip("%")) for name in ("drift", "encoder", "head", "count")]
    assert 95 <= sum(shares) + int(rows["estimate"][1].rstrip("%")) <= 105  # rounded to 1%
    assert float(rows["encoder"][0]) > 0 and float(rows["head"][0]) > 0


def test_without_profile_no_breakdown_is_printed(clip):
    outcome = invoke("run", clip, "--max-frames", 1)
    assert outcome.code == 0, outcome.err
    assert "where the time goes" not in outcome.out


@pytest.mark.parametrize(("name", "size"), [("dinov2-s14-vitdet", 196), ("vit-s16", 64)])
def test_a_registered_model_runs_on_a_real_clip_with_its_fidelity(clip, tmp_path, name, size):
    path = tmp_path / "run.json"
    outcome = invoke(
        "run", clip, "--model", name, "--size", size, "--compare", "--max-frames", 3,
        "--level", "tokenwise", "--json", path,
    )  # fmt: skip
    assert outcome.code == 0, outcome.err
    report = json.loads(path.read_text())
    assert report["model"] == name and report["input_size"] == [size, size]
    assert report["fidelity"]["saliency_mae"] is None  # no saliency map: feature cosine only
    assert 0.5 < report["fidelity"]["feature_cosine_min"] <= 1.0 + 1e-6
