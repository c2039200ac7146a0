"""``proposals``: a learned cropper whose perception is a real pretrained reader (issue 16, "policies that look").

The reader's detector + recogniser read a cheap view (:mod:`zoomvlm.policies.perception`; with the ``ocr``
target, the SAME first pass the target makes at its own budget, so it is not paid twice). What it found
(lines, rows, pairs and blocks of rows, their low-resolution text and geometry) are the candidate regions;
a small torch model (:class:`RegionScorer`) scores each candidate against the question, and the policy
emits the top ``k`` candidates (non-overlapping, padded by a margin) as boxes cut from the ORIGINAL image.
It works in front of any target: the boxes are plain normalised boxes.

Question understanding uses the question TEXT (all-MiniLM-L6-v2 embedding + word overlap with each
candidate's text), never a field id, so users' own questions and unseen document kinds go through the
same model.

Training, no human boxes (the CropVLM recipe): :func:`seed_targets` turns the reader's native-resolution
boxes from ``zoomvlm curate boxes --grounder ocr`` into a soft label over candidates, :func:`train_seed`
fits the scorer by cross-entropy (the seed / SFT stage), then :mod:`zoomvlm.cropvlm.proposal_grpo` runs GRPO
on the target's own reward.

Checkpoint folder: ``scorer.pt`` (state dict, ~100 kB), ``config.json`` (:class:`ScorerConfig` +
inference settings), ``zoomvlm_recipe.json`` (how it was made).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from zoomvlm.core.geometry import Box, Budget
from zoomvlm.policies.base import Proposal
from zoomvlm.policies.perception import (
    N_NGRAM,
    Perceiver,
    Perception,
    QuestionEncoder,
    Region,
    char_ngrams,
    n_region_features,
    printed_rows,
    region_features,
)

logger = logging.getLogger(__name__)

__all__ = [
    "N_SIM",
    "N_SIM_V2",
    "N_SIM_V3",
    "n_sim",
    "ProposalCropper",
    "RegionScorer",
    "ScorerConfig",
    "crop_box",
    "default_proposals_path",
    "legible_tiles",
    "legible_window",
    "wants_windows",
    "featurize",
    "image_features",
    "seed_targets",
    "select_boxes",
    "train_seed",
    "word_matcher",
]

WINDOW_FITS = ("shift", "clip", "centre")
"""What a legibility window does at the page's edge (:attr:`ScorerConfig.window_fit`)."""

N_SIM = 4
"""Question-region similarity features (version 1): word overlap and trigram overlap (region, best line)."""

N_SIM_V2 = 6
"""Version 2 adds the question's word overlap with the region's NEIGHBOURS: the other lines of its printed rows
(a label left of its value) and the lines of the two rows above it that overlap it horizontally (a label or a
table header above)."""


N_SIM_V3 = N_SIM_V2
"""Version 3: the same six overlaps, but a question word also matches a page word that differs by a typo or an
inflection (:func:`word_matcher`): people type "advertsing expense of Neflix" about "Advertising expenses"."""


def n_sim(version: int = 1) -> int:
    """Number of question-region similarity features of a feature ``version``."""
    return N_SIM if version == 1 else N_SIM_V2


_WORD = re.compile(r"[a-z0-9]{3,}")
_STOP = frozenset(
    "the and what which who whom whose how many much does did was were are is for from this that with "
    "according shown show page document report paper there their they them into about when where".split()
)


def default_proposals_path() -> str:
    """Folder of the proposals cropper shipped inside the package (``--policy proposals``)."""
    from importlib import resources

    return str(resources.files("zoomvlm") / "assets" / "proposals")


@dataclass
class ScorerConfig:
    """Shape of :class:`RegionScorer` and how the policy turns scores into boxes.

    Args:
        hidden: width of the hidden layers.
        rank: width of the question / region projections whose product carries the interaction.
        view_budget: the perception's text view (``384`` = the ``ocr`` target's global view at 384 px).
        detect_budget: ``None`` = candidates from the lines read at ``view_budget``; otherwise two-pass
            perception: the detector alone at ``detect_budget`` gives the line boxes, the text view their text
            (:func:`~zoomvlm.policies.perception.perception_from_passes`).
        legible, max_recognise: two-pass only: pages whose text view reads fewer than ``legible`` of the
            detected lines get up to ``max_recognise`` lines recognised at ``detect_budget``.
        k: boxes emitted per question (top-k candidates after suppression).
        margin_x, margin_y: padding added to each side of a chosen region (fractions of width / height).
        line_pad: extra vertical padding, in units of the region's mean line height (the low-resolution
            line box is a few pixels off at native resolution).
        suppress: a candidate is skipped when its box covers >= this fraction of an already chosen box or
            is covered by one to this extent (so the k boxes look at different places).
        features: region feature version (:func:`~zoomvlm.policies.perception.region_features`; 1 = the
            first checkpoints, 2 adds ``part`` windows and the crop's legibility at the target, 3 is 2 with
            typo-tolerant question matching, :func:`word_matcher`).
        part_px: offer ``part`` windows of lines wider than this many original pixels (version 2).
        lexical: add a direct path from the question-text overlaps to the logit (``w . sims``, ``w`` initialised
            to 2 per overlap): an inductive bias towards the text the question names, which a scorer fitted
            mostly on one page kind otherwise drops for that kind's layout prior.
        window_line_px: ``None`` = crop the chosen region itself. Otherwise each chosen region is widened into
            its LEGIBILITY WINDOW (:func:`legible_window`): the largest box around it whose text the target
            still sees at ``window_line_px`` pixels of line height, so a crop shows the region's surroundings
            (the answer near the words the question names) at no loss of legibility.
        window_side: the target's budget (longest side of a crop's view, px) the window is sized for.
        window_max_area: cap on a window's area (fraction of the page): bounds the extra text the target reads.
        window_fit: what a window does at the page's edge: ``"shift"`` slides it back inside the page (keeps its
            full size, so its centre leaves the region), ``"clip"`` cuts it at the edge (smaller; its centre moves
            half the cut away from the edge), ``"centre"`` cuts it by the same amount on the opposite side too
            (smaller still, and its centre is the region's centre, so the box follows the answer). The default
            is what checkpoints written before this option did; ``train proposals seed`` writes ``"centre"``.
        window_tiles: a chosen window wider than the target can read (its region is a row wider than
            ``window_side * line height / window_line_px``, so :func:`legible_window` could not narrow it) is cut
            into up to this many tiles across its width, each read as a crop of its own (:func:`legible_tiles`);
            1 = never (one crop per region, as before this option). Tiles add crops, not area.
        window_below: "zoom out when unsure": widen into windows only when the scorer's probability mass on
            its ``k`` most probable candidates (``softmax(logits)``) is below this; ``None`` = always widen.
            A confident scorer keeps its tight crops (cheap); an unsure one shows the target more context.
            GRPO (:func:`~zoomvlm.cropvlm.proposal_grpo.make_target_reward`) rewards each sampled region's
            window when windows are always on (``window_below`` None), its own crop (:func:`crop_box`) otherwise.
    """

    hidden: int = 64
    rank: int = 32
    view_budget: str = "384"
    detect_budget: str | None = None
    legible: float = 0.5
    max_recognise: int = 96
    k: int = 2
    margin_x: float = 0.03
    margin_y: float = 0.01
    line_pad: float = 0.5
    suppress: float = 0.6
    features: int = 1
    part_px: int | None = None
    lexical: bool = False
    window_line_px: float | None = None
    window_side: int = 384
    window_max_area: float = 1.0
    window_fit: str = "shift"
    window_tiles: int = 1
    window_below: float | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Refuse settings the policy cannot honour (raises ``ValueError`` naming the field)."""
        problems = []
        if not isinstance(self.k, int) or self.k < 1:
            problems.append(f"k must be an integer >= 1 (boxes per question), got {self.k!r}")
        if self.features not in (1, 2, 3):
            problems.append(f"features must be 1, 2 or 3, got {self.features!r}")
        if self.window_fit not in WINDOW_FITS:
            problems.append(f"window_fit must be one of {', '.join(WINDOW_FITS)}, got {self.window_fit!r}")
        if not isinstance(self.window_tiles, int) or self.window_tiles < 1:
            problems.append(f"window_tiles must be an integer >= 1, got {self.window_tiles!r}")
        if not 0 < self.suppress <= 1:
            problems.append(f"suppress must be in (0, 1], got {self.suppress!r}")
        if self.window_line_px is not None and not self.window_line_px > 0:
            problems.append(f"window_line_px must be > 0 or None, got {self.window_line_px!r}")
        if not 0 < self.window_max_area <= 1:
            problems.append(
                f"window_max_area must be in (0, 1] (a fraction of the page), got {self.window_max_area!r}"
            )
        if self.hidden < 1 or self.rank < 1:
            problems.append(f"hidden and rank must be >= 1, got {self.hidden!r} and {self.rank!r}")
        for name in ("margin_x", "margin_y", "line_pad"):
            if not _finite_at_least(getattr(self, name), 0.0):
                problems.append(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if not _finite_at_least(self.legible, 0.0) or self.legible > 1:
            problems.append(f"legible must be in [0, 1], got {self.legible!r}")
        if self.window_below is not None and not (_finite_at_least(self.window_below, 0.0) and self.window_below <= 1):
            problems.append(f"window_below must be in [0, 1] or None, got {self.window_below!r}")
        if not isinstance(self.max_recognise, int) or self.max_recognise < 0:
            problems.append(f"max_recognise must be an integer >= 0, got {self.max_recognise!r}")
        if not isinstance(self.window_side, int) or self.window_side < 1:
            problems.append(f"window_side must be an integer >= 1 (px), got {self.window_side!r}")
        if self.part_px is not None and (not isinstance(self.part_px, int) or self.part_px < 16):
            problems.append(f"part_px must be an integer >= 16 (original px) or None, got {self.part_px!r}")
        for name in ("view_budget", "detect_budget"):
            value = getattr(self, name)
            if value is not None or name == "view_budget":
                try:
                    Budget.parse(value)
                except ValueError as e:
                    problems.append(f"{name}: {e}")
        if problems:
            raise ValueError("invalid proposals scorer config: " + "; ".join(problems))


def _finite_at_least(value, low: float) -> bool:
    """``value`` is a real (non-bool) finite number >= ``low``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= low


class RegionScorer(nn.Module):
    """Scores candidate regions against a question: ``logits = f(question, regions)``.

    ``score_i = head([c_i, q, c_i * q])`` with ``c_i = MLP(region features_i)`` and ``q = W e(question)``
    (``e`` = MiniLM embedding), so the question modulates every region multiplicatively.

    Shapes: ``forward(q [B, 384], x [B, N, F], mask [B, N] bool) -> logits [B, N]``, ``-inf`` where
    ``mask`` is False. ``F = n_region_features(v) + N_NGRAM + n_sim(v)``, ``v = config.features``.
    """

    def __init__(self, config: ScorerConfig | None = None):
        super().__init__()
        self.config = config or ScorerConfig()
        h, r = self.config.hidden, self.config.rank
        n_in = n_region_features(self.config.features) + N_NGRAM + n_sim(self.config.features)
        self.region = nn.Sequential(nn.Linear(n_in, h), nn.ReLU(), nn.Linear(h, r))
        self.question = nn.Linear(QuestionEncoder.dim, r)
        self.head = nn.Sequential(nn.Linear(3 * r, h), nn.ReLU(), nn.Linear(h, 1))
        self.n_sim = n_sim(self.config.features)
        if self.config.lexical:
            self.lexical = nn.Linear(self.n_sim, 1, bias=False)
            nn.init.constant_(self.lexical.weight, 2.0)

    def forward(self, q: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        c = self.region(x)  # [B, N, r]
        qq = self.question(q)[:, None, :].expand_as(c)  # [B, N, r]
        logits = self.head(torch.cat([c, qq, c * qq], dim=-1)).squeeze(-1)  # [B, N]
        if self.config.lexical:  # the question-region overlaps are the last n_sim features
            logits = logits + self.lexical(x[..., -self.n_sim :]).squeeze(-1)
        return logits.masked_fill(~mask, float("-inf"))


def _words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.casefold()) if w not in _STOP}


def word_matcher(question_words: set[str], texts: Sequence[str], min_ratio: float = 80.0):
    """``overlap(text) -> fraction of question_words`` matched in ``text``, tolerant of typos and inflections.

    A question word matches a word of the text when they are equal, or when both have >= 4 characters, neither
    contains a digit (numbers and years must match exactly: 2015 is not 2016) and their normalised Indel
    similarity (rapidfuzz ``fuzz.ratio``, 0-100) is >= ``min_ratio``: "expense"/"expenses" 93,
    "advertsing"/"advertising" 95, "neflix"/"netflix" 92, "cost"/"most" 75. The similarity of every
    (question word, page word) pair is computed once over the vocabulary of ``texts`` (``process.cdist``), so
    a page of a few hundred regions costs one small matrix.
    """
    from rapidfuzz import fuzz, process

    q = sorted(question_words)
    n_q = max(1, len(q))
    index = {w: i for i, w in enumerate(q)}
    vocab = sorted(set().union(*(_words(t) for t in texts))) if texts else []
    matched: dict[str, frozenset[int]] = {}
    if q and vocab:
        sim = process.cdist(q, vocab, scorer=fuzz.ratio, workers=1)
        fuzzy_q = np.array([len(w) >= 4 and not any(c.isdigit() for c in w) for w in q])
        for j, v in enumerate(vocab):
            ok = fuzzy_q & (sim[:, j] >= min_ratio) if len(v) >= 4 and not any(c.isdigit() for c in v) else 0
            hits = set(np.flatnonzero(ok).tolist()) | ({index[v]} if v in index else set())
            if hits:
                matched[v] = frozenset(int(i) for i in hits)

    def overlap(text: str) -> float:  # a text outside the vocabulary still matches exactly
        hit: set[int] = set()
        for w in _words(text):
            hit |= matched.get(w, frozenset({index[w]}) if w in index else frozenset())
        return len(hit) / n_q

    return overlap


def _trigrams(text: str) -> set[str]:
    t = re.sub(r"\s+", " ", text.casefold())
    return {t[i : i + 3] for i in range(len(t) - 2)}


def image_features(perception: Perception, encoder: QuestionEncoder | None = None, version: int = 1) -> np.ndarray:
    """The question-independent part, once per image: ``[N, n_region_features(version) + N_NGRAM]`` float32.

    :func:`~zoomvlm.policies.perception.region_features` and hashed character n-grams of each region's
    low-resolution text. (``encoder`` is unused: line texts are not embedded, which keeps the policy's own
    cost a small fraction of the reader's pass; the low-resolution text is compared with the question by
    its characters instead, see :func:`featurize`.)
    """
    regions = perception.regions
    if not regions:
        return np.zeros((0, n_region_features(version) + N_NGRAM), np.float32)
    return np.concatenate(
        [
            np.stack([region_features(r, perception, version) for r in regions]),
            np.stack([char_ngrams(r.text) for r in regions]),
        ],
        axis=1,
    ).astype(np.float32)


def featurize(
    perception: Perception,
    question: str,
    encoder: QuestionEncoder,
    static: np.ndarray | None = None,
    version: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Inputs of the scorer for one (image, question): ``(q [384], x [N, F])`` with N = ``len(regions)``.

    ``q`` = the question's MiniLM embedding. ``x`` = :func:`image_features` (pass ``static`` to reuse them
    across questions about one image) and :func:`n_sim` question-region similarities of the low-resolution
    text: the fraction of the question's content words found in the region's text and in its best line, and
    the character-trigram overlap (share of the region's trigrams found in the question) of the region and of
    its best line; version 2 adds the word overlap of its neighbours (:data:`N_SIM_V2`); version 3 matches
    words through :func:`word_matcher` (typos, inflections) instead of exactly (:data:`N_SIM_V3`).
    """
    regions = perception.regions
    q = encoder.encode([question])[0]
    static_x = static if static is not None else image_features(perception, version=version)
    if not regions:
        return q, np.zeros((0, n_region_features(version) + N_NGRAM + n_sim(version)), np.float32)
    qwords, qtri = _words(question), _trigrams(question)
    n_q = max(1, len(qwords))
    if version >= 3:
        overlap = word_matcher(qwords, [ln.text for ln in perception.lines] + [r.text for r in regions])
    else:

        def overlap(text: str) -> float:
            return len(qwords & _words(text)) / n_q

    line_overlap = np.array([overlap(ln.text) for ln in perception.lines], np.float32)
    line_tri = np.array([len(qtri & (t := _trigrams(ln.text))) / max(1, len(t)) for ln in perception.lines])
    sims = np.zeros((len(regions), n_sim(version)), np.float32)
    if version >= 2:
        row_of = np.zeros(len(perception.lines), dtype=int)
        rows = line_rows(perception.lines)
        for k, row in enumerate(rows):
            row_of[row] = k
    for i, r in enumerate(regions):
        m = list(r.members)
        tri = _trigrams(r.text)
        sims[i, 0] = overlap(r.text)
        sims[i, 1] = line_overlap[m].max() if m else 0.0
        sims[i, 2] = len(qtri & tri) / max(1, len(tri))
        sims[i, 3] = line_tri[m].max() if m else 0.0
        if version >= 2 and m:
            own = sorted({int(row_of[j]) for j in m})
            same = [j for k in own for j in rows[k] if j not in m]
            above = [j for k in range(max(0, own[0] - 2), own[0]) for j in rows[k]
                     if perception.lines[j].box.x0 < r.box.x1 and perception.lines[j].box.x1 > r.box.x0]  # fmt: skip
            sims[i, 4] = line_overlap[same].max() if same else 0.0
            sims[i, 5] = line_overlap[above].max() if above else 0.0
    return q, np.concatenate([static_x, sims], axis=1)


def line_rows(lines: Sequence[Region]) -> list[list[int]]:
    """Indices of ``lines`` grouped into printed rows, top to bottom (as :func:`candidate_regions` groups them)."""
    index = {id(ln): j for j, ln in enumerate(lines)}
    return [[index[id(ln)] for ln in row] for row in printed_rows(lines)]


def crop_box(region: Region, config: ScorerConfig) -> Box:
    """The box cut for ``region``: its box padded by the margins and ``line_pad`` line heights, clipped."""
    line_h = region.box.height / max(1, region.n_lines)
    return region.box.pad(config.margin_x, config.margin_y + config.line_pad * line_h)


def legible_window(region: Region, config: ScorerConfig, image_size: tuple[int, int] | None) -> Box:
    """The crop for ``region``: :func:`crop_box`, widened to its legibility window when ``config.window_line_px``.

    A target shrinks a crop of longest side ``S`` original pixels to ``window_side`` pixels, so text of line
    height ``h`` original pixels (the region's mean line height) stays ``window_line_px`` high up to
    ``S = window_side * h / window_line_px``. The window is the ``S x S`` box (clipped to the page, and shrunk
    evenly to ``window_max_area`` of the page) centred on the region; at the page's edge it is shifted inside
    the page (``window_fit="shift"``), cut there (``"clip"``) or cut there and by as much on the opposite side
    (``"centre"``: the window's centre stays the region's); it never cuts the region's own crop smaller.
    Raises ``ValueError`` for an unknown ``window_fit``. Units: ``image_size`` = ``(width, height)`` of the
    original image in pixels (``None``: no widening); boxes normalised to it.
    """
    box = crop_box(region, config)
    if config.window_line_px is None or image_size is None:
        return box
    w_img, h_img = image_size
    line_px = region.box.height * h_img / max(1, region.n_lines)
    side = config.window_side * line_px / config.window_line_px
    w, h = min(1.0, side / w_img), min(1.0, side / h_img)
    if w * h > config.window_max_area:
        shrink = (config.window_max_area / (w * h)) ** 0.5
        w, h = w * shrink, h * shrink
    w, h = max(w, box.width), max(h, box.height)
    cx, cy = box.center
    if config.window_fit == "clip":
        window = Box(max(0.0, cx - w / 2), max(0.0, cy - h / 2), min(1.0, cx + w / 2), min(1.0, cy + h / 2))
        return Box(min(window.x0, box.x0), min(window.y0, box.y0), max(window.x1, box.x1), max(window.y1, box.y1))
    if config.window_fit == "centre":  # cut evenly on both sides: the centre stays the region's centre
        a = max(box.width / 2, min(w / 2, cx, 1.0 - cx))
        b = max(box.height / 2, min(h / 2, cy, 1.0 - cy))
        return Box(max(0.0, cx - a), max(0.0, cy - b), min(1.0, cx + a), min(1.0, cy + b))
    if config.window_fit != "shift":
        raise ValueError(f"window_fit must be 'shift', 'clip' or 'centre', got {config.window_fit!r}")
    x0, y0 = min(max(0.0, cx - w / 2), 1.0 - w), min(max(0.0, cy - h / 2), 1.0 - h)
    return Box(x0, y0, min(1.0, x0 + w), min(1.0, y0 + h))


def legible_tiles(region: Region, config: ScorerConfig, image_size: tuple[int, int] | None) -> list[Box]:
    """The crops cut for ``region``: its :func:`legible_window`, cut into equal tiles across its width when it is
    wider than the target can read.

    The legible width is ``window_side * h / window_line_px`` original pixels (``h`` = the region's mean line
    height, the side of the un-capped window); a window more than 5 % wider than that is cut into
    ``n = min(window_tiles, ceil(width / legible width))`` tiles of the window's height, left to right, so each is
    read at (about) ``window_line_px`` px line height. A table row 1,500 px wide on a 2,000 px page with 30 px
    lines becomes three 500 px tiles instead of one crop the target shrinks to 8 px text. Returns
    ``[legible_window(...)]`` when ``window_tiles <= 1``, without windows, or when it is narrow enough. Units as
    :func:`legible_window`: boxes normalised to the image.
    """
    window = legible_window(region, config, image_size)
    if config.window_tiles <= 1 or config.window_line_px is None or image_size is None:
        return [window]
    w_img, h_img = image_size
    line_px = region.box.height * h_img / max(1, region.n_lines)
    legible_w = config.window_side * line_px / config.window_line_px / w_img
    if window.width <= 1.05 * legible_w:
        return [window]
    n = min(config.window_tiles, math.ceil(window.width / legible_w))
    tw = window.width / n
    return [Box(window.x0 + i * tw, window.y0, window.x0 + (i + 1) * tw, window.y1) for i in range(n)]


def wants_windows(logits: np.ndarray, config: ScorerConfig) -> bool:
    """Whether the policy widens its crops into legibility windows for these candidate ``logits`` ``[N]``.

    True when ``config.window_line_px`` is set and either ``window_below`` is None or the softmax probability
    mass of the ``k`` most probable candidates is below ``window_below`` (the scorer is unsure where to look).
    """
    if config.window_line_px is None:
        return False
    if config.window_below is None or len(logits) == 0:
        return True
    z = np.asarray(logits, np.float64)
    z = z[np.isfinite(z)]
    p = np.exp(z - z.max())
    p /= p.sum()
    return float(np.sort(p)[::-1][: config.k].sum()) < config.window_below


def select_boxes(
    regions: Sequence[Region],
    logits: np.ndarray,
    config: ScorerConfig,
    k: int | None = None,
    crops: Sequence[Box] | None = None,
) -> list[int]:
    """Indices of the top ``k`` regions by ``logits``, skipping ones that overlap a chosen box (``suppress``).

    ``crops``: the boxes actually cut for the regions (e.g. their legibility windows); overlap is judged on them
    when given, so k wide windows do not all frame one place. Default: the regions' own boxes.
    """
    k = config.k if k is None else k
    if k <= 0:  # e.g. proposals+prior with k = 1: the prior's box is the only one
        return []
    boxes = [r.box for r in regions] if crops is None else list(crops)
    chosen: list[int] = []
    for i in np.argsort(-logits, kind="stable"):
        if not np.isfinite(logits[i]):
            break
        b = boxes[i]
        if any(b.coverage(boxes[j]) >= config.suppress or boxes[j].coverage(b) >= config.suppress for j in chosen):
            continue
        chosen.append(int(i))
        if len(chosen) == k:
            break
    return chosen


def seed_targets(perception: Perception, seed_box: Box, min_iou: float = 0.1) -> np.ndarray | None:
    """Soft seed label over ``perception.regions`` from a model-made box (``curate boxes --grounder ocr``).

    ``p_i ∝ IoU(region_i, seed)^2`` over regions with IoU >= ``min_iou``: the region that best matches the
    reader's native-resolution answer line gets most of the mass, its row / pair a little. Returns None when
    no candidate reaches ``min_iou`` (the low-resolution pass missed the answer line): no seed label.
    """
    if not perception.regions:
        return None
    iou = np.array([r.box.iou(seed_box) for r in perception.regions], np.float64)
    iou[iou < min_iou] = 0.0
    if iou.max() <= 0:
        return None
    p = iou**2
    return (p / p.sum()).astype(np.float32)


def pad_batch(items: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[(q [384], x [N_i, F])] -> (q [B, 384], x [B, N_max, F], mask [B, N_max])`` (zero-padded)."""
    n = max(1, max(x.shape[0] for _, x in items))
    f = items[0][1].shape[1]
    qs = torch.from_numpy(np.stack([q for q, _ in items]))
    xs = torch.zeros(len(items), n, f)
    mask = torch.zeros(len(items), n, dtype=torch.bool)
    for i, (_, x) in enumerate(items):
        xs[i, : x.shape[0]] = torch.from_numpy(x)
        mask[i, : x.shape[0]] = True
    return qs, xs, mask


def train_seed(
    items: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    config: ScorerConfig | None = None,
    epochs: int = 60,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 32,
    seed: int = 0,
) -> RegionScorer:
    """The seed stage: fit a :class:`RegionScorer` to soft labels by cross-entropy.

    Args:
        items: ``(q [384], x [N, F], target [N])`` per question, ``target`` from :func:`seed_targets`.
        epochs, lr, weight_decay, batch_size: AdamW over shuffled mini-batches.
        seed: torch / numpy seed (the result is deterministic for a given seed on one machine).

    Loss: ``-sum_i target_i log softmax(logits)_i`` (listwise cross-entropy), mean over questions.

    Raises:
        ValueError: no item has a candidate region (nothing to fit: the result would be the random init).
    """
    if not any(x.shape[0] > 0 for _, x, _ in items):
        raise ValueError(
            "no seed label to fit: no question has both a model-made seed box and a candidate region that "
            "matches it (is the curation finished, and did the reader find text in the images?)"
        )
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = RegionScorer(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sizes = np.array([x.shape[0] for _, x, _ in items])
    for epoch in range(epochs):
        # Shuffled, then sorted by candidate count within windows of 4 batches: batches of similar size pad
        # little (a dense page has ~10x the candidates of a receipt).
        order = rng.permutation(len(items))
        window = 4 * batch_size
        order = np.concatenate(
            [o[np.argsort(sizes[o], kind="stable")] for o in np.split(order, range(window, len(order), window))]
        )
        batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        total = 0.0
        for b in rng.permutation(len(batches)):
            batch = [items[i] for i in batches[b]]
            q, x, mask = pad_batch([(a, b) for a, b, _ in batch])
            t = torch.zeros_like(mask, dtype=torch.float32)
            for i, (_, _, tgt) in enumerate(batch):
                t[i, : len(tgt)] = torch.from_numpy(tgt)
            logp = torch.log_softmax(model(q, x, mask), dim=-1).masked_fill(~mask, 0.0)
            loss = -(t * logp).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(batch)
        if epoch % 10 == 0 or epoch == epochs - 1:
            logger.info("seed epoch %d: loss %.4f", epoch, total / max(1, len(items)))
    return model.eval()


def save_checkpoint(model: nn.Module, out_dir: str | Path, weights: str, recipe: dict | None = None) -> Path:
    """Write ``weights`` (the state dict), ``config.json`` (``asdict(model.config)``) and ``zoomvlm_recipe.json``
    (``recipe``) into ``out_dir``: the folder layout of the small torch policies (scorer, crop-set reader head)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / weights)
    (out / "config.json").write_text(json.dumps(asdict(model.config), indent=2) + "\n")
    if recipe is not None:
        (out / "zoomvlm_recipe.json").write_text(json.dumps(recipe, indent=2, default=str) + "\n")
    return out


def save_scorer(model: RegionScorer, out_dir: str | Path, recipe: dict | None = None) -> Path:
    """Write ``scorer.pt``, ``config.json`` and ``zoomvlm_recipe.json`` (``recipe``) into ``out_dir``."""
    return save_checkpoint(model, out_dir, "scorer.pt", recipe)


def load_scorer(path: str | Path) -> RegionScorer:
    """Load a scorer saved by :func:`save_scorer`.

    Raises:
        FileNotFoundError: ``path`` lacks ``scorer.pt`` or ``config.json``.
        ValueError: ``config.json`` is not a JSON object of :class:`ScorerConfig` fields with valid values, or
            ``scorer.pt`` does not hold weights of the shape that config describes (the message names the file).
    """
    return load_checkpoint(path, "scorer.pt", ScorerConfig, RegionScorer, "proposals")


def load_checkpoint(path: str | Path, weights: str, config_cls, build, kind: str) -> nn.Module:
    """A small checkpoint folder (``config.json`` of ``config_cls`` fields + ``weights``, a state dict) ->
    ``build(config)`` with the weights, in eval mode: the one loader of the reader-perception policies' folders.

    Raises:
        FileNotFoundError: a file is missing (the message says the folder is not a ``kind`` checkpoint).
        ValueError: ``config.json`` is not a JSON object of ``config_cls`` fields with valid values (e.g. a setting
            written by a newer zoomvlm), or the weights do not fit that config (the message names the file).
    """
    path = Path(path)
    for name in (weights, "config.json"):
        if not (path / name).exists():
            raise FileNotFoundError(f"{path} is not a {kind} checkpoint: no {name}")
    config_path = path / "config.json"
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{config_path}: expected a JSON object of {kind} settings")
    unknown = sorted(set(raw) - {f.name for f in fields(config_cls)})
    if unknown:
        raise ValueError(f"{config_path}: unknown settings {unknown} (written by a newer zoomvlm?)")
    try:
        model = build(config_cls(**raw))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: {e}") from e
    try:
        model.load_state_dict(torch.load(path / weights, map_location="cpu", weights_only=True))
    except Exception as e:  # unpickling errors, size mismatches, missing keys
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path / weights}: weights do not match {config_path} ({first})") from e
    return model.eval()


class ProposalCropper:
    """``proposals[:CKPT]``: reader candidates scored against the question; the top ``k`` become crops.

    Args:
        path: a checkpoint folder (:func:`save_scorer`); ``None`` = the shipped one.
        k: override the checkpoint's number of boxes.
        perceiver, encoder: shared instances (tests, training); built from the checkpoint otherwise.
        name: the policy name in records.
        prior: a :class:`~zoomvlm.policies.prior.QuestionPrior`; when given, its box comes first and the
            scorer's top ``k - 1`` candidates it does not already cover follow (``proposals+prior``).

    ``propose`` emits ``Proposal(boxes)`` with up to ``k`` boxes (no candidates: no zoom, ``error`` says
    so). Call :meth:`bind_target` to share the first pass with an ``ocr`` target at the same budget; the
    read's seconds are then in ``Proposal.shared_seconds`` and charged to the target.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        k: int | None = None,
        perceiver: Perceiver | None = None,
        encoder: QuestionEncoder | None = None,
        name: str | None = None,
        model: RegionScorer | None = None,
        prior=None,
    ):
        self.model = model if model is not None else load_scorer(path or default_proposals_path())
        self.checkpoints = () if model is not None else (str(path or default_proposals_path()),)  # see run_eval
        self.config = self.model.config
        if k is not None:
            if k < 1:
                raise ValueError(f"proposals k must be >= 1, got {k}")
            self.config = ScorerConfig(**{**asdict(self.config), "k": k})
        self.perceiver = perceiver or Perceiver(
            Budget.parse(self.config.view_budget),
            detect_budget=self.config.detect_budget,
            legible=self.config.legible,
            max_recognise=self.config.max_recognise,
            part_px=self.config.part_px,
        )
        self.encoder = encoder or QuestionEncoder()
        self.name = name or ("proposals" if path is None else f"proposals:{path}")
        self._static, self._static_key = None, None
        # Optional non-reading prior (a QuestionPrior): its box is emitted first and the scorer's candidates
        # fill the other k - 1 places (a wide, question-placed region + precise lines the reader found).
        self.prior = prior
        if prior is not None:
            self.checkpoints += tuple(getattr(prior, "checkpoints", ()))

    def bind_target(self, target) -> bool:
        """Share the perception pass with ``target`` where possible (see :meth:`Perceiver.bind`)."""
        return self.perceiver.bind(target)

    @torch.no_grad()
    def logits(self, perception: Perception, question: str) -> np.ndarray:
        """Scores ``[len(perception.regions)]`` of the candidates for ``question``."""
        if self._static_key is not perception.regions:  # questions about one image share its features
            v = self.config.features
            self._static, self._static_key = image_features(perception, self.encoder, v), perception.regions
        q, x = featurize(perception, question, self.encoder, self._static, self.config.features)
        if x.shape[0] == 0:
            return np.zeros(0, np.float32)
        qt, xt, mask = pad_batch([(q, x)])
        return self.model(qt, xt, mask)[0].numpy()

    def crops(
        self, perception: Perception, image_size: tuple[int, int], logits: np.ndarray | None = None
    ) -> list[Box]:
        """The box cut for each candidate of ``perception``, normalised to the image: its legibility window
        (:func:`legible_window`) when windows are on and, with ``window_below``, the scorer is unsure of
        ``logits`` (see :func:`wants_windows`); its own padded box (:func:`crop_box`) otherwise."""
        size = perception.image_size or image_size
        if logits is not None and not wants_windows(logits, self.config):
            return [crop_box(r, self.config) for r in perception.regions]
        return [legible_window(r, self.config, size) for r in perception.regions]

    def propose(self, images: Sequence[Image.Image], questions: Sequence[str], evidence=None) -> list[Proposal]:
        """Up to ``k`` boxes per (image, question); ``evidence`` is ignored (no human box is read)."""
        out = []
        for image, question in zip(images, questions, strict=True):
            p = self.perceiver.perceive(image)
            if not p.regions:
                out.append(Proposal(error="the reader found no text line", shared_seconds=p.shared_seconds))
                continue
            logits = self.logits(p, question)
            crops = self.crops(p, image.size, logits)
            wide = wants_windows(logits, self.config)
            if self.prior is None:  # suppress on what is cut (windows, or the padded boxes of tight crops)
                idx = select_boxes(p.regions, logits, self.config, crops=crops)
                lead = ()
            else:
                lead = self.prior.propose([image], [question])[0].boxes
                covered = np.array([lead[0].coverage(r.box) >= self.config.suppress for r in p.regions])
                idx = select_boxes(p.regions, np.where(covered, -np.inf, logits), self.config, self.config.k - 1,
                                   crops)  # fmt: skip
            if wide and self.config.window_tiles > 1:  # wide windows read as legible tiles
                size = p.image_size or image.size
                boxes = lead + tuple(b for i in idx for b in legible_tiles(p.regions[i], self.config, size))
            else:
                boxes = lead + tuple(crops[i] for i in idx)
            raw = " | ".join(p.regions[i].text for i in idx)
            out.append(Proposal(boxes, raw=raw, shared_seconds=p.shared_seconds))
        return out
