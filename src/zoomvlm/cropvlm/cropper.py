"""A learned cropper (CropVLM): a small VLM that reads the image + question and writes one box."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from zoomvlm.core.geometry import Box, BoxFormatError, Budget, parse_percent_box, resize_to_budget
from zoomvlm.core.prompts import cropper_prompt
from zoomvlm.cropvlm import DEFAULT_CROPPER_BUDGET
from zoomvlm.policies.base import Proposal
from zoomvlm.targets.hf import chat_prompt, generate_texts, load_vlm

logger = logging.getLogger(__name__)


def _trained_budget(checkpoint: str) -> int | str:
    """The cropper budget a zoomvlm recipe trained ``checkpoint`` with (``zoomvlm_recipe.json``), else 512."""
    recipe = Path(checkpoint).expanduser() / "zoomvlm_recipe.json"
    if recipe.is_file():
        return json.loads(recipe.read_text()).get("data", {}).get("cropper_budget") or DEFAULT_CROPPER_BUDGET
    return DEFAULT_CROPPER_BUDGET


class VLMCropper:
    """``vlm:CHECKPOINT``: CropVLM's cropper as a zoom policy.

    The cropper sees the image (shrunk to ``budget``; SmolVLM's processor then tiles it) and
    :func:`~zoomvlm.core.prompts.cropper_prompt`, and answers ``"[x1, y1, x2, y2]."`` in percentages
    (parsed by :func:`~zoomvlm.core.geometry.parse_percent_box`). An invalid answer falls back to the whole
    image, as in CropVLM, and is COUNTED: the Proposal carries the raw text and the parse error, and
    :attr:`n_invalid` / :attr:`n_total` keep running totals.

    Args:
        checkpoint: hub id or local ``save_pretrained`` folder (a full model, or a merged LoRA).
        budget: the cropper's input budget before its processor (CropVLM variants: 512/1024/2048 px). None =
            the ``data.cropper_budget`` a zoomvlm training run stored with the checkpoint, else 512.
        max_new_tokens: CropVLM's completion limit (32).
        model, processor: an already loaded pair (then ``checkpoint`` is only the name).
        name: the policy's name in results (default ``vlm:CHECKPOINT``).
    """

    def __init__(
        self,
        checkpoint: str,
        budget: Budget | int | str | None = None,
        max_new_tokens: int = 32,
        device: str | None = None,
        model=None,
        processor=None,
        name: str | None = None,
    ):
        if budget is None:
            budget = _trained_budget(checkpoint)
        self.budget = Budget.parse(budget)
        self.max_new_tokens = max_new_tokens
        if model is None or processor is None:
            model, processor = load_vlm(checkpoint, device=device)
        self.model, self.processor = model, processor
        self.name = name or f"vlm:{checkpoint}"
        self.n_invalid = 0
        self.n_total = 0

    def propose(self, images: Sequence[Image.Image], questions: Sequence[str], evidence=None) -> list[Proposal]:
        views = [[resize_to_budget(img.convert("RGB"), self.budget)] for img in images]
        prompts = [chat_prompt(self.processor, 1, cropper_prompt(q)) for q in questions]
        texts, _, _ = generate_texts(self.model, self.processor, prompts, views, max_new_tokens=self.max_new_tokens)
        out = []
        for text in texts:
            self.n_total += 1
            try:
                out.append(Proposal((parse_percent_box(text),), raw=text))
            except BoxFormatError as err:
                self.n_invalid += 1
                logger.debug("cropper output %r is invalid (%s); using the whole image", text, err)
                out.append(Proposal((Box.full(),), raw=text, error=str(err)))
        return out
