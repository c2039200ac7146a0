"""A real reader as a target: RapidOCR (PP-OCR detection + recognition ONNX models shipped in the wheel).

It stands in for a low-resolution VLM on machines without VLM weights: each view is shrunk to a pixel
budget (like a VLM's input resolution), read, and the transcript is the answer. Its
:meth:`OCRTarget.loglikelihood` scores an answer from the recogniser's per-frame character
probabilities (CTC), so the likelihood reward of CropVLM has a real, graded signal here too.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from zoomvlm.core.geometry import Budget
from zoomvlm.targets.base import Generation, TargetRequest, Usage, require_answers

logger = logging.getLogger(__name__)

PROB_FLOOR = 1e-8
"""Probabilities are clamped here before the log, so one impossible frame costs log(1e-8) = -18.4 nats."""

# RapidOCR resizes behind the caller's back in three places. Two are switched off so that a view's own size
# (already shrunk to the budget) is what the detector sees:
#  - Global.max_side_len (default 2000) shrinks large images before detection;
#  - Det.limit_type=min / limit_side_len=736 UPSCALES so the short side is 736 px, which would read
#    a 384 px "low-resolution" view at ~2x the resolution it claims to have.
# The third, Global.min_side_len (30), is kept: it upscales a view whose SHORT side is under 30 px (a thin crop of
# one text line, e.g. 384 x 20 read at 576 x 30), which every measurement in the README was made with. A view so
# thin that this would blow its long side past _MAX_UPSCALED_SIDE (a 383 x 1 view became ~11490 x 30: 47 s and
# 4.8 GB) is padded with white to 30 px instead (see OCRTarget.detect).
_MAX_UPSCALED_SIDE = 4096
_NO_RESIZE = 1_000_000
_ENGINE_PARAMS = {
    "Global.max_side_len": _NO_RESIZE,
    "Global.log_level": "warning",
    "Det.limit_type": "max",
    "Det.limit_side_len": _NO_RESIZE,
}


@dataclass(frozen=True)
class OCRLine:
    """One recognised text line.

    Args:
        text: decoded text.
        score: the recogniser's mean character confidence in ``[0, 1]``.
        box: quadrilateral ``[[x, y] x 4]`` in the pixels of the view it was read from.
        log_probs: ``[T, C]`` per-frame log-probabilities (C = recogniser classes, 0 = CTC blank).
    """

    text: str
    score: float
    box: np.ndarray
    log_probs: np.ndarray


@dataclass(frozen=True)
class _Read:
    """One memoised pass over a view: every detected line, and the seconds the pass took."""

    lines: tuple[OCRLine, ...]
    seconds: float

    def rows(self, text_score: float) -> list[list[OCRLine]]:
        """The lines the reader keeps (non-empty text, confidence >= ``text_score``) in reading order."""
        return reading_order([ln for ln in self.lines if ln.text.strip() and ln.score >= text_score])


class OCRTarget:
    """RapidOCR as a :class:`~zoomvlm.targets.base.Target`.

    Args:
        budget: default per-view budget; the CLI's ``--budget 384`` gives ``Budget(max_side=384)``.
        text_score: lines whose recogniser confidence is below this are dropped (RapidOCR's default 0.5).

    ``generate`` returns the transcript of all views, line by line in reading order (top-to-bottom,
    left-to-right, view after view). It ignores the question: a reader answers by reading.
    """

    def __init__(self, budget: Budget | int | str | None = 384, text_score: float = 0.5, cache_size: int = 8):
        self.budget = Budget.parse(budget)
        self.text_score = text_score
        self.name = f"ocr@{self.budget}"
        self._engine = None
        self._char_index: dict[str, list[int]] | None = None
        self._charge = 0.0
        # Reads of identical views are memoised (LRU, keyed by a hash of the pixels): the global view of a
        # receipt is shared by its 3 questions in eval and by all G rollouts of a GRPO group. Small: a read
        # keeps per-frame log-probs over ~6.6k classes (about 1 MB per text line).
        self._reads: OrderedDict[bytes, _Read] = OrderedDict()
        self.cache_size = cache_size
        # Reads made by a policy on the target's behalf (``read_shared``), not yet consumed by the target:
        # kept apart from the LRU so a batch of prefetched global views cannot evict each other.
        self._pending: OrderedDict[bytes, _Read] = OrderedDict()
        # Reads handed in from a cache on disk (:meth:`preload`): never evicted, never charged.
        self._preloaded: dict[bytes, _Read] = {}

    # ---- engine -------------------------------------------------------------------------------
    @property
    def engine(self):
        if self._engine is None:
            from rapidocr import RapidOCR

            self._engine = RapidOCR(params=dict(_ENGINE_PARAMS))
            self._engine._load_rec_model()
        return self._engine

    def read(self, view: Image.Image) -> list[list[OCRLine]]:
        """Detect and recognise the lines of one view, AS IS (no budget applied here).

        Returns:
            Rows in reading order (top to bottom), each a list of lines left to right, with confidence
            >= ``text_score`` and non-empty text. Identical views (same pixels) are read once and memoised
            (``cache_size`` most recent views; 0 disables).
        """
        return self._lookup(view)[0].rows(self.text_score)

    def cache_identity(self) -> dict:
        """Settings that change the answers but not :attr:`name` (:func:`~zoomvlm.targets.cache.target_identity`):
        the confidence a line needs to be kept (``text_score``)."""
        return {"text_score": self.text_score}

    def read_all(self, view: Image.Image) -> list[OCRLine]:
        """Every line the detector found in ``view`` (any confidence, even empty text), detection order.

        Same memoised pass as :meth:`read` (one detection + recognition per distinct view).
        """
        return list(self._lookup(view)[0].lines)

    def read_shared(self, view: Image.Image) -> tuple[list[OCRLine], float]:
        """A read made on the target's behalf: a policy looks at the view the target will read anyway.

        The first pass is the target's (AwaRes: the first turn is already paid for). A policy that reads
        the target's OWN global view (same pixels, same budget) through this method gets every line the
        detector found, and the seconds of that read are charged to the target, once, when the target
        itself consumes the memoised read in :meth:`generate` or :meth:`loglikelihood` (its ``Usage.seconds``
        then include them, as for the ``none`` policy). Until then the read is held apart from the LRU
        (at most 512 views).

        Returns:
            ``(lines, seconds)``: all lines (see :meth:`read_all`) and the seconds this call spent reading
            that the target will be charged (0.0 when the view was already read: nothing to hand over).
        """
        entry, fresh = self._lookup(view, shared=True)
        return list(entry.lines), (entry.seconds if fresh else 0.0)

    @staticmethod
    def _key(view: Image.Image) -> bytes:
        return hashlib.blake2b(view.tobytes(), digest_size=16, person=str(view.size).encode()[:16]).digest()

    def preload(self, view: Image.Image, lines: Sequence[OCRLine]) -> None:
        """Hand in this reader's own earlier pass over ``view`` (e.g. a training cache of global views).

        The lines are returned for that exact view (same pixels) from then on, never evicted (the LRU of
        ``cache_size`` reads stays small: a read keeps ~1 MB of log-probabilities per line) and never charged.
        Lines without log-probabilities serve :meth:`generate`, not :meth:`loglikelihood`.
        """
        self._preloaded[self._key(view.convert("RGB"))] = _Read(tuple(lines), 0.0)

    def _lookup(self, view: Image.Image, shared: bool = False) -> tuple[_Read, bool]:
        """``(entry, fresh)`` for ``view``; a pending shared entry consumed by the target is charged once."""
        view = view.convert("RGB")
        key = self._key(view)
        if key in self._preloaded:
            return self._preloaded[key], False
        if key in self._pending:
            entry = self._pending[key]
            if not shared:  # the target consumes the policy's read: charge it now, once
                del self._pending[key]
                self._charge += entry.seconds
                self._remember(key, entry)
            return entry, False
        if key in self._reads:
            self._reads.move_to_end(key)
            return self._reads[key], False
        start = time.perf_counter()
        entry = _Read(tuple(self._read_uncached(view)), 0.0)
        entry = _Read(entry.lines, time.perf_counter() - start)
        if shared:
            self._pending[key] = entry
            while len(self._pending) > 512:
                self._pending.popitem(last=False)
        else:
            self._remember(key, entry)
        return entry, True

    def _remember(self, key: bytes, entry: _Read) -> None:
        if self.cache_size > 0:
            self._reads[key] = entry
            while len(self._reads) > self.cache_size:
                self._reads.popitem(last=False)

    def _take_charge(self) -> float:
        """Seconds of shared reads consumed since the last call (added to the consuming request's usage)."""
        charge, self._charge = self._charge, 0.0
        return charge

    def detect(self, view: Image.Image) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The DETECTOR alone on ``view`` (as is; not memoised): ``(quads, crops)``.

        ``quads``: ``[4, 2]`` float32 line quadrilaterals in ``view`` pixels, detection order; ``crops``: the
        rectified line images, NOT yet turned upright by the angle classifier (pass a subset to
        :meth:`recognise_crops`, which does). Detection is a small part of a read's cost: the classifier and
        the recogniser run once per line.
        """
        from rapidocr.main import RapidOCRError

        engine = self.engine
        view = view.convert("RGB")
        floor = int(getattr(engine, "min_side_len", 0) or 0)
        w, h = view.size
        if floor and min(w, h) < floor and max(w, h) * floor / max(1, min(w, h)) > _MAX_UPSCALED_SIDE:
            padded = Image.new("RGB", (max(w, floor), max(h, floor)), "white")  # quads stay in the view's frame
            padded.paste(view, (0, 0))
            view = padded
        from rapidocr.utils.process_img import map_boxes_to_original

        original = engine.load_img(np.asarray(view))
        img, op_record = engine.preprocess_img(original)
        try:
            crops, det = engine.detect_and_crop(img, op_record)
        except RapidOCRError:  # nothing detected
            return [], []
        # det.boxes are in the PREPROCESSED frame: RapidOCR pads views wider than 8:1 or at most 30 px high and
        # rescales small / large ones; its own output maps them back (the crops stay cut from that frame)
        quads = np.array(det.boxes, dtype=np.float32).reshape(-1, 4, 2)
        quads = map_boxes_to_original(quads.copy(), op_record, *original.shape[:2])
        return [np.asarray(q, dtype=np.float32) for q in quads], list(crops)

    def recognise_crops(self, crops: list[np.ndarray]) -> tuple[list[str], list[float], list[np.ndarray]]:
        """Angle classifier (when the engine uses one) + recogniser on line crops from :meth:`detect`:
        ``(texts, mean confidences, [T, C] log-probs)``, one per crop."""
        if not crops:
            return [], [], []
        if self.engine.use_cls:
            crops, _ = self.engine.cls_and_rotate(list(crops))
        return self._recognise(crops)

    def _read_uncached(self, view: Image.Image) -> list[OCRLine]:
        quads, crops = self.detect(view)
        if not quads:
            return []
        texts, scores, log_probs = self.recognise_crops(crops)
        # Every detected line is kept (a policy looks at low-confidence lines too); ``_Read.rows`` filters.
        return [OCRLine(t, s, b, lp) for t, s, b, lp in zip(texts, scores, quads, log_probs, strict=True)]

    def _recognise(self, crops: list[np.ndarray]) -> tuple[list[str], list[float], list[np.ndarray]]:
        # RapidOCR's TextRecognizer.__call__ decodes and throws the probabilities away; this repeats its
        # batching (same resize/normalisation, same decoder) but keeps the [T, C] probabilities for CTC.
        rec = self.engine.text_rec
        _, img_h, img_w = rec.rec_image_shape[:3]
        texts: list[str] = [""] * len(crops)
        scores: list[float] = [0.0] * len(crops)
        log_probs: list[np.ndarray] = [np.zeros((0, 0), np.float32)] * len(crops)
        order = np.argsort([c.shape[1] / c.shape[0] for c in crops])
        for start in range(0, len(crops), rec.rec_batch_num):
            idx = order[start : start + rec.rec_batch_num]
            ratios = [crops[i].shape[1] / crops[i].shape[0] for i in idx]
            max_ratio = max([img_w / img_h, *ratios])
            batch = np.stack([rec.resize_norm_img(crops[i], max_ratio) for i in idx]).astype(np.float32)
            probs = rec.session(batch)
            decoded, _ = rec.postprocess_op(probs, False, wh_ratio_list=ratios, max_wh_ratio=max_ratio)
            lp = np.log(np.clip(probs, PROB_FLOOR, 1.0))
            for j, i in enumerate(idx):
                texts[i], scores[i] = decoded[j][0], float(decoded[j][1])
                log_probs[i] = lp[j]
        return texts, scores, log_probs

    # ---- Target protocol ----------------------------------------------------------------------
    def generate(self, requests: Sequence[TargetRequest]) -> list[Generation]:
        """Transcribe every view of each request (see class docstring). One Generation per request."""
        out = []
        for req in requests:
            start = time.perf_counter()
            views = req.views(self.budget)
            self._take_charge()
            lines = [" ".join(line.text for line in row) for view in views for row in self.read(view)]
            usage = Usage(
                view_pixels=tuple(v.width * v.height for v in views),
                # + a first pass a policy made for this target (``read_shared``): the target's own cost
                seconds=time.perf_counter() - start + self._take_charge(),
            )
            out.append(Generation("\n".join(lines), usage))
        return out

    def loglikelihood(self, requests: Sequence[TargetRequest]) -> list[float]:
        """Log-likelihood (nats) that the reader sees ``answer`` as a SUBSTRING of one line of the views.

        Definition: the recogniser's per-frame class probabilities ``p[t, c]`` of all lines of a view are
        concatenated in reading order into one frame sequence; the answer (spaces removed) is aligned by
        CTC to a contiguous window of frames; frames before and after the window are free (probability
        1), so the answer may be any part of a line, e.g. ``"9.00"`` in ``"TOTAL: RM 9.00"``, or run on
        into the next line (a company name wrapped over two lines). Inside the window, blank and space
        both count as "no character" and letter case is merged (``p(a) + p(A)``), matching the case- and
        space-insensitive ``contains`` metric. The score is the best window over the views:
        ``max_view max_{window} log sum_{CTC paths in window} prod_t p[t, path_t]``.

        An answer no line can hold (no text detected) scores ``len(answer) * log(PROB_FLOOR)``, the
        same order as the worst line, so the reward stays finite. Characters absent from the
        recogniser's alphabet are skipped (logged).

        Raises:
            ValueError: a request has no answer, or an answer with no readable character.
        """
        answers = require_answers(requests)
        out = []
        for req, answer in zip(requests, answers, strict=True):
            labels = self._encode(answer)
            best = len(labels) * math.log(PROB_FLOOR)
            for view in req.views(self.budget):
                rows = self.read(view)
                if rows:
                    frames = np.concatenate([line.log_probs for row in rows for line in row])
                    best = max(best, ctc_substring_logprob(frames, labels))
            out.append(float(best))
        return out

    def _encode(self, answer: str) -> list[list[int]]:
        """Each answer character (spaces dropped) -> the class ids it may be read as (case variants)."""
        if self._char_index is None:
            chars = self.engine.text_rec.postprocess_op.character
            index: dict[str, list[int]] = {}
            for i, ch in enumerate(chars):
                if i == 0 or ch == " ":  # CTC blank / space class
                    continue
                index.setdefault(ch.lower(), []).append(i)
            self._char_index = index
        labels, missing = [], []
        for ch in answer:
            if ch.isspace():
                continue
            ids = self._char_index.get(ch.lower())
            if ids is None:
                missing.append(ch)
            else:
                labels.append(ids)
        if missing:
            logger.warning("characters %r are not in the OCR alphabet; scored without them", missing)
        if not labels:
            raise ValueError(f"answer {answer!r} has no character the reader can score")
        return labels


def ctc_substring_logprob(log_probs: np.ndarray, labels: Sequence[Sequence[int]]) -> float:
    """Best CTC log-probability of ``labels`` over any contiguous window of frames (free prefix/suffix).

    Args:
        log_probs: ``[T, C]`` per-frame log-probabilities; class 0 is the CTC blank, and the LAST class
            is treated as blank-like too (PP-OCR's space class).
        labels: the target sequence; each element lists the class ids that may realise that character
            (their probabilities are summed, e.g. upper/lower case).

    Returns:
        ``max_{a <= b} log P_CTC(labels | frames a..b)``, computed by the CTC forward recursion
        (Graves et al. 2006) with a fresh start allowed at every frame and the end taken at every frame.
        ``-inf``-free: with clamped inputs it is at least ``T * log(PROB_FLOOR)``-bounded.

    Raises:
        ValueError: empty labels.
    """
    if len(labels) == 0:
        raise ValueError("ctc_substring_logprob needs at least one label")
    T = log_probs.shape[0]
    L = len(labels)
    blank_cols = [0, log_probs.shape[1] - 1]
    blank = np.logaddexp.reduce(log_probs[:, blank_cols], axis=1)  # [T]
    emit = np.stack([np.logaddexp.reduce(log_probs[:, list(ids)], axis=1) for ids in labels], axis=1)  # [T, L]
    if T < L:
        return float(L * math.log(PROB_FLOOR))
    # Extended sequence: b, l1, b, l2, ..., lL, b  (S = 2L + 1); characters at odd positions.
    S = 2 * L + 1
    neg = -1e30
    emit_ext = np.full((T, S), 0.0)
    emit_ext[:, 0::2] = blank[:, None]
    emit_ext[:, 1::2] = emit
    # s-2 -> s skip allowed for characters unless the same character repeats (needs a blank between).
    can_skip = np.zeros(S, dtype=bool)
    for k in range(1, L):
        can_skip[2 * k + 1] = list(labels[k]) != list(labels[k - 1])
    alpha = np.full(S, neg)
    alpha[1] = emit_ext[0, 1]
    best = alpha[S - 2]
    for t in range(1, T):
        stay = alpha
        step = np.concatenate(([neg], alpha[:-1]))
        skip = np.where(can_skip, np.concatenate(([neg, neg], alpha[:-2])), neg)
        alpha = np.logaddexp(np.logaddexp(stay, step), skip) + emit_ext[t]
        # Fresh start: the window may begin at frame t (everything before is the free prefix).
        alpha[1] = max(alpha[1], emit_ext[t, 1])
        best = max(best, alpha[S - 2])
    return float(best)


def reading_order(lines: list[OCRLine]) -> list[list[OCRLine]]:
    """Group lines into rows (top to bottom) and order each row left to right.

    A line joins the current row when its vertical centre lies within half the median line height of
    the row's first line. RapidOCR's own order sorts by top edge with a fixed 10 px tolerance, which
    splits one printed line into two rows when a word box sits a few pixels higher ("BHD" before
    "LIGHTROOM GALLERY SDN").
    """
    if not lines:
        return []
    centers = [float(line.box[:, 1].mean()) for line in lines]
    heights = [float(line.box[:, 1].max() - line.box[:, 1].min()) for line in lines]
    tol = 0.5 * float(np.median(heights))
    rows: list[list[OCRLine]] = []
    row_center = None
    for i in np.argsort(centers, kind="stable"):
        if row_center is None or centers[i] - row_center > tol:
            rows.append([])
            row_center = centers[i]
        rows[-1].append(lines[i])
    return [sorted(row, key=lambda line: float(line.box[:, 0].min())) for row in rows]
