"""The AwaRes protocol, shared by self-zoom, the external crop-set policy, curation and training.

AwaRes (METHODS.md; awares_paper_excerpt sec. 3.1): turn 1 shows a LOW-resolution view of the whole
image (the high-resolution view with each side halved: a quarter of its pixels) and the question; the
model either answers directly or emits ``GET_CROPS: [...]`` naming regions of the fixed crop set
(:data:`~zoomvlm.core.geometry.CROP_SET`); the requested crops, cut from the ORIGINAL image at the
high-resolution view's scale, are appended as a new user turn and the model answers.

Frames and units: crop keys name normalised regions; images here are PIL images; budgets are
:class:`~zoomvlm.core.geometry.Budget`. ``high`` is the reference (high-resolution) budget: RTR is counted
against the whole image under it (the low view is 0.25, a quadrant another 0.25).

A trajectory record (one JSONL line written by ``zoomvlm curate awares``) is::

    {"id", "image": "/abs/path.jpg", "question", "answers": [...], "answer": "the supervised answer",
     "label": "LR" | "HR", "crops": [] | ["3", ...], "high": "side:768", ...}

and :func:`trajectory_messages` / :func:`trajectory_images` turn it into the conversation and its images.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from zoomvlm.core.geometry import (
    CROP_SET,
    CROP_SET_NAMES,
    Budget,
    ToolCallError,
    crop_image,
    format_get_crops,
    half_resolution_budget,
    parse_get_crops,
    resize_to_budget,
    same_scale_budget,
)
from zoomvlm.core.prompts import AWARES_SYSTEM_PROMPT, NO_CROPS, completion_text

__all__ = [
    "awares_action",
    "crop_budgets",
    "crop_set_proposal",
    "high_res_crops",
    "low_res_budget",
    "low_res_view",
    "parse_crop_action",
    "parse_tool_call",
    "tool_output_text",
    "trajectory_images",
    "trajectory_messages",
]


def low_res_budget(image: Image.Image, high: Budget) -> Budget:
    """Budget of the turn-1 view: the ``high`` view of ``image`` with each side halved (0.25 of its pixels)."""
    return half_resolution_budget(*image.size, high)


def low_res_view(image: Image.Image, high: Budget) -> Image.Image:
    """The turn-1 low-resolution view of the ORIGINAL ``image`` (RGB)."""
    return resize_to_budget(image.convert("RGB"), low_res_budget(image, high))


def crop_budgets(image: Image.Image, keys: Sequence[str], high: Budget) -> list[Budget]:
    """Per-crop budgets that keep each crop at the ``high`` view's scale (see ``same_scale_budget``)."""
    return [same_scale_budget(CROP_SET[k], *image.size, high) for k in keys]


def high_res_crops(image: Image.Image, keys: Sequence[str], high: Budget) -> list[Image.Image]:
    """The requested crop-set regions cut from the ORIGINAL ``image`` at the ``high`` view's scale (RGB).

    Raises:
        KeyError: a key not in :data:`~zoomvlm.core.geometry.CROP_SET` (parse tool calls with
            :func:`~zoomvlm.core.geometry.parse_get_crops` first).
    """
    rgb = image.convert("RGB")
    return [
        resize_to_budget(crop_image(rgb, CROP_SET[k]), b)
        for k, b in zip(keys, crop_budgets(image, keys, high), strict=True)
    ]


def tool_output_text(keys: Sequence[str]) -> str:
    """The text that follows the crops in the tool-output turn, e.g. ``"High-resolution crops: '3' bottom-right."``."""
    return "High-resolution crops: " + ", ".join(f"'{k}' {CROP_SET_NAMES[k]}" for k in keys) + "."


def trajectory_messages(
    question: str, answer: str | None, crops: Sequence[str] = (), system: str | None = AWARES_SYSTEM_PROMPT
) -> list[dict]:
    """The AwaRes conversation in the transformers/TRL multimodal message format.

    Direct answer (``crops`` empty): ``[system, user(image, question), assistant(answer)]``.
    Tool call: ``[system, user(image, question), assistant(GET_CROPS: [...]),
    user(image * len(crops), tool text), assistant(answer)]``: the crops come back as a new USER turn,
    as in AwaRes. ``answer=None`` leaves the final assistant turn out (a prompt for generation).
    Image placeholders are ``{"type": "image"}``; the images themselves are :func:`trajectory_images`.
    """
    messages: list[dict] = []
    if system:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]})
    if crops:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": format_get_crops(list(crops))}]})
        content = [{"type": "image"} for _ in crops] + [{"type": "text", "text": tool_output_text(crops)}]
        messages.append({"role": "user", "content": content})
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def trajectory_images(image: Image.Image, crops: Sequence[str], high: Budget) -> list[Image.Image]:
    """The images of a trajectory in placeholder order: ``[low-res view, *high-res crops]``."""
    return [low_res_view(image, high), *high_res_crops(image, crops, high)]


def crop_set_proposal(
    image: Image.Image, keys: Sequence[str], high: Budget, raw: str | None = None, error: str | None = None
):
    """The :class:`~zoomvlm.policies.base.Proposal` for a crop-set action on ``image``: the low-resolution
    global view plus the requested regions at the high-resolution scale (``keys`` empty = low view only).

    The pipeline turns it into ``[low view, *crops]`` for any target, so the external crop-set policy, its
    GRPO reward and the evaluation all build the same views.
    """
    from zoomvlm.policies.base import Proposal

    return Proposal(
        boxes=tuple(CROP_SET[k] for k in keys),
        global_budget=low_res_budget(image, high),
        crop_budgets=tuple(crop_budgets(image, keys, high)),
        raw=raw,
        error=error,
    )


# ---------------------------------------------------------------------------------------------------------------
# Actions. The GET_CROPS grammar itself is parsed in ONE place, :func:`~zoomvlm.core.geometry.parse_get_crops`;
# these read the two policies' actions on top of it.
# ---------------------------------------------------------------------------------------------------------------


def parse_tool_call(text: str) -> tuple[list[str] | None, str | None]:
    """Self-zoom turn 1's action: ``(None, None)`` a direct answer, ``(keys, None)`` a valid ``GET_CROPS`` call,
    ``(None, error)`` an unparseable one (counted by the caller; its text is the final answer)."""
    try:
        return parse_get_crops(text), None
    except ToolCallError as err:
        return None, str(err)


def parse_crop_action(completion) -> tuple[list[str] | None, str | None]:
    """The EXTERNAL crop-set policy's action: ``([], None)`` for ``NO_CROPS``, ``(keys, None)`` for a valid
    ``GET_CROPS: [...]``, ``(None, error)`` for anything else (counted as a format failure).

    ``completion``: a string or a TRL conversational completion (:func:`~zoomvlm.core.prompts.completion_text`).
    """
    text = completion_text(completion).strip()
    keys, error = parse_tool_call(text)
    if error is not None:
        return None, error
    if keys is not None:
        return keys, None
    if text.upper().startswith(NO_CROPS):
        return [], None
    return None, f"neither {NO_CROPS} nor GET_CROPS: {text[:60]!r}"


def _assistant_texts(completion) -> list[str]:
    if isinstance(completion, str):
        return [completion]
    return [completion_text([m]) for m in completion if m.get("role") == "assistant"]


def awares_action(completion) -> tuple[list[str] | None, str, str | None]:
    """``(crops, final answer, tool-call error)`` of one self-zoom rollout (a TRL conversational completion or a
    string).

    ``crops`` are the keys of turn 1's valid ``GET_CROPS`` call, else ``None``. The final answer is the last
    assistant turn after a valid call (``""`` if the rollout ended before turn 2), else turn 1's text: a direct
    answer, or an unparseable call (``error`` set), which is never replaced by the full image.
    """
    texts = _assistant_texts(completion) or [""]
    keys, error = parse_tool_call(texts[0])
    if keys:
        return keys, (texts[-1] if len(texts) > 1 else ""), None
    return None, texts[0], error
