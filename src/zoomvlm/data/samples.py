"""Samples and the JSONL dataset format (the format of ``shared/data/receipts``).

One JSON object per line::

    {"id": "sroie_017_total", "image": "images/sroie_017.jpg", "width": 835, "height": 2333,
     "question": "How much was paid in total?", "answers": ["39.80"], "field": "total",
     "evidence_boxes": [[492, 1465, 597, 1497]]}

``image`` is relative to the JSONL file's folder (or absolute); ``width``/``height`` are the native
size; ``evidence_boxes`` are optional human boxes in native pixels ``[x0, y0, x1, y1]``, used ONLY to
evaluate localisation and by the ``oracle`` policy, never to train. ``metric`` (optional) names the
answer metric for that sample.

Standard benchmarks (TextVQA, DocVQA, ChartQA, OCRBench, V* Bench, HR-Bench, POPE, RealWorldQA) come from
Hugging Face ``datasets`` through :func:`load_samples` (see :mod:`zoomvlm.data.benchmarks`); their images
stay on disk until :meth:`Sample.load_image` is called.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from zoomvlm.core.geometry import Box, BoxFormatError
from zoomvlm.core.metrics import METRICS

__all__ = [
    "DatasetError",
    "Sample",
    "UnreadableImageError",
    "iter_jsonl",
    "load_image",
    "load_image_cached",
    "load_jsonl",
    "load_samples",
    "read_appended_jsonl",
    "to_rgb",
]

logger = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset file is malformed; the message names the file and line."""


class UnreadableImageError(OSError):
    """An image file is missing or cannot be decoded; the message names it."""


@dataclass(frozen=True)
class Sample:
    """One question about one image.

    Args:
        id: unique within the dataset (results are keyed by it, so resumed runs skip it exactly once).
        image: path to the image file, or a zero-argument callable returning the image (a lazy reference
            into a benchmark's Arrow table: nothing is decoded until :meth:`load_image`).
        question: the question text.
        answers: accepted answers (any one is right).
        width, height: native image size in pixels (as declared by the dataset).
        evidence_boxes: human evidence boxes, normalised; evaluation and ``oracle`` only.
        field: optional category (e.g. ``total``), used to split reports.
        metric: optional answer-metric name overriding the run's default.
        meta: everything else the dataset row carries (e.g. ``options`` of a multiple-choice question,
            read by the ``multiple_choice`` scorer).
    """

    id: str
    image: Path | Callable[[], Image.Image]
    question: str
    answers: tuple[str, ...]
    width: int
    height: int
    evidence_boxes: tuple[Box, ...] = ()
    field: str | None = None
    metric: str | None = None
    meta: dict = dc_field(default_factory=dict, compare=False, hash=False)

    def load_image(self) -> Image.Image:
        """The native-resolution image, RGB, decoded now.

        Raises:
            UnreadableImageError: the file is missing or the image (file or lazy reference) cannot be decoded.
        """
        if callable(self.image):
            try:
                img = self.image()
                img.load()
                return to_rgb(upright(img))
            except UnreadableImageError:
                raise
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
                raise UnreadableImageError(f"cannot read image of sample {self.id!r}: {err}") from err
        return load_image(self.image)


def to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of ``img`` as a viewer shows it, for every PIL mode.

    A bare ``convert("RGB")`` is right for RGB, CMYK, palette and 8-bit gray, but not for:

    - 16- and 32-bit gray and float (``I;16*``, ``I``, ``F``): PIL clips them to 0 / 255, so a 16-bit scan turns
      almost white. 16-bit gray maps its full range to 8 bits (``v / 257``, as viewers show it); 32-bit integer
      and float images are scaled by ``255 / max`` when their values exceed 255 (black stays black).
    - transparency (``RGBA``, ``LA``, ``PA``, a palette or gray image with a transparent colour): PIL drops the
      alpha, so ink drawn on a transparent background (RGB 0 there) becomes solid black. It is composited over
      white, as viewers and browsers show it.
    """
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        import numpy as np

        a = np.asarray(img, dtype=np.float64)
        top = float(a.max()) if a.size else 0.0
        if img.mode.startswith("I;16"):
            a = a / 257.0
        elif top > 255:
            a = a * (255.0 / top)
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return img.convert("RGB")


_EXIF_ORIENTATION = 0x0112
_TURNED = (5, 6, 7, 8)  # EXIF orientations stored a quarter turn from how the photo is seen: width <-> height


def upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation tag says (as viewers, ``datasets`` and browsers show it); ``img``
    itself when the tag is absent or 1. Every image zoomvlm reads goes through this, so boxes are in the frame
    people see."""
    if img.getexif().get(_EXIF_ORIENTATION, 1) not in (1, None):  # stored sideways or mirrored
        return ImageOps.exif_transpose(img)
    return img


def upright_size(img: Image.Image) -> tuple[int, int]:
    """``(width, height)`` of :func:`upright` ``(img)`` from the header alone (pixels not decoded).

    TIFF: Pillow already reports the turned size (and turns the pixels on load). PNG: the EXIF of the chunks
    before the pixels (``eXIf``, ImageMagick's "Raw profile type exif" text, XMP), read without decoding (a PNG's
    own ``getexif`` decodes the image to look for an ``eXIf`` chunk after the pixels, where the PNG spec does not
    put it; such a file gets the size of its stored frame here).
    """
    w, h = img.size
    if img.format == "TIFF":
        return w, h
    exif = Image.Image.getexif(img) if img.format == "PNG" else img.getexif()
    return (h, w) if exif.get(_EXIF_ORIENTATION, 1) in _TURNED else (w, h)


def load_image(path: str | Path) -> Image.Image:
    """Open an image fully (decoded now, not lazily) as RGB, upright: a photo's EXIF orientation tag is applied,
    as viewers, labelling tools and ``zoomvlm serve`` do, so boxes are in the frame people see.

    Raises:
        UnreadableImageError: the file does not exist or is not a decodable image.
    """
    path = Path(path)
    if not path.is_file():
        raise UnreadableImageError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(upright(img))
    except Image.DecompressionBombError as err:
        raise UnreadableImageError(
            f"cannot read image {path}: {err} (PIL's guard against decompression bombs: downscale the image, or raise "
            "PIL.Image.MAX_IMAGE_PIXELS if you trust it)"
        ) from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise UnreadableImageError(f"cannot read image {path}: {err}") from err


_REQUIRED = {"id": str, "image": str, "question": str, "answers": list, "width": int, "height": int}


@functools.lru_cache(maxsize=16)
def load_image_cached(path: str) -> Image.Image:
    """:func:`load_image` with a small per-process LRU cache (16 images), for the trainers and rewards whose G
    rollouts of one prompt all need the same ORIGINAL image. Callers must not modify the returned image."""
    return load_image(path)


def _parse_line(obj: object, root: Path, where: str) -> Sample:
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key, kind in _REQUIRED.items():
        if key not in obj:
            raise DatasetError(f"{where}: missing field {key!r}")
        if not isinstance(obj[key], kind) or (kind is int and isinstance(obj[key], bool)):
            raise DatasetError(f"{where}: field {key!r} must be {kind.__name__}, got {obj[key]!r}")
    if obj["width"] <= 0 or obj["height"] <= 0:
        raise DatasetError(f"{where}: width and height must be positive, got {obj['width']}x{obj['height']}")
    if not obj["question"].strip():
        raise DatasetError(f"{where}: 'question' is empty")
    answers = obj["answers"]
    if not answers or not all(isinstance(a, str) for a in answers):
        raise DatasetError(f"{where}: 'answers' must be a non-empty list of strings, got {answers!r}")
    for key in ("field", "metric"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise DatasetError(f"{where}: field {key!r} must be a string, got {obj[key]!r}")
    if obj.get("metric") is not None and obj["metric"] not in METRICS:
        raise DatasetError(f"{where}: unknown metric {obj['metric']!r}; choose from {', '.join(METRICS)}")
    if not isinstance(obj.get("evidence_boxes") or [], list):
        raise DatasetError(
            f"{where}: 'evidence_boxes' must be a list of [x0, y0, x1, y1] pixel boxes, got {obj['evidence_boxes']!r}"
        )
    boxes = []
    for i, raw in enumerate(obj.get("evidence_boxes") or []):
        try:
            boxes.append(Box.from_pixels(raw, obj["width"], obj["height"]))
        except (BoxFormatError, TypeError, ValueError) as err:
            raise DatasetError(f"{where}: evidence_boxes[{i}] = {raw!r} is invalid: {err}") from err
    image = Path(obj["image"])
    known = set(_REQUIRED) | {"evidence_boxes", "field", "metric"}
    return Sample(
        id=obj["id"],
        image=image if image.is_absolute() else root / image,
        question=obj["question"],
        answers=tuple(answers),
        width=obj["width"],
        height=obj["height"],
        evidence_boxes=tuple(boxes),
        field=obj.get("field"),
        metric=obj.get("metric"),
        meta={k: v for k, v in obj.items() if k not in known},
    )


def iter_jsonl(path: str | Path, error: type[ValueError] = ValueError) -> Iterator[tuple[str, object]]:
    """The JSON values of a JSONL file, one per non-blank line, with ``"file:line"`` for error messages.

    Yields:
        ``(where, value)``, ``where`` = ``"<path>:<line number>"`` (1-based).

    Lines end at ``\n`` (``\r\n`` too; a file with bare ``\r`` line ends, classic Mac OS, reads as one line and
    is refused as invalid JSON), never inside a JSON string (which may hold U+2028 and other characters
    ``str.splitlines`` breaks at); a UTF-8 byte-order mark at the start (Windows editors) is skipped.

    Raises:
        error: a line is not UTF-8 or not valid JSON (the message names ``file:line``). OSError: the file cannot
            be read.
    """
    with Path(path).open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise error(f"{where}: not UTF-8 text ({err.reason} at byte {err.start})") from err
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{where}: not valid JSON ({err.msg})") from err


def read_appended_jsonl(path: str | Path, repair: bool = False) -> list[dict]:
    """The records of an append-only JSONL file that a crashed run may have left torn (results, curation).

    A final line without its newline that is not a whole JSON object (a write cut by a crash) is not a record;
    with ``repair=True`` it is truncated away so appending continues on a clean line. A final line without its
    newline that IS a whole JSON object (a file written or merged by hand without the last newline) is a record;
    with ``repair=True`` the newline is added. Any OTHER unparseable line is corruption and raises ValueError
    naming the line.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    complete, _, torn = data.rpartition(b"\n")
    if torn.strip():
        try:
            whole = isinstance(json.loads(torn.decode("utf-8")), dict)
        except (UnicodeDecodeError, json.JSONDecodeError):
            whole = False
        if whole:
            complete = data
            if repair:
                with path.open("ab") as f:
                    f.write(b"\n")
        else:
            logger.warning("%s: dropping a torn last line (%d bytes) from an interrupted write", path, len(torn))
            if repair:
                with path.open("r+b") as f:
                    f.truncate(len(complete) + 1 if complete else 0)
    records = []
    for lineno, line in enumerate(complete.split(b"\n") if complete else [], start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line.decode("utf-8")))
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}:{lineno} is not a valid record (not UTF-8: {err.reason})") from err
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno} is not a valid record ({err.msg})") from err
    return records


def load_jsonl(path: str | Path, check_images: bool = True, evidence: bool = True) -> list[Sample]:
    """Read and validate a JSONL dataset; image paths are resolved relative to the file's folder.

    Args:
        path: the ``.jsonl`` file.
        check_images: also check that every image file exists (cheap: no decoding).
        evidence: ``False`` drops each line's ``evidence_boxes`` BEFORE parsing them (training data: policies
            never read human boxes, and a malformed one cannot stop a training run).

    Raises:
        DatasetError: the file is missing or empty, a line is not valid JSON or misses/mistypes a field,
            an id repeats, or an image file is missing; the message names ``file:line``.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    samples: list[Sample] = []
    seen: dict[str, str] = {}
    for where, obj in iter_jsonl(path, DatasetError):
        if not evidence and isinstance(obj, dict):
            obj = {**obj, "evidence_boxes": []}
        sample = _parse_line(obj, path.parent, where)
        if sample.id in seen:
            raise DatasetError(f"{where}: id {sample.id!r} already used on line {seen[sample.id].rsplit(':', 1)[1]}")
        seen[sample.id] = where
        if check_images and not sample.image.is_file():
            raise DatasetError(f"{where}: image not found: {sample.image}")
        samples.append(sample)
    if not samples:
        raise DatasetError(f"{path}: no samples")
    return samples


def load_samples(
    spec: str | Path,
    split: str | None = None,
    limit: int | None = None,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> list[Sample]:
    """Samples of a benchmark by name, or of a JSONL file in the receipts format.

    Args:
        spec: a benchmark name from :data:`zoomvlm.data.benchmarks.BENCHMARKS` (``textvqa``, ``docvqa``,
            ``chartqa``, ``ocrbench``, ``vstar``, ``hrbench4k``, ``hrbench8k``, ``pope``, ``realworldqa``) or the
            path of a ``.jsonl`` file.
        split: the benchmark split; ``None`` = the split the field reports (e.g. TextVQA ``validation``).
            JSONL files have no splits.
        limit: the first ``limit`` samples only (in dataset order; a benchmark's rows past them are not
            converted, a JSONL file is still checked whole).
        data_dir: a local copy of the benchmark's hub repository (see
            :func:`zoomvlm.data.benchmarks.load_benchmark`); ``None`` = ``$ZOOMVLM_DATA_DIR/<hub id>`` if that
            exists, else the hub.
        cache_dir: the ``datasets`` cache folder; ``None`` = its default.

    Raises:
        DatasetError: ``spec`` is neither a known benchmark nor an existing file, a split is given for a JSONL
            file, ``limit`` is not positive, or the benchmark cannot be loaded (the message says why).
    """
    if limit is not None and limit <= 0:
        raise DatasetError(f"limit must be a positive number of samples, got {limit}")
    from zoomvlm.data.benchmarks import BENCHMARKS, load_benchmark

    name = str(spec)
    if name.lower() in BENCHMARKS:
        return load_benchmark(name.lower(), split=split, limit=limit, data_dir=data_dir, cache_dir=cache_dir)
    path = Path(spec)
    if path.suffix == ".jsonl" or path.is_file():
        if split is not None:
            raise DatasetError(f"{path}: a JSONL dataset has no splits (got split={split!r}); make one file per split")
        samples = load_jsonl(path)
        return samples[:limit] if limit is not None else samples
    raise DatasetError(f"unknown dataset {name!r}: not a file, and not one of the benchmarks {', '.join(BENCHMARKS)}")
