"""The ZoomPolicy seam: given images and questions, decide where the target should look."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from PIL import Image

from zoomvlm.core.geometry import Box, Budget


@dataclass(frozen=True)
class Proposal:
    """A policy's decision for one question.

    Args:
        boxes: regions to crop from the ORIGINAL image, normalised; ``()`` = no zoom (global view only).
        global_budget: budget of the global view; ``None`` = the target's own budget. The ``full``
            policy sets ``Budget()`` (native resolution), the cost ceiling.
        crop_budget: budget of each crop; ``None`` = the run's crop budget (by default the target's).
        crop_budgets: one budget per box, overriding ``crop_budget`` (AwaRes: each crop-set region at the
            high-resolution view's scale, so a quadrant and a half cost what they cover).
        raw: the policy model's raw output text, where there is one (kept for debugging and rewards).
        error: why the raw output was invalid (e.g. ``"x2 (10) must be > x1 (40)"``); the policy then
            fell back (CropVLM: to the whole image) and this failure is counted, never hidden.
        shared_seconds: seconds of this proposal's work that were a first pass made ON THE TARGET'S BEHALF
            (the target's own read of its global view, memoised and reused by the target, which charges the
            same seconds to its ``Usage.seconds``). The pipeline subtracts them from the policy's seconds,
            so the pass is counted once, as target time. 0.0 for every policy that shares nothing.
    """

    boxes: tuple[Box, ...] = ()
    global_budget: Budget | None = None
    crop_budget: Budget | None = None
    crop_budgets: tuple[Budget, ...] | None = None
    raw: str | None = None
    error: str | None = None
    shared_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.crop_budgets is not None and len(self.crop_budgets) != len(self.boxes):
            raise ValueError(f"crop_budgets has {len(self.crop_budgets)} entries for {len(self.boxes)} boxes")


@runtime_checkable
class ZoomPolicy(Protocol):
    """Decides which regions of each image the target should see at higher resolution.

    ``propose`` is batched: one :class:`Proposal` per (image, question), in order. Images are the
    native-resolution originals. ``evidence`` carries the human evidence boxes (normalised) of each
    sample; only the evaluation-only oracles (``oracle``, ``crop-set-oracle``; they set ``needs_evidence``) read
    it, every other policy must ignore it.

    A policy that loads weights may also list them in ``checkpoints`` (a tuple of local folders or files, or
    hub ids): :func:`~zoomvlm.evaluation.run.run_eval` fingerprints those files and refuses to resume a run
    whose policy files changed under the same name.
    """

    name: str

    def propose(
        self,
        images: Sequence[Image.Image],
        questions: Sequence[str],
        evidence: Sequence[Sequence[Box]] | None = None,
    ) -> list[Proposal]: ...
