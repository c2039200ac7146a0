"""The AwaRes protocol, shared by self-zoom, the external crop-set policy, curation and training.

AwaRes (METHODS.md; awares_paper_excerpt sec. 3.1): turn 1 shows a LOW-resolution view of the whole
image (the high-resolution view with each side halved: a quarter of its pixels) and the question; the
model either answers directly or emits ``GET_CROPS: [...]`` naming regions of the fixed crop set
(:data:`~zoomvlm.awares.protocol.CROP_SET`); the requested crops, cut from the ORIGINAL image at the
high-resolution view's scale, are appended as a new user turn and the model answers.

Frames and units: crop keys name normalised regions; images here are PIL images; budgets are
:class:`~zoomvlm.core.geometry.Budget`. ``high`` is the reference (high-resolution) budget: RTR is counted
against the whole image under it (the low view is 0.25, a quadrant another 0.25).

A trajectory record (one JSONL line written by ``zoomvlm curate awares``) is::

    {"id", "image": "/abs/path.jpg", "question", "answers": [...], "answer": "the supervised answer",
     "label": "LR" | "HR", "crops": [] | ["3", ...], "high": "side:768", ...}

and :func:`trajectory_messages` / :func:`trajectory_images` turn it into the conversation and its images.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from zoomvlm.core.geometry import Box, Budget, crop_image, half_resolution_budget, resize_to_budget, same_scale_budget
from zoomvlm.core.prompts import clean_question, completion_text

__all__ = [
    "AWARES_RELEASED_CROPS_MAP",
    "AWARES_RELEASED_SYSTEM_PROMPT",
    "PROTOCOLS",
    "SelfZoomProtocol",
    "AWARES_SYSTEM_PROMPT",
    "CROP_SET",
    "CROP_SETS",
    "CROP_SET_NAMES",
    "FINE_BANDS",
    "FINE_CROP_SET",
    "CROP_SET_POLICY_TEMPLATE",
    "NO_CROPS",
    "ToolCallError",
    "awares_action",
    "crop_region",
    "crop_set_area",
    "crop_set_sent_area",
    "covering_crops",
    "crop_set_coverage",
    "crop_set_policy_prompt",
    "crops_for_box",
    "format_get_crops",
    "parse_crop_action",
    "parse_get_crops",
    "parse_tool_call",
    "crop_budgets",
    "crop_set_proposal",
    "high_res_crops",
    "low_res_budget",
    "low_res_view",
    "tool_output_text",
    "trajectory_images",
    "trajectory_messages",
]


class ToolCallError(ValueError):
    """A ``GET_CROPS`` tool call was attempted but cannot be parsed; the message says why."""


# ---------------------------------------------------------------------------------------------
# AwaRes crop set and GET_CROPS tool calls (METHODS.md, AwaRes)
# ---------------------------------------------------------------------------------------------
CROP_SET: dict[str, Box] = {
    "0": Box(0.0, 0.0, 0.5, 0.5),  # top-left quadrant
    "1": Box(0.5, 0.0, 1.0, 0.5),  # top-right quadrant
    "2": Box(0.0, 0.5, 0.5, 1.0),  # bottom-left quadrant
    "3": Box(0.5, 0.5, 1.0, 1.0),  # bottom-right quadrant
    "4": Box(0.25, 0.25, 0.75, 0.75),  # center, half-size
    "5": Box(0.0, 0.0, 1.0, 0.5),  # top half
    "6": Box(0.0, 0.5, 1.0, 1.0),  # bottom half
    "7": Box(0.0, 0.0, 0.5, 1.0),  # left half
    "8": Box(0.5, 0.0, 1.0, 1.0),  # right half
    "all": Box(0.0, 0.0, 1.0, 1.0),
}
"""AwaRes's fixed crop set, index -> normalised region (quadrants, center, halves, all)."""

CROP_SET_NAMES: dict[str, str] = {
    "0": "top-left", "1": "top-right", "2": "bottom-left", "3": "bottom-right", "4": "center",
    "5": "top", "6": "bottom", "7": "left", "8": "right", "all": "all",
}  # fmt: skip
_CROP_ALIASES = {v.replace("-", " "): k for k, v in CROP_SET_NAMES.items()} | {
    "centre": "4", "middle": "4", "full": "all", "whole": "all", "whole image": "all",
}  # fmt: skip


FINE_BANDS: dict[str, Box] = {
    **{f"h{i}": Box(0.0, i / 8, 1.0, (i + 1) / 8) for i in range(8)},
    **{f"h{i}l": Box(0.0, i / 8, 0.5, (i + 1) / 8) for i in range(8)},
    **{f"h{i}r": Box(0.5, i / 8, 1.0, (i + 1) / 8) for i in range(8)},
    **{f"s{i}": Box(0.0, (2 * i + 1) / 16, 1.0, (2 * i + 3) / 16) for i in range(7)},
    **{f"s{i}l": Box(0.0, (2 * i + 1) / 16, 0.5, (2 * i + 3) / 16) for i in range(7)},
    **{f"s{i}r": Box(0.5, (2 * i + 1) / 16, 1.0, (2 * i + 3) / 16) for i in range(7)},
}
"""The bands the fine crop set adds: ``h0``..``h7`` the eighths of the height at full width (``h0`` at the top),
``s0``..``s6`` the same bands shifted down by 1/16 (``s0`` spans 1/16..3/16), and the left / right halves of each
(``h3l``, ``s3r``): 1/8 and 1/16 of the image."""

FINE_CROP_SET: dict[str, Box] = {**CROP_SET, **FINE_BANDS}
"""The finer crop set for text documents (an OPTION of the external ``crop-set-reader`` policy; AwaRes's
:data:`CROP_SET` stays the default everywhere): AwaRes's 10 regions plus :data:`FINE_BANDS` (55 regions).

Why these: the evidence of a text question is a line, and with AwaRes's set the smallest region holding a line
is a quadrant or a half (0.25-0.5 of the high view; the README measured the interface's ceiling at RTR 0.44 on
receipts). A line is 1-3 % of a page's height, so an eighth-height band (0.125) holds it, and the half of a
band (0.0625) when the line sits in one column (a receipt's total or date printed right or left of its label);
the shifted bands put every band edge 1/16 from an edge of the other family, so a line whose padded box is at most
1/16 of the height high always fits ONE band (without them a padded line straddles an edge about a third of the
time and costs two). AwaRes's regions stay in the set, so a block of text is still one request. Regions are
named by key only; they are not part of the ``GET_CROPS`` grammar of the VLM protocol (:func:`parse_get_crops`
reads :data:`CROP_SET` keys only), since the external policy emits no text."""

CROP_SETS: dict[str, dict[str, Box]] = {"awares": CROP_SET, "fine": FINE_CROP_SET}
"""The crop sets by name (``crop_set`` of a ``crop-set-reader`` checkpoint): ``awares`` (default) or ``fine``."""


def parse_get_crops(text: str) -> list[str] | None:
    """Parse an AwaRes tool call ``GET_CROPS: ['0', '5']`` into crop-set keys, or None if there is none.

    Tolerant where the official parser is not: any case, optional colon, single/double/no quotes,
    spaces, crop names (``'top-left'``) as well as indices, ``all``. Duplicates are dropped, order kept.

    The call may come anywhere in the text, after prose that names it ("I will use GET_CROPS ... GET_CROPS:
    ['3']") and in markdown (``**GET_CROPS**: ['3']``, backticks): the first mention followed by a list is the
    call. Near-miss spellings (``GET_CROP``, ``GET-CROPS``) are read as the call too, never as a direct answer.

    Returns:
        ``None`` when the text holds no call: no mention at all, or only the plain words "get crops" with no list
        after them (an answer that says "they get crops from the field"), else the list of keys of
        :data:`CROP_SET`.

    Raises:
        ToolCallError: the call's token (``GET_CROPS``, ``GETCROPS``, ``GET-CROP``...) is present but no list
            follows any mention, or the list is empty or names an unknown crop. Callers count these; they are
            never silently replaced by the full image.
    """
    # whole words only: "budget crops" or "Target crops: wheat" in an answer are not tool calls
    mentions = list(re.finditer(r"\bget([_\- ]?)crops?\b", text, flags=re.IGNORECASE))
    if not mentions:
        return None
    listed = None
    for mention in mentions:
        listed = re.match(r"[\s:*`=]*\[([^\]]*)\]", text[mention.end() :])
        if listed is not None:
            break
    if listed is None:
        if all(_in_prose(m, text) for m in mentions):  # the words in prose, not the call's token
            return None
        raise ToolCallError(f"GET_CROPS without a [...] list: {text.strip()[:80]!r}")
    items = [t.strip().strip("'\"").strip().lower() for t in listed.group(1).split(",")]
    if "" in items[:-1] and any(items):  # ['3',,'4']: a missing key (a trailing comma is tolerated)
        raise ToolCallError(f"GET_CROPS list with an empty entry: {listed.group(0).strip()[:80]!r}")
    items = [t for t in items if t]
    if not items:
        raise ToolCallError("GET_CROPS with an empty list")
    keys: list[str] = []
    for item in items:
        key = item if item in CROP_SET else _CROP_ALIASES.get(item.replace("-", " ").replace("_", " "))
        if key is None:
            raise ToolCallError(f"unknown crop {item!r}; valid: {', '.join(CROP_SET)}")
        if key not in keys:
            keys.append(key)
    return keys


def _in_prose(mention: re.Match, text: str) -> bool:
    """A "get crops" mention that is plain words of an answer, not the call: spelled with a space, not in capitals,
    and not followed by ``:`` or ``=`` (``GET CROPS: '3'`` is a malformed call, and counted as one)."""
    return (
        mention.group(1) == " "
        and not mention.group(0).isupper()
        and re.match(r"[\s*`]*[:=]", text[mention.end() :]) is None
    )


def format_get_crops(keys: Sequence[str]) -> str:
    """Render crop-set keys as the canonical tool call, e.g. ``GET_CROPS: ['0', '5']``.

    Raises:
        ToolCallError: a key is not in :data:`CROP_SET`, or no key is given.
    """
    if not keys:
        raise ToolCallError("a tool call needs at least one crop")
    bad = [k for k in keys if k not in CROP_SET]
    if bad:
        raise ToolCallError(f"unknown crop(s) {bad}; valid: {', '.join(CROP_SET)}")
    return "GET_CROPS: [" + ", ".join(f"'{k}'" for k in keys) + "]"


def crop_region(key: str) -> Box:
    """The normalised region of a crop key of either crop set (:data:`CROP_SETS`): AwaRes's ``"0"``..``"8"``,
    ``"all"``, or a band of the fine set (``"h3"``, ``"h3l"``, ``"h3r"``).

    Raises:
        ToolCallError: a key of neither set.
    """
    box = FINE_CROP_SET.get(key)
    if box is None:
        raise ToolCallError(f"unknown crop {key!r}; valid: {', '.join(FINE_CROP_SET)}")
    return box


def crop_set_sent_area(keys: Sequence[str]) -> float:
    """Fraction of the image the target is SENT for the crop request ``keys``: the summed areas of the distinct
    crops (AwaRes's area(A) in ``C_tool``, sec. 3.4; what RTR counts).

    Each requested crop reaches the target as its own image, so an overlap is sent, and paid in image tokens,
    once per crop: ``['0', '5']`` sends 0.75 of the image although it covers 0.5 (:func:`crop_set_area`). The
    cost term therefore ranks a redundant request above a lean one with the same coverage. Keys of either crop
    set; a repeated key counts once (:func:`parse_get_crops` drops repeats before anything is sent).

    >>> crop_set_sent_area(['0']), crop_set_sent_area(['0', '5']), crop_set_sent_area(['4', 'all'])
    (0.25, 0.75, 1.25)

    Raises:
        ToolCallError: an unknown key.
    """
    return float(sum(crop_region(k).area for k in dict.fromkeys(keys)))


def crop_set_area(keys: Sequence[str]) -> float:
    """Fraction of the image covered by the UNION of the crop regions ``keys``: how much of the image the
    request shows (overlaps count once: ``['0', '5']`` covers 0.5). What a request COSTS is
    :func:`crop_set_sent_area`. Keys of either crop set (:data:`CROP_SETS`) are
    accepted. Exact for any rectangles: the union is summed over the cells of the grid the regions' own edges
    make (coordinate compression); every edge of both sets is a multiple of 1/16, so the sums are exact in floating
    point too.

    >>> crop_set_area(['0']), crop_set_area(['0', '5']), crop_set_area(['4', 'all'])
    (0.25, 0.5, 1.0)
    >>> crop_set_area(['h0']), crop_set_area(['h0l', 'h0r', 'h1']), crop_set_area(['0', 'h0', 'h3r'])
    (0.125, 0.25, 0.375)

    Raises:
        ToolCallError: an unknown key.
    """
    return _union_area([crop_region(k) for k in keys])


def crops_for_box(box: Box, iou_threshold: float) -> list[str]:
    """AwaRes curation: the crop subset for an evidence box, ``{c in CROP_SET : IoU(box, c) >= threshold}``.

    ``all`` is excluded (it is the answer for a whole-image box only). Evidence on receipts is often a thin
    text line whose IoU with any crop is tiny, so when no crop passes the threshold the subset is the
    SMALLEST crop containing >= 99 % of the box, else the crop of highest IoU (ties: the one covering more
    of the box). AwaRes sec. 3.2 defines the subset by the threshold only; the fallback is ours. Measured on
    the 760 OCR-grounded (model-made) seed boxes of receipts train, the subset fully covers the box for
    99.3 / 98.6 / 96.1 % of them at threshold 0.1 / 0.2 / 0.3, for a mean area of 0.42 / 0.39 / 0.38.

    >>> crops_for_box(Box(0.6, 0.6, 0.9, 0.9), 0.2)
    ['3']
    >>> crops_for_box(Box(0.1, 0.2, 0.9, 0.23), 0.2)  # a full-width line in the top half
    ['5']
    >>> crops_for_box(Box(0.0, 0.0, 1.0, 1.0), 0.2)
    ['all']

    Raises:
        ValueError: ``iou_threshold`` outside ``(0, 1]``.
    """
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    if box.area <= 0:  # a degenerate box (a point, a line): the smallest crop holding its centre, as covering_crops
        return list(covering_crops(box))
    if box.iou(CROP_SET["all"]) >= 0.999:
        return ["all"]
    crops = {k: c for k, c in CROP_SET.items() if k != "all"}
    ious = {k: box.iou(c) for k, c in crops.items()}
    chosen = [k for k, v in ious.items() if v >= iou_threshold]
    if chosen:
        return chosen
    covered = {k: box.intersection(c) / box.area if box.area > 0 else 0.0 for k, c in crops.items()}
    containing = [k for k, v in covered.items() if v >= 0.99]
    if containing:
        return [min(containing, key=lambda k: crops[k].area)]
    return [max(ious, key=lambda k: (ious[k], covered[k]))]


def _union_area(boxes: Sequence[Box], within: Box | None = None) -> float:
    """Exact area of the union of ``boxes`` (clipped to ``within`` when given), by coordinate compression."""
    if within is not None:
        boxes = [
            Box(max(b.x0, within.x0), max(b.y0, within.y0), min(b.x1, within.x1), min(b.y1, within.y1))
            for b in boxes
            if b.intersection(within) > 0
        ]
    xs = sorted({v for b in boxes for v in (b.x0, b.x1)})
    ys = sorted({v for b in boxes for v in (b.y0, b.y1)})
    area = 0.0
    for x0, x1 in zip(xs, xs[1:], strict=False):
        for y0, y1 in zip(ys, ys[1:], strict=False):
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            if any(b.x0 <= cx <= b.x1 and b.y0 <= cy <= b.y1 for b in boxes):
                area += (x1 - x0) * (y1 - y0)
    return area


def crop_set_coverage(keys: Sequence[str], box: Box) -> float:
    """Fraction of ``box``'s area inside the union of the crop regions ``keys`` (either set), exact; 0 for no key.

    >>> crop_set_coverage(['0'], Box(0.25, 0.25, 0.75, 0.5)), crop_set_coverage(['0', '1'], Box(0.25, 0.25, 0.75, 0.5))
    (0.5, 1.0)

    Raises:
        ToolCallError: an unknown key.
    """
    if box.area <= 0 or not keys:
        return 0.0
    return _union_area([crop_region(k) for k in keys], within=box) / box.area


def covering_crops(box: Box, crop_set: str = "awares", cover: float = 0.99, max_crops: int = 3) -> list[str]:
    """The cheapest crop subset of ``crop_set`` (a :data:`CROP_SETS` name) whose union covers ``box``.

    Among the subsets of at most ``max_crops`` regions that cover at least ``cover`` of ``box``'s area, the one
    that sends the target the least (:func:`crop_set_sent_area`, what RTR and ``C_tool`` count; overlapping crops
    are each sent whole), then fewest regions, then earliest keys in the set's order (so ``all`` rather than two
    halves that make the whole image). Unlike :func:`crops_for_box` (AwaRes's curation rule,
    IoU against a threshold, which can leave part of a line out), this never cuts the box: a crop edge through a
    text line loses the line. The external ``crop-set-reader`` policy uses it to turn a chosen reader region (padded)
    into its request.

    >>> covering_crops(Box(0.6, 0.6, 0.9, 0.9)), covering_crops(Box(0.1, 0.2, 0.9, 0.23))
    (['3'], ['5'])
    >>> covering_crops(Box(0.55, 0.3, 0.9, 0.33), "fine"), covering_crops(Box(0.1, 0.36, 0.9, 0.39), "fine")
    (['h2r'], ['s2'])

    Raises:
        KeyError: an unknown crop set. ValueError: ``cover`` outside ``(0, 1]`` or ``max_crops < 1``.
    """
    if crop_set not in CROP_SETS:
        raise KeyError(f"unknown crop set {crop_set!r}; use one of {sorted(CROP_SETS)}")
    if not 0.0 < cover <= 1.0 or max_crops < 1:
        raise ValueError(f"cover must be in (0, 1] and max_crops >= 1, got {cover}, {max_crops}")
    return list(_covering(box.as_list(6), crop_set, cover, max_crops))


@functools.lru_cache(maxsize=65536)
def _covering_cached(box: tuple[float, ...], crop_set: str, cover: float, max_crops: int) -> tuple[str, ...]:
    target = Box(*box)
    regions = CROP_SETS[crop_set]
    if target.area <= 0:  # a degenerate box: the smallest region holding its centre
        cx, cy = target.center
        holding = [k for k, b in regions.items() if b.x0 <= cx <= b.x1 and b.y0 <= cy <= b.y1]
        return (min(holding, key=lambda k: regions[k].area),)
    touching = [k for k, b in regions.items() if b.intersection(target) > 0]
    order = {k: i for i, k in enumerate(regions)}
    best: tuple[float, int, tuple[int, ...]] | None = None
    for n in range(1, max_crops + 1):
        # a subset sends at least its largest region: with a best subset found, only regions smaller than it can
        # make a better one (ties go to fewer regions, which the best already has)
        pool = touching if best is None else [k for k in touching if regions[k].area < best[0] - 1e-12]
        for subset in itertools.combinations(pool, n):
            boxes = [regions[k] for k in subset]
            if _union_area(boxes, within=target) < cover * target.area - 1e-12:
                continue
            rank = (sum(b.area for b in boxes), n, tuple(sorted(order[k] for k in subset)))
            if best is None or rank < best:
                best = rank
    if best is None:
        return ("all",)
    keys = list(regions)
    return tuple(keys[i] for i in best[2])


def _covering(box: Sequence[float], crop_set: str, cover: float, max_crops: int) -> tuple[str, ...]:
    return _covering_cached(tuple(float(v) for v in box), crop_set, cover, max_crops)


def _crop_set_listing() -> str:
    return ", ".join(f"'{k}' {'whole image' if k == 'all' else name}" for k, name in CROP_SET_NAMES.items())


AWARES_SYSTEM_PROMPT = (
    "You see a low-resolution view of an image. If it is enough to answer the question, answer directly "
    "and briefly. If fine details are too small to read, do not guess: request high-resolution crops with "
    "a tool call GET_CROPS: [...] listing one or more of " + _crop_set_listing() + ", "
    "e.g. GET_CROPS: ['3'] or GET_CROPS: ['0', '5']. The crops are returned to you; then answer briefly."
)
"""AwaRes self-zoom system prompt (turn 1). The paper publishes the protocol but not its prompt, so this
one is ours: it lists the crop set (:data:`~zoomvlm.awares.protocol.CROP_SET`) by index and name and shows the
exact tool-call syntax :func:`~zoomvlm.awares.protocol.parse_get_crops` reads."""

AWARES_RELEASED_CROPS_MAP: dict[str, str] = {k: v for k, v in CROP_SET_NAMES.items() if k != "all"}
"""The released AwaRes checkpoint's ``CROPS_MAP`` (NimrodShabtay/AwaRes README): ``{'0': 'top-left', '1':
'top-right', '2': 'bottom-left', '3': 'bottom-right', '4': 'center', '5': 'top', '6': 'bottom', '7': 'left',
'8': 'right'}``, the regions of :data:`CROP_SET` (its lmms-eval adapter's variant adds ``'all'``)."""

AWARES_RELEASED_SYSTEM_PROMPT = (
    "You are a vision-language model that analyzes images and answers questions about them. If the image "
    "resolution is too low for accurate analysis, respond with GET_CROPS: followed by a list of crop numbers in "
    "square brackets (e.g., GET_CROPS: ['3'] or GET_CROPS: ['0', '5']), where the available crop numbers and their "
    "corresponding areas are " + str(AWARES_RELEASED_CROPS_MAP) + ", otherwise provide your answer."
)
"""The system prompt ``Kimhi/AWARES-Qwen2.5-VL-7B`` was trained with (NimrodShabtay/AwaRes README), with
``{CROPS_MAP}`` filled as Python formats a dict in an f-string (``{'0': 'top-left', ...}``). Its tool call is the
``GET_CROPS: [...]`` that :func:`parse_get_crops` reads (more tolerantly than the authors' adapter, which accepts
one spelling only and silently falls back to the full image)."""

NO_CROPS = "NO_CROPS"
"""The external crop-set policy's no-crop action: the target answers from the low-resolution view alone."""

CROP_SET_POLICY_TEMPLATE = (
    "{question}\nCan this be answered from this low-resolution view? If yes, reply " + NO_CROPS + ". "
    "If not, reply GET_CROPS: [...] with the high-resolution crops to fetch: " + _crop_set_listing() + "."
)
"""Prompt of the external crop-set policy (a small VLM in front of a target that cannot be trained, e.g.
the OCR reader or an API): it sees the low-resolution view and emits ``NO_CROPS`` or ``GET_CROPS: [...]``."""


def crop_set_policy_prompt(question: str) -> str:
    """The external crop-set policy's user text for ``question``. Raises ValueError on an empty question."""
    return CROP_SET_POLICY_TEMPLATE.format(question=clean_question(question))


def parse_tool_call(text: str) -> tuple[list[str] | None, str | None]:
    """Self-zoom turn 1's action: ``(None, None)`` a direct answer, ``(keys, None)`` a valid ``GET_CROPS`` call,
    ``(None, error)`` an unparseable one (counted by the caller; its text is the final answer)."""
    try:
        return parse_get_crops(text), None
    except ToolCallError as err:
        return None, str(err)


def parse_crop_action(completion) -> tuple[list[str] | None, str | None]:
    """The external crop-set policy's action: ``([], None)`` for ``NO_CROPS``, ``(keys, None)`` for a valid
    ``GET_CROPS: [...]``, ``(None, error)`` for anything else (counted as a format failure).

    ``completion``: its text, or a TRL conversational completion (:func:`~zoomvlm.core.prompts.completion_text`).

    >>> parse_crop_action("NO_CROPS"), parse_crop_action("GET_CROPS: ['3']"), parse_crop_action("hm")[0]
    (([], None), (['3'], None), None)
    """
    text = completion_text(completion).strip()
    keys, error = parse_tool_call(text)
    if error is not None:
        return None, error
    if keys is not None:
        return keys, None
    if text.upper().startswith(NO_CROPS):
        return [], None
    return None, f"neither {NO_CROPS} nor GET_CROPS: {text[:60]!r}"


@dataclass(frozen=True)
class SelfZoomProtocol:
    """One named variant of the self-zoom conversation. Both share the crop set and the tool-call grammar of
    :func:`parse_get_crops`; they differ in prompts and in how the views are cut (``views``).

    Args:
        name: the spec suffix (``--policy self-zoom:NAME``).
        system: turn-1 system prompt.
        crops_text: whether the crops' user turn carries :func:`tool_output_text` after the images (ours) or holds
            ONLY the images (the released AwaRes model).
        high: the default high-resolution budget.
        views: ``same_scale`` (ours, what our recipes train: the low view is the ``high`` view halved per side and
            the crops are at the ``high`` view's scale, so RTR adds up 0.25 + 0.25 per quadrant) or ``released``
            (the AwaRes authors' lmms-eval adapter: the low view is the ORIGINAL image halved per side and each
            crop the original region, each image then capped by ``high`` separately, as their processor's
            ``max_pixels`` does). The two agree for images within ``high``; above it ``released`` shows more.
    """

    name: str
    system: str
    crops_text: bool
    high: Budget
    views: str = "same_scale"

    def __post_init__(self) -> None:
        if self.views not in VIEW_MODES:
            raise ValueError(f"views must be one of {VIEW_MODES}, got {self.views!r}")


VIEW_MODES = ("same_scale", "released")
"""How a self-zoom protocol cuts its low view and crops (see :class:`SelfZoomProtocol`)."""


PROTOCOLS: dict[str, SelfZoomProtocol] = {
    # The released Kimhi/AWARES-Qwen2.5-VL-7B as its authors run it (NimrodShabtay/AwaRes README and lmms-eval
    # adapter): their system prompt, crops-only user turn, Qwen max_pixels 2048*28*28 for the full-resolution view.
    # Views as their adapter cuts them: the original halved, crops from the original, each capped separately.
    "awares": SelfZoomProtocol(
        "awares", AWARES_RELEASED_SYSTEM_PROMPT, False, Budget(max_pixels=2048 * 28 * 28), views="released"
    ),
    # zoomvlm's own prompt (what our SFT/GRPO recipes train), with a text naming the returned crops; 768 px high
    # view as on the receipts testbed.
    "zoomvlm": SelfZoomProtocol("zoomvlm", AWARES_SYSTEM_PROMPT, True, Budget(max_side=768)),
}
"""Self-zoom protocol variants by name; ``awares`` (the released model's) is the default of ``--policy self-zoom``."""


def low_res_budget(image: Image.Image, high: Budget) -> Budget:
    """Budget of the turn-1 view: the ``high`` view of ``image`` with each side halved (0.25 of its pixels)."""
    return half_resolution_budget(*image.size, high)


def low_res_view(image: Image.Image, high: Budget, views: str = "same_scale") -> Image.Image:
    """The turn-1 low-resolution view of the ORIGINAL ``image`` (RGB): the ``high`` view halved per side
    (``same_scale``), or the original halved per side and then capped by ``high`` (``released``, the AwaRes
    authors' adapter; see :class:`SelfZoomProtocol`)."""
    rgb = image.convert("RGB")
    if views == "released":
        half = resize_to_budget(rgb, Budget(max_side=max(1, max(rgb.size) // 2)))
        return resize_to_budget(half, high)
    return resize_to_budget(rgb, low_res_budget(image, high))


def crop_budgets(image: Image.Image, keys: Sequence[str], high: Budget) -> list[Budget]:
    """Per-crop budgets that keep each crop at the ``high`` view's scale (see ``same_scale_budget``)."""
    return [same_scale_budget(crop_region(k), *image.size, high) for k in keys]


def high_res_crops(
    image: Image.Image, keys: Sequence[str], high: Budget, views: str = "same_scale"
) -> list[Image.Image]:
    """The requested crop-set regions cut from the ORIGINAL ``image`` (RGB): at the ``high`` view's scale
    (``same_scale``), or each at native resolution capped by ``high`` on its own (``released``).

    Raises:
        ToolCallError: a key of neither crop set (:func:`crop_region`; parse tool calls with
            :func:`~zoomvlm.awares.protocol.parse_get_crops` first).
    """
    rgb = image.convert("RGB")
    if views == "released":
        return [resize_to_budget(crop_image(rgb, crop_region(k)), high) for k in keys]
    return [
        resize_to_budget(crop_image(rgb, crop_region(k)), b)
        for k, b in zip(keys, crop_budgets(image, keys, high), strict=True)
    ]


def tool_output_text(keys: Sequence[str]) -> str:
    """The text that follows the crops in the tool-output turn, e.g. ``"High-resolution crops: '3' bottom-right."``."""
    return "High-resolution crops: " + ", ".join(f"'{k}' {CROP_SET_NAMES[k]}" for k in keys) + "."


def trajectory_messages(
    question: str,
    answer: str | None,
    crops: Sequence[str] = (),
    system: str | None = AWARES_SYSTEM_PROMPT,
    crops_text: bool = True,
) -> list[dict]:
    """The AwaRes conversation in the transformers/TRL multimodal message format.

    Direct answer (``crops`` empty): ``[system, user(image, question), assistant(answer)]``.
    Tool call: ``[system, user(image, question), assistant(GET_CROPS: [...]),
    user(image * len(crops), tool text), assistant(answer)]``: the crops come back as a new USER turn,
    as in AwaRes. ``answer=None`` leaves the final assistant turn out (a prompt for generation).
    Image placeholders are ``{"type": "image"}``; the images themselves are :func:`trajectory_images`.
    ``crops_text=False`` leaves the tool text out of the crops' user turn (the released AwaRes model's layout).
    """
    messages: list[dict] = []
    if system:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]})
    if crops:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": format_get_crops(list(crops))}]})
        content = [{"type": "image"} for _ in crops]
        if crops_text:
            content.append({"type": "text", "text": tool_output_text(crops)})
        messages.append({"role": "user", "content": content})
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def trajectory_images(image: Image.Image, crops: Sequence[str], high: Budget) -> list[Image.Image]:
    """The images of a trajectory in placeholder order: ``[low-res view, *high-res crops]``."""
    return [low_res_view(image, high), *high_res_crops(image, crops, high)]


def crop_set_proposal(
    image: Image.Image, keys: Sequence[str], high: Budget, raw: str | None = None, error: str | None = None
):
    """The :class:`~zoomvlm.policies.base.Proposal` for a crop-set action on ``image``: the low-resolution
    global view plus the requested regions at the high-resolution scale (``keys`` empty = low view only).

    The pipeline turns it into ``[low view, *crops]`` for any target, so the external crop-set policy, its
    GRPO reward and the evaluation all build the same views.
    """
    from zoomvlm.policies.base import Proposal

    return Proposal(
        boxes=tuple(crop_region(k) for k in keys),
        global_budget=low_res_budget(image, high),
        crop_budgets=tuple(crop_budgets(image, keys, high)),
        raw=raw,
        error=error,
    )


def _assistant_texts(completion) -> list[str]:
    if isinstance(completion, str):
        return [completion]
    return [completion_text([m]) for m in completion if m.get("role") == "assistant"]


def awares_action(completion) -> tuple[list[str] | None, str, str | None]:
    """``(crops, final answer, tool-call error)`` of one self-zoom rollout (a TRL conversational completion or a
    string).

    ``crops`` are the keys of turn 1's valid ``GET_CROPS`` call, else ``None``. The final answer is the last
    assistant turn after a valid call (``""`` if the rollout ended before turn 2), else turn 1's text: a direct
    answer, or an unparseable call (``error`` set), which is never replaced by the full image.
    """
    texts = _assistant_texts(completion) or [""]
    keys, error = parse_tool_call(texts[0])
    if keys:
        return keys, (texts[-1] if len(texts) > 1 else ""), None
    return None, texts[0], error
