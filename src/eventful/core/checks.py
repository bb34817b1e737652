"""Argument checks shared by settings classes; each error names the value and what was expected."""

from __future__ import annotations

import math


def check_count(name: str, value: object) -> None:
    """A positive integer or None (booleans are not integers here)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


def check_number(name: str, value: object, low: float, inclusive: bool) -> None:
    """A finite number above `low` (or equal to it, when `inclusive`), or None."""
    if value is None:
        return
    valid = not isinstance(value, bool) and isinstance(value, (int, float))
    valid = valid and math.isfinite(value) and (value >= low if inclusive else value > low)
    if not valid:
        relation = ">=" if inclusive else ">"
        raise ValueError(
            f"{name} must be {relation} {low:g} (a finite number) or None, got {value!r}"
        )
