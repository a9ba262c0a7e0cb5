"""Numbers written by someone else (a query parameter, a path, a port, a setting, JSON).

`str.isdigit` is true of more than ASCII digits ('\u00b2', a superscript two; '\u09ed', a
Bengali seven), and `int()` accepts some of those ('\u09ed' is 7) and refuses others with a
ValueError, as it refuses any string of more than 4,300 digits (sys.get_int_max_str_digits):
a check of `isdigit` before `int` lets both through to whoever catches the ValueError, or to
no one. `parse_decimal` takes ASCII digits only, and never converts more of them than its
bound needs.

JSON from outside goes through `reject_json_constant` and `finite_json_float` (json's
parse_constant and parse_float): Python's json takes NaN and Infinity, which are not JSON, and
turns 1e999 into infinity, which no encoder of ours writes back.
"""

from __future__ import annotations

import math
from typing import Final

MAX_INT64: Final = (1 << 63) - 1


def parse_decimal(text: str, high: int) -> int | None:
    """`text` as an integer in 0..high when it is ASCII decimal digits only (leading zeros
    allowed); None otherwise (no digits, any other character, or a number over `high`)."""
    if not text.isascii() or not text.isdigit():
        return None
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(high)):
        return None
    value = int(digits)
    return value if value <= high else None


def reject_json_constant(name: str) -> object:
    """json's parse_constant: NaN, Infinity and -Infinity are not JSON (RFC 8259)."""
    raise ValueError(f"{name} is not valid JSON")


def finite_json_float(text: str) -> float:
    """json's parse_float: a number out of a float's range (1e999) is refused, not infinity."""
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"the number {text[:20]} is out of range")
    return number
