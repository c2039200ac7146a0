"""Boxes, box text formats, budgets and crop/resize helpers (the AwaRes crop set is in :mod:`zoomvlm.awares.protocol`).

Everything here is pure (no model, no I/O) and is the single place where coordinates change frame.

Coordinate frames used across zoomvlm:

- **normalised** (`Box`): ``x0, y0, x1, y1`` as fractions of the image width/height, in ``[0, 1]``,
  origin top-left, ``x0 <= x1``, ``y0 <= y1``. Frame-free: the same Box applies to any resize of the
  image, which is why it is the only box type passed between modules.
- **percent text** (CropVLM): ``"[x1, y1, x2, y2]."`` with integer percentages 0..100.
- **pixel**: integer ``(x0, y0, x1, y1)`` in one concrete image, half-open (PIL's ``crop`` convention).
- **bbox_2d** (Qwen2.5-VL grounding): absolute pixels in the frame of the *resized* image the model saw.

>>> b = parse_percent_box("[10, 20, 60, 80].")
>>> b
Box(x0=0.1, y0=0.2, x1=0.6, y1=0.8)
>>> format_percent_box(b)
'[10, 20, 60, 80].'
>>> round(b.iou(Box(0.1, 0.2, 0.6, 0.5)), 3)
0.5
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from PIL import Image

__all__ = [
    "Box",
    "BoxFormatError",
    "Budget",
    "crop_image",
    "half_resolution_budget",
    "expand_small_box",
    "format_bbox_2d",
    "format_percent_box",
    "format_percent_boxes",
    "parse_bbox_2d",
    "parse_percent_box",
    "parse_percent_boxes",
    "percentile_thresholds",
    "resize_to_budget",
    "same_scale_budget",
]

_EPS = 1e-9


class BoxFormatError(ValueError):
    """A box (or box text) is malformed; the message says why, e.g. ``"x2 (10) must be > x1 (40)"``."""


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in the normalised frame: fractions of width/height in ``[0, 1]``.

    Args:
        x0, y0: top-left corner (fractions of width, height).
        x1, y1: bottom-right corner; ``x1 >= x0`` and ``y1 >= y0``.

    Raises:
        BoxFormatError: a coordinate is not finite, lies outside ``[0, 1]``, or the box is inverted.
    """

    x0: float
    y0: float
    x1: float
    y1: float

    def __post_init__(self) -> None:
        coords = (self.x0, self.y0, self.x1, self.y1)
        # numbers.Real: numpy scalars out of a model's arrays are numbers too; a bool is not a coordinate
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in coords):
            raise BoxFormatError(f"box coordinates must be finite numbers, got {coords}")
        if not all(-_EPS <= v <= 1 + _EPS for v in coords):
            raise BoxFormatError(f"normalised box coordinates must lie in [0, 1], got {coords}")
        if self.x1 < self.x0 or self.y1 < self.y0:
            raise BoxFormatError(f"box is inverted (need x0 <= x1 and y0 <= y1), got {coords}")
        # Snap the tolerated rounding noise so downstream maths never sees -1e-12.
        for name in ("x0", "y0", "x1", "y1"):
            object.__setattr__(self, name, float(min(1.0, max(0.0, getattr(self, name)))))

    # ---- constructors -------------------------------------------------------------------------
    @classmethod
    def full(cls) -> Box:
        """The whole image, ``[0, 0, 1, 1]``."""
        return cls(0.0, 0.0, 1.0, 1.0)

    @classmethod
    def from_pixels(cls, box: Sequence[float], width: int, height: int) -> Box:
        """Normalise a pixel box ``(x0, y0, x1, y1)`` of an image of ``width x height`` pixels.

        Coordinates outside the image are clipped to it.

        Raises:
            BoxFormatError: not 4 finite real numbers (strings and booleans are refused, not coerced), inverted,
                empty after clipping, or every coordinate <= 1 on an image larger than 1 px (a NORMALISED box
                given where pixels are expected: read as pixels it would be a dot in the top-left corner).
        """
        if isinstance(box, (str, bytes)) or len(box) != 4:
            raise BoxFormatError(f"a pixel box needs 4 numbers, got {box!r}")
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in box):
            raise BoxFormatError(f"a pixel box needs 4 finite numbers, got {list(box)!r}")
        x0, y0, x1, y1 = (float(v) for v in box)
        if x1 <= x0 or y1 <= y0:
            raise BoxFormatError(f"pixel box is empty or inverted: {[x0, y0, x1, y1]}")
        if max(x0, y0, x1, y1) <= 1.0 and max(width, height) > 1:
            raise BoxFormatError(
                f"pixel box {[x0, y0, x1, y1]} has every coordinate <= 1 on a {width}x{height} image: it looks "
                "normalised; boxes here are in pixels of the image"
            )
        x0, x1 = (min(max(v, 0.0), width) / width for v in (x0, x1))
        y0, y1 = (min(max(v, 0.0), height) / height for v in (y0, y1))
        if x1 <= x0 or y1 <= y0:
            raise BoxFormatError(f"pixel box {list(box)} lies outside the {width}x{height} image")
        return cls(x0, y0, x1, y1)

    # ---- measures -----------------------------------------------------------------------------
    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        """Fraction of the image area covered, in ``[0, 1]``."""
        return self.width * self.height

    @property
    def center(self) -> tuple[float, float]:
        return ((self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2)

    def intersection(self, other: Box) -> float:
        """Area (fraction of the image) of the overlap with ``other``."""
        w = min(self.x1, other.x1) - max(self.x0, other.x0)
        h = min(self.y1, other.y1) - max(self.y0, other.y0)
        return max(0.0, w) * max(0.0, h)

    def iou(self, other: Box) -> float:
        """Intersection over union in ``[0, 1]``; 0 when both boxes are empty."""
        inter = self.intersection(other)
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0

    def coverage(self, other: Box) -> float:
        """Fraction of ``other``'s area that lies inside this box, in ``[0, 1]`` (1 = fully covered)."""
        return self.intersection(other) / other.area if other.area > 0 else 0.0

    # ---- transforms ---------------------------------------------------------------------------
    def to_pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """Smallest integer pixel box (half-open) of a ``width x height`` image that contains this box.

        Always at least 1 px wide and high, so a degenerate box still crops something.
        """
        x0 = min(int(math.floor(self.x0 * width + _EPS)), width - 1)
        y0 = min(int(math.floor(self.y0 * height + _EPS)), height - 1)
        x1 = max(int(math.ceil(self.x1 * width - 1e-6)), x0 + 1)
        y1 = max(int(math.ceil(self.y1 * height - 1e-6)), y0 + 1)
        return x0, y0, min(x1, width), min(y1, height)

    def pad(self, dx: float, dy: float) -> Box:
        """Grow by ``dx`` (fraction of width) left and right and ``dy`` top and bottom, clipped to the image."""
        return Box(max(0.0, self.x0 - dx), max(0.0, self.y0 - dy), min(1.0, self.x1 + dx), min(1.0, self.y1 + dy))

    def scale(self, factor: float) -> Box:
        """Scale each side by ``factor`` about the centre, shift back inside the image, then clamp.

        A side longer than the image becomes the whole side. Shifting (not just clamping) keeps the
        requested size where it fits, as in CropVLM's expansion rule.
        """
        cx, cy = self.center
        w, h = min(1.0, self.width * factor), min(1.0, self.height * factor)
        x0, y0 = cx - w / 2, cy - h / 2
        x0 = min(max(x0, 0.0), 1.0 - w)
        y0 = min(max(y0, 0.0), 1.0 - h)
        return Box(x0, y0, min(1.0, x0 + w), min(1.0, y0 + h))

    def union(self, other: Box) -> Box:
        """Smallest box containing both."""
        return Box(min(self.x0, other.x0), min(self.y0, other.y0), max(self.x1, other.x1), max(self.y1, other.y1))

    def as_list(self, ndigits: int = 4) -> list[float]:
        """``[x0, y0, x1, y1]`` rounded, for JSON output."""
        return [round(v, ndigits) for v in (self.x0, self.y0, self.x1, self.y1)]


# ---------------------------------------------------------------------------------------------
# CropVLM percent text: "[x1, y1, x2, y2]."  (METHODS.md, CropVLM "Box format")
# ---------------------------------------------------------------------------------------------
_NUMBER = r"[-+]?\d+(?:\.\d+)?"


def format_percent_box(box: Box) -> str:
    """Render a Box as CropVLM's target text ``"[x1, y1, x2, y2]."`` in integer percentages.

    The low corner is rounded down and the high corner up, so the text box always contains the box
    and is never empty (``x2 > x1``, ``y2 > y1``), hence always valid for :func:`parse_percent_box`.
    """
    x0 = min(int(math.floor(box.x0 * 100 + 1e-6)), 99)
    y0 = min(int(math.floor(box.y0 * 100 + 1e-6)), 99)
    x1 = max(int(math.ceil(box.x1 * 100 - 1e-6)), x0 + 1)
    y1 = max(int(math.ceil(box.y1 * 100 - 1e-6)), y0 + 1)
    return f"[{x0}, {y0}, {x1}, {y1}]."


def format_percent_boxes(boxes: Sequence[Box]) -> str:
    """Render one or more Boxes as the multi-box text ``"[x1, y1, x2, y2], [x1, y1, x2, y2]."``.

    Each box is rounded as in :func:`format_percent_box`; one box gives exactly :func:`format_percent_box`'s text.

    Raises:
        BoxFormatError: no box.
    """
    if not boxes:
        raise BoxFormatError("the box text needs at least one box")
    return ", ".join(format_percent_box(b)[:-1] for b in boxes) + "."


def _parse_box_list(inner: str, shown: str) -> Box:
    """One ``x1, y1, x2, y2`` list (the text between the brackets) -> Box, by CropVLM's validity rule."""
    parts = [p.strip() for p in inner.split(",")]
    if parts == [""]:
        parts = []
    if len(parts) != 4:
        raise BoxFormatError(f"expected 4 numbers, got {len(parts)} in {shown!r}")
    values = []
    for p in parts:
        if not re.fullmatch(_NUMBER, p):
            raise BoxFormatError(f"{p!r} is not a number in {shown!r}")
        values.append(float(p))
    for name, v in zip(("x1", "y1", "x2", "y2"), values, strict=True):
        if not 0 <= v <= 100:
            raise BoxFormatError(f"{name} = {v:g} is outside [0, 100]")
    x1, y1, x2, y2 = values
    if x2 <= x1:
        raise BoxFormatError(f"x2 ({x2:g}) must be > x1 ({x1:g})")
    if y2 <= y1:
        raise BoxFormatError(f"y2 ({y2:g}) must be > y1 ({y1:g})")
    return Box(x1 / 100, y1 / 100, x2 / 100, y2 / 100)


_BOX_LIST = re.compile(r"\[([^\[\]]*)\]")


def parse_percent_box(text: str) -> Box:
    """Parse CropVLM's box text ``"[x1, y1, x2, y2]."`` (percentages of width/height) into a Box.

    Tolerant of whitespace, a missing trailing period and decimals. Valid iff the first bracketed
    list holds exactly 4 numbers, each in ``[0, 100]``, with ``x2 > x1`` and ``y2 > y1`` (CropVLM's
    validity rule, which the ``format`` reward scores). Later lists are ignored: see
    :func:`parse_percent_boxes` for the multi-box grammar.

    Raises:
        BoxFormatError: with the reason, e.g. ``"expected 4 numbers, got 3"``.
    """
    if not isinstance(text, str):
        raise BoxFormatError(f"expected box text, got {type(text).__name__}")
    match = _BOX_LIST.search(text)
    if match is None:
        raise BoxFormatError(f"no [x1, y1, x2, y2] list found in {text.strip()[:60]!r}")
    return _parse_box_list(match.group(1), match.group(0))


def parse_percent_boxes(text: str, max_boxes: int | None = None) -> list[Box]:
    """Parse the multi-box text ``"[x1, y1, x2, y2], [x1, y1, x2, y2]."`` into Boxes, in order.

    Every bracketed list in ``text`` is one box, each valid by :func:`parse_percent_box`'s rule (4 numbers in
    ``[0, 100]``, ``x2 > x1``, ``y2 > y1``), with its tolerance (whitespace, decimals, no period). The
    canonical text (:func:`format_percent_boxes`) separates boxes by ``", "`` and ends with ``"."``; a single
    box is CropVLM's format. One invalid box makes the whole text invalid (no partial answers, so the
    ``format`` reward and the failure count mean one thing).

    Args:
        max_boxes: at most this many boxes (``None``: no limit).

    Raises:
        BoxFormatError: no list, more than ``max_boxes`` lists, or an invalid list (the reason names which).
        ValueError: ``max_boxes`` < 1.
    """
    if max_boxes is not None and max_boxes < 1:
        raise ValueError(f"max_boxes must be >= 1, got {max_boxes}")
    if not isinstance(text, str):
        raise BoxFormatError(f"expected box text, got {type(text).__name__}")
    lists = list(_BOX_LIST.finditer(text))
    if not lists:
        raise BoxFormatError(f"no [x1, y1, x2, y2] list found in {text.strip()[:60]!r}")
    if max_boxes is not None and len(lists) > max_boxes:
        raise BoxFormatError(f"expected at most {max_boxes} box(es), got {len(lists)}")
    boxes = []
    for i, match in enumerate(lists):
        try:
            boxes.append(_parse_box_list(match.group(1), match.group(0)))
        except BoxFormatError as err:
            raise BoxFormatError(f"box {i + 1}: {err}" if len(lists) > 1 else str(err)) from None
    return boxes


# ---------------------------------------------------------------------------------------------
# Qwen2.5-VL grounding output: {"bbox_2d": [x1, y1, x2, y2]} in the RESIZED frame it saw
# ---------------------------------------------------------------------------------------------
def parse_bbox_2d(text: str, seen_size: tuple[int, int]) -> Box:
    """Parse the first ``"bbox_2d": [x1, y1, x2, y2]`` in a grounding VLM's answer into a normalised Box.

    Qwen2.5-VL answers in absolute pixels of the image *after its processor resized it*
    (``seen_size = (width, height)``, e.g. from ``image_grid_thw * patch_size``). Dividing by that
    size gives the normalised box, valid for the original image too. (The official CropVLM code
    divides by the original size, which shifts every box when the processor resized the image.)

    Accepts fenced JSON, a list of objects or one object; the first box wins. Coordinates beyond the
    seen frame are clipped.

    Raises:
        BoxFormatError: no ``bbox_2d`` with 4 numbers, or an empty/inverted box.
    """
    match = re.search(r"[\"']?bbox_2d[\"']?\s*:\s*(\[[^\[\]]*\])", text)
    if match is None:
        raise BoxFormatError(f"no bbox_2d field in {text.strip()[:80]!r}")
    try:
        values = json.loads(match.group(1))
    except json.JSONDecodeError as err:
        raise BoxFormatError(f"bbox_2d is not a JSON list: {match.group(1)!r}") from err
    if len(values) != 4 or not all(isinstance(v, (int, float)) for v in values):
        raise BoxFormatError(f"bbox_2d needs 4 numbers, got {values!r}")
    return Box.from_pixels(values, *seen_size)


def format_bbox_2d(box: Box, seen_size: tuple[int, int]) -> str:
    """Render a Box as Qwen2.5-VL grounding JSON in the pixel frame ``seen_size = (width, height)``."""
    coords = box.to_pixels(*seen_size)
    return json.dumps([{"bbox_2d": list(coords)}])


# ---------------------------------------------------------------------------------------------
# CropVLM percentile expansion of small seed boxes (METHODS.md, "Small-box expansion")
# ---------------------------------------------------------------------------------------------
_PERCENTILES = (0.2, 0.4, 0.6, 0.8)
_AREA_MULTIPLIERS = (45.0, 10.0, 4.0, 2.0, 1.0)


def percentile_thresholds(area_ratios: Iterable[float]) -> tuple[float, float, float, float]:
    """The p20, p40, p60, p80 thresholds of box-area/image-area ratios over a whole seed set.

    Nearest-rank on the sorted ratios: ``p_q = sorted_r[min(n - 1, floor(q * n))]``.

    Raises:
        ValueError: no ratios.
    """
    r = sorted(float(v) for v in area_ratios)
    if not r:
        raise ValueError("percentile_thresholds needs at least one area ratio")
    n = len(r)
    return tuple(r[min(n - 1, int(math.floor(q * n)))] for q in _PERCENTILES)  # type: ignore[return-value]


def expand_small_box(box: Box, thresholds: Sequence[float]) -> Box:
    """CropVLM's small-box expansion: grow a seed box's AREA by a multiplier picked by its area percentile.

    With ``r = box.area`` and thresholds ``(p20, p40, p60, p80)`` from :func:`percentile_thresholds`:
    ``r < p20 -> x45, < p40 -> x10, < p60 -> x4, < p80 -> x2, else x1``. Each side scales by
    ``sqrt(multiplier)`` about the centre, is shifted back inside the image, then clamped
    (CropVLM paper, seed-data section; METHODS.md).
    """
    r = box.area
    multiplier = _AREA_MULTIPLIERS[-1]
    for threshold, m in zip(thresholds, _AREA_MULTIPLIERS, strict=False):
        if r < threshold:
            multiplier = m
            break
    return box.scale(math.sqrt(multiplier)) if multiplier != 1.0 else box


# ---------------------------------------------------------------------------------------------
# Images: crops from the ORIGINAL image, and views resized to a budget
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """How large a view a target may consume: a cap on the longest side and/or on the pixel count.

    ``Budget()`` (both None) means native resolution. Images are only ever shrunk, never upscaled.

    >>> Budget.parse("384")
    Budget(max_side=384, max_pixels=None)
    >>> Budget.parse("pixels:200000"), Budget.parse("native").is_native
    (Budget(max_side=None, max_pixels=200000), True)
    """

    max_side: int | None = None
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_side", "max_pixels"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"Budget.{name} must be a positive integer or None, got {v!r}")

    @property
    def is_native(self) -> bool:
        return self.max_side is None and self.max_pixels is None

    @classmethod
    def parse(cls, spec: Budget | str | int | None) -> Budget:
        """``384`` / ``"384"`` / ``"side:384"`` -> longest side; ``"pixels:N"`` -> pixel cap;
        ``None`` / ``"native"`` / ``"full"`` -> no limit; a :class:`Budget` is returned as is (so every
        constructor that takes a budget takes any of these forms through this one call).

        Raises:
            ValueError: anything else, with the accepted forms.
        """
        if isinstance(spec, Budget):  # Budget.parse(Budget(max_side=384)) is Budget(max_side=384)
            return spec
        if isinstance(spec, bool):
            raise ValueError(f"cannot read budget {spec!r}: use e.g. 384, side:384, pixels:200000 or native")
        if spec is None or isinstance(spec, int):
            return cls(max_side=spec)
        s = str(spec).strip().lower()
        if s in ("native", "full", "none", ""):
            return cls()
        if "," in s:  # both caps, as __str__ writes them: "side:384,pixels:200000"
            parts = [cls.parse(part) for part in s.split(",")]
            sides = [b.max_side for b in parts if b.max_side is not None]
            pixels = [b.max_pixels for b in parts if b.max_pixels is not None]
            if len(parts) == 2 and len(sides) == 1 and len(pixels) == 1:
                return cls(max_side=sides[0], max_pixels=pixels[0])
            raise ValueError(f"cannot read budget {spec!r}: two caps are written side:N,pixels:M")
        kind, _, value = s.rpartition(":")
        if value.isdigit() and kind in ("", "side"):
            return cls(max_side=int(value))
        if value.isdigit() and kind in ("pixels", "px"):
            return cls(max_pixels=int(value))
        raise ValueError(f"cannot read budget {spec!r}: use e.g. 384, side:384, pixels:200000 or native")

    def __str__(self) -> str:
        """``native``, ``side:N``, ``pixels:M`` or, with both caps, ``side:N,pixels:M`` (what :meth:`parse` reads back;
        the response cache and ``run.json`` key on it, so two different budgets never share a string)."""
        if self.is_native:
            return "native"
        if self.max_pixels is None:
            return f"side:{self.max_side}"
        if self.max_side is None:
            return f"pixels:{self.max_pixels}"
        return f"side:{self.max_side},pixels:{self.max_pixels}"

    def fit(self, width: int, height: int) -> tuple[int, int]:
        """The size ``(w, h)`` an image of ``width x height`` takes under this budget (aspect kept)."""
        scale = 1.0
        if self.max_side is not None:
            scale = min(scale, self.max_side / max(width, height))
        if self.max_pixels is not None:
            scale = min(scale, math.sqrt(self.max_pixels / (width * height)))
        if scale >= 1.0:
            return width, height
        return max(1, int(width * scale)), max(1, int(height * scale))


def resize_to_budget(image: Image.Image, budget: Budget) -> Image.Image:
    """Shrink ``image`` to fit ``budget`` (bicubic, aspect ratio kept); returned unchanged if it fits."""
    size = budget.fit(*image.size)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.BICUBIC)


def crop_image(image: Image.Image, box: Box) -> Image.Image:
    """Cut ``box`` out of ``image`` (which should be the ORIGINAL, full-resolution image)."""
    return image.crop(box.to_pixels(*image.size))


def same_scale_budget(box: Box, width: int, height: int, reference: Budget) -> Budget:
    """The budget that gives the crop ``box`` of a ``width x height`` image the SAME scale (pixels per
    original pixel) as the whole image under ``reference``.

    AwaRes's high-resolution crops: a quadrant of the high-resolution view costs 0.25 of that view, so
    RTR adds up (low view 0.25 + one quadrant 0.25 = 0.5). Native ``reference`` -> native crop.
    """
    if reference.is_native:
        return Budget()
    fw, _ = reference.fit(width, height)
    scale = fw / width
    cx0, cy0, cx1, cy1 = box.to_pixels(width, height)
    return Budget(max_side=max(1, math.ceil(max(cx1 - cx0, cy1 - cy0) * scale)))


def half_resolution_budget(width: int, height: int, reference: Budget) -> Budget:
    """AwaRes's low-resolution view: the ``reference`` (high-resolution) view of a ``width x height`` image
    with each side halved, i.e. a quarter of its pixels (RTR 0.25 against the reference).

    >>> half_resolution_budget(1000, 2000, Budget(max_side=768))
    Budget(max_side=384, max_pixels=None)
    """
    fw, fh = reference.fit(width, height)
    return Budget(max_side=max(1, max(fw, fh) // 2))
