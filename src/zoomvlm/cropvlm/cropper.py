"""A learned cropper (CropVLM): a small VLM that reads the image + question and writes one or more boxes."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence

from PIL import Image

from zoomvlm.core.geometry import Box, BoxFormatError, Budget, parse_percent_boxes, resize_to_budget
from zoomvlm.core.prompts import cropper_prompt
from zoomvlm.cropvlm import DEFAULT_CROPPER_BUDGET
from zoomvlm.policies.base import Proposal
from zoomvlm.policies.learned import SmallVLMPolicy, trained_setting

logger = logging.getLogger(__name__)


def _trained_budget(checkpoint: str) -> int | str:
    """The cropper budget a zoomvlm recipe trained ``checkpoint`` with (``data.cropper_budget``), else 512."""
    return trained_setting(checkpoint, "data", "cropper_budget") or DEFAULT_CROPPER_BUDGET


class VLMCropper(SmallVLMPolicy):
    """``vlm:CHECKPOINT``: CropVLM's cropper as a zoom policy.

    The cropper sees the image (shrunk to ``budget``; SmolVLM's processor then tiles it) and
    :func:`~zoomvlm.core.prompts.cropper_prompt`, and answers ``"[x1, y1, x2, y2]."`` in percentages, or with
    ``max_boxes`` K > 1 up to K boxes ``"[x1, y1, x2, y2], [x1, y1, x2, y2]."``, parsed by
    :func:`~zoomvlm.core.geometry.parse_percent_boxes`; each box becomes one crop for the target. By default
    decoding is constrained to that grammar (:mod:`zoomvlm.cropvlm.constrained`), so every answer is a valid
    box. An invalid answer (possible with ``constrained=False``, or when ``max_new_tokens`` cuts a box) falls
    back to the whole image, as in CropVLM, and is COUNTED: the Proposal carries the raw text and the parse
    error, and :attr:`n_invalid` / :attr:`n_total` keep running totals; :attr:`n_tokens` counts generated tokens
    (end-of-turn included) and :attr:`n_boxes` the boxes proposed (fallbacks included).

    Args:
        checkpoint: hub id or local ``save_pretrained`` folder (a full model, or a merged LoRA).
        budget: the cropper's input budget before its processor (CropVLM variants: 512/1024/2048 px). None =
            the ``data.cropper_budget`` a zoomvlm training run stored with the checkpoint, else 512.
        max_new_tokens: completion limit; default 32 (CropVLM's) for one box, 20 more per extra box (a box is at
            most 20 characters, ``"[99, 99, 100, 100], "``).
        constrained: mask every token that cannot continue a valid box text (default on).
        max_boxes: K, the most boxes one answer may hold (default 1, CropVLM's single box).
        temperature: 0 = greedy (default); > 0 samples, as GRPO's rollouts do (CropVLM: 0.8).
        image_side: "see more": the view, capped at this longest side (px, a multiple of the tile), is SPLIT into
            tiles (each its own image tokens) plus a global tile, instead of one tile (SmolVLM/Idefics3). A
            ``budget`` below it is raised to ``side:image_side`` (the view is shrunk to the budget first, so a
            512 px budget would leave one 512 px tile). ``None`` = the checkpoint's processor settings. Raises
            ValueError for a processor without splitting.
        device: where to load the checkpoint (default CUDA if available).
        model, processor: an already loaded pair (then ``checkpoint`` is only the name).
        name: the policy's name in results (default ``vlm:CHECKPOINT``).
    """

    def __init__(
        self,
        checkpoint: str,
        budget: Budget | int | str | None = None,
        max_new_tokens: int | None = None,
        device: str | None = None,
        model=None,
        processor=None,
        name: str | None = None,
        constrained: bool = True,
        max_boxes: int = 1,
        temperature: float = 0.0,
        image_side: int | None = None,
    ):
        if max_boxes < 1:
            raise ValueError(f"max_boxes must be >= 1, got {max_boxes}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if budget is None:
            budget = _trained_budget(checkpoint)
        self.budget = Budget.parse(budget)
        super().__init__(checkpoint, max_new_tokens=max_new_tokens or 32 + 20 * (max_boxes - 1), device=device,
                         model=model, processor=processor, name=name or f"vlm:{checkpoint}")  # fmt: skip
        model, processor = self.model, self.processor
        self.constrained, self.max_boxes, self.temperature = constrained, max_boxes, temperature
        if image_side is not None:
            _split_images(processor, image_side)
            if not self.budget.is_native and (self.budget.max_side or 0) < image_side:
                # the view is shrunk to the budget BEFORE the processor (which then does not resize): a 512 px
                # view is one 512 px SmolVLM tile whatever image_side says, so "see more" raises the budget
                logger.info("%s: image_side=%d raises the cropper's view budget %s to side:%d",
                            self.name, image_side, self.budget, image_side)  # fmt: skip
                self.budget = Budget(max_side=image_side)
        self.vocabulary = None
        if constrained:
            from zoomvlm.cropvlm.constrained import BoxVocabulary

            eos = model.generation_config.eos_token_id
            self.vocabulary = BoxVocabulary(processor.tokenizer, eos, max_boxes=max_boxes)
            if self.max_new_tokens < 20 * max_boxes + 3:  # longest text: " " + K boxes of <= 20 chars + "." + EOS
                logger.warning("max_new_tokens=%d may cut a box of the %d-box grammar short (it then falls back "
                               "to the whole image)", self.max_new_tokens, max_boxes)  # fmt: skip
        self.n_boxes = 0

    @classmethod
    def from_spec(cls, arg: str, default_checkpoint: str, **kwargs) -> VLMCropper:
        """Build from the argument of ``--policy vlm[:CKPT][@OPTS]``; OPTS, separated by ``,`` or ``@`` (the latter
        for comma-separated contexts such as lmms-eval's ``--model_args``): ``free``
        (unconstrained decoding), ``boxes=K``, ``t=TEMPERATURE``, ``side=PX`` (image splitting at PX).

        Raises:
            ValueError: an unknown option or a bad value.
        """
        checkpoint, _, opts = arg.partition("@")
        for opt in filter(None, re.split(r"[,@]", opts)):
            key, _, value = opt.partition("=")
            if key == "free" and not value:
                kwargs["constrained"] = False
            elif key in ("boxes", "side"):
                if not value.isdigit() or int(value) < 1:
                    raise ValueError(f"cropper option {key}= needs a whole number >= 1, got {value!r}")
                kwargs["max_boxes" if key == "boxes" else "image_side"] = int(value)
            elif key == "t":
                try:
                    kwargs["temperature"] = float(value)
                except ValueError:
                    raise ValueError(f"cropper option t= needs a number >= 0, got {value!r}") from None
            else:
                raise ValueError(f"unknown cropper option {opt!r}; use free, boxes=K, t=TEMPERATURE, side=PX")
        name = f"vlm:{checkpoint}" if checkpoint else "vlm"
        kwargs.setdefault("name", f"{name}@{opts}" if opts else name)
        return cls(checkpoint or default_checkpoint, **kwargs)

    def propose(self, images: Sequence[Image.Image], questions: Sequence[str], evidence=None) -> list[Proposal]:
        views = [resize_to_budget(img.convert("RGB"), self.budget) for img in images]
        gen_kwargs = {}
        if self.temperature > 0:
            gen_kwargs.update(do_sample=True, temperature=self.temperature, top_k=0, top_p=1.0)
        if self.vocabulary is not None:
            from transformers import LogitsProcessorList

            from zoomvlm.cropvlm.constrained import BoxLogitsProcessor

            gen_kwargs["logits_processor"] = LogitsProcessorList([BoxLogitsProcessor(self.vocabulary)])
        texts = self.write_actions(views, [cropper_prompt(q) for q in questions], **gen_kwargs)
        out = []
        for text in texts:
            try:
                out.append(Proposal(tuple(parse_percent_boxes(text, max_boxes=self.max_boxes)), raw=text))
            except BoxFormatError as err:
                self.count_invalid(text, str(err), "using the whole image")
                out.append(Proposal((Box.full(),), raw=text, error=str(err)))
            self.n_boxes += len(out[-1].boxes)
        return out


def _split_images(processor, side: int) -> None:
    """Make SmolVLM/Idefics3's image processor resize to ``side`` px (longest edge) and split into tiles."""
    image_processor = processor.image_processor
    if not hasattr(image_processor, "do_image_splitting"):
        raise ValueError(f"{type(image_processor).__name__} has no image splitting: image_side needs SmolVLM")
    tile = image_processor.max_image_size["longest_edge"]
    if side < tile or side % tile:
        raise ValueError(f"image_side must be a multiple of the {tile} px tile, got {side}")
    image_processor.do_image_splitting = True
    image_processor.size = {"longest_edge": side}
