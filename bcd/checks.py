"""Argument checks shared across bcd, with the error wording every module uses."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any


def is_number(value: Any) -> bool:
    """Whether ``value`` is a finite int or float (``bool`` is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_int(value: Any, low: int | None = None, high: int | None = None) -> bool:
    """Whether ``value`` is an integer (``bool`` is not) from ``low`` to ``high`` (either end open when None).

    The predicate the checks below are made of, for callers whose error names more than a label
    (a state-dict key, a block range).
    """
    return (isinstance(value, int) and not isinstance(value, bool)
            and (low is None or value >= low) and (high is None or value <= high))


def integer(label: str, value: Any) -> int:
    """``value`` if it is an integer (``bool`` is not accepted).

    Raises:
        ValueError: naming ``label``, the value received and what is accepted.
    """
    if not is_int(value):
        raise ValueError(f"Invalid {label}: {value!r}; accepted: an integer.")
    return value


def positive_int(label: str, value: Any) -> int:
    """``value`` if it is an integer >= 1 (``bool`` is not accepted).

    Raises:
        ValueError: naming ``label``, the value received and what is accepted.
    """
    if not is_int(value, 1):
        raise ValueError(f"Invalid {label}: {value!r}; accepted: an integer >= 1.")
    return value


def flag(label: str, value: Any) -> bool:
    """``value`` if it is True or False (not 1, not ``"yes"``).

    Raises:
        ValueError: naming ``label``, the value received and what is accepted.
    """
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {label}: {value!r}; accepted: True or False.")
    return value


def fraction(label: str, value: Any) -> float:
    """``value`` if it is a number from 0 to 1 (``bool`` is not accepted).

    Raises:
        ValueError: naming ``label``, the value received and what is accepted.
    """
    if not is_number(value) or not 0 <= value <= 1:
        raise ValueError(f"Invalid {label}: {value!r}; accepted: a number from 0 to 1.")
    return value


def optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    """``check``, letting None through (an option whose default means "not set")."""

    def checked(label: str, value: Any) -> Any:
        return value if value is None else check(label, value)

    return checked


def validator(check: Callable[[str, Any], Any]) -> Callable[[Any, Any, Any], None]:
    """``check`` as an attrs validator, labelled with the field's name: the plugin classes' options use these."""

    def validate(instance: Any, attribute: Any, value: Any) -> None:
        check(attribute.name, value)

    return validate
