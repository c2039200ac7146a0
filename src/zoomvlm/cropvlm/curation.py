"""Seed boxes from a model, CropVLM's small-box expansion, and the SFT file (CropVLM paper, seed data; METHODS.md).

No human box enters here. :func:`curate_boxes` strips ``Sample.evidence_boxes`` before any grounder sees a
sample, and the files it writes hold only model-made boxes. Two grounders propose the evidence box of an
(image, question, answer):

- :class:`OCRGrounder` (``ocr``): reads the image with the OCR reader and returns the union of the text
  lines whose text contains the answer (an amount: a number of equal value; other text: rapidfuzz
  ``partial_ratio`` on case-folded, space-free text; a line, a row of lines, or two rows);
  the whole image when no line matches (counted as a failure).
- :class:`VLMGrounder` (``vlm``): asks a grounding VLM (default Qwen2.5-VL-7B-Instruct) CropVLM's grounding
  prompt and parses ``bbox_2d`` in the pixel frame of the image the model saw, mapped back to the original
  (the official code skips that mapping); the whole image on failure (counted).

Files written by :func:`curate_boxes` into ``out_dir``:

- ``raw.jsonl``: one line per sample as it is grounded, ``{"id", "seed_box", "found", "raw", "error"}`` (the
  unexpanded box), so an interrupted run resumes where it stopped (a torn last line is redone).
- ``settings.json``: the grounder and its settings; a resume under other settings is refused.
- ``seeds.jsonl``: one line per sample, ``{"id", "seed_box", "box", "found", "grounder", "raw", "error"}``
  (``seed_box`` and ``box`` normalised ``[x0, y0, x1, y1]``; ``box`` is after expansion), written when every
  sample is grounded (the expansion needs the areas of all of them).
- ``sft.jsonl``: the SFT conversations, ``{"id", "image", "question", "prompt", "completion"}`` with
  ``prompt`` = one user turn ``[image, cropper_prompt(question)]`` and ``completion`` = one assistant turn
  ``"[x1, y1, x2, y2]."`` (integer percentages), TRL's conversational prompt-completion format.
- ``curation.json``: counts, failure rate, the p20..p80 area thresholds.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from zoomvlm.core.geometry import (
    Box,
    BoxFormatError,
    Budget,
    expand_small_box,
    format_percent_box,
    parse_bbox_2d,
    percentile_thresholds,
    resize_to_budget,
)
from zoomvlm.core.prompts import cropper_prompt, grounding_prompt
from zoomvlm.data.samples import read_appended_jsonl

logger = logging.getLogger(__name__)

__all__ = [
    "GROUNDERS",
    "OCRGrounder",
    "SeedBox",
    "VLMGrounder",
    "curate_boxes",
    "expand_seed_boxes",
    "sft_record",
]


@dataclass(frozen=True)
class SeedBox:
    """A grounder's box for one sample.

    Args:
        box: normalised box in the ORIGINAL image frame; ``Box.full()`` when nothing was found.
        found: False when the grounder failed (no matching line, unparsable answer): the box is then the
            whole image, as in CropVLM, and the failure is counted.
        raw: what the grounder produced (matched OCR text or the VLM's answer), for inspection.
        error: why it failed, else None.
    """

    box: Box
    found: bool
    raw: str = ""
    error: str | None = None


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text.casefold())


_CURRENCY = re.compile(r"^(?:rm|myr|usd|us\$|s\$|\$|eur|€|£)|(?:rm|myr|usd|eur|€|£)$")
_NUMBER = re.compile(r"(?<![\d.,])\d[\d,]*(?:\.\d+)?(?![\d])")
"""A number token of a line: digits with thousands commas and a decimal part, never part of a longer number."""


def _number_key(text: str, currency: bool = False) -> tuple[str, object] | None:
    """How a number-like answer or token compares (squashed, case-folded text), else None.

    ``("amount", Decimal)`` for a decimal amount (``39.80``, ``rm39.80``, ``1,050.00``) or a currency amount
    (``rm39``): equal when the values are (``39.8`` = ``39.80``). ``("digits", str)`` for an integer without a
    currency (a year, a quantity, an invoice number ``007``): equal only as the same digits. A comma before exactly
    3 digits groups thousands; any other comma is a decimal point (``39,80``).
    """
    from decimal import Decimal, InvalidOperation

    bare = _CURRENCY.sub("", text)
    currency = currency or bare != text
    if not re.fullmatch(r"\d[\d,]*(?:\.\d+)?", bare):
        return None
    bare = re.sub(r",(?=\d{3}(?!\d))", "", bare).replace(",", ".")
    if "." not in bare and not currency:
        return "digits", bare
    try:
        return "amount", Decimal(bare)
    except InvalidOperation:  # "1.2.3"
        return None


def _match(targets: Sequence[str], texts: Sequence[str]) -> tuple[float, set[int] | None]:
    """``(score 0-100, indices of the lines the match falls in)`` of the best answer in a candidate's lines.

    A number-like answer (:func:`_number_key`) matches only a whole number token of one line that compares equal:
    ``39.80`` = ``39.8`` and ``RM 39.80`` in ``TOTAL: 39.80``, but ``1.00`` is not inside ``41.00`` nor equal to
    ``COUNTER 1``, ``9.00`` is not inside ``19.00``, ``007`` is not ``7``, and two numbers of a line or of two
    lines never fuse (fuzzy matching has no token boundaries, and one digit decides an amount). Other answers:
    rapidfuzz ``partial_ratio`` over the lines' squashed text joined (the shorter string aligned inside the
    longer), when that text is at least 0.8 of the answer's length (a 2-character line cannot "contain" a long
    company name).
    """
    from rapidfuzz import fuzz

    squashed = [_squash(t) for t in texts]
    joined = "".join(squashed)
    starts = [sum(len(x) for x in squashed[:k]) for k in range(len(squashed))]
    best: tuple[float, set[int] | None] = (0.0, None)
    for a in targets:
        key = _number_key(a)
        if key is not None:
            for k, text in enumerate(texts):
                for m in _NUMBER.finditer(text.casefold()):
                    before = text.casefold()[max(0, m.start() - 3) : m.start()].replace(" ", "")
                    token = _number_key(m.group(), currency=bool(_CURRENCY.search(before)))
                    if token == key:
                        return 100.0, {k}
            continue
        if len(joined) >= 0.8 * len(a):
            al = fuzz.partial_ratio_alignment(a, joined)
            if al is not None and al.score > best[0]:
                hit = {k for k, (st, sq) in enumerate(zip(starts, squashed, strict=True))
                       if st < al.dest_end and st + len(sq) > al.dest_start}  # fmt: skip
                best = (al.score, hit)
    return best


class OCRGrounder:
    """``ocr``: the OCR reader finds the answer's text line(s); their union is the seed box.

    Args:
        budget: the reading resolution. CropVLM grounds at native resolution; the default ``side:2048``
            equals native for most receipts (longest side <= 2048) and bounds the cost of a few 4800x6700
            scans (68 s at native vs 3 s at 1600 px on this machine), whose text is large anyway.
        threshold: minimum rapidfuzz ``partial_ratio`` (0..100) between the squashed answer and a squashed
            line (or two adjacent rows, for answers split over lines) to count as a match.
        reader: an :class:`~zoomvlm.targets.ocr.OCRTarget` (built lazily when None).

    All lines scoring within 1 point of the best score (and >= ``threshold``) are united: an amount printed
    on both the TOTAL and the CASH line gives the box covering both, as the issue asks ("their union").
    """

    name = "ocr"

    def __init__(self, budget: Budget | int | str | None = "side:2048", threshold: float = 90.0, reader=None):
        self.budget = Budget.parse(budget)
        self.threshold = threshold
        self._reader = reader
        self._cache: dict[str, list] = {}

    def settings(self) -> dict:
        """What makes this grounder's boxes (a resumed curation must match them, :func:`start_curation`)."""
        # "match": the matching rule; v2 reads amounts as numbers and boxes the matched lines of a row, so a
        # curation started under the earlier rule is not continued under this one
        return {"budget": str(self.budget), "threshold": self.threshold, "match": "v2"}

    @property
    def reader(self):
        if self._reader is None:
            from zoomvlm.targets.ocr import OCRTarget

            self._reader = OCRTarget(budget=self.budget)
        return self._reader

    def _lines(self, key: str, image: Image.Image):
        """Rows of (text, normalised Box) of one image, read once per image (3 questions share a receipt)."""
        if key not in self._cache:
            view = resize_to_budget(image.convert("RGB"), self.budget)
            rows = []
            for row in self.reader.read(view):
                rows.append([(line.text, _quad_to_box(line.box, view.size)) for line in row])
            self._cache = {key: rows}  # keep one image: samples arrive grouped by image
        return self._cache[key]

    def ground(self, image: Image.Image, question: str, answers: Sequence[str], key: str = "") -> SeedBox:
        """The seed box of ``answers`` in ``image`` (``key`` identifies the image for the per-image cache)."""

        rows = self._lines(key or str(id(image)), image)
        targets = [_squash(a) for a in answers if _squash(a)]
        if not targets:
            return SeedBox(Box.full(), False, error="no non-empty answer")
        # Candidates, in order of preference: every line; every row of several lines joined (an answer the reader
        # split, "RM" | "39.80"); every pair of adjacent rows joined (answers that wrap over two lines). The box
        # of a joined candidate is the union of the lines the match falls in, not of its whole rows.
        candidates: list[tuple[int, list[tuple[str, Box]]]] = [(0, [line]) for row in rows for line in row]
        candidates += [(1, list(row)) for row in rows if len(row) > 1]
        candidates += [(2, list(upper + lower)) for upper, lower in zip(rows, rows[1:], strict=False)]
        scored = []
        for kind, parts in candidates:
            if not "".join(_squash(t) for t, _ in parts):
                continue
            score, lines = _match(targets, [t for t, _ in parts])
            hit = [b for k, (_, b) in enumerate(parts) if lines is None or k in lines]
            scored.append((score, kind, " ".join(t for t, _ in parts), _union(hit or [b for _, b in parts])))
        best = max((s for s, *_ in scored), default=0.0)
        if best < self.threshold:
            return SeedBox(Box.full(), False, error=f"answer not found by OCR (best match {best:.0f})")
        # single lines within 1 point of the best are united (an amount on both the TOTAL and the CASH line);
        # a joined row or pair only enters when no single line matches as well
        for kind in (0, 1, 2):
            chosen = [(s, t, b) for s, k, t, b in scored if k == kind and s >= best - 1.0]
            if chosen:
                chosen = chosen if kind == 0 else chosen[:1]
                break
        return SeedBox(_union([b for *_, b in chosen]), True, raw=" | ".join(t for _, t, _ in chosen))


class VLMGrounder:
    """``vlm``: a grounding VLM (Qwen2.5-VL) answers CropVLM's grounding prompt with a ``bbox_2d``.

    Args:
        model_id: hub id or local folder (default ``Qwen/Qwen2.5-VL-7B-Instruct``, as in CropVLM).
        max_new_tokens: generation limit for the JSON answer.
        model, processor: an already loaded pair (tests pass a tiny Qwen2.5-VL).

    Qwen2.5-VL answers in the pixel frame of the image AFTER its processor's resize (multiples of 28 px
    within min/max pixels). That size is read from the processor's ``image_grid_thw`` (patch 14 px) and
    :func:`~zoomvlm.core.geometry.parse_bbox_2d` maps the box back to the normalised frame of the original.
    """

    name = "vlm"

    def __init__(self, model_id: str = "Qwen/Qwen2.5-VL-7B-Instruct", max_new_tokens: int = 64, device=None,
                 model=None, processor=None):  # fmt: skip
        from zoomvlm.targets.hf import load_vlm

        if model is None or processor is None:
            model, processor = load_vlm(model_id, device=device)
        self.model, self.processor = model, processor
        self.model_id = model_id
        self.max_new_tokens = max_new_tokens

    def settings(self) -> dict:
        """What makes this grounder's boxes (a resumed curation must match them, :func:`start_curation`)."""
        return {"model": self.model_id, "max_new_tokens": self.max_new_tokens}

    def ground(self, image: Image.Image, question: str, answers: Sequence[str], key: str = "") -> SeedBox:
        """The seed box the VLM outputs for ``question`` (``answers`` unused: CropVLM's prompt has no answer)."""
        from zoomvlm.targets.hf import chat_prompt, generate_texts

        image = image.convert("RGB")
        prompt = chat_prompt(self.processor, 1, grounding_prompt(question))
        texts, inputs, _ = generate_texts(self.model, self.processor, [prompt], [[image]], self.max_new_tokens)
        seen = _seen_size(inputs, image.size)
        try:
            return SeedBox(parse_bbox_2d(texts[0], seen), True, raw=texts[0])
        except BoxFormatError as err:
            return SeedBox(Box.full(), False, raw=texts[0], error=str(err))


def _seen_size(inputs, fallback: tuple[int, int]) -> tuple[int, int]:
    """(width, height) in pixels of the image as the model saw it (Qwen2-VL family: grid_thw x 14 px)."""
    grid = inputs.get("image_grid_thw") if hasattr(inputs, "get") else None
    if grid is None:
        return fallback
    _, h, w = (int(v) for v in grid[0])
    return w * 14, h * 14


GROUNDERS = {"ocr": OCRGrounder, "vlm": VLMGrounder}
"""Grounder names for ``zoomvlm curate boxes --grounder``."""


def _quad_to_box(quad, size: tuple[int, int]) -> Box:
    """An OCR quadrilateral ``[[x, y] x 4]`` in view pixels -> normalised axis-aligned Box."""
    w, h = size
    xs = [float(p[0]) for p in quad]
    ys = [float(p[1]) for p in quad]
    return Box.from_pixels((max(0.0, min(xs)), max(0.0, min(ys)), min(w, max(xs)), min(h, max(ys))), w, h)


def _union(boxes: Iterable[Box]) -> Box:
    boxes = list(boxes)
    out = boxes[0]
    for b in boxes[1:]:
        out = out.union(b)
    return out


def expand_seed_boxes(seed_boxes: Sequence[Box]) -> tuple[list[Box], tuple[float, float, float, float]]:
    """CropVLM's percentile expansion over a WHOLE seed set.

    Returns:
        The expanded boxes (same order) and the (p20, p40, p60, p80) area-ratio thresholds used
        (:func:`~zoomvlm.core.geometry.percentile_thresholds`, :func:`~zoomvlm.core.geometry.expand_small_box`).
        Failed seeds (whole image) take part in the percentiles as CropVLM's do: they are boxes of area 1.
    """
    thresholds = percentile_thresholds(b.area for b in seed_boxes)
    return [expand_small_box(b, thresholds) for b in seed_boxes], thresholds


def sft_record(sample_id: str, image: str, question: str, box: Box) -> dict:
    """One SFT example in TRL's conversational prompt-completion format (the image goes in the ``image`` column).

    >>> r = sft_record("a", "a.jpg", "What is the total?", Box(0.1, 0.5, 0.9, 0.6))
    >>> r["completion"][0]["content"][0]["text"]
    '[10, 50, 90, 60].'
    """
    return {
        "id": sample_id,
        "image": image,
        "question": question,
        "prompt": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": cropper_prompt(question)}]}
        ],
        "completion": [{"role": "assistant", "content": [{"type": "text", "text": format_percent_box(box)}]}],
    }


def _read_done(path: Path) -> dict[str, dict]:
    # a torn last line of a killed run is cut off (that sample is redone), so appending continues cleanly
    return {row["id"]: row for row in read_appended_jsonl(path, repair=True)}


def grounder_settings(grounder) -> dict:
    """``{"grounder": name, **grounder.settings()}``: its name and what makes its boxes (budget, threshold, model),
    for the settings a resumed curation must match."""
    own = getattr(grounder, "settings", None)
    return {"grounder": grounder.name, **(own() if callable(own) else {})}


def _check_settings(out_dir: Path, settings: dict, resuming: bool) -> None:
    """Keep ``out_dir/settings.json`` = the settings the rows of ``raw.jsonl`` were made with; refuse to resume
    with others (they would mix into one curation while ``curation.json`` reported only the new ones)."""
    from zoomvlm.core.resume import settings_diff

    path = out_dir / "settings.json"
    now = json.loads(json.dumps(settings, default=str))
    if path.exists() and resuming:
        diff = settings_diff(json.loads(path.read_text(encoding="utf-8")), now)
        if diff:
            raise ValueError(
                f"{out_dir} holds rows made with other settings; resuming would mix them. Rerun with the same "
                f"settings or use another --out. Differences (saved -> now): " + "; ".join(diff)
            )
        return
    if resuming:
        logger.warning("%s has rows but no settings.json (an older run): resuming without checking", out_dir)
    path.write_text(json.dumps(now, indent=2) + "\n", encoding="utf-8")


def start_curation(
    samples, out_dir: str | Path, settings: dict | None = None
) -> tuple[list, Path, dict[str, dict], list]:
    """The shared start of every curation: ``(samples, raw_path, done, todo)``.

    Drops every sample's ``evidence_boxes`` (the guard: no human box gets past this line), checks each has
    an answer, creates ``out_dir`` and reads the rows already in ``out_dir/raw.jsonl`` (resume; a torn last
    line is redone). ``todo`` = samples not done yet, in order. ``settings`` (grounder, judge, budgets, ...) are
    saved in ``out_dir/settings.json`` and a resume must match them.

    Raises:
        ValueError: a sample has no answer, or ``settings`` differ from those of the rows already made.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = [replace(s, evidence_boxes=()) for s in samples]
    for s in samples:
        if not s.answers:
            raise ValueError(f"sample {s.id!r} has no answer; curation needs (image, question, answer)")
    raw_path = out_dir / "raw.jsonl"
    done = _read_done(raw_path)
    if settings is not None:
        _check_settings(out_dir, settings, resuming=bool(done))
    return samples, raw_path, done, [s for s in samples if s.id not in done]


def curate_boxes(samples, grounder, out_dir: str | Path, progress: bool = True) -> dict:
    """Ground every sample, expand the seed boxes, write ``seeds.jsonl``, ``sft.jsonl`` and ``curation.json``.

    Args:
        samples: :class:`~zoomvlm.data.samples.Sample` list (with answers). Their ``evidence_boxes`` are dropped here,
            before any grounder sees them: human boxes never reach a training file.
        grounder: an object with ``name`` and ``ground(image, question, answers, key) -> SeedBox``.
        out_dir: output folder; raw groundings already in ``out_dir/raw.jsonl`` are reused (resume), if they were
            made by the same grounder (``settings.json``).

    Returns:
        The ``curation.json`` dict: ``n``, ``n_failed``, ``failure_rate``, ``thresholds``, ``grounder``.

    Raises:
        ValueError: a sample has no answer (the grounders look for the answer), or ``out_dir`` holds groundings
            of another grounder.
    """
    out_dir = Path(out_dir)
    settings = grounder_settings(grounder)
    samples, raw_path, done, todo = start_curation(samples, out_dir, settings)  # drops every human box first
    with raw_path.open("a", encoding="utf-8") as f:
        for s in tqdm(todo, desc=f"grounding ({grounder.name})", unit="q", disable=not progress):
            seed = grounder.ground(s.load_image(), s.question, s.answers, key=str(s.image))
            row = {"id": s.id, "seed_box": seed.box.as_list(), "found": seed.found, "raw": seed.raw,
                   "error": seed.error}  # fmt: skip
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            done[s.id] = row
    rows = [done[s.id] for s in samples]
    seeds = [Box(*r["seed_box"]) for r in rows]
    boxes, thresholds = expand_seed_boxes(seeds)
    with (out_dir / "seeds.jsonl").open("w", encoding="utf-8") as f:
        for r, b in zip(rows, boxes, strict=True):
            f.write(json.dumps({**r, "box": b.as_list(), "grounder": grounder.name}, ensure_ascii=False) + "\n")
    with (out_dir / "sft.jsonl").open("w", encoding="utf-8") as f:
        for s, b in zip(samples, boxes, strict=True):
            f.write(
                json.dumps(sft_record(s.id, str(Path(s.image).resolve()), s.question, b), ensure_ascii=False) + "\n"
            )
    n_failed = sum(not r["found"] for r in rows)
    info = {
        "grounder": grounder.name,
        "n": len(rows),
        "n_failed": n_failed,
        "failure_rate": n_failed / len(rows) if rows else None,
        "thresholds": list(thresholds),
        "multipliers": "r<p20 x45, <p40 x10, <p60 x4, <p80 x2, else x1 (area)",
    }
    (out_dir / "curation.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
