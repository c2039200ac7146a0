"""Fixed policies: baselines, the cost ceiling and the localisation upper bound."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from zoomvlm.core.geometry import Box, Budget
from zoomvlm.policies.base import Proposal


class NoZoom:
    """``none``: the global view at the target's budget only (the cheap baseline)."""

    name = "none"

    def propose(self, images: Sequence[Image.Image], questions: Sequence[str], evidence=None) -> list[Proposal]:
        return [Proposal() for _ in images]


class FullResolution:
    """``full``: the whole image at native resolution, no crop: the accuracy reference and cost ceiling
    (RTR = 1.0 by definition)."""

    name = "full"

    def propose(self, images: Sequence[Image.Image], questions: Sequence[str], evidence=None) -> list[Proposal]:
        return [Proposal(global_budget=Budget()) for _ in images]


class CenterCrop:
    """``center[:FRACTION]``: one crop of ``fraction`` x the width and height about the image centre.

    The default 0.5 is AwaRes's "center" crop; a question-blind baseline any learned policy must beat.
    """

    def __init__(self, fraction: float = 0.5):
        if not 0 < fraction <= 1:
            raise ValueError(f"center crop fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction
        self.name = "center" if fraction == 0.5 else f"center:{fraction:g}"
        m = (1 - fraction) / 2
        self.box = Box(m, m, 1 - m, 1 - m)

    def propose(self, images: Sequence[Image.Image], questions: Sequence[str], evidence=None) -> list[Proposal]:
        return [Proposal((self.box,)) for _ in images]


class OracleCrop:
    """``oracle[:MARGIN]``: a crop around the sample's human evidence box. EVALUATION ONLY.

    Each evidence box is padded by ``margin`` (fraction of the image width/height on every side); where
    several boxes hold the answer (the total printed twice) the smallest padded crop is used. This is
    the upper bound of single-crop localisation; it must never produce training data.

    Raises:
        ValueError: from ``propose`` when called without evidence or for a sample without evidence
            boxes (an oracle without labels is meaningless, so it fails loudly instead of guessing).
    """

    needs_evidence = True  # reads the samples' human boxes: run_eval checks every sample has one

    def __init__(self, margin: float = 0.02):
        if not 0 <= margin < 0.5:
            raise ValueError(f"oracle margin must be in [0, 0.5), got {margin}")
        self.margin = margin
        self.name = "oracle" if margin == 0.02 else f"oracle:{margin:g}"

    def propose(self, images: Sequence[Image.Image], questions: Sequence[str], evidence=None) -> list[Proposal]:
        if evidence is None or len(evidence) != len(images):
            raise ValueError("the oracle policy needs the samples' evidence boxes (evaluation only)")
        out = []
        for i, boxes in enumerate(evidence):
            if not boxes:
                raise ValueError(f"the oracle policy got a sample without evidence boxes (batch index {i})")
            padded = [b.pad(self.margin, self.margin) for b in boxes]
            out.append(Proposal((min(padded, key=lambda b: b.area),)))
        return out
