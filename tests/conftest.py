"""Shared fixtures. Offline by construction: no test may reach a model hub."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from zoomvlm.cli import demo_data_path  # noqa: E402
from zoomvlm.data import load_jsonl  # noqa: E402


@pytest.fixture(scope="session")
def demo_samples():
    """The 12 bundled demo questions (4 real receipts with human evidence boxes)."""
    return load_jsonl(demo_data_path())


@pytest.fixture(scope="session")
def ocr_target():
    """One RapidOCR target at 384 px for the whole session (engine start-up takes ~1 s)."""
    from zoomvlm.targets.ocr import OCRTarget

    return OCRTarget(384)
