"""argparse types shared by the commands: a bad number is refused when the command line is parsed (exit 2, one
line naming the option), before any data or model loads."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = ["group_size", "non_negative_float", "non_negative_int", "positive_float", "positive_int", "unit_interval"]


def _number(text: str, kind: type, ok: Callable[[float], bool], expected: str):
    """``kind(text)`` if it is a finite number for which ``ok`` holds, else ``ArgumentTypeError("expected ...")``."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (batch sizes, limits, boxes per question, steps between checkpoints, ...)."""
    return _number(text, int, lambda v: v >= 1, "an integer >= 1")


def group_size(text: str) -> int:
    """A GRPO group size: an integer >= 2 (the group-relative advantage of one sample is always 0)."""
    return _number(text, int, lambda v: v >= 2, "a GRPO group of >= 2 samples (advantages are relative)")


def non_negative_int(text: str) -> int:
    """An integer >= 0 (counts where 0 means none: gallery questions per run, ...)."""
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (KL coefficients, costs)."""
    return _number(text, float, lambda v: v >= 0, "a finite number >= 0")


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, sampling temperatures)."""
    return _number(text, float, lambda v: v > 0, "a finite number > 0")


def unit_interval(text: str) -> float:
    """A number in ``(0, 1]`` (IoU thresholds, shares)."""
    return _number(text, float, lambda v: 0 < v <= 1, "a number in (0, 1]")
