"""Shared fixtures. Offline by construction: no test may reach a model hub."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from zoomvlm.cli.main import demo_data_path  # noqa: E402
from zoomvlm.data.samples import load_jsonl  # noqa: E402


@pytest.fixture(scope="session")
def demo_samples():
    """The 12 bundled demo questions (4 real receipts with human evidence boxes)."""
    return load_jsonl(demo_data_path())


@pytest.fixture(scope="session")
def ocr_target():
    """One RapidOCR target at 384 px for the whole session (engine start-up takes ~1 s)."""
    from zoomvlm.targets.ocr import OCRTarget

    return OCRTarget(384)


@pytest.fixture(scope="session")
def tiny_vlms():
    """Tiny random-weight SmolVLM, Qwen2.5-VL and LLaVA (real architectures), built once per session."""
    import tiny_models as tiny

    return {
        "smolvlm": tiny.build_tiny_smolvlm(),
        "qwen2_5_vl": tiny.build_tiny_qwen25vl(),
        "llava": tiny.build_tiny_llava(),
    }


@pytest.fixture(scope="session")
def noise_images():
    """Two random images of different shapes (300x200 landscape, 120x240 portrait)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (240, 120, 3), dtype=np.uint8)),
    ]


@pytest.fixture(scope="session")
def tiny_smolvlm_init(tmp_path_factory):
    """A from-scratch tiny SmolVLM cropper saved as a folder (``model.init`` of the CPU recipes in tests): one
    64 px view, so a training step takes well under a second on 2 cores."""
    import tiny_models as tiny

    path = tmp_path_factory.mktemp("tiny_init") / "smolvlm_64px"
    return tiny.save_tiny(*tiny.build_tiny_smolvlm(tile_size=64, longest_edge=64, image_splitting=False), path)


@pytest.fixture(scope="session")
def tiny_qwen25vl_init(tmp_path_factory):
    """A from-scratch tiny Qwen2.5-VL saved as a folder (``model.init`` of the self-zoom training tests)."""
    import tiny_models as tiny

    return tiny.save_tiny(*tiny.build_tiny_qwen25vl(), tmp_path_factory.mktemp("tiny_init") / "qwen25vl")


@pytest.fixture(scope="session")
def real_vlms():
    """Random-weight models of the REAL SmolVLM-256M-Instruct (idefics3), Qwen2.5-VL-7B-Instruct and
    llava-1.5-7b-hf configurations with their real processors (tests/real_models.py), built once per session."""
    import real_models

    return {family: real_models.build_real(family) for family in real_models.FOLDERS}
