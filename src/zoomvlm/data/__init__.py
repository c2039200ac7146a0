"""Datasets: :class:`Sample`, the JSONL format (:mod:`zoomvlm.data.samples`, the one JSONL line reader) and the
standard benchmarks from the Hugging Face hub (:mod:`zoomvlm.data.benchmarks`, loaded on use)."""

from zoomvlm.data.samples import (
    DatasetError,
    Sample,
    UnreadableImageError,
    iter_jsonl,
    load_image,
    load_jsonl,
    load_samples,
    read_appended_jsonl,
)

__all__ = [
    "DatasetError",
    "Sample",
    "UnreadableImageError",
    "iter_jsonl",
    "load_image",
    "load_jsonl",
    "load_samples",
    "read_appended_jsonl",
]
