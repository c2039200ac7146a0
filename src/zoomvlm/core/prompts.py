"""Every prompt template and output parser of CropVLM and the targets, in one place (AwaRes's prompts and its
GET_CROPS grammar are the AwaRes protocol: :mod:`zoomvlm.awares.protocol`).

Prompt drift silently changes rewards and benchmark numbers, so each template here has a golden test
(``tests/test_prompts.py``). Parsers for box text live in :mod:`zoomvlm.core.geometry`
and are re-exported here so callers have one import for "text in, text out".

>>> cropper_prompt("What is the total?")
'What is the total?\\nOutline the region in the image that would help answer this question.'
>>> target_prompt("What is the total?")
'What is the total?\\nGive a very brief answer.'
"""

from __future__ import annotations

from zoomvlm.core.geometry import format_percent_box, parse_bbox_2d, parse_percent_box

__all__ = [
    "clean_question",
    "completion_text",
    "CROPPER_TEMPLATE",
    "GROUNDING_TEMPLATE",
    "TARGET_TEMPLATE",
    "cropper_prompt",
    "format_percent_box",
    "grounding_prompt",
    "parse_bbox_2d",
    "parse_percent_box",
    "target_prompt",
]

CROPPER_TEMPLATE = "{question}\nOutline the region in the image that would help answer this question."
"""CropVLM's cropper prompt (METHODS.md). The question is used verbatim: the official code's
``str.capitalize()`` lower-cases every other letter of the question and is not copied."""

TARGET_TEMPLATE = "{question}\nGive a very brief answer."
"""CropVLM's target prompt: one user turn, images ``[full, crop]`` then this text; greedy decoding."""

GROUNDING_TEMPLATE = (
    "Outline the region in the image that would help answer the following question: {question}\n"
    "Output the coordinates in JSON format with a 'bbox_2d' field containing [x1, y1, x2, y2]."
)
"""CropVLM's seed-box prompt for a grounding VLM (Qwen2.5-VL); answers are parsed by ``parse_bbox_2d``."""


def clean_question(question: str) -> str:
    """``question`` stripped. Raises ValueError on an empty or non-string question."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"a question must be a non-empty string, got {question!r}")
    return question.strip()


def cropper_prompt(question: str) -> str:
    """The cropper's user text for ``question``. Raises ValueError on an empty question."""
    return CROPPER_TEMPLATE.format(question=clean_question(question))


def target_prompt(question: str) -> str:
    """The target's user text for ``question``. Raises ValueError on an empty question."""
    return TARGET_TEMPLATE.format(question=clean_question(question))


def grounding_prompt(question: str) -> str:
    """The grounding VLM's user text for ``question``. Raises ValueError on an empty question."""
    return GROUNDING_TEMPLATE.format(question=clean_question(question))


def completion_text(completion) -> str:
    """The text of one TRL completion: a plain string, or a conversational ``[{"role", "content"}]`` list whose
    contents (strings or ``[{"type": "text", "text": ...}]`` parts) are joined in order."""
    if isinstance(completion, str):
        return completion
    parts = []
    for message in completion:
        content = message.get("content") or ""
        if isinstance(content, str):
            parts.append(content)
        else:
            parts.extend(c.get("text") or "" for c in content if c.get("type") == "text")
    return "".join(parts)
