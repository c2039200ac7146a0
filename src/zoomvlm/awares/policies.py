"""AwaRes crop-set policies: the target sees a LOW-resolution view plus chosen HIGH-resolution crop-set regions.

- :class:`CropSetPolicy` (``crop-set[:CKPT]``): the EXTERNAL crop-set policy, a small VLM in front of a
  target that cannot be trained (the OCR reader, an API). It sees the low-resolution view and the question
  and emits ``NO_CROPS`` or ``GET_CROPS: [...]`` (:func:`~zoomvlm.awares.protocol.parse_crop_action`, the same
  parser as self-zoom). Trained like AwaRes: SFT on curated actions, then GRPO on ``R_ans - C_tool``.
- :class:`FixedCropSet`: always the same regions (``['all']`` = the always-all-crops baseline).
- :class:`OracleCropSet`: the crop subset whose IoU with the HUMAN evidence box passes a threshold
  (AwaRes's mapping rule applied to human boxes): the upper bound of the crop-set interface; EVALUATION ONLY.

All three return :func:`~zoomvlm.awares.protocol.crop_set_proposal`: global view = the ``high`` view with each side
halved, crops at the ``high`` view's scale, so RTR against ``high`` is 0.25 + the summed area of the requested crops
(:func:`~zoomvlm.awares.protocol.crop_set_sent_area`; overlapping crops are each sent whole).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from PIL import Image

from zoomvlm.awares.protocol import crop_set_policy_prompt, crop_set_proposal, crops_for_box, low_res_view
from zoomvlm.core.geometry import Box, Budget
from zoomvlm.policies.base import Proposal
from zoomvlm.policies.learned import SmallVLMPolicy, trained_setting

logger = logging.getLogger(__name__)

DEFAULT_HIGH = Budget(max_side=768)
"""High-resolution view of the receipts testbed: OCR at 768 px reads far more than at 384 px (the low view);
see the README's AwaRes section for the measured accuracies."""

DEFAULT_IOU_THRESHOLD = 0.2
"""Default IoU threshold of the box -> crop-subset mapping (curation and the oracle subset); the README's
AwaRes section gives the measurement behind it."""


def _as_budget(b: Budget | int | str | None, default: Budget) -> Budget:
    if b is None:
        return default
    return Budget.parse(b)


def trained_high(checkpoint: str) -> Budget:
    """The high-resolution budget a zoomvlm recipe trained ``checkpoint`` with (``data.high``), else 768 px (also
    when it trained on each trajectory's own high view, recorded as ``"per record"``)."""
    high = trained_setting(checkpoint, "data", "high")
    return Budget.parse(high if high not in (None, "per record") else DEFAULT_HIGH)


class CropSetPolicy(SmallVLMPolicy):
    """``crop-set:CHECKPOINT``: a small VLM choosing AwaRes crop-set regions for another target.

    Args:
        checkpoint: hub id or ``save_pretrained`` folder of the policy VLM.
        high: the high-resolution reference budget; ``None`` = the ``data.high`` the checkpoint was trained
            with, else 768 px. The policy itself sees the low view (``high`` with sides halved).
        max_new_tokens: action length limit.
        model, processor: an already loaded pair (then ``checkpoint`` only names it).

    An action that is neither ``NO_CROPS`` nor a parseable ``GET_CROPS`` is COUNTED (``n_invalid``, and the
    Proposal's ``error``) and answered from the low view alone, never silently replaced by the full image.
    """

    def __init__(
        self,
        checkpoint: str,
        high: Budget | int | str | None = None,
        max_new_tokens: int = 24,
        device: str | None = None,
        model=None,
        processor=None,
        name: str | None = None,
    ):
        self.high = _as_budget(high, trained_high(checkpoint))
        super().__init__(checkpoint, max_new_tokens=max_new_tokens, device=device, model=model, processor=processor,
                         name=name or f"crop-set:{checkpoint}")  # fmt: skip

    def propose(self, images: Sequence[Image.Image], questions: Sequence[str], evidence=None) -> list[Proposal]:
        """One :func:`~zoomvlm.awares.protocol.crop_set_proposal` per image: the model reads the low view (the
        ``high`` view with sides halved) and the question and writes ``NO_CROPS`` or ``GET_CROPS: [...]``; boxes are
        the requested crop-set regions, normalised to the ORIGINAL image. An unparseable action is counted
        (``count_invalid``) and answered from the low view alone (``Proposal.error`` says why); nothing raises.
        ``evidence`` is ignored."""
        from zoomvlm.awares.protocol import parse_crop_action

        views = [low_res_view(img, self.high) for img in images]
        texts = self.write_actions(views, [crop_set_policy_prompt(q) for q in questions])
        out = []
        for img, text in zip(images, texts, strict=True):
            keys, error = parse_crop_action(text)
            if error is not None:
                self.count_invalid(text, error, "answering from the low view")
            out.append(crop_set_proposal(img, keys or [], self.high, raw=text, error=error))
        return out


class FixedCropSet:
    """Always the same crop-set regions (``keys=[]`` = the low view only; ``['all']`` = always-all-crops)."""

    def __init__(self, keys: Sequence[str], high: Budget | int | str | None = None, name: str | None = None):
        from zoomvlm.awares.protocol import format_get_crops

        self.keys = list(dict.fromkeys(keys))  # a repeated key is one crop (sent once, counted once in RTR)
        if self.keys:
            format_get_crops(self.keys)  # raises ToolCallError on an unknown key
        self.high = _as_budget(high, DEFAULT_HIGH)
        self.name = name or f"crop-set-fixed:{','.join(self.keys) or 'none'}"

    def propose(self, images, questions, evidence=None) -> list[Proposal]:
        """The same crop-set regions for every image (boxes normalised to the original image, crops at the
        ``high`` view's scale) beside the low view; ``questions`` and ``evidence`` are ignored."""
        return [crop_set_proposal(img, self.keys, self.high) for img in images]


class OracleCropSet:
    """EVALUATION ONLY: the crop subset of the human evidence box(es), by AwaRes's IoU mapping rule.

    Each evidence box is mapped with :func:`~zoomvlm.awares.protocol.crops_for_box`; the subsets are merged. A
    sample without evidence gets the low view only; ``run_eval`` refuses a benchmark where some sample has none
    (``needs_evidence``), so that an oracle row never silently holds low-view-only answers.
    """

    needs_evidence = True  # reads the samples' human boxes: run_eval checks every sample has one

    def __init__(self, high: Budget | int | str | None = None, iou_threshold: float = DEFAULT_IOU_THRESHOLD):
        if not 0 < iou_threshold <= 1:  # checked here, not at the first batch after the target has loaded
            raise ValueError(f"crop-set-oracle threshold must be in (0, 1], got {iou_threshold}")
        self.high = _as_budget(high, DEFAULT_HIGH)
        self.iou_threshold = iou_threshold
        self.name = f"crop-set-oracle:{iou_threshold:g}"

    def propose(self, images, questions, evidence: Sequence[Sequence[Box]] | None = None) -> list[Proposal]:
        """Per image, the merged crop subsets of its human evidence boxes (``evidence[i]``: boxes normalised to
        image ``i``; none = the low view only). Boxes out are crop-set regions normalised to the original image.

        Raises:
            ValueError: ``evidence`` is None (the oracle reads human boxes; evaluation only).
        """
        if evidence is None:
            raise ValueError("the crop-set oracle needs human evidence boxes (evaluation only)")
        out = []
        for img, boxes in zip(images, evidence, strict=True):
            keys: list[str] = []
            for box in boxes:
                keys += [k for k in crops_for_box(box, self.iou_threshold) if k not in keys]
            out.append(crop_set_proposal(img, keys, self.high))
        return out
