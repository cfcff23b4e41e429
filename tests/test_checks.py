"""bcd.checks: one vocabulary of argument checks, with one wording."""

from __future__ import annotations

import pytest

from bcd import checks


@pytest.mark.parametrize("value,low,high,expected", [
    (3, None, None, True), (True, None, None, False), (3.0, None, None, False), ("3", None, None, False),
    (0, 0, None, True), (-1, 0, None, False), (4, 0, 4, True), (5, 0, 4, False), (2**70, 1, None, True),
])
def test_is_int_refuses_bools_floats_and_out_of_range(value, low, high, expected):
    assert checks.is_int(value, low, high) is expected


def test_the_checks_name_the_label_the_value_and_what_is_accepted():
    assert checks.positive_int("K", 2) == 2 and checks.optional(checks.positive_int)("K", None) is None
    with pytest.raises(ValueError, match=r"^Invalid K: True; accepted: an integer >= 1\.$"):
        checks.positive_int("K", True)
    with pytest.raises(ValueError, match=r"^Invalid seed: 1\.5; accepted: an integer\.$"):
        checks.integer("seed", 1.5)
    with pytest.raises(ValueError, match=r"^Invalid scale: 2; accepted: a number from 0 to 1\.$"):
        checks.fraction("scale", 2)
