"""Standard benchmarks as Hugging Face ``datasets`` loaders: name -> hub dataset, split, columns, metric.

``load_benchmark("textvqa")`` (or ``zoomvlm eval --data textvqa``) reads the dataset lmms-eval evaluates, in
the same split, and turns each row into a :class:`~zoomvlm.data.samples.Sample` with the metric the field reports:

=============  =====================================  ===========================  ====================
name           hub dataset (config)                   default split                metric
=============  =====================================  ===========================  ====================
textvqa        lmms-lab/textvqa                       validation (5,000)           vqa_accuracy
docvqa         lmms-lab/DocVQA (DocVQA)               validation (5,349)           anls
chartqa        lmms-lab/ChartQA                       test (2,500)                 relaxed_accuracy
ocrbench       echo840/OCRBench                       test (1,000)                 ocrbench(_hme)
vstar          lmms-lab/vstar-bench                   test (191)                   multiple_choice
hrbench4k      DreamMr/HR-Bench (hrbench_version_     hrbench_4k (800)             multiple_choice
               split)
hrbench8k      DreamMr/HR-Bench (hrbench_version_     hrbench_8k (800)             multiple_choice
               split)
pope           lmms-lab/POPE                          test (9,000)                 pope
realworldqa    lmms-lab/RealWorldQA                   test (765)                   multiple_choice
=============  =====================================  ===========================  ====================

Hub ids, configs, splits and column names are those of lmms-eval's task YAMLs and ``utils.py`` (v0.7.3 reads
the same datasets through mirrors under ``lmms-lab-encoder/``; pass ``data_dir`` to use a mirror's copy).
Multiple-choice questions carry their options in the question text the way lmms-eval's ``doc_to_text``
writes them (``"A. ..."`` lines and its instruction) and in ``Sample.meta["options"]`` for the scorer.

Images are never decoded at load time: each Sample holds a :class:`HubImage`, a zero-argument callable that
reads its row's bytes from the memory-mapped Arrow table when called, so a 5,000-image benchmark costs only
its questions in memory. Native sizes come from the dataset's size columns where it has them (TextVQA),
else from the image header (PIL reads a few hundred bytes, no decoding).

Offline use: point ``data_dir`` (or ``$ZOOMVLM_DATA_DIR/<hub id>``) at a local copy of the hub repository
(``huggingface-cli download lmms-lab/textvqa --repo-type dataset --local-dir DIR``); it is read by the same
``datasets.load_dataset`` call, config and split as the hub.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from zoomvlm.data.samples import DatasetError, Sample, upright_size

logger = logging.getLogger(__name__)

__all__ = ["BENCHMARKS", "Benchmark", "HubImage", "load_benchmark", "parse_inline_options", "parse_option_lines"]

DATA_DIR_ENV = "ZOOMVLM_DATA_DIR"
"""Environment variable: a folder holding local copies of hub datasets as ``<owner>/<name>/``."""

# lmms-eval's instructions for multiple-choice questions (its task YAMLs / doc_to_text), kept verbatim so
# prompts, and so accuracies, stay comparable.
VSTAR_INSTRUCTION = "Answer with the option's letter from the given choices directly."
HRBENCH_INSTRUCTION = "Answer the option letter directly."


@dataclass(frozen=True)
class Row:
    """What a converter makes of one dataset row (everything but the image)."""

    id: str
    question: str
    answers: tuple[str, ...]
    metric: str
    field: str | None = None
    meta: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: where it lives on the hub and how its rows become Samples.

    Args:
        name: the name users type (``--data textvqa``).
        hub_id, config, split: the ``datasets.load_dataset(hub_id, config, split=split)`` arguments.
        columns: columns a row must have (checked at load, so a schema change fails with a clear error).
        image_column: the column holding the image: a ``datasets.Image`` struct (bytes/path) or, for
            HR-Bench, a base64 string.
        convert: ``(row, index) -> Row`` for a row without its image column.
        size_columns: ``(width, height)`` columns giving the native size, if the dataset has them.
    """

    name: str
    hub_id: str
    config: str | None
    split: str
    columns: tuple[str, ...]
    image_column: str
    convert: Callable[[dict, int], Row]
    size_columns: tuple[str, str] | None = None

    @property
    def metric(self) -> str:
        """The benchmark's metric name (OCRBench rows may use the ``ocrbench_hme`` variant)."""
        return _DEFAULT_METRIC[self.name]

    @property
    def row_metrics(self) -> tuple[str, ...]:
        """Every metric its rows may carry (:attr:`metric`, and OCRBench's ``ocrbench_hme`` for HME100k): an
        explicit ``--metric`` outside this set, or any when there are several, changes how some row is scored."""
        return (self.metric, "ocrbench_hme") if self.name == "ocrbench" else (self.metric,)


# ---- question formats -----------------------------------------------------------------------------------
_INLINE_OPTION = re.compile(r"\(([A-Z])\)\s*")
_OPTION_LINE = re.compile(r"^\s*([A-Z])\.\s+(.+?)\s*$", re.MULTILINE)


def parse_inline_options(text: str) -> tuple[str, dict[str, str]]:
    """Split a V*-style question ``"What is ...? (A) red (B) blue"`` into its stem and options.

    Options may be separated by spaces or newlines; a trailing instruction line after the last option
    (e.g. ``"Answer with the option's letter ..."``) is dropped. Letters must run A, B, C... in order; any
    other parenthesised capital (e.g. "(B)" inside a stem before "(A)") is left in the stem.

    Returns:
        ``(stem, {"A": "red", "B": "blue"})``; ``(text, {})`` when there are no ``(A)``-style options.
    """
    marks = []
    expected = "A"
    for m in _INLINE_OPTION.finditer(text):
        if m.group(1) == expected:
            marks.append(m)
            expected = chr(ord(expected) + 1)
    if not marks:
        return text.strip(), {}
    options = {}
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        body = text[m.end() : end].strip()
        if i + 1 == len(marks):
            body = body.split("\n")[0].strip()
        options[m.group(1)] = body
    return text[: marks[0].start()].strip(), options


def parse_option_lines(text: str) -> dict[str, str]:
    """Options written as ``"A. text"`` lines (RealWorldQA, lmms-eval's MC format) -> ``{"A": "text"}``."""
    return {m.group(1): m.group(2) for m in _OPTION_LINE.finditer(text)}


def format_options(options: Mapping[str, str]) -> str:
    """``{"A": "red"}`` -> ``"A. red"`` lines, lmms-eval's multiple-choice layout."""
    return "\n".join(f"{k}. {v}" for k, v in options.items())


def _answer_letter(label: Any, options: Mapping[str, str], where: str) -> str:
    # V* labels are letters in lmms-lab/vstar-bench; some re-uploads store a 0-based index instead.
    if isinstance(label, int) and not isinstance(label, bool):
        letter = chr(ord("A") + label)
    else:
        letter = str(label).strip().strip("()").upper()
    if letter not in options:
        raise DatasetError(f"{where}: answer {label!r} is not one of the options {sorted(options)}")
    return letter


def _answers(value: Any, where: str) -> tuple[str, ...]:
    answers = (value,) if isinstance(value, str) else tuple(value or ())
    answers = tuple(str(a) for a in answers if a is not None and str(a).strip())
    if not answers:
        raise DatasetError(f"{where}: no reference answer")
    return answers


# ---- one converter per schema (the columns lmms-eval's utils.py reads) ----------------------------------
def _textvqa(row: dict, i: int) -> Row:
    return Row(f"textvqa_{row['question_id']}", row["question"], _answers(row["answers"], f"textvqa row {i}"),
               "vqa_accuracy", meta={"image_id": row.get("image_id")})  # fmt: skip


def _docvqa(row: dict, i: int) -> Row:
    return Row(f"docvqa_{row['questionId']}", row["question"], _answers(row["answers"], f"docvqa row {i}"), "anls",
               meta={"question_types": row.get("question_types"), "docId": row.get("docId")})  # fmt: skip


def _chartqa(row: dict, i: int) -> Row:
    # ``type`` is human_test / augmented_test: lmms-eval's relaxed_human_split / relaxed_augmented_split.
    return Row(f"chartqa_{i}", row["question"], _answers(row["answer"], f"chartqa row {i}"), "relaxed_accuracy",
               field=row["type"])  # fmt: skip


def _ocrbench(row: dict, i: int) -> Row:
    # OCRBench's official eval scores handwritten maths (HME100k) with all spaces removed, case kept.
    metric = "ocrbench_hme" if row["dataset"] == "HME100k" else "ocrbench"
    return Row(f"ocrbench_{i}", row["question"].strip(), _answers(row["answer"], f"ocrbench row {i}"), metric,
               field=row["question_type"], meta={"dataset": row["dataset"]})  # fmt: skip


def _vstar(row: dict, i: int) -> Row:
    stem, options = parse_inline_options(row["text"])
    if not options:
        raise DatasetError(f"vstar row {i}: no (A)/(B) options in {row['text']!r}")
    letter = _answer_letter(row["label"], options, f"vstar row {i}")
    question = f"{stem}\n{format_options(options)}\n{VSTAR_INSTRUCTION}"
    return Row(f"vstar_{row['question_id']}", question, (letter,), "multiple_choice", field=row.get("category"),
               meta={"options": options})  # fmt: skip


def _hrbench(name: str) -> Callable[[dict, int], Row]:
    def convert(row: dict, i: int) -> Row:
        options = {k: str(row[k]) for k in "ABCDEF" if row.get(k) is not None and str(row[k]).strip() != "nan"}
        letter = _answer_letter(row["answer"], options, f"{name} row {i}")
        question = f"{row['question'].strip()}\n{format_options(options)}\n{HRBENCH_INSTRUCTION}"
        return Row(f"{name}_{row['index']}", question, (letter,), "multiple_choice", field=row["category"],
                   meta={"options": options, "cycle_category": row.get("cycle_category")})  # fmt: skip

    return convert


def _pope(row: dict, i: int) -> Row:
    answer = row["answer"].strip().lower()
    if answer not in ("yes", "no"):
        raise DatasetError(f"pope row {i}: answer must be yes or no, got {row['answer']!r}")
    return Row(f"pope_{i}", row["question"].strip(), (answer,), "pope", field=row.get("category"),
               meta={"question_id": row.get("question_id")})  # fmt: skip


def _realworldqa(row: dict, i: int) -> Row:
    # The question already lists "A. ..." options and lmms-eval's instruction; a few answers are free-form
    # ("0", "Downhill"), which the multiple_choice scorer compares as normalised text.
    options = parse_option_lines(row["question"])
    answer = row["answer"].strip()
    return Row(f"realworldqa_{i}", row["question"].strip(), (answer,), "multiple_choice", meta={"options": options})


_DEFAULT_METRIC = {
    "textvqa": "vqa_accuracy", "docvqa": "anls", "chartqa": "relaxed_accuracy", "ocrbench": "ocrbench",
    "vstar": "multiple_choice", "hrbench4k": "multiple_choice", "hrbench8k": "multiple_choice", "pope": "pope",
    "realworldqa": "multiple_choice",
}  # fmt: skip

_HR_COLUMNS = ("index", "question", "answer", "category", "A", "B", "image")
BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in [
        Benchmark("textvqa", "lmms-lab/textvqa", None, "validation", ("question_id", "question", "answers", "image"),
                  "image", _textvqa, size_columns=("image_width", "image_height")),
        Benchmark("docvqa", "lmms-lab/DocVQA", "DocVQA", "validation", ("questionId", "question", "answers", "image"),
                  "image", _docvqa),
        Benchmark("chartqa", "lmms-lab/ChartQA", None, "test", ("type", "question", "answer", "image"), "image",
                  _chartqa),
        Benchmark("ocrbench", "echo840/OCRBench", None, "test",
                  ("dataset", "question", "question_type", "answer", "image"), "image", _ocrbench),
        Benchmark("vstar", "lmms-lab/vstar-bench", None, "test", ("question_id", "text", "label", "image"), "image",
                  _vstar),
        Benchmark("hrbench4k", "DreamMr/HR-Bench", "hrbench_version_split", "hrbench_4k", _HR_COLUMNS, "image",
                  _hrbench("hrbench4k")),
        Benchmark("hrbench8k", "DreamMr/HR-Bench", "hrbench_version_split", "hrbench_8k", _HR_COLUMNS, "image",
                  _hrbench("hrbench8k")),
        Benchmark("pope", "lmms-lab/POPE", None, "test", ("question", "answer", "image"), "image", _pope),
        Benchmark("realworldqa", "lmms-lab/RealWorldQA", None, "test", ("question", "answer", "image"), "image",
                  _realworldqa),
    ]
}  # fmt: skip
"""Benchmarks by name, as ``--data`` accepts them."""


# ---- lazy images ----------------------------------------------------------------------------------------
def _open_cell(value: Any) -> Image.Image:
    """An undecoded image cell -> a PIL image opened lazily (header read, pixels not decoded yet)."""
    if isinstance(value, str):  # HR-Bench stores base64-encoded JPEGs in a string column
        try:
            return Image.open(io.BytesIO(base64.b64decode(value, validate=False)))
        except binascii.Error as err:
            raise UnidentifiedImageError(f"not base64 image data: {err}") from err
    if isinstance(value, Mapping):
        if value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"]))
        if value.get("path"):
            return Image.open(value["path"])
    raise UnidentifiedImageError(f"no image data in cell of type {type(value).__name__}")


_B64_HEADER_CHARS = 1 << 16  # a multiple of 4, so the prefix is whole base64 quanta


class HubImage:
    """A zero-argument callable that decodes one row's image from a benchmark's Arrow table.

    Holds the (memory-mapped) table and a row index only; each call reads that row's bytes and returns a
    fresh PIL image (not yet converted; :meth:`zoomvlm.data.samples.Sample.load_image` converts to RGB).
    """

    def __init__(self, table: Any, row: int, column: str, label: str):
        self.table = table
        self.row = row
        self.column = column
        self.label = label

    def __call__(self) -> Image.Image:
        return _open_cell(self.table[self.row][self.column])

    def size(self) -> tuple[int, int]:
        """Native ``(width, height)`` in pixels from the image header, without decoding pixels; a photo's EXIF
        orientation applied (the frame :meth:`~zoomvlm.data.samples.Sample.load_image` returns)."""
        cell = self.table[self.row][self.column]
        if isinstance(cell, str) and len(cell) > _B64_HEADER_CHARS:
            # An 8K HR-Bench image is ~6 MB of base64; its JPEG header sits in the first few kB.
            try:
                with _open_cell(cell[:_B64_HEADER_CHARS]) as img:
                    return upright_size(img)
            except (UnidentifiedImageError, OSError, ValueError):
                pass
        with _open_cell(cell) as img:
            return upright_size(img)

    def __repr__(self) -> str:
        return f"HubImage({self.label} row {self.row})"


# ---- loading --------------------------------------------------------------------------------------------
def _resolve_data_dir(bench: Benchmark, data_dir: str | Path | None) -> str:
    if data_dir is not None:
        path = Path(data_dir)
        if not path.is_dir():
            raise DatasetError(f"{bench.name}: data_dir {path} is not a folder")
        return str(path)
    root = os.environ.get(DATA_DIR_ENV)
    if root and (Path(root) / bench.hub_id).is_dir():
        return str(Path(root) / bench.hub_id)
    return bench.hub_id


def load_benchmark(
    name: str,
    split: str | None = None,
    limit: int | None = None,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> list[Sample]:
    """Load a benchmark from :data:`BENCHMARKS` as Samples (images lazy, see :class:`HubImage`).

    Args:
        name: benchmark name, e.g. ``textvqa``.
        split: overrides the benchmark's default split (e.g. ``validation``). Only splits with reference answers load:
            a split without them (TextVQA's ``test``) is refused (``DatasetError``, "no reference answer"), since
            every sample must be scorable.
        limit: keep the first ``limit`` rows (dataset order, deterministic); the rest is never read.
        data_dir: a local copy of the hub repository (same files, same ``README.md`` configs); ``None`` =
            ``$ZOOMVLM_DATA_DIR/<hub id>`` when that folder exists, else the hub itself.
        cache_dir: the ``datasets`` cache folder; ``None`` = its default (``$HF_DATASETS_CACHE``).

    Returns:
        One Sample per row, in dataset order; ``width``/``height`` are native pixels; ``metric`` is set.

    Raises:
        DatasetError: unknown name or split, the dataset cannot be reached (e.g. ``HF_HUB_OFFLINE=1`` and no
            local copy) or lacks a column the benchmark needs, a row has no answer, ids repeat, or an image
            header cannot be read.
    """
    if name not in BENCHMARKS:
        raise DatasetError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    bench = BENCHMARKS[name]
    import datasets  # heavy: imported only when a benchmark is asked for

    source = _resolve_data_dir(bench, data_dir)
    split = split or bench.split
    try:
        ds = datasets.load_dataset(
            source, bench.config, split=split, cache_dir=None if cache_dir is None else str(cache_dir)
        )
    except (OSError, ValueError, ConnectionError) as err:
        root = os.environ.get(DATA_DIR_ENV)
        if source != bench.hub_id:
            hint = ""
        elif root:  # set, but the hub copy is not where it looks: say where
            hint = (f" (${DATA_DIR_ENV} is {root}, but {Path(root) / bench.hub_id} does not exist: download the "
                    f"dataset there, e.g. `huggingface-cli download {bench.hub_id} --repo-type dataset --local-dir "
                    f"{Path(root) / bench.hub_id}`)")  # fmt: skip
        else:
            hint = f" (offline? pass data_dir= or set ${DATA_DIR_ENV})"
        raise DatasetError(f"{name}: cannot load {source} config={bench.config} split={split}{hint}: {err}") from err
    missing = [c for c in bench.columns if c not in ds.column_names]
    if missing:
        raise DatasetError(f"{name} ({source}, split {split}): missing column(s) {missing}; found {ds.column_names}")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    images = ds.select_columns([bench.image_column])
    if isinstance(images.features[bench.image_column], datasets.Image):
        images = images.cast_column(bench.image_column, datasets.Image(decode=False))
    rows = ds.remove_columns([bench.image_column])
    samples: list[Sample] = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        r = bench.convert(row, i)
        if r.id in seen:
            raise DatasetError(f"{name} row {i}: id {r.id!r} repeats")
        seen.add(r.id)
        image = HubImage(images, i, bench.image_column, f"{name}/{split}")
        if bench.size_columns and all(row.get(c) for c in bench.size_columns):
            width, height = int(row[bench.size_columns[0]]), int(row[bench.size_columns[1]])
        else:
            try:
                width, height = image.size()
            except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
                raise DatasetError(f"{name} row {i} ({r.id}): unreadable image: {err}") from err
        samples.append(Sample(id=r.id, image=image, question=r.question, answers=r.answers, width=width,
                              height=height, field=r.field, metric=r.metric, meta=dict(r.meta or {})))  # fmt: skip
    if not samples:
        raise DatasetError(f"{name} ({source}, split {split}): no rows")
    logger.info("loaded %d samples of %s (%s, split %s)", len(samples), name, source, split)
    return samples
