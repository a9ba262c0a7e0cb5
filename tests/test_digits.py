"""raftkv.digits.parse_decimal: ASCII digits only, bounded before any conversion."""

from __future__ import annotations

import pytest

from raftkv.digits import parse_decimal


@pytest.mark.parametrize(("text", "high", "expected"), [
    ("0", 10, 0), ("10", 10, 10), ("007", 10, 7), ("0" * 10_000 + "9", 10, 9),
    ("65535", 65535, 65535), ("65536", 65535, None), ("11", 10, None),
    ("9" * 5000, 2**63, None), ("", 10, None), ("-1", 10, None), ("+1", 10, None),
    (" 1", 10, None), ("1_0", 10, None), ("1.0", 10, None),
    ("\u00b2", 10, None), ("\u09ed", 10, None), ("\uff11", 10, None),
])
def test_parse_decimal(text: str, high: int, expected: int | None) -> None:
    assert parse_decimal(text, high) == expected
