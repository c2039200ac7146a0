"""Targets: the models that answer. ``load_target("ocr")``, ``"hf:MODEL_ID_OR_PATH"``, ``"openai:MODEL"``."""

from __future__ import annotations

from zoomvlm.core.geometry import Budget
from zoomvlm.targets.base import Generation, Target, TargetRequest, Usage

__all__ = ["Generation", "Target", "TargetRequest", "Usage", "check_target_spec", "load_target", "TARGET_SPECS"]

TARGET_SPECS = {
    "ocr": "RapidOCR reader (real PP-OCR weights, CPU); answers with the transcript",
    "hf:MODEL": "a transformers image-text-to-text model by hub id or local path (SmolVLM, Qwen2.5-VL, LLaVA)",
    "openai:MODEL": "an OpenAI-compatible chat endpoint ($OPENAI_BASE_URL, $OPENAI_API_KEY)",
}


def check_target_spec(spec: str) -> None:
    """Refuse a malformed target spec BEFORE anything loads (the CLI calls it before loading a policy).

    Raises:
        ValueError: an unknown kind, or a missing/extra ``:MODEL``, with the accepted forms.
    """
    kind, _, arg = spec.partition(":")
    if not ((kind == "ocr" and not arg) or (kind in ("hf", "openai") and arg)):
        forms = "; ".join(f"{k} ({v})" for k, v in TARGET_SPECS.items())
        raise ValueError(f"unknown target {spec!r}; use one of: {forms}")


def load_target(spec: str, budget: Budget | int | str | None = None, **kwargs) -> Target:
    """Build a target from its spec string (see :data:`TARGET_SPECS`).

    Args:
        spec: ``ocr``, ``hf:<model id or path>`` or ``openai:<model name>``.
        budget: per-view budget; ``None`` = the backend's default (ocr 384 px, openai 512 px, hf: the
            processor's own resizing only).
        kwargs: passed to the target's constructor.

    Raises:
        ValueError: unknown spec, with the accepted forms.
    """
    kind, _, arg = spec.partition(":")
    if budget is not None:
        kwargs["budget"] = budget
    if kind == "ocr" and not arg:
        from zoomvlm.targets.ocr import OCRTarget

        return OCRTarget(**kwargs)
    if kind == "hf" and arg:
        from zoomvlm.targets.hf import HFTarget

        return HFTarget(arg, **kwargs)
    if kind == "openai" and arg:
        from zoomvlm.targets.openai import OpenAITarget

        return OpenAITarget(arg, **kwargs)
    forms = "; ".join(f"{k} ({v})" for k, v in TARGET_SPECS.items())
    raise ValueError(f"unknown target {spec!r}; use one of: {forms}")
