"""Every prompt template and output parser used by zoomvlm, in one place.

Prompt drift silently changes rewards and benchmark numbers, so each template here has a golden test
(``tests/test_prompts.py``). Parsers for box text and tool calls live in :mod:`zoomvlm.core.geometry`
and are re-exported here so callers have one import for "text in, text out".

>>> cropper_prompt("What is the total?")
'What is the total?\\nOutline the region in the image that would help answer this question.'
>>> target_prompt("What is the total?")
'What is the total?\\nGive a very brief answer.'
"""

from __future__ import annotations

from zoomvlm.core.geometry import (
    CROP_SET_NAMES,
    format_get_crops,
    format_percent_box,
    parse_bbox_2d,
    parse_get_crops,
    parse_percent_box,
)

__all__ = [
    "AWARES_SYSTEM_PROMPT",
    "completion_text",
    "CROP_SET_POLICY_TEMPLATE",
    "CROPPER_TEMPLATE",
    "NO_CROPS",
    "GROUNDING_TEMPLATE",
    "TARGET_TEMPLATE",
    "crop_set_policy_prompt",
    "cropper_prompt",
    "format_get_crops",
    "format_percent_box",
    "grounding_prompt",
    "parse_bbox_2d",
    "parse_get_crops",
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


def _check(question: str) -> str:
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"a question must be a non-empty string, got {question!r}")
    return question.strip()


def cropper_prompt(question: str) -> str:
    """The cropper's user text for ``question``. Raises ValueError on an empty question."""
    return CROPPER_TEMPLATE.format(question=_check(question))


def target_prompt(question: str) -> str:
    """The target's user text for ``question``. Raises ValueError on an empty question."""
    return TARGET_TEMPLATE.format(question=_check(question))


def grounding_prompt(question: str) -> str:
    """The grounding VLM's user text for ``question``. Raises ValueError on an empty question."""
    return GROUNDING_TEMPLATE.format(question=_check(question))


def _crop_set_listing() -> str:
    return ", ".join(f"'{k}' {'whole image' if k == 'all' else name}" for k, name in CROP_SET_NAMES.items())


AWARES_SYSTEM_PROMPT = (
    "You see a low-resolution view of an image. If it is enough to answer the question, answer directly "
    "and briefly. If fine details are too small to read, do not guess: request high-resolution crops with "
    "a tool call GET_CROPS: [...] listing one or more of " + _crop_set_listing() + ", "
    "e.g. GET_CROPS: ['3'] or GET_CROPS: ['0', '5']. The crops are returned to you; then answer briefly."
)
"""AwaRes self-zoom system prompt (turn 1). The paper publishes the protocol but not its prompt, so this
one is ours: it lists the crop set (:data:`~zoomvlm.core.geometry.CROP_SET`) by index and name and shows the
exact tool-call syntax :func:`~zoomvlm.core.geometry.parse_get_crops` reads."""

NO_CROPS = "NO_CROPS"
"""The external crop-set policy's no-crop action: the target answers from the low-resolution view alone."""

CROP_SET_POLICY_TEMPLATE = (
    "{question}\nCan this be answered from this low-resolution view? If yes, reply " + NO_CROPS + ". "
    "If not, reply GET_CROPS: [...] with the high-resolution crops to fetch: " + _crop_set_listing() + "."
)
"""Prompt of the external crop-set policy (a small VLM in front of a target that cannot be trained, e.g.
the OCR reader or an API): it sees the low-resolution view and emits ``NO_CROPS`` or ``GET_CROPS: [...]``."""


def crop_set_policy_prompt(question: str) -> str:
    """The external crop-set policy's user text for ``question``. Raises ValueError on an empty question."""
    return CROP_SET_POLICY_TEMPLATE.format(question=_check(question))


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
