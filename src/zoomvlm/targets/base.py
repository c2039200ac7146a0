"""The Target seam: what every answering model (OCR reader, local HF VLM, HTTP API) takes and returns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from PIL import Image

from zoomvlm.core.geometry import Budget, resize_to_budget


@dataclass(frozen=True)
class TargetRequest:
    """One question to a target, with its views.

    Args:
        images: the views, in order (CropVLM: ``[global, crop, ...]``), at ANY resolution; the target
            shrinks each to its budget itself so that what it consumed is what it reports.
        question: the user's question (the target applies its own prompt template).
        answer: the continuation to score, for :meth:`Target.loglikelihood` only.
        view_budgets: per-view budget overriding the target's default (e.g. ``Budget()`` = native for the
            ``full`` policy's global view, or AwaRes's high-resolution crops); ``None`` (for all views or
            one entry) = the target's default.
    """

    images: tuple[Image.Image, ...]
    question: str
    answer: str | None = None
    view_budgets: tuple[Budget | None, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "images", tuple(self.images))
        if self.view_budgets is not None:
            object.__setattr__(self, "view_budgets", tuple(self.view_budgets))
            if len(self.view_budgets) != len(self.images):
                raise ValueError(f"view_budgets has {len(self.view_budgets)} entries for {len(self.images)} images")

    def views(self, default: Budget) -> list[Image.Image]:
        """The images shrunk to their budgets (``default`` where no per-view budget is set), RGB."""
        budgets = self.view_budgets or (None,) * len(self.images)
        return [
            resize_to_budget(img.convert("RGB"), default if b is None else b)
            for img, b in zip(self.images, budgets, strict=True)
        ]


@dataclass(frozen=True)
class Usage:
    """What one request cost, as measured by the backend that served it.

    Args:
        view_pixels: pixels (width x height) of each view as the target consumed it, in request order.
        visual_tokens: image tokens in the prompt, where the backend exposes them; ``None`` = unknown.
        prompt_tokens: all prompt tokens (text + image), where known.
        completion_tokens: generated tokens, where known.
        seconds: wall-clock seconds the target spent on this request (batch time split evenly).
    """

    view_pixels: tuple[int, ...] = ()
    visual_tokens: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    seconds: float = 0.0

    @property
    def pixels(self) -> int:
        """Pixels processed across all views."""
        return sum(self.view_pixels)


@dataclass(frozen=True)
class Generation:
    """A target's answer text and what it cost."""

    text: str
    usage: Usage = field(default_factory=Usage)


@runtime_checkable
class Target(Protocol):
    """Anything that answers questions about images (the model the zoom policy serves).

    Implementations: :class:`zoomvlm.targets.ocr.OCRTarget`, :class:`zoomvlm.targets.hf.HFTarget`,
    :class:`zoomvlm.targets.openai.OpenAITarget`. All calls are batched: one result per request, in order.
    """

    name: str
    budget: Budget
    """Default per-view budget: each view is shrunk to this before the model sees it."""

    def generate(self, requests: Sequence[TargetRequest]) -> list[Generation]:
        """Answer each request (greedy). Returns one Generation per request, in order."""
        ...

    def loglikelihood(self, requests: Sequence[TargetRequest]) -> list[float]:
        """Log-probability (nats, <= 0) of each request's ``answer`` given its views and question.

        Raises:
            NotImplementedError: the backend cannot score text (e.g. an API without prompt log-probs).
            ValueError: a request has no ``answer``.
        """
        ...


def require_answers(requests: Sequence[TargetRequest]) -> list[str]:
    """The ``answer`` of every request, for loglikelihood.

    Raises:
        ValueError: naming the first request without an answer.
    """
    answers = []
    for i, r in enumerate(requests):
        if r.answer is None:
            raise ValueError(f"loglikelihood request {i} has no answer to score")
        answers.append(r.answer)
    return answers
