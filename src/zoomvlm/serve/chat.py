"""The chat-completions request: schema checks, its images, and the payload forwarded upstream with crops.

Only what the zoom server needs is typed (roles, content parts, image URLs); every other field of
OpenAI's schema (temperature, max_tokens, tools, ...) passes through to the upstream untouched.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Annotated, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from zoomvlm.serve.errors import ServeError
from zoomvlm.serve.media import DecodedImage, MediaLimits, decode_data_url, fetch_remote_image

__all__ = [
    "ChatRequest",
    "RequestImage",
    "image_parts",
    "load_images",
    "parse_chat_request",
    "question_of",
    "with_crops",
]


class _ImageURL(BaseModel):
    model_config = ConfigDict(extra="allow")
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class _ImagePart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["image_url"]
    image_url: _ImageURL


class _RefusalPart(BaseModel):  # an assistant turn's refusal (OpenAI schema), kept in the history as sent
    model_config = ConfigDict(extra="allow")
    type: Literal["refusal"]
    refusal: str


_Part = Annotated[_TextPart | _ImagePart | _RefusalPart, Field(discriminator="type")]
_PART_TAGS = ("text", "image_url", "refusal")


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_Part] | None = None


class ChatRequest(BaseModel):
    """The typed part of a ``POST /v1/chat/completions`` body (other fields are kept, not checked)."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[_Message] = Field(min_length=1)
    stream: bool | None = False  # null: not streamed (the OpenAI schema allows it)


def parse_chat_request(body: bytes) -> tuple[dict, ChatRequest]:
    """Parse and check a request body.

    Returns:
        ``(raw, typed)``: the JSON object as sent (forwarded upstream) and its checked view.

    Raises:
        ServeError: 400 ``invalid_json`` (not UTF-8 JSON, or not an object) or ``invalid_request`` (schema),
            naming the first offending field, e.g. ``messages.0.content.1.type``.
    """
    try:
        raw = json.loads(body)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise ServeError(400, f"request body is not valid JSON: {str(err)[:200]}", "invalid_json") from err
    if not isinstance(raw, dict):
        raise ServeError(400, "request body must be a JSON object", "invalid_json")
    try:  # a lone surrogate ("\ud800") is valid JSON but no text: it would fail only when echoed in the reply
        json.dumps(raw, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        message = "request holds a string that is not valid Unicode (a lone surrogate)"
        raise ServeError(400, message, "invalid_json") from err
    try:
        typed = ChatRequest.model_validate(raw)
    except ValidationError as err:
        first, param = _first_error(err.errors())
        raise ServeError(400, f"invalid request: {param}: {first['msg']}", "invalid_request", param) from err
    return raw, typed


def _first_error(errors: list[dict]) -> tuple[dict, str]:
    """The error to report and its field as a client wrote it (``messages.0.content.1.type``).

    ``content`` is a string OR a list of parts, so pydantic reports both branches; a list that fails inside is
    reported from the list branch (the string branch's "should be a valid string" named a ``content.str`` field
    that does not exist). The branch labels pydantic adds (``list[...]``, the parts' discriminator tag) are dropped.
    """

    def deep_in_list(e: dict) -> bool:
        loc = e["loc"]
        k = next((i for i, p in enumerate(loc) if isinstance(p, str) and "[" in p), None)
        return k is not None and len(loc) > k + 1

    first = next((e for e in errors if deep_in_list(e)), errors[0])
    raw_loc, loc = list(first["loc"]), []
    for i, p in enumerate(raw_loc):
        after_index = i > 0 and isinstance(raw_loc[i - 1], int) and i > 1 and "[" in str(raw_loc[i - 2])
        if isinstance(p, str) and ("[" in p or (p == "str" and i > 0 and raw_loc[i - 1] == "content")):
            continue  # a branch label of the str | list union
        if isinstance(p, str) and after_index and p in _PART_TAGS:
            continue  # the discriminator tag pydantic puts after a part's index
        loc.append(p)
    if first.get("type") == "union_tag_invalid":
        loc.append("type")
    return first, ".".join(str(p) for p in loc)


@dataclass
class RequestImage:
    """One image part of the request, decoded.

    Attributes:
        message, part: indices of the message and the content part that hold it.
        image: the ORIGINAL image (native resolution, RGB); crops are cut from it.
        zoom: True for images of the last user message (the ones the policy looks at).
        url: a data URL of the image as received, or re-encoded when it was fetched from a remote URL.
    """

    message: int
    part: int
    image: Image.Image
    zoom: bool
    url: str
    decoded: DecodedImage | None = field(default=None, repr=False)


def image_parts(typed: ChatRequest) -> list[tuple[int, int, str]]:
    """``(message index, part index, url)`` of every image part, in request order."""
    out = []
    for i, message in enumerate(typed.messages):
        if isinstance(message.content, list):
            out.extend((i, j, p.image_url.url) for j, p in enumerate(message.content) if isinstance(p, _ImagePart))
    return out


def question_of(typed: ChatRequest) -> str:
    """The text of the last user message (its text parts joined by newlines): what the policy reads."""
    for message in reversed(typed.messages):
        if message.role == "user":
            if isinstance(message.content, str):
                return message.content
            if isinstance(message.content, list):
                return "\n".join(p.text for p in message.content if isinstance(p, _TextPart))
            return ""
    return ""


def check_question(typed: ChatRequest, question: str, local: bool) -> None:
    """Refuse a request a LOCAL target cannot answer: no text in the last user message (its prompt is the question;
    it raised inside the batch, as a 502). Proxied requests are not refused: the upstream reads the whole
    conversation (the question may be in the system prompt or an earlier turn); a policy that needs the question
    fails for that request alone and it goes on without crops (``--on-policy-error open``).

    Raises:
        ServeError: 400 ``invalid_request`` naming the message.
    """
    if question.strip() or not local:
        return
    last = _last_user(typed)
    has_images = any(i == last for i, _, _ in image_parts(typed))
    where = f"messages.{last}.content" if last is not None else "messages"
    what = "holds images but no text" if has_images else "has no text"
    raise ServeError(400, f"the last user message {what}: a local target answers its question", "invalid_request",
                     where)  # fmt: skip


def _last_user(typed: ChatRequest) -> int | None:
    users = [i for i, m in enumerate(typed.messages) if m.role == "user"]
    return users[-1] if users else None


async def load_images(typed: ChatRequest, limits: MediaLimits, max_images: int) -> list[RequestImage]:
    """Decode every image of the request under ``limits`` (see :mod:`zoomvlm.serve.media`), upright.

    The count is checked before anything is decoded, and each image's pixels (from its header) against what is
    left of ``limits.max_request_pixels``.

    Raises:
        ServeError: 400 ``too_many_images`` or any refusal of :mod:`zoomvlm.serve.media`.
    """
    import asyncio

    parts = image_parts(typed)
    if len(parts) > max_images:
        raise ServeError(
            400, f"{len(parts)} images in one request, over the limit of {max_images}", "too_many_images", "messages"
        )
    from zoomvlm.targets.openai import image_data_url

    last = _last_user(typed)
    out = []
    pixels = 0  # decoded so far: the request's total is bounded too (limits.max_request_pixels)
    for i, j, url in parts:
        param = f"messages.{i}.content.{j}.image_url"
        if url.startswith("data:"):
            decoded = await asyncio.to_thread(decode_data_url, url, limits, param, pixels)
            # an image turned upright by its EXIF tag is re-encoded (off the event loop: ~0.2 s for 40 MP), so the
            # upstream sees the frame the crops use
            kept_url = await asyncio.to_thread(image_data_url, decoded.image) if decoded.oriented else url
        elif url.split(":", 1)[0].lower() in ("http", "https"):
            decoded = await fetch_remote_image(url, limits, param, pixels)
            kept_url = await asyncio.to_thread(image_data_url, decoded.image)
        else:
            raise ServeError(
                400, "image_url must be a data: URL (or an allowed https URL)", "invalid_image_url", param
            )
        pixels += decoded.image.width * decoded.image.height
        out.append(RequestImage(i, j, decoded.image, i == last, kept_url, decoded))
    return out


def with_crops(
    raw: dict,
    images: list[RequestImage],
    global_urls: list[str | None],
    crop_urls: list[list[str]],
    model: str | None,
) -> dict:
    """The payload forwarded upstream: the client's request with zoomed views and crops appended.

    Args:
        raw: the request as the client sent it (not modified).
        images: the request's images (:func:`load_images`).
        global_urls: per image, the data URL of its global view, or ``None`` to keep the part as received.
        crop_urls: per image, the data URLs of its crops, appended (in order) at the end of the content
            of the message that holds the image, as ``image_url`` parts.
        model: replaces ``model`` when given (``--upstream-model``).
    """
    out = copy.deepcopy(raw)
    if model:
        out["model"] = model
    for img, url, crops in zip(images, global_urls, crop_urls, strict=True):
        content = out["messages"][img.message]["content"]
        content[img.part]["image_url"]["url"] = url or img.url  # img.url: as received, or a fetched image
        content.extend({"type": "image_url", "image_url": {"url": c}} for c in crops)
    return out
