"""What a video run shows while it runs and at its end: a rich progress bar and table on a
terminal, plain lines elsewhere; and the engine's estimated cosine wherever it is shown.

The runner does not estimate fidelity yet: `estimating_runner` sets an estimate on each frame
as the engine will, so that what the command does with it is tested now.
"""

import io
import json
import re

import pytest

pytest.importorskip("av")
pytest.importorskip("matplotlib")
pytest.importorskip("rich")

from rich.console import Console

from eventful.video import runner
from eventful.video.runner import FrameResult
from eventful.viz.plot import run_figure
from eventful.viz.terminal import RunProgress, print_summary
from tests.helpers import invoke

ESTIMATES = [0.97, 0.96, 0.95]  # the estimated cosine of frames 0, 1, 2


@pytest.fixture(autouse=True)
def undecided_terminal(monkeypatch):
    """Only the output stream decides whether it is a terminal, not the test's environment."""
    for variable in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")


def frame(index: int, estimated: float | None = None) -> FrameResult:
    """A frame that cost a quarter of the dense ops and updated a quarter of the tokens."""
    return FrameResult(index, 25, 100, 0.25, ms=10.0, estimated_cosine=estimated)


def terminal() -> Console:
    """A console that is an interactive terminal of 100 columns, without colours."""
    return Console(
        file=io.StringIO(),
        force_terminal=True,
        force_interactive=True,
        color_system=None,
        width=100,
    )


# --- the progress display -------------------------------------------------------------------


def test_progress_elsewhere_prints_a_plain_line_every_n_frames_and_after_the_last(capsys):
    progress = RunProgress(total=7, every=3)  # stderr is pytest's capture: not a terminal
    for index in range(7):
        progress.update(frame(index))
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" |")[0] for line in lines] == ["frame 3/7", "frame 6/7", "frame 7/7"]
    for line in lines:
        assert "elapsed 0:00:00, remaining 0:00:00" in line
        assert line.endswith("fps | tokens updated 25.0% | ops saved 75.0%")
        assert "est. cos" not in line  # no estimate: nothing shown


def test_progress_elsewhere_of_unknown_length_shows_no_total_and_no_remaining_time(capsys):
    progress = RunProgress(total=None, every=50)
    for index in range(2):
        progress.update(frame(index, ESTIMATES[index]))
    progress.close()
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("frame 2 | elapsed 0:00:00 | ")
    assert "remaining" not in line
    assert line.endswith(" | est. cos 0.96")  # the latest frame's estimate


def test_progress_on_a_terminal_is_a_bar_with_total_times_fps_and_estimated_cosine(capsys):
    console = terminal()
    progress = RunProgress(total=10, console=console)
    for index in range(3):
        progress.update(frame(index, ESTIMATES[index]))
    progress.close()
    shown = console.file.getvalue()
    final = shown.split("\x1b[2K")[-1]  # the last render of the live display
    assert "frame" in final and "━" in final
    assert "3/10" in final
    assert "elapsed," in final and "remaining" in final
    assert "fps | tokens updated 25.0% | ops saved 75.0% | est. cos 0.95" in final
    assert capsys.readouterr().err == ""  # no plain line besides the bar


# --- the summary table ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def estimated_run(clip, tmp_path_factory):
    """A compared 3-frame run at 112x112 whose frames carry ESTIMATES; its outcome and report."""
    folder = tmp_path_factory.mktemp("estimated")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "run_video", estimating(runner.run_video))
        patch.delenv("FORCE_COLOR", raising=False)
        patch.delenv("TTY_COMPATIBLE", raising=False)
        patch.delenv("TTY_INTERACTIVE", raising=False)
        outcome = invoke(
            "run", clip, "--size", 112, "--max-frames", 3, "--compare",
            "--json", folder / "run.json", "--plot", folder / "run.png",
        )  # fmt: skip
    assert outcome.code == 0, outcome.err
    return outcome, json.loads((folder / "run.json").read_text())


def estimating(run_video):
    """run_video whose frames carry ESTIMATES as their estimated cosine, set before the
    callbacks see them, as the engine will set them."""

    def run(*args, on_frame, **kwargs):
        def estimate(view: runner.FrameView) -> None:
            view.result.estimated_cosine = ESTIMATES[view.result.index]
            on_frame(view)

        return run_video(*args, on_frame=estimate, **kwargs)

    return run


def test_summary_on_a_terminal_is_a_rich_table(estimated_run):
    _, report = estimated_run
    console = terminal()
    print_summary(report, console)
    shown = console.file.getvalue()
    assert shown.splitlines()[0].startswith("dinov2-saliency on ")
    assert "─" in shown  # the table's rule under its header
    for row in ("GMACs / frame", "ms / frame", "tokens updated", "feature cosine", "saliency MAE"):
        assert row in shown
    assert "estimated cosine" in shown and "mean 0.9600" in shown and "min 0.9500" in shown


def test_summary_elsewhere_is_plain_text(estimated_run, capsys):
    _, report = estimated_run
    print_summary(report)  # stdout is pytest's capture: not a terminal
    shown = capsys.readouterr().out
    assert "─" not in shown and "\x1b" not in shown
    assert re.search(r"\nestimated cosine +mean 0\.9600 +min 0\.9500\n", shown)


# --- the estimated cosine, from the runner to every output ---------------------------------


def test_estimated_cosine_reaches_the_progress_line_and_the_summary(estimated_run):
    outcome, _ = estimated_run
    (line,) = outcome.err.splitlines()  # 3 frames: one plain line, after the last
    assert line.startswith("frame 3/3 | ")
    assert line.endswith(" | est. cos 0.95")
    assert "estimated cosine" in outcome.out and "mean 0.9600" in outcome.out


def test_estimated_cosine_is_reported_per_frame_with_its_mean_and_minimum(estimated_run):
    _, report = estimated_run
    assert [f["estimated_cosine"] for f in report["per_frame"]] == ESTIMATES
    assert report["eventful"]["estimated_cosine_mean"] == pytest.approx(0.96)
    assert report["eventful"]["estimated_cosine_min"] == 0.95


def test_estimated_cosine_is_drawn_dashed_on_the_fidelity_panel(estimated_run):
    _, report = estimated_run
    fidelity = {line.get_label(): line for line in run_figure(report).axes[1].get_lines()}
    assert list(fidelity["estimated cosine"].get_ydata()) == ESTIMATES
    assert fidelity["estimated cosine"].get_linestyle() == "--"
    assert fidelity["feature cosine"].get_linestyle() == "-"


def test_run_on_a_terminal_shows_the_bar_and_the_rich_table(clip, monkeypatch):
    monkeypatch.setattr(runner, "run_video", estimating(runner.run_video))
    outcome = invoke("run", clip, "--size", 112, "--max-frames", 3, terminal=True)
    assert outcome.code == 0, outcome.err
    final = outcome.err.split("\x1b[2K")[-1]
    assert "3/3" in final and "━" in final
    assert "fps | tokens updated" in final and "est. cos 0.95" in final
    assert "─" in outcome.out and "estimated cosine" in outcome.out
