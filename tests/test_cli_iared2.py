"""`eventful train iared2` and `eventful run --method iared2`: a small registered model trained
for a step per group on real frames, then run on a real clip; one-line errors for bad input."""

import json

import pytest

from eventful.video.clips import registry_clip
from tests.helpers import assert_one_line_error, invoke

pytest.importorskip("av")
pytest.importorskip("matplotlib")

MODEL = ("--model", "vit-s16", "--size", "64")
CLIP = "carphone_pristine.mp4"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("iared2") / "vit.safetensors"
    outcome = invoke(
        "train", "iared2", *MODEL, "--clips", CLIP, "--every", "20", "--steps-per-group", "1",
        "--batch-size", "2", "--output", path, "--threads", "1",
    )  # fmt: skip
    assert outcome.code == 0, outcome
    assert "done: reward" in outcome.out
    return path


def test_training_writes_a_checkpoint_with_its_log(checkpoint):
    meta = json.loads(checkpoint.with_suffix(".json").read_text())
    assert checkpoint.is_file()
    assert [entry["group"] for entry in meta["log"]] == [0, 1, 2]
    assert meta["model"]["starts"] == [0, 4, 8]
    assert meta["progress"] == {"group": 3, "step": 0}


def test_a_run_with_the_trained_interpreters_reports_what_it_dropped(checkpoint, tmp_path):
    # At most 8 of the 16 patches per group: one training step per group drops little alone.
    report = tmp_path / "run.json"
    outcome = invoke(
        "run", registry_clip(CLIP), *MODEL, "--method", "iared2", "--weights", checkpoint,
        "--keep", "0.5:8", "--max-frames", "3", "--compare", "--json", report,
    )  # fmt: skip
    assert outcome.code == 0, outcome
    written = json.loads(report.read_text())
    assert written["level"] == "iared2"
    assert written["frames"] == 3
    assert 0 < written["eventful"]["gops_per_frame"] < written["dense"]["gops_per_frame"]
    assert 0 < written["eventful"]["updated_fraction"] < 1
    for frame in written["per_frame"]:
        assert frame["feature_cosine"] is not None


def test_keeping_every_patch_is_the_dense_model(checkpoint, tmp_path):
    report = tmp_path / "run.json"
    outcome = invoke(
        "run", registry_clip(CLIP), *MODEL, "--method", "iared2", "--weights", checkpoint,
        "--keep", "0", "--max-frames", "2", "--compare", "--json", report,
    )  # fmt: skip
    assert outcome.code == 0, outcome
    written = json.loads(report.read_text())
    assert written["eventful"]["gops_per_frame"] > written["dense"]["gops_per_frame"]
    for frame in written["per_frame"]:
        assert frame["feature_cosine"] > 0.9999


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        (("--method", "iared2"), "--method iared2 needs --weights CKPT"),
        (("--weights", "x.safetensors"), "--weights applies to --method iared2 only"),
        (("--method", "iared2", "--weights", "none.safetensors"), "does not exist"),
        (("--method", "iared2", "--weights", "x.safetensors", "--keep", "2"), "--keep 2"),
    ],
)
def test_bad_method_options_are_one_line_errors(arguments, fragment):
    outcome = invoke("run", registry_clip(CLIP), *MODEL, *arguments, "--max-frames", "1")
    assert_one_line_error(outcome, 1, fragment)


def test_training_refuses_to_overwrite_and_to_resume_what_is_not_there(checkpoint, tmp_path):
    again = invoke("train", "iared2", *MODEL, "--clips", CLIP, "--output", checkpoint)
    assert_one_line_error(again, 1, "exists; pass --resume")
    missing = tmp_path / "missing.safetensors"
    resumed = invoke("train", "iared2", *MODEL, "--clips", CLIP, "--output", missing, "--resume")
    assert_one_line_error(resumed, 1, "does not exist")
    unknown = invoke("train", "iared2", *MODEL, "--clips", "nowhere.mp4", "--output", missing)
    assert_one_line_error(unknown, 1, "neither a video file nor one of the registry's clips")
