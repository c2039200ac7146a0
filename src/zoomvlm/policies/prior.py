"""``prior``: the non-reading control. A box per question, learned from model-made labels, placed in the ink outline.

It does not read the page. For a new question it finds the ``k`` most similar training questions
(all-MiniLM-L6-v2 cosine of the question text; no field id, so any question works), takes their seed boxes
(``zoomvlm curate boxes --grounder ocr``: the reader's native-resolution answer lines, never human boxes)
expressed in the frame of their page's ink outline (:func:`~zoomvlm.policies.perception.ink_outline`, dark
pixels of a thumbnail), and returns the quantile box of those (``lo`` quantile of the left/top edges, ``hi``
of the right/bottom edges) mapped into the new page's ink outline. Cheap (a thumbnail + one sentence
embedding) and strong on forms, where a field sits at a stable place: the bar a policy that looks must clear.

Checkpoint: one ``prior.npz`` (``emb [M, 384]``, ``boxes [M, 4]`` ink-relative) + ``config.json``
(``k``, ``lo``, ``hi``, sources).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from zoomvlm.core.geometry import Box
from zoomvlm.policies.base import Proposal
from zoomvlm.policies.perception import QuestionEncoder, ink_outline

__all__ = ["QuestionPrior", "default_prior_path", "fit_prior", "to_ink_frame"]


def default_prior_path() -> str:
    """Folder of the prior shipped inside the package (``--policy prior``)."""
    from importlib import resources

    return str(resources.files("zoomvlm") / "assets" / "prior")


def to_ink_frame(box: Box, ink: Box) -> np.ndarray:
    """``box`` (image frame) in ``ink``'s frame: ``[4]`` = ``(x0 - ink.x0) / ink.width, ...`` (may leave [0, 1])."""
    w, h = max(ink.width, 1e-6), max(ink.height, 1e-6)
    return np.array([(box.x0 - ink.x0) / w, (box.y0 - ink.y0) / h, (box.x1 - ink.x0) / w, (box.y1 - ink.y0) / h])


def from_ink_frame(rel: np.ndarray, ink: Box) -> Box:
    """The inverse of :func:`to_ink_frame`, clipped to the image; never empty (at least 1 % per side)."""
    x0, y0, x1, y1 = (
        float(ink.x0 + rel[0] * ink.width),
        float(ink.y0 + rel[1] * ink.height),
        float(ink.x0 + rel[2] * ink.width),
        float(ink.y0 + rel[3] * ink.height),
    )
    x0, y0 = min(max(x0, 0.0), 0.99), min(max(y0, 0.0), 0.99)
    x1, y1 = min(max(x1, x0 + 0.01), 1.0), min(max(y1, y0 + 0.01), 1.0)
    return Box(x0, y0, x1, y1)


def fit_prior(questions: Sequence[str], boxes: Sequence[Box], inks: Sequence[Box], out_dir: str | Path,
              encoder: QuestionEncoder | None = None, k: int = 20, lo: float = 0.2, hi: float = 0.8,
              sources: dict | None = None) -> Path:  # fmt: skip
    """Write a prior checkpoint from training questions, their model-made boxes and their pages' ink outlines.

    Raises:
        ValueError: lengths differ, or no question.
    """
    if not (len(questions) == len(boxes) == len(inks)) or not questions:
        raise ValueError("fit_prior needs as many boxes and ink outlines as questions, and at least one")
    encoder = encoder or QuestionEncoder()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rel = np.stack([to_ink_frame(b, i) for b, i in zip(boxes, inks, strict=True)]).astype(np.float32)
    np.savez_compressed(out / "prior.npz", emb=encoder.encode(list(questions)).astype(np.float16), boxes=rel)
    (out / "config.json").write_text(json.dumps({"k": k, "lo": lo, "hi": hi, "sources": sources or {}}, indent=2))
    return out


class QuestionPrior:
    """``prior[:PATH]``: the k-nearest-question box in the page's ink outline (see module docstring).

    Raises:
        FileNotFoundError: ``path`` is not a prior checkpoint.
    """

    def __init__(
        self, path: str | Path | None = None, encoder: QuestionEncoder | None = None, name: str | None = None
    ):
        p = Path(path or default_prior_path())
        if not (p / "prior.npz").exists():
            raise FileNotFoundError(f"{p} is not a prior checkpoint: no prior.npz")
        data = np.load(p / "prior.npz")
        self.emb = data["emb"].astype(np.float32)
        self.boxes = data["boxes"]
        cfg = json.loads((p / "config.json").read_text())
        self.k, self.lo, self.hi = int(cfg["k"]), float(cfg["lo"]), float(cfg["hi"])
        self.encoder = encoder or QuestionEncoder()
        self.name = name or ("prior" if path is None else f"prior:{path}")
        self.checkpoints = (str(p),)

    def relative_box(self, question: str) -> np.ndarray:
        """The ink-relative box ``[4]`` for ``question``."""
        q = self.encoder.encode([question])[0]
        near = np.argsort(-(self.emb @ q), kind="stable")[: self.k]
        b = self.boxes[near]
        return np.array([np.quantile(b[:, 0], self.lo), np.quantile(b[:, 1], self.lo),
                         np.quantile(b[:, 2], self.hi), np.quantile(b[:, 3], self.hi)])  # fmt: skip

    def propose(self, images: Sequence[Image.Image], questions: Sequence[str], evidence=None) -> list[Proposal]:
        """One box per (image, question); ``evidence`` is ignored."""
        out = []
        for image, question in zip(images, questions, strict=True):
            out.append(Proposal((from_ink_frame(self.relative_box(question), ink_outline(image)),)))
        return out
