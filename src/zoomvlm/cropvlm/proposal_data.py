"""Training data of the ``proposals`` cropper: reader passes cached on disk, seed labels, feature items.

No human box is read here: samples enter through :func:`strip_evidence`, and the seed labels come from
``zoomvlm curate boxes --grounder ocr`` (``raw.jsonl``/``seeds.jsonl``: the reader's own native-resolution
answer lines).

``reads.jsonl`` (:func:`cached_reads`): one line per image, ``{"image", "view_size", "seconds", "lines":
[[quad [[x, y] x 4] in view pixels, text, score], ...]}``; written as images are read, so an interrupted
run resumes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from zoomvlm.core.geometry import Box, Budget, resize_to_budget
from zoomvlm.data.samples import read_appended_jsonl
from zoomvlm.policies.perception import Perception, QuestionEncoder, perception_from_lines, perception_from_passes

logger = logging.getLogger(__name__)

__all__ = [
    "TrainItem",
    "build_items",
    "cached_passes",
    "cached_reads",
    "cached_rows",
    "load_seed_boxes",
    "refine_seed_boxes",
    "load_training_samples",
    "reads_stem",
    "strip_evidence",
]


def strip_evidence(samples):
    """The samples without their human ``evidence_boxes`` (the guard: nothing after this can read them)."""
    return [replace(s, evidence_boxes=()) for s in samples]


def reads_stem(data: str | Path) -> str:
    """Name of a dataset file's reads caches (``--reads``): its folder and stem, e.g. ``receipts_train``."""
    return f"{Path(data).resolve().parent.name}_{Path(data).stem}"


def load_training_samples(path: str | Path):
    """A JSONL dataset as training reads it: ``evidence_boxes`` dropped before parsing (a malformed human box
    cannot stop training; errors name ``file:line``, :func:`zoomvlm.data.load_jsonl`) and image paths made
    absolute, the keys of the reads caches (:func:`cached_rows`).

    Raises:
        zoomvlm.data.DatasetError: the file is missing, empty or has a bad line.
    """
    from zoomvlm.data import load_jsonl

    return [replace(s, image=s.image.resolve()) for s in strip_evidence(load_jsonl(path, evidence=False))]


def cached_rows(samples, budget: Budget | int | str, path: str | Path, reader=None,
                progress: bool = True) -> dict[str, dict]:  # fmt: skip
    """The reader's full pass over each distinct image of ``samples`` at ``budget``, cached in ``path`` (JSONL).

    Returns:
        ``{str(sample.image): row}`` with ``row = {"image", "view_size", "seconds", "lines": [[quad, text,
        score]]}``; the pass is exactly the ``ocr`` target's read of a view at ``budget`` (same resize, every
        detected line kept). Images already in the file are not read again (an interrupted run resumes).
    """
    from zoomvlm.targets.ocr import OCRTarget

    budget = budget if isinstance(budget, Budget) else Budget.parse(budget)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a line torn by a kill is cut off before appending (the next row would glue onto it and be lost too)
    done: dict[str, dict] = {row["image"]: row for row in read_appended_jsonl(path, repair=True)}

    def key(s) -> str:
        return str(Path(s.image).resolve())

    todo = list(dict.fromkeys(key(s) for s in samples if key(s) not in done))
    if todo:
        reader = reader or OCRTarget(budget=budget)
        by_image = {key(s): s for s in samples}
        with path.open("a", encoding="utf-8") as f:
            for image in tqdm(todo, desc=f"reading at {budget}", unit="img", disable=not progress):
                view = resize_to_budget(by_image[image].load_image().convert("RGB"), budget)
                start = time.perf_counter()
                lines = reader.read_all(view)
                row = {
                    "image": image,
                    "view_size": list(view.size),
                    "seconds": time.perf_counter() - start,
                    "lines": [[ln.box.tolist(), ln.text, float(ln.score)] for ln in lines],
                }
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
                done[image] = row
    return {str(s.image): done[key(s)] for s in samples}


def cached_reads(samples, budget: Budget | int | str, path: str | Path, reader=None, progress: bool = True,
                 max_block: int = 4, part_px: int | None = None) -> dict[str, Perception]:  # fmt: skip
    """One-pass perceptions ``{str(sample.image): Perception}`` from :func:`cached_rows` at ``budget``."""
    rows = cached_rows(samples, budget, path, reader, progress)
    sizes = {str(s.image): (s.width, s.height) for s in samples}
    return {
        image: perception_from_lines(r["lines"], tuple(r["view_size"]), max_block, part_px, sizes[image])
        for image, r in rows.items()
    }


def cached_passes(samples, view_budget, detect_budget, reads_dir: str | Path, stem: str, legible: float = 0.5,
                  max_recognise: int = 96, max_block: int = 4, progress: bool = True,
                  part_px: int | None = None) -> dict[str, Perception]:  # fmt: skip
    """Two-pass perceptions (:func:`~zoomvlm.policies.perception.perception_from_passes`) from cached reads.

    The text pass is the cached full read at ``view_budget``; the detection pass is the cached full read at
    ``detect_budget`` (its quads are what the detector alone returns: same view, same detector), whose texts
    stand in for the live policy's recognition of the lines it recognises. Caches:
    ``reads_dir/{stem}_{budget}.jsonl``.
    """
    text = cached_rows(samples, view_budget, Path(reads_dir) / f"{stem}_{view_budget}.jsonl", progress=progress)
    det = cached_rows(samples, detect_budget, Path(reads_dir) / f"{stem}_{detect_budget}.jsonl", progress=progress)
    sizes = {str(s.image): (s.width, s.height) for s in samples}
    out = {}
    for image, low in text.items():
        high = det[image]["lines"]

        def recognise(idx, high=high):
            return [(high[i][1], high[i][2]) for i in idx]

        out[image] = perception_from_passes(low["lines"], tuple(low["view_size"]), [ln[0] for ln in high],
                                            tuple(det[image]["view_size"]), recognise, legible, max_recognise,
                                            max_block, part_px, sizes[image])  # fmt: skip
    return out


def load_seed_boxes(curation_dir: str | Path) -> dict[str, Box | None]:
    """``{sample id: seed box}`` from a ``curate boxes`` folder (its ``raw.jsonl``: the UNexpanded reader box);
    ``None`` where the reader did not find the answer (``found`` false)."""
    out: dict[str, Box | None] = {}
    for row in _curation_rows(curation_dir):
        out[row["id"]] = Box(*row["seed_box"]) if row["found"] else None
    return out


def _curation_rows(curation_dir: str | Path) -> list[dict]:
    """The rows of a ``curate boxes`` folder's ``raw.jsonl``: split at ``\\n`` only (a reader's text may hold
    U+2028, which ``str.splitlines`` breaks at: the row was skipped), a torn last line of an interrupted run
    left out, any other bad line an error naming it (ValueError)."""
    path = Path(curation_dir) / "raw.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{curation_dir} is not a curate boxes folder: no raw.jsonl")
    return read_appended_jsonl(path)


def refine_seed_boxes(curation_dir: str | Path, samples, part_px: int) -> dict[str, Box | None]:
    """Seed boxes narrowed to the answer's span inside a WIDE matched line (wider than ``part_px`` px).

    The reader's seed box is its whole matched line; on a dense page that is 1000+ px wide, and a crop of it
    is shrunk past legibility by the target. Where ONE line matched (``raw`` holds its text) and the line is
    wider than ``part_px`` original pixels, the answer is aligned inside the line's text (rapidfuzz
    ``partial_ratio_alignment``, squashed like the grounder) and the box is narrowed to the same relative x
    range, padded by two characters' width. Model-made, no human box: the line and its text are the reader's.

    Returns:
        ``{sample id: box}`` like :func:`load_seed_boxes` (``None`` = not found), refined where possible.
    """
    from rapidfuzz import fuzz

    by_id = {s.id: s for s in samples}
    out = load_seed_boxes(curation_dir)
    for row in _curation_rows(curation_dir):
        s, box = by_id.get(row["id"]), out.get(row["id"])
        raw = row.get("raw") or ""
        if s is None or box is None or " | " in raw or box.width * s.width <= part_px:
            continue
        text = raw.casefold()
        best = None
        for answer in s.answers:
            a = answer.casefold().strip()
            if not a or len(a) > len(text):
                continue
            al = fuzz.partial_ratio_alignment(a, text)
            if al is not None and (best is None or al.score > best.score):
                best = al
        if best is None or best.score < 80:
            continue
        n = max(1, len(text))
        pad = 2 / n
        a, b = max(0.0, best.dest_start / n - pad), min(1.0, best.dest_end / n + pad)
        out[row["id"]] = Box(box.x0 + a * box.width, box.y0, box.x0 + b * box.width, box.y1)
    return out


@dataclass
class TrainItem:
    """One training question: its sample, perception, scorer inputs and (optional) seed label."""

    sample: object
    perception: Perception
    q: np.ndarray
    x: np.ndarray
    target: np.ndarray | None
    seed_box: Box | None = None


def build_items(samples, perceptions: dict[str, Perception], encoder: QuestionEncoder,
                seeds: dict[str, Box | None] | None = None, progress: bool = True,
                version: int = 1) -> list[TrainItem]:  # fmt: skip
    """Featurise every sample (:func:`~zoomvlm.cropvlm.proposals.featurize`, feature ``version``); seed labels
    where a seed exists."""
    from zoomvlm.cropvlm.proposals import featurize, image_features, seed_targets

    items = []
    static: dict[str, np.ndarray] = {}
    encoder.encode([s.question for s in samples])  # one batched pass; featurize then hits the memo
    for s in tqdm(samples, desc="features", unit="q", disable=not progress):
        p = perceptions[str(s.image)]
        if str(s.image) not in static:
            static[str(s.image)] = image_features(p, encoder, version)
        q, x = featurize(p, s.question, encoder, static[str(s.image)], version)
        seed = (seeds or {}).get(s.id)
        target = seed_targets(p, seed) if seed is not None else None
        items.append(TrainItem(s, p, q, x, target, seed))
    return items


def split_train(items: Sequence[TrainItem], holdout: float = 0.2, seed: int = 0) -> tuple[list, list]:
    """Split training items BY IMAGE into (fit, held-out) for selecting settings on train only."""
    images = sorted({str(it.sample.image) for it in items})
    rng = np.random.default_rng(seed)
    held = set(rng.choice(images, size=max(1, int(len(images) * holdout)), replace=False).tolist())
    fit = [it for it in items if str(it.sample.image) not in held]
    out = [it for it in items if str(it.sample.image) in held]
    return fit, out
