"""argparse types shared by the commands: a bad number is refused when the command line is parsed (exit 2, one
line naming the option), before any data or model loads."""

from __future__ import annotations

import argparse
import math

__all__ = ["group_size", "non_negative_float", "non_negative_int", "positive_float", "positive_int", "unit_interval"]


def positive_int(text: str) -> int:
    """An integer >= 1 (batch sizes, limits, boxes per question, steps between checkpoints, ...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def group_size(text: str) -> int:
    """A GRPO group size: an integer >= 2 (the group-relative advantage of one sample is always 0)."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"a GRPO group needs >= 2 samples (advantages are relative), got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (counts where 0 means none: gallery questions per run, ...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (KL coefficients, costs)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, sampling temperatures)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def unit_interval(text: str) -> float:
    """A number in ``(0, 1]`` (IoU thresholds, shares)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value
