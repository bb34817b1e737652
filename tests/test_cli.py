"""The `eventful` command: what `run` and `demo` write, and one-line errors for bad input.

Every run uses the real DINOv2 ViT-S/14 saliency model on a few frames of real or generated
video; the bad inputs are files made here with PyAV.
"""

import contextlib
import io
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")
pytest.importorskip("matplotlib")

from eventful.cli import main  # noqa: E402
from eventful.video.clips import registry_clip  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class Outcome:
    code: int
    out: str
    err: str


def invoke(*argv) -> Outcome:
    """`eventful ARGV` in this process: exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(arg) for arg in argv])
        except SystemExit as exit_:  # argparse errors exit instead of returning
            code = exit_.code
    return Outcome(code, out.getvalue(), err.getvalue())


def assert_one_line_error(outcome: Outcome, code: int, fragment: str) -> None:
    assert outcome.code == code, outcome
    assert "Traceback" not in outcome.err
    lines = outcome.err.splitlines()
    assert len(lines) == 1, outcome.err
    assert lines[0].startswith("eventful: error: "), lines[0]
    assert fragment in lines[0]


# --- videos made for the tests -------------------------------------------------------------


@pytest.fixture(scope="module")
def clip() -> Path:
    try:
        return registry_clip("bikes.mp4")
    except (ModuleNotFoundError, FileNotFoundError) as error:
        pytest.skip(str(error))


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
    assert "4 frames (0 failed), 224x224" in outcome.out
    assert f"report: {paths['json']}" in outcome.out


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
    assert len(report["per_frame"]) == 4
    for index, frame in enumerate(report["per_frame"]):
        assert set(frame) >= {"index", "gops", "updated_fraction", "feature_cosine"}
        assert frame["index"] == index


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


def test_plot_option_writes_a_png(compared_run):
    _, paths = compared_run
    assert paths["png"].read_bytes().startswith(PNG_SIGNATURE)


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
    outcome = invoke("run", resolution_change, "--size", 112, "--json", report_path)
    assert outcome.code == 0, outcome.err
    report = json.loads(report_path.read_text())
    assert report["frames"] == 6
    assert report["frames_failed"] == 0
    assert any("resolution changed" in note for note in report["notes"])
    assert "resolution changed from 320x240 to 160x128" in outcome.out
    updated = [frame["updated_fraction"] for frame in report["per_frame"]]
    assert updated[3] == pytest.approx(1.0)  # the first frame of the new size is dense again
    assert updated[4] < 1


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
        "--error-bound", 1e9, "--json", paths["json"], "--plot", paths["png"],
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
    assert report["drift"] == {"refresh_every": 4, "error_bound": 1e9, "scene_cut_factor": 50.0}
    assert report["events"] == {"periodic": 2}
    assert [f["index"] for f in frames if f["events"]] == [4, 8]
    assert frames[4]["events"] == [{"stream": 0, "kind": "periodic", "value": None}]
    dense = [f["index"] for f in frames if f["updated_fraction"] == pytest.approx(1.0)]
    assert dense == [0, 4, 8]
    assert "refreshes and resets: 2 periodic" in outcome.out


def test_scheduled_run_plots_a_png(scheduled_run):
    _, _, plot = scheduled_run
    assert plot.read_bytes().startswith(PNG_SIGNATURE)


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


def test_resolution_change_is_reported_as_an_event_of_its_frame(resolution_change, tmp_path):
    report_path = tmp_path / "run.json"
    outcome = invoke("run", resolution_change, "--size", 112, "--json", report_path)
    assert outcome.code == 0, outcome.err
    report = json.loads(report_path.read_text())
    events = [(f["index"], f["events"]) for f in report["per_frame"] if f["events"]]
    assert events == [(3, [{"stream": 0, "kind": "resolution", "value": None}])]
    assert report["events"] == {"resolution": 1}


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
        (["--scene-cut", 1], "scene_cut_factor must be > 1 or None, got 1.0"),
        (["--error-bound", -1], "error_bound must be >= 0 or None, got -1.0"),
    ],
)
def test_bad_budget_and_drift_options_are_one_line_errors(clip, options, fragment):
    assert_one_line_error(invoke("run", clip, *options), 1, fragment)


def test_ops_budget_above_the_dense_cost_is_a_one_line_error(clip):
    outcome = invoke("run", clip, "--size", 112, "--policy", "ops:5")
    assert_one_line_error(outcome, 1, "OpsBudget(5.0) exceeds the 1.42242 GMACs per frame")


def test_non_integer_refresh_is_an_argument_error_with_exit_code_2(clip):
    assert_one_line_error(invoke("run", clip, "--refresh", "often"), 2, "invalid int value")
