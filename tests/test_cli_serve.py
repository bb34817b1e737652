"""`eventful serve`: a local Ray cluster serving three cameras of real clips; one-line errors."""

import pytest

from tests.helpers import assert_one_line_error, invoke

pytest.importorskip("ray")
pytest.importorskip("av")

MODEL = ("--model", "vit-s16", "--size", "64")


def test_serve_answers_every_frame_of_every_camera():
    outcome = invoke(
        "serve", *MODEL, "--cameras", "3", "--workers", "2", "--frames", "4", "--threads", "1",
        "--precision", "int8",
    )  # fmt: skip
    assert outcome.code == 0, outcome
    expected = "serving 3 cameras of vit-s16 at 64, precision int8, on 2 workers; load [2, 1]"
    assert expected in outcome.out
    for camera in range(3):
        assert f"camera-{camera}: 4 frames answered, 0 dropped" in outcome.out
    assert "failovers: 0" in outcome.out


def test_serve_refuses_bad_settings_in_one_line():
    assert_one_line_error(invoke("serve", *MODEL, "--cameras", "0"), 1, "--cameras must be")
    unknown = invoke("serve", *MODEL, "--clips", "nowhere.mp4")
    assert_one_line_error(unknown, 1, "neither a video file nor a registry clip")


def test_serve_refuses_bf16_without_native_bfloat16_before_starting_workers(monkeypatch):
    from eventful.core import precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2"}))
    outcome = invoke("serve", *MODEL, "--precision", "bf16")
    assert_one_line_error(outcome, 1, "precision 'bf16' needs native bfloat16 matmuls")
