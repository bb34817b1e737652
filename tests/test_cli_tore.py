"""`eventful train tore`: a small registered model fine-tuned for recycling for two steps on real
frames; resuming; one-line errors for bad input."""

import json

import pytest
import torch

from eventful.methods.tore_train import load_tuned
from eventful.zoo import load_model
from tests.helpers import assert_one_line_error, invoke

pytest.importorskip("av")

MODEL = ("--model", "vit-s16", "--size", "64")
CLIP = "carphone_pristine.mp4"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tore") / "vit.safetensors"
    outcome = invoke(
        "train", "tore", *MODEL, "--clips", CLIP, "--every", "20", "--steps", "2",
        "--batch-size", "2", "--output", path, "--threads", "1",
    )  # fmt: skip
    assert outcome.code == 0, outcome
    assert "done: mean loss" in outcome.out
    return path


def test_fine_tuning_writes_a_checkpoint_that_loads_into_the_model(checkpoint):
    meta = json.loads(checkpoint.with_suffix(".json").read_text())
    assert meta["format"] == "eventful-tore/1"
    assert meta["progress"]["step"] == 2 and len(meta["log"]) == 2
    assert meta["settings"]["batch_size"] == 2
    base = load_model("vit-s16", 64).dense
    before = {k: v.clone() for k, v in base.state_dict().items()}
    tuned = load_tuned(base, checkpoint)
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, before[k])]
    assert changed  # two Adam steps move every tuned weight


def test_resuming_a_finished_fine_tuning_does_nothing_more(checkpoint):
    stamp = checkpoint.stat().st_mtime_ns
    outcome = invoke(
        "train", "tore", *MODEL, "--clips", CLIP, "--every", "20", "--output", checkpoint,
        "--resume", "--threads", "1",
    )  # fmt: skip
    assert outcome.code == 0, outcome
    assert "2 steps, 2 done" in outcome.out
    assert checkpoint.stat().st_mtime_ns == stamp


def test_fine_tuning_refuses_bad_input_in_one_line(checkpoint, tmp_path):
    again = invoke("train", "tore", *MODEL, "--clips", CLIP, "--output", checkpoint)
    assert_one_line_error(again, 1, "exists; pass --resume")
    missing = tmp_path / "missing.safetensors"
    resumed = invoke("train", "tore", *MODEL, "--clips", CLIP, "--output", missing, "--resume")
    assert_one_line_error(resumed, 1, "does not exist")
    other = invoke(
        "train", "tore", "--model", "vit-b16", "--size", "64", "--clips", CLIP, "--every", "20",
        "--output", checkpoint, "--resume",
    )  # fmt: skip
    assert_one_line_error(other, 1, "tuned from the model with fingerprint")
    wrong_suffix = invoke("train", "tore", *MODEL, "--output", tmp_path / "tore.pt")
    assert_one_line_error(wrong_suffix, 1, "ending in .safetensors")
    zero = invoke("train", "tore", *MODEL, "--clips", CLIP, "--steps", "0", "--output", missing)
    assert_one_line_error(zero, 1, "steps must be a positive integer")
