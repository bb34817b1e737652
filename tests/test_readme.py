"""The README's Python snippets run as written and print what the README leads one to expect."""

import contextlib
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def snippets_by_section(text: str) -> dict[tuple[str, int], str]:
    """Each Python snippet, keyed by the heading of its "## " section and its place there."""
    parts = re.split(r"^## (.+)$", text, flags=re.MULTILINE)
    snippets = {}
    for heading, body in zip(parts[1::2], parts[2::2], strict=True):
        for index, code in enumerate(re.findall(r"```python\n(.*?)```", body, flags=re.DOTALL)):
            snippets[(heading, index)] = code
    return snippets


SNIPPETS = snippets_by_section(README.read_text())
NUMBER = r"\d+(?:\.\d+)?(?:e-?\d+)?"


@dataclass(frozen=True)
class Printed:
    """What a snippet prints: one regex per line (matched whole), and what must hold of the
    numbers its named groups capture (one dict of floats per line)."""

    lines: list[str]
    holds: Callable[[list[dict[str, float]]], bool]


def fewer_ops_after_the_first(lines: list[dict[str, float]]) -> bool:
    """The first step is dense (1.0x fewer ops), every later one costs fewer ops."""
    return lines[0]["ratio"] == 1.0 and all(line["ratio"] > 1.0 for line in lines[1:])


# Per snippet, keyed by (section heading, its place in the section): a README snippet without an
# entry here fails test_readme_snippet_prints_what_is_stated.
EXPECTED = {
    ("Quick start", 0): Printed(
        # step, eventful ops over dense ops (1 on the dense first step, below after), and the
        # ops by category (no gate ops on the first step, no head on a bare ViT).
        [
            rf"{t} (?P<ratio>{NUMBER}) \{{'linear': \d+, 'attention': \d+, 'adds': \d+, "
            r"'gates': (?P<gates>\d+), 'head': 0\}"
            for t in range(3)
        ],
        lambda lines: (
            lines[0]["ratio"] == 1.0
            and lines[0]["gates"] == 0
            and all(0 < line["ratio"] < 1 and line["gates"] > 0 for line in lines[1:])
        ),
    ),
    ("Convert your own Hugging Face model", 0): Printed(
        # step, last_hidden_state's shape (1 + 16 x 16 patches of 14 pixels, 384 features)
        [rf"{t} torch\.Size\(\[1, 257, 384\]\) (?P<ratio>{NUMBER})x fewer ops" for t in range(3)],
        fewer_ops_after_the_first,
    ),
    ("Detection backbones: ViTDet and windowed attention", 0): Printed(
        # the last step's feature map (384 features on the 28 x 28 grid of 16-pixel patches)
        [rf"\(1, 384, 28, 28\) (?P<ratio>{NUMBER})x fewer ops"],
        lambda lines: lines[0]["ratio"] > 1,
    ),
    ("Dropping patches: IA-RED^2", 0): Printed(
        # 1 + 14 x 14 tokens of 384 features; each group keeps at most 98 of 196 patches (the
        # untrained interpreters rate every patch above 0.5), so the blocks run on about half
        [rf"\(1, 197, 384\) \[98, 98, 98\] (?P<ratio>{NUMBER})x fewer ops"],
        lambda lines: 1.5 < lines[0]["ratio"] < 2.5,
    ),
    ("Inputs that arrive piece by piece: TORE token recycling", 0): Printed(
        # after each tile, 1 + 49 more patch tokens of 384 features; the prediction runs 4 of
        # the 12 blocks, on every token: 3x fewer ops than the whole model
        [rf"\(1, {1 + 49 * n}, 384\) (?P<ratio>{NUMBER})x" for n in range(1, 5)],
        lambda lines: all(line["ratio"] == 3.0 for line in lines),
    ),
    ("Inputs that arrive piece by piece: TORE token recycling", 1): Printed(
        # per step, the whole model on the tiles seen over the extractor on the view and the
        # aggregator: equal with one tile, then fewer; from step 4 on the aggregator is
        # eventful (its dense first step is step 3), and the revisits cost fewer still
        [rf"{t} (?P<ratio>{NUMBER})x fewer ops" for t in range(8)],
        lambda lines: (
            lines[0]["ratio"] == 1.0
            and all(line["ratio"] > 1.0 for line in lines[1:4])
            and all(line["ratio"] > lines[3]["ratio"] for line in lines[4:])
        ),
    ),
    ("Video classification: a factorised ViViT", 0): Printed(
        # one clip's logits over 97 classes; after the dense first step only the changed
        # corner's tokens are re-processed
        [rf"\(1, 97\) (?P<ratio>{NUMBER})x fewer ops"],
        lambda lines: lines[0]["ratio"] > 1.5,
    ),
    ("Real weights, offline", 0): Printed(
        # one saliency map of the 224 x 224 input per frame, 4 frames
        [rf"torch\.Size\(\[1, 1, 224, 224\]\) (?P<ratio>{NUMBER})x fewer ops"] * 4,
        fewer_ops_after_the_first,
    ),
    ("Compute budgets and drift control", 0): Printed(
        # GMACs per frame over frames 0-19 and 20-39, near the budgets of 0.002 and 0.001 (the
        # dense first frame and the refreshes are paid back), then the two periodic refreshes
        [
            r"(?P<before>0\.\d{4}) then (?P<after>0\.\d{4}) GMACs per frame",
            r"\[DriftEvent\(frame=15, stream=0, kind='periodic', value=None\), "
            r"DriftEvent\(frame=30, stream=0, kind='periodic', value=None\)\]",
        ],
        lambda lines: (
            abs(lines[0]["before"] / 0.002 - 1) < 0.15 and abs(lines[0]["after"] / 0.001 - 1) < 0.15
        ),
    ),
    ("A stream that knows its own error", 0): Printed(
        # the dense first step is estimated exact, the later ones below it
        [rf"estimated cosine (?P<estimate>{NUMBER})" for _ in range(5)],
        lambda lines: (
            lines[0]["estimate"] == 1.0 and all(0 < line["estimate"] < 1 for line in lines[1:])
        ),
    ),
    ("Camera motion", 0): Printed(
        # the calibrated policy, and fewer ops than dense on the calibration frames
        [
            rf"MaxAge\(ErrorBound\((?P<bound>{NUMBER})\), max_age=8\) (?P<ratio>{NUMBER})x fewer "
            r"ops on the calibration frames"
        ],
        lambda lines: lines[0]["bound"] > 0 and lines[0]["ratio"] > 1,
    ),
    ("Streams and state", 0): Printed(
        # the full level's caches per stream: in 2 blocks of 65 tokens, 48 features and 4
        # heads, 9 token buffers of 65 x 48, the attention reference of 4 x 65 x 65 and the
        # running sums of 4 x 65 twice, and the 3 gates' scales, in float32
        [r"(?P<bytes>\d+) bytes of cache per stream"],
        lambda lines: lines[0]["bytes"] == 2 * 4 * (9 * 65 * 48 + 4 * 65 * 65 + 2 * 4 * 65 + 3),
    ),
}


def test_readme_starts_with_the_setup_and_test_commands():
    lines = README.read_text().splitlines()
    assert lines[1].endswith("eventful demo")
    assert lines[2].endswith("python -m pytest -q")


def test_readme_states_the_demo_length_the_command_has():
    from eventful.cli import DEMO_FRAMES

    text = README.read_text()
    assert text.count(f"first {DEMO_FRAMES} frames") == 2  # the first lines and the demo section


def test_every_stated_expectation_has_its_snippet():
    assert set(EXPECTED) <= set(SNIPPETS), set(EXPECTED) - set(SNIPPETS)


@pytest.mark.parametrize("key", SNIPPETS, ids=lambda key: f"{key[0]}-{key[1]}")
def test_readme_snippet_prints_what_is_stated(key):
    heading, index = key
    assert key in EXPECTED, (
        f"README snippet {index} of section {heading!r} has no stated output: add one to EXPECTED"
    )
    expected = EXPECTED[key]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(SNIPPETS[key], f"README snippet {key}", "exec"), {})
    lines = printed.getvalue().splitlines()
    assert len(lines) == len(expected.lines), printed.getvalue()
    values = []
    for line, pattern in zip(lines, expected.lines, strict=True):
        match = re.fullmatch(pattern, line)
        assert match, f"{line!r} does not match {pattern!r}"
        values.append({name: float(value) for name, value in match.groupdict().items()})
    assert expected.holds(values), printed.getvalue()


BENCHMARKS = README.parent / "BENCHMARKS.md"


def benchmark_table(name: str) -> list[dict[str, str]]:
    """The first table of BENCHMARKS.md's section `name`, one dict per row keyed by column."""
    text = BENCHMARKS.read_text()
    section = text[text.index(f"<!-- begin {name} -->") : text.index(f"<!-- end {name} -->")]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    return [
        dict(zip(header, (cell.strip() for cell in row.strip("|").split("|")), strict=True))
        for row in rows[2:]
    ]


def test_readme_quotes_the_cost_of_the_defaults_that_the_benchmark_measured():
    rows = {row["drift control"].split(":")[0]: row for row in benchmark_table("drift-settings")}
    column = "op ratio, registry clips"
    stated = (
        f"{rows['default'][column]}x fewer ops than the dense model on the registry clips, "
        f"against {rows['off'][column]}x with drift control off"
    )
    text = " ".join(README.read_text().split())
    assert stated in text
    assert rows["default"]["frames < 0.85"] == "0"
    assert f"drift control off leaves {rows['off']['frames < 0.85']} such frames" in text
