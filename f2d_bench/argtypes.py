"""Argument types for the commands' argparse options: each refuses a value outside its range with a message
that names the range, so a bad option is a one-line usage error and not a traceback from deep inside."""

from __future__ import annotations

import argparse
import math


def int_at_least(minimum: int):
    """Parser of an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text}")
        return value

    return parse


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"must be a number, got {text}")
    return value


def number_at_least(minimum: float):
    """Parser of a number >= ``minimum`` (nan refused)."""
    def parse(text: str) -> float:
        value = _number(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be a number >= {minimum:g}, got {text}")
        return value

    return parse


def probability(text: str) -> float:
    """A number in [0, 1]."""
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def open_fraction(text: str) -> float:
    """A number strictly between 0 and 1 (an interval's confidence level, say)."""
    value = _number(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1 (0.95: a 95% interval), got {text}")
    return value
