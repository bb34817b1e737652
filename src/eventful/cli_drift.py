"""The drift-control options of `eventful run` and `eventful demo`: each replaces one setting of
`eventful.DEFAULT_DRIFT`, 'off' turns that setting off, --no-drift-control turns all off."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

from eventful.core.drift import DEFAULT_DRIFT, DriftControl

# (option, DriftControl field, value type, metavar, help)
DRIFT_OPTIONS = (
    ("--refresh", "refresh_every", int, "N", "a dense frame once N frames pass without one"),
    (
        "--error-bound",
        "error_bound",
        float,
        "B",
        "a dense frame after one whose unprocessed share (mean over the gates) exceeds B",
    ),
    (
        "--scene-cut",
        "scene_cut_factor",
        float,
        "F",
        "a dense frame where the frame's change (as 16x16 cell means) exceeds F times the "
        "recent typical change",
    ),
    (
        "--content-change",
        "content_change",
        float,
        "C",
        "a dense frame where the frame's change exceeds C times its contrast, or where detail "
        "appears from a faint or featureless frame",
    ),
    (
        "--escalation",
        "escalation_bound",
        float,
        "E",
        "gates select beyond the policy while their unprocessed share exceeds E",
    ),
    (
        "--escalation-max-tokens",
        "escalation_max_tokens",
        int,
        "K",
        "at most K tokens per gate when escalating",
    ),
)


OFF = "off"


def off_or(kind: type) -> Callable[[str], object]:
    """An argparse type: 'off' (None) or a value of `kind`."""

    def parse(text: str) -> object:
        if text == "off":
            return OFF
        try:
            return kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(
                f"expected {expected} or 'off', got {text!r}"
            ) from None

    return parse


def add_drift_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "drift control",
        "on by default (eventful.DEFAULT_DRIFT); each option replaces one setting of the "
        "default, 'off' turns that one off",
    )
    for option, field, kind, meta, text in DRIFT_OPTIONS:
        group.add_argument(
            option,
            dest=field,
            type=off_or(kind),
            metavar=meta,
            help=f"{text} (default: {getattr(DEFAULT_DRIFT, field) or OFF})",
        )
    group.add_argument(
        "--no-drift-control",
        action="store_true",
        help="run without any drift control (no refreshes, no escalation)",
    )


def drift_control(args: argparse.Namespace) -> DriftControl | None:
    """The drift control the drift options ask for: the default with the given settings
    replaced, or None with --no-drift-control (which takes no other drift option)."""
    given = {
        field: getattr(args, field)
        for _, field, *_ in DRIFT_OPTIONS
        if getattr(args, field) is not None
    }
    if args.no_drift_control:
        if given:
            names = ", ".join(option for option, field, *_ in DRIFT_OPTIONS if field in given)
            raise ValueError(
                f"--no-drift-control turns drift control off, but {names} also given; "
                "expected one or the other"
            )
        return None
    settings = {field: None if value == OFF else value for field, value in given.items()}
    try:
        return dataclasses.replace(DEFAULT_DRIFT, **settings)
    except ValueError as error:
        options = ", ".join(option for option, *_ in DRIFT_OPTIONS)
        raise ValueError(f"{error} (from {options})") from None
