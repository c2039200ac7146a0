"""TRL-compatible reward functions for training a cropper (CropVLM paper, GRPO rewards; METHODS.md).

Each reward is a named callable with TRL's reward-function signature
``reward(prompts, completions, **columns) -> list[float]`` (one finite float per completion). TRL passes
every extra dataset column as a keyword list aligned with ``completions``; the rewards here read
``image_path`` (path of the ORIGINAL full-resolution image; ``image`` is the cropper's own input view),
``question`` and ``answers``. The GRPO recipe names rewards and weights them
(``rewards: {format: 1.0, likelihood: 1.0}``; names in :data:`zoomvlm.train.rewards.REWARDS`); TRL sums them.
AwaRes's reward lives in :mod:`zoomvlm.awares.rewards`.

- ``format``: 1.0 for a valid ``"[x1, y1, x2, y2]."`` box, 0.0 otherwise.
- ``accuracy``: the reward target answers from ``[global view, crop]``; the dataset's metric
  (:data:`~zoomvlm.core.metrics.METRICS`) of that answer, in [0, 1].
- ``likelihood``: the reward target's log-likelihood (nats, <= 0) of the answer given
  ``[global view, crop]``: one teacher-forced forward pass for ``hf`` targets, the CTC likelihood for
  ``ocr``; no generation. CropVLM's best reward.
- ``answer_probability``: the same log-likelihood made bounded, ``exp(log p / n_chars)`` in (0, 1]: the
  geometric-mean per-character probability of the answer. Our variant (not in the paper): raw
  log-likelihoods of one group can span 0..-100 nats, so one hopeless box decides the group's advantage.

An invalid box is scored as the pipeline would use it at inference, i.e. with the whole image as the crop
(the ``format`` reward is what penalises it). Rewards call the :class:`~zoomvlm.targets.base.Target`
once per call, batched over the whole group, and identical crops of the same sample (same pixel box) are
scored once. The reward target is built from the same spec strings as ``zoomvlm eval`` (``ocr``,
``hf:MODEL``, ``openai:MODEL`` for a vLLM/OpenAI-compatible server).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

from zoomvlm.core.geometry import Box, BoxFormatError, Budget, parse_percent_boxes
from zoomvlm.core.metrics import METRICS
from zoomvlm.core.pipeline import build_request
from zoomvlm.core.prompts import completion_text
from zoomvlm.data.samples import load_image_cached
from zoomvlm.policies.base import Proposal

DEFAULT_METRIC = "anls"
"""Metric of :class:`AccuracyReward` when none is given (the recipe's ``target.metric`` default is this one)."""

__all__ = [
    "AccuracyReward",
    "AnswerProbabilityReward",
    "LikelihoodReward",
    "completion_text",
    "format_reward",
]


def _parse(completion) -> Box | None:
    # the one-box grammar the cropper's inference reads (parse_percent_boxes with max_boxes=1): a second list
    # ("[..], [..]." or "[..]. Total: [5]") is invalid there, so it must earn no format reward and no crop here
    try:
        return parse_percent_boxes(completion_text(completion), max_boxes=1)[0]
    except BoxFormatError:
        return None


def format_reward(prompts=None, completions=(), **_) -> list[float]:
    """``format``: 1.0 when the completion is a valid CropVLM box, else 0.0 (CropVLM's format reward). Valid =
    what the ``vlm`` cropper accepts at inference: exactly one box (:func:`~zoomvlm.core.geometry.parse_percent_boxes`
    with ``max_boxes=1``)."""
    return [1.0 if _parse(c) is not None else 0.0 for c in completions]


format_reward.__name__ = "format"


class _TargetReward:
    """Shared machinery: load images, cut crops, dedupe identical crops, call the target once per batch."""

    __name__ = "target_reward"

    def __init__(self, target, crop_budget: Budget | int | str | None = None):
        self.target = target
        self.crop_budget = None if crop_budget is None else Budget.parse(crop_budget)
        self.n_calls = 0  # target requests actually sent (after dedupe), for logging and tests

    def _unique_requests(self, completions, image, question, answers):
        """(requests to send, index of each completion's request). The key is (image, question, answer, crop px)."""
        keys: dict[tuple, int] = {}
        requests, index = [], []
        for c, path, q, ans in zip(completions, image, question, answers, strict=True):
            img = load_image_cached(str(path))
            box = _parse(c) or Box.full()
            answer = _first_answer(ans)
            key = (str(path), q, answer, box.to_pixels(*img.size))
            if key not in keys:
                keys[key] = len(requests)
                request = build_request(img, q, Proposal((box,)), self.crop_budget)
                requests.append(dataclasses.replace(request, answer=answer))
            index.append(keys[key])
        self.n_calls += len(requests)
        return requests, index


def _first_answer(answers) -> str:
    if isinstance(answers, str):
        return answers
    if not answers:
        raise ValueError("a reward needs the gold answer, got an empty answer list")
    return str(answers[0])


class AccuracyReward(_TargetReward):
    """``accuracy``: the reward target's answer from ``[global, crop]`` scored by ``metric`` (CropVLM ablation).

    Args:
        target: a :class:`~zoomvlm.targets.base.Target` (e.g. ``load_target("ocr", budget=384)``).
        metric: default metric name (``contains``, ``anls``, ``vqa_accuracy``...); a ``metric`` dataset column
            overrides it per sample.
        crop_budget: the crop's budget (None = the target's).
    """

    __name__ = "accuracy"

    def __init__(self, target, metric: str = DEFAULT_METRIC, crop_budget=None):
        super().__init__(target, crop_budget)
        if metric not in METRICS:
            raise KeyError(f"unknown metric {metric!r}; choose from {sorted(METRICS)}")
        self.metric = metric

    def __call__(self, prompts=None, completions=(), image_path=(), question=(), answers=(), metric=None, **_):
        requests, index = self._unique_requests(completions, image_path, question, answers)
        texts = [g.text for g in self.target.generate(requests)]
        metrics = metric if metric is not None else [""] * len(completions)
        return [
            float(METRICS[m or self.metric](texts[i], [ans] if isinstance(ans, str) else list(ans)))
            for i, ans, m in zip(index, answers, metrics, strict=True)
        ]


class LikelihoodReward(_TargetReward):
    """``likelihood``: log p(answer | [global, crop], question) under the frozen reward target, in nats.

    One teacher-forced forward pass per unique crop (``Target.loglikelihood``), no generation; the first
    gold answer is scored (CropVLM scores the annotated answer). Values are <= 0 and finite: a target that
    returns -inf or NaN is clipped to ``floor`` so GRPO's group mean stays defined.
    """

    __name__ = "likelihood"

    def __init__(self, target, crop_budget=None, floor: float = -100.0):
        super().__init__(target, crop_budget)
        self.floor = floor

    def __call__(self, prompts=None, completions=(), image_path=(), question=(), answers=(), **_):
        requests, index = self._unique_requests(completions, image_path, question, answers)
        scores = [float(s) for s in self.target.loglikelihood(requests)]
        scores = [s if math.isfinite(s) else self.floor for s in scores]
        return [max(self.floor, scores[i]) for i in index]


class AnswerProbabilityReward(LikelihoodReward):
    """``answer_probability``: ``exp(log p(answer | [global, crop], question) / n_chars)``, in (0, 1].

    The geometric-mean per-character probability of the first gold answer (``n_chars`` = its length in
    characters, at least 1), from the same teacher-forced score as :class:`LikelihoodReward`. Our bounded
    variant of CropVLM's likelihood reward: raw CTC log-likelihoods of one GRPO group span 0..-100 nats on
    receipts, so with ``scale_rewards: none`` the worst box alone sets the group's advantages; here every
    hopeless box scores ~0 and the spread between readable boxes keeps its weight. Length normalisation
    also puts long and short answers on one scale.
    """

    __name__ = "answer_probability"

    def __call__(self, prompts=None, completions=(), image_path=(), question=(), answers=(), **kwargs):
        logliks = super().__call__(prompts, completions, image_path, question, answers, **kwargs)
        return [math.exp(ll / max(1, len(_first_answer(ans)))) for ll, ans in zip(logliks, answers, strict=True)]


def resolve_image_column(paths: Sequence[str | Path]) -> list[str]:
    """Absolute image paths as strings (the reward's ``image`` column), raising FileNotFoundError early."""
    out = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"image {p} not found")
        out.append(str(p.resolve()))
    return out
