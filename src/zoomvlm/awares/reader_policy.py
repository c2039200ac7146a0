"""``crop-set-reader``: AwaRes's external crop-set policy with real perception (issue 16, item 3).

AwaRes (sec. 3.1) shows the target a LOW-resolution view and lets a policy decide between answering from it
(``NO_CROPS``) and requesting high-resolution regions of a fixed crop set (``GET_CROPS``). The ``crop-set``
policy makes that decision with a tiny VLM trained from scratch, which cannot see a text line (README, "AwaRes
Table 1": it learned one crop per question type). This policy looks, with the reader's own perception:

1. **Perception** (:class:`~zoomvlm.policies.perception.Perceiver`): the reader's pass over a cheap view, built
   as :class:`~zoomvlm.cropvlm.proposals.ProposalCropper` builds it from the proposals checkpoint's
   :class:`~zoomvlm.cropvlm.proposals.ScorerConfig` (``view_budget``, ``detect_budget``, ``legible``,
   ``max_recognise``), except that by default its TEXT pass reads the AwaRes low view (``high`` halved; line boxes
   from the detector at the scorer's own budget): :func:`perception_settings` says why (measured) and how
   :class:`ReaderConfig` changes it. :meth:`ReaderCropSetPolicy.bind_target` binds it to the target exactly as
   ``proposals`` does: with the ``ocr`` target at the text pass's budget, and an image whose AwaRes low view has
   that size (every receipt at ``high`` 768 px: 384 px), the pass IS the target's first turn: read once, and
   charged to the target (``Proposal.shared_seconds``; AwaRes's point that the first turn is already paid for).
   Images whose low view differs are read by a second, unbound perceiver that the policy pays for, so no read is
   ever charged to a target that does not consume it.
2. **Where**: the frozen proposals :class:`~zoomvlm.cropvlm.proposals.RegionScorer` (by default the shipped
   checkpoint, :func:`~zoomvlm.cropvlm.proposals.default_proposals_path`) scores the candidate regions against the
   question.
3. **What**: a small learned head (:class:`ActionHead`) picks ONE action of a categorical over ``m + 1`` (see
   :func:`action_space`): ``NO_CROPS``, or ``GET_CROPS`` with the smallest crop subset
   (:func:`~zoomvlm.awares.protocol.covering_crops`) covering one of the ``m`` best candidate regions (padded as
   the ``proposals`` cropper pads its crops), distinct subsets only.

The action is emitted as :func:`~zoomvlm.awares.protocol.crop_set_proposal` does for ``crop-set``: the low view
(``high`` with sides halved) plus the chosen regions at the ``high`` view's scale, so RTR against ``high`` is
0.25 + the summed area of the crops (:func:`~zoomvlm.awares.protocol.crop_set_sent_area`). The crop set is
AwaRes's (``crop_set="awares"``, default) or the finer one for text
(``"fine"``, :data:`~zoomvlm.awares.protocol.FINE_CROP_SET`), a field of the checkpoint's config. No text is
emitted, so the ``GET_CROPS`` grammar of the VLM protocol is untouched.

Initial policy (:func:`hand_set_head`): a HAND-SET linear head, "GET_CROPS on the top region unless the reader read
it confidently and its text already looks like an answer", not a fit on ``curate awares`` labels. Training
(:class:`ActionReward`, ``zoomvlm train crop-set-reader``): GRPO on AwaRes's ``R = R_ans - C_tool`` (sec. 3.4)
with the loop of :mod:`zoomvlm.cropvlm.proposal_grpo` (group of ``G`` sampled actions per question, Dr-GRPO
group-relative advantage ``A_i = r_i - mean_j r_j``, exact KL to the hand-set initial policy; its module docstring
lists the equations), since an action is one index into a per-question candidate list there as here.

Checkpoint folder (:func:`save_reader`): ``head.pt`` (state dict, a few kB), ``config.json`` (:class:`ReaderConfig`),
``zoomvlm_recipe.json`` (how it was made).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from zoomvlm.awares.protocol import (
    CROP_SETS,
    NO_CROPS,
    covering_crops,
    crop_set_coverage,
    crop_set_proposal,
    crop_set_sent_area,
    low_res_budget,
)
from zoomvlm.core.geometry import Budget
from zoomvlm.policies.base import Proposal
from zoomvlm.policies.perception import Perceiver, Perception, QuestionEncoder, text_stats

logger = logging.getLogger(__name__)

__all__ = [
    "ACTION_FEATURES",
    "N_ACTION_FEATURES",
    "ActionHead",
    "ActionReward",
    "ActionSpace",
    "ReaderConfig",
    "ReaderCropSetPolicy",
    "ReaderItem",
    "action_space",
    "build_reader_items",
    "hand_set_head",
    "load_awares_labels",
    "load_reader",
    "looks_like_answer",
    "perception_settings",
    "question_shape",
    "save_reader",
]

PERCEPTION_KEYS = ("view_budget", "detect_budget", "legible", "max_recognise", "part_px")
"""The perception settings a reader checkpoint may override (:class:`~zoomvlm.cropvlm.proposals.ScorerConfig`'s)."""

ACTION_FEATURES = (
    # the candidate region behind a GET_CROPS action (for NO_CROPS: the best one, whose reading it would trust)
    "logp",  # scorer log-probability of the region among all candidates, clipped at -10, / 10: [-1, 0]
    "mass",  # scorer probability of the scanned candidates the crop subset covers: P(answer inside the crops)
    "conf",  # the region's text-pass confidence (mean character probability at low resolution)
    "looks",  # 1 when its low-resolution text already looks like an answer to the question (looks_like_answer)
    "legibility",  # Perception.legibility: share of the page's lines the text pass read confidently
    "area",  # area the crop subset sends (summed, the lam term of C_tool)
    "n_crops",  # regions in the subset / 3
    "rank",  # rank of the subset among the distinct ones / m (0 = the scorer's best)
    "fallback",  # 1 for the 'all' action offered when the reader found no line at all
    "density",  # log(1 + number of detected lines) / 5
    *(f"text_{k}" for k in ("len", "digits", "letters", "upper", "punct", "date", "money", "colon")),
    *(f"asks_{k}" for k in ("date", "amount", "other")),
)
"""Names of one candidate's features ``g`` (length ``G``); see :func:`action_space` for the action vector."""

G = len(ACTION_FEATURES)
N_ACTION_FEATURES = 1 + 2 * G
"""Length of an action's feature vector: ``[is_no_crops, g (NO_CROPS block), g (GET_CROPS block)]``."""

_ASKS_DATE = re.compile(r"\b(date|dated|when|day|month|year)\b", re.IGNORECASE)
_ASKS_AMOUNT = re.compile(
    r"\b(total|amount|price|cost|paid|pay|sum|how much|how many|number|percent|percentage|rate|value)\b|%",
    re.IGNORECASE,
)


def question_shape(question: str) -> np.ndarray:
    """What kind of answer the question asks for, from its words: ``[3]`` = (date, amount, other), one-hot.

    Word rules, not a field id, so any question goes through (a date question on a report, an amount on a slide).
    """
    if _ASKS_DATE.search(question):
        return np.array([1.0, 0.0, 0.0], np.float32)
    if _ASKS_AMOUNT.search(question):
        return np.array([0.0, 1.0, 0.0], np.float32)
    return np.array([0.0, 0.0, 1.0], np.float32)


def looks_like_answer(question: str, text: str) -> float:
    """1.0 when a region's low-resolution ``text`` already has the shape of an answer to ``question``, else 0.0.

    Date questions: the text holds a date pattern; amount questions: a money pattern or >= 30 % digits; other
    questions: >= 3 characters, mostly letters (:func:`~zoomvlm.policies.perception.text_stats`).
    """
    if not text.strip():
        return 0.0
    stats = text_stats(text)
    date, amount, _ = question_shape(question)
    if date:
        return float(stats[5] > 0)
    if amount:
        return float(stats[6] > 0 or stats[1] >= 0.3)
    return float(stats[2] >= 0.5 and len(text.strip()) >= 3)


@dataclass
class ReaderConfig:
    """A reader crop-set policy's settings (saved as its checkpoint's ``config.json``).

    Args:
        crop_set: ``"awares"`` (AwaRes's 10 regions, default) or ``"fine"`` (plus eighth-height bands and their
            halves, :data:`~zoomvlm.awares.protocol.FINE_CROP_SET`).
        m: GET_CROPS actions per question (distinct crop subsets of the best candidate regions); ``m + 1`` actions.
        hidden: width of the head's residual MLP (0 = the head is one linear layer).
        high: the high-resolution budget (the low view is it with sides halved; RTR is counted against it).
        scorer: the proposals checkpoint whose scorer finds the candidate regions (``None`` = the shipped one).
        text_view: ``"low"`` (default): the perception's TEXT pass reads the AwaRes low view (``high``'s longest side
            halved), the view the target reads first, so it is shared with an ``ocr`` target there and the
            confidences are those of the target's own reading; the line boxes come from the detector at the scorer's
            view budget (two-pass, :func:`~zoomvlm.policies.perception.perception_from_passes`), as the scorer was
            trained. ``"scorer"``: the scorer checkpoint's perception settings as they are. See
            :func:`perception_settings` for the rule and its measurement.
        perception: explicit perception settings (keys :data:`PERCEPTION_KEYS`) over the two above. Training writes
            the resolved settings here, so a checkpoint perceives as it was trained whatever ``high`` it is run at.
        cover: a crop subset must cover this share of the (padded) region box
            (:func:`~zoomvlm.awares.protocol.covering_crops`).
        max_crops: the most regions in one subset.
        scan: candidates considered, best first, to find ``m`` distinct subsets and each subset's ``mass``.
        init: how the initial policy was made (``"hand-set"``; recorded, not read).

    Raises:
        ValueError: an unknown crop set, text view or perception key, ``m < 1``, ``hidden < 0``.
    """

    crop_set: str = "awares"
    m: int = 3
    hidden: int = 16
    high: str = "side:768"
    scorer: str | None = None
    text_view: str = "low"
    perception: dict = field(default_factory=dict)
    cover: float = 0.99
    max_crops: int = 3
    scan: int = 24
    init: str = "hand-set"

    def __post_init__(self) -> None:
        if self.crop_set not in CROP_SETS:
            raise ValueError(f"unknown crop set {self.crop_set!r}; use one of {sorted(CROP_SETS)}")
        if self.m < 1 or self.hidden < 0 or self.scan < 1:
            raise ValueError(f"m and scan must be >= 1 and hidden >= 0, got {self.m}, {self.scan}, {self.hidden}")
        if self.text_view not in ("low", "scorer"):
            raise ValueError(f"text_view must be 'low' or 'scorer', got {self.text_view!r}")
        bad = set(self.perception) - set(PERCEPTION_KEYS)
        if bad:
            raise ValueError(f"unknown perception settings {sorted(bad)}; use {PERCEPTION_KEYS}")
        Budget.parse(self.high)


def perception_settings(scorer_config, config: ReaderConfig | None = None, high: Budget | str | None = None) -> dict:
    """The perception settings ``{view_budget, detect_budget, legible, max_recognise}`` of a reader policy.

    Start from the scorer checkpoint's (:class:`~zoomvlm.cropvlm.proposals.ScorerConfig`). With
    ``config.text_view == "low"`` and a longest-side ``high`` (default ``config.high``), the text pass moves to the
    AwaRes low view, ``L = high // 2``: when the scorer reads at ``S > L``, two passes (text at ``L``, line boxes from
    the detector at ``S``, or at the scorer's own detection budget if it has one); when ``S < L``, one pass at ``L``;
    ``S == L``: unchanged. ``config.perception`` then overrides any key.

    Why (measured on the 361 receipts-train questions with cached reads at 384 and 512 px, shipped 512 px scorer,
    target = ``ocr`` on the 384 px low view, right on 50.1 %): how well the best region's reading predicts that the
    low view suffices, AUC of confidence + looks-like-an-answer, is 0.833 with the text from the 384 px view against
    0.803 from the scorer's 512 px view, and the page's legibility alone reaches 0.848 (0.5, uninformative, in one
    pass). The policy must judge what the TARGET can read, and that text pass is the target's own first turn.
    """
    settings = {k: getattr(scorer_config, k) for k in PERCEPTION_KEYS}
    config = config or ReaderConfig()
    high = Budget.parse(high if high is not None else config.high)
    if config.text_view == "low" and high.max_side and not high.max_pixels:
        low, own = max(1, high.max_side // 2), Budget.parse(settings["view_budget"])
        if own.max_side and not own.max_pixels and own.max_side != low:
            if own.max_side > low:
                settings["detect_budget"] = settings["detect_budget"] or str(own.max_side)
            settings["view_budget"] = str(low)
    settings.update(config.perception)
    return settings


def make_perceiver(settings: dict) -> Perceiver:
    """A :class:`~zoomvlm.policies.perception.Perceiver` with :func:`perception_settings`' settings (as
    ``ProposalCropper`` builds its own)."""
    return Perceiver(
        Budget.parse(settings["view_budget"]),
        detect_budget=settings["detect_budget"],
        legible=settings["legible"],
        max_recognise=settings["max_recognise"],
        part_px=settings.get("part_px"),
    )


@dataclass(frozen=True)
class ActionSpace:
    """The actions of one (image, question): ``keys[0] == []`` is ``NO_CROPS``; ``keys[j]`` (j >= 1) a crop subset.

    Args:
        keys: crop keys per action (``A = len(keys)`` <= ``m + 1``).
        regions: per action, the index into ``perception.regions`` of the candidate it covers (``None`` for
            ``NO_CROPS`` and for the ``all`` fallback).
        x: ``[A, N_ACTION_FEATURES]`` float32 features (see :func:`action_space`).
    """

    keys: tuple[tuple[str, ...], ...]
    regions: tuple[int | None, ...]
    x: np.ndarray


def _candidate_features(perception: Perception, question: str, region=None, **values) -> np.ndarray:
    g = np.zeros(G, np.float32)
    g[ACTION_FEATURES.index("legibility")] = perception.legibility
    g[ACTION_FEATURES.index("density")] = np.log1p(len(perception.lines)) / 5
    g[-3:] = question_shape(question)
    if region is not None:
        g[ACTION_FEATURES.index("conf")] = region.confidence
        g[ACTION_FEATURES.index("looks")] = looks_like_answer(question, region.text)
        start = ACTION_FEATURES.index("text_len")
        g[start : start + 8] = text_stats(region.text)
    for name, value in values.items():
        g[ACTION_FEATURES.index(name)] = value
    return g


def action_space(
    perception: Perception, logits: np.ndarray, question: str, config: ReaderConfig, scorer_config
) -> ActionSpace:
    """NO_CROPS + up to ``m`` GET_CROPS actions for one (image, question), with their features.

    Args:
        perception: the reader's pass over the image (regions in the ORIGINAL image's normalised frame).
        logits: ``[len(perception.regions)]`` scorer logits of the candidates for ``question``.
        config: the policy's :class:`ReaderConfig` (``crop_set``, ``m``, ``cover``, ``max_crops``, ``scan``).
        scorer_config: the scorer's :class:`~zoomvlm.cropvlm.proposals.ScorerConfig`; a region is covered as the
            ``proposals`` cropper would cut it (:func:`~zoomvlm.cropvlm.proposals.crop_box`: margins + line pad).

    The best ``scan`` candidates, by logit, are mapped to their smallest covering subset of the crop set; the
    first ``m`` DISTINCT subsets become the GET_CROPS actions, in that order (two lines in one band are one
    action). No candidate at all (the reader found nothing in the view): the one GET_CROPS action is ``['all']``.

    Features (:data:`ACTION_FEATURES`, ``g`` of length ``G``): an action's vector is ``[is_no_crops, g_no, g_crop]``
    ``[N_ACTION_FEATURES]``: ``NO_CROPS`` is ``[1, g(best candidate), 0]``, GET_CROPS ``j`` is ``[0, 0, g(its
    candidate)]``, so a linear head has separate weights for "trust the low view's reading of the best region" and
    "fetch this region", and the NO_CROPS logit can depend on how confidently the reader read it.

    Returns:
        The :class:`ActionSpace`; deterministic for given inputs.
    """
    from zoomvlm.cropvlm.proposals import crop_box

    regions = perception.regions
    keys: list[tuple[str, ...]] = [()]
    chosen: list[int | None] = [None]
    gs: list[np.ndarray] = []
    if regions:
        logits = np.asarray(logits, np.float64)
        logp = logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
        order = [int(i) for i in np.argsort(-logits, kind="stable")[: config.scan]]
        boxes = {i: crop_box(regions[i], scorer_config) for i in order}
        for i in order:
            subset = tuple(covering_crops(boxes[i], config.crop_set, config.cover, config.max_crops))
            if subset in keys:
                continue
            keys.append(subset)
            chosen.append(i)
            if len(keys) == config.m + 1:
                break
        for j, (subset, i) in enumerate(zip(keys[1:], chosen[1:], strict=True)):
            mass = sum(np.exp(logp[c]) for c in order if crop_set_coverage(subset, boxes[c]) >= config.cover)
            gs.append(_candidate_features(perception, question, regions[i], logp=max(logp[i], -10.0) / 10,
                                          mass=mass, area=crop_set_sent_area(subset), n_crops=len(subset) / 3,
                                          rank=j / config.m))  # fmt: skip
        best = gs[0]
    else:
        keys.append(("all",))
        chosen.append(None)
        gs.append(_candidate_features(perception, question, None, area=1.0, n_crops=1 / 3, fallback=1.0))
        best = _candidate_features(perception, question, None)
    x = np.zeros((len(keys), N_ACTION_FEATURES), np.float32)
    x[0, 0], x[0, 1 : 1 + G] = 1.0, best
    for j, g in enumerate(gs, start=1):
        x[j, 1 + G :] = g
    return ActionSpace(tuple(keys), tuple(chosen), x)


class ActionHead(nn.Module):
    """The policy's head: a categorical over the actions of one question, ``pi(a) = softmax(logits)_a``.

    ``logits = linear(x) + mlp(x)``: a linear layer (the hand-set initial policy lives there) plus, when
    ``config.hidden > 0``, a 2-layer MLP residual whose output layer starts at zero (so the initial policy is
    exactly the linear one and GRPO can learn interactions, e.g. confidence x question shape).

    Shapes: ``forward(q [B, *] (unused), x [B, A, N_ACTION_FEATURES], mask [B, A] bool) -> logits [B, A]``,
    ``-inf`` where ``mask`` is False: the signature of :class:`~zoomvlm.cropvlm.proposals.RegionScorer`, so the
    proposals GRPO loop (:func:`~zoomvlm.cropvlm.proposal_grpo.grpo_step`) trains it unchanged.
    """

    def __init__(self, config: ReaderConfig | None = None):
        super().__init__()
        self.config = config or ReaderConfig()
        self.linear = nn.Linear(N_ACTION_FEATURES, 1)
        self.mlp = None
        if self.config.hidden:
            self.mlp = nn.Sequential(
                nn.Linear(N_ACTION_FEATURES, self.config.hidden), nn.Tanh(), nn.Linear(self.config.hidden, 1)
            )
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)

    def forward(self, q: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = self.linear(x).squeeze(-1)  # [B, A]
        if self.mlp is not None:
            logits = logits + self.mlp(x).squeeze(-1)
        return logits.masked_fill(~mask, float("-inf"))


HAND_SET = {
    # NO_CROPS block: trust the low view when the best region was read confidently and looks like an answer
    "is_no": -11.5,
    "no.conf": 12.0,
    "no.looks": 2.0,
    # GET_CROPS block: the scorer's best region first, a subset holding more of its mass, a smaller area
    "crop.logp": 2.0,
    "crop.mass": 2.0,
    "crop.rank": -1.0,
    "crop.area": -1.0,
}
"""The initial policy's weights: NO_CROPS logit ``12 conf + 2 looks - 11.5``, GET_CROPS logit
``2 logp + 2 mass - rank - area`` (``logp`` in [-1, 0]). With a sure scorer (mass ~1, a quadrant's logit ~1.7)
NO_CROPS wins only when the best region was read at confidence above ~0.93 and looks like an answer. With an unsure
scorer the GET_CROPS logits fall (low mass, negative logp), and a region read at confidence ~0.96 or more can win
NO_CROPS even when it does not look like an answer (``12 conf - 11.5`` up to 0.5): the rule is the comparison of
the two logits, not "always fetch what does not look like an answer"."""


def hand_set_head(config: ReaderConfig | None = None) -> ActionHead:
    """The initial policy (and GRPO's KL reference): :data:`HAND_SET` in the linear layer, the MLP's output at 0.

    Deterministic: the MLP's hidden layer is initialised from a fixed seed (0), apart from the global RNG.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        head = ActionHead(config)
    w = torch.zeros(N_ACTION_FEATURES)
    for name, value in HAND_SET.items():
        if name == "is_no":
            w[0] = value
            continue
        block, feature = name.split(".")
        w[(1 if block == "no" else 1 + G) + ACTION_FEATURES.index(feature)] = value
    with torch.no_grad():
        head.linear.weight.copy_(w[None, :])
        head.linear.bias.zero_()
    return head.eval()


def save_reader(model: ActionHead, out_dir: str | Path, recipe: dict | None = None) -> Path:
    """Write ``head.pt``, ``config.json`` (:class:`ReaderConfig`) and ``zoomvlm_recipe.json`` into ``out_dir``."""
    from zoomvlm.cropvlm.proposals import save_checkpoint

    return save_checkpoint(model, out_dir, "head.pt", recipe)


def load_reader(path: str | Path) -> ActionHead:
    """Load a head saved by :func:`save_reader`.

    Raises:
        FileNotFoundError: ``path`` lacks ``head.pt`` or ``config.json`` (e.g. a ``proposals`` checkpoint).
        ValueError: ``config.json`` is not a JSON object of :class:`ReaderConfig` fields with valid values (e.g. a
            setting written by a newer zoomvlm), or ``head.pt`` does not fit it (the message names the file).
    """
    from zoomvlm.cropvlm.proposals import load_checkpoint

    return load_checkpoint(path, "head.pt", ReaderConfig, ActionHead, "crop-set-reader")


class ReaderCropSetPolicy:
    """``crop-set-reader[:CKPT][@HIGH]``: AwaRes's external crop-set policy that looks with the reader (module docs).

    Args:
        path: a :func:`save_reader` checkpoint; ``None`` = the hand-set initial head with ``config``.
        high: the high-resolution budget; ``None`` = the checkpoint's (``config.high``, default 768 px).
        config: the :class:`ReaderConfig` when ``path`` is None (default: AwaRes's crop set).
        head: an already built head (tests, training); overrides ``path``'s.
        scorer: a loaded :class:`~zoomvlm.cropvlm.proposals.RegionScorer` (else ``config.scorer`` or the shipped one).
        perceiver, encoder: shared instances (tests); built from the settings otherwise.
        name: the policy name in records.

    ``propose`` returns one :func:`~zoomvlm.awares.protocol.crop_set_proposal` per question (the greedy action;
    ``raw`` says which and why), with ``shared_seconds`` of a first pass read for the target. ``evidence`` is
    ignored: no human box is read.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        high: Budget | int | str | None = None,
        *,
        config: ReaderConfig | None = None,
        head: ActionHead | None = None,
        scorer=None,
        perceiver: Perceiver | None = None,
        encoder: QuestionEncoder | None = None,
        name: str | None = None,
    ):
        from zoomvlm.cropvlm.proposals import ProposalCropper, default_proposals_path, load_scorer

        self.checkpoints = () if path is None or head is not None else (str(path),)  # fingerprinted by run_eval
        if head is None:
            head = load_reader(path) if path is not None else hand_set_head(config)
        self.head = head.eval()
        self.config = self.head.config
        self.high = Budget.parse(high if high is not None else self.config.high)
        if scorer is None:
            self.checkpoints += (str(self.config.scorer or default_proposals_path()),)
        scorer = scorer if scorer is not None else load_scorer(self.config.scorer or default_proposals_path())
        self.settings = perception_settings(scorer.config, self.config, self.high)
        self.cropper = ProposalCropper(model=scorer, perceiver=perceiver or make_perceiver(self.settings),
                                       encoder=encoder)  # fmt: skip
        self.perceiver = self.cropper.perceiver
        self._own: Perceiver | None = None  # reads views the bound target will not read itself
        suffix = f":{path}" if path is not None else ("" if self.config.crop_set == "awares" else "@fine")
        self.name = name or f"crop-set-reader{suffix}"

    def bind_target(self, target) -> bool:
        """Share the perception pass with ``target`` where possible, as ``proposals`` does
        (:meth:`~zoomvlm.policies.perception.Perceiver.bind`): True when ``target`` is the ``ocr`` reader at the
        perceiver's view budget."""
        return self.cropper.bind_target(target)

    def _perceive(self, image: Image.Image) -> Perception:
        """The reader's pass; through the target only when the target's global view (the AwaRes low view) is the
        perceiver's view, else by an unbound perceiver, so a shared read is always consumed (and charged) once."""
        w, h = image.size
        if not self.perceiver.shared or self.perceiver.budget.fit(w, h) == low_res_budget(image, self.high).fit(w, h):
            return self.perceiver.perceive(image)
        if self._own is None:
            self._own = make_perceiver(self.settings)
        return self._own.perceive(image)

    def actions(self, image: Image.Image, question: str) -> tuple[Perception, ActionSpace, np.ndarray]:
        """``(perception, action space, head logits [A])`` of one (image, question)."""
        from zoomvlm.cropvlm.proposals import pad_batch

        p = self._perceive(image)
        space = action_space(p, self.cropper.logits(p, question), question, self.config, self.cropper.config)
        q, x, mask = pad_batch([(np.zeros(0, np.float32), space.x)])
        with torch.no_grad():
            logits = self.head(q, x, mask)[0].numpy()
        return p, space, logits

    def propose(self, images: Sequence[Image.Image], questions: Sequence[str], evidence=None) -> list[Proposal]:
        """The greedy action of the head per (image, question): ``NO_CROPS`` (the low view alone) or the crop subset
        covering one of the scorer's best regions, as a :func:`~zoomvlm.awares.protocol.crop_set_proposal` (boxes
        normalised to the original image, crops at the ``high`` view's scale). ``evidence`` is ignored; on an image
        where the reader finds no text the choice is between ``NO_CROPS`` and the ``all`` crop."""
        out = []
        for image, question in zip(images, questions, strict=True):
            p, space, logits = self.actions(image, question)
            a = int(np.argmax(logits))
            keys = list(space.keys[a])
            r = space.regions[a if a else (1 if len(space.regions) > 1 else 0)]
            seen = (
                "no line" if r is None else f"{p.regions[r].text[:60]!r} at confidence {p.regions[r].confidence:.2f}"
            )
            raw = f"{NO_CROPS} (best region {seen})" if not keys else f"GET_CROPS {keys} (region {seen})"
            proposal = crop_set_proposal(image, keys, self.high, raw=raw)
            out.append(replace(proposal, shared_seconds=p.shared_seconds))
        return out


# ---------------------------------------------------------------------------------------------
# Training: items and the AwaRes reward over actions (zoomvlm train crop-set-reader)
# ---------------------------------------------------------------------------------------------
@dataclass
class ReaderItem:
    """One training question: its sample (evidence stripped), perception, action space.

    ``q`` is empty (``[0]``): the head reads only ``x`` (kept so :func:`~zoomvlm.cropvlm.proposals.pad_batch` and the
    proposals GRPO loop take these items as they are); ``x`` = ``space.x`` ``[A, N_ACTION_FEATURES]``.
    """

    sample: object
    perception: Perception
    space: ActionSpace
    q: np.ndarray
    x: np.ndarray


def build_reader_items(samples, perceptions: dict[str, Perception], scorer, encoder: QuestionEncoder,
                       config: ReaderConfig, progress: bool = True) -> list[ReaderItem]:  # fmt: skip
    """Action spaces of every sample, from cached perceptions (``{str(sample.image): Perception}``) and the frozen
    scorer (:func:`~zoomvlm.cropvlm.proposal_data.build_items` features, no seed labels)."""
    from zoomvlm.cropvlm.proposal_data import build_items
    from zoomvlm.cropvlm.proposals import pad_batch

    out = []
    with torch.no_grad():
        for it in build_items(samples, perceptions, encoder, None, progress=progress, version=scorer.config.features):
            if it.x.shape[0]:
                q, x, mask = pad_batch([(it.q, it.x)])
                logits = scorer(q, x, mask)[0].numpy()
            else:
                logits = np.zeros(0, np.float32)
            space = action_space(it.perception, logits, it.sample.question, config, scorer.config)
            out.append(ReaderItem(it.sample, it.perception, space, np.zeros(0, np.float32), space.x))
    return out


def load_awares_labels(dirs: Sequence[str | Path]) -> dict[str, str]:
    """``{sample id: "LR" | "HR"}`` from ``zoomvlm curate awares`` folders (their ``raw.jsonl``).

    Raises:
        FileNotFoundError: a folder without ``raw.jsonl``.
    """
    labels = {}
    for d in dirs:
        path = Path(d) / "raw.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (write it with `zoomvlm curate awares`)")
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # torn last line of a killed run
                continue
            labels[row["id"]] = str(row["label"]).upper()
    return labels


HIGH_KEY = "@high"
"""Reward-cache key of the target's answer score from the high view alone (for on-the-fly LR/HR labels)."""


def action_key(keys: Sequence[str]) -> str:
    """Text key of an action in the reward cache: ``NO_CROPS`` or the crop keys joined by commas."""
    return ",".join(keys) if keys else NO_CROPS


class ActionReward:
    """AwaRes's ``R = R_ans - C_tool`` (sec. 3.4) for actions of :class:`ReaderItem` s, as a proposals-GRPO reward.

    ``reward(item_indices, actions) -> [R]`` (the ``RewardFn`` of :mod:`zoomvlm.cropvlm.proposal_grpo`): action ``a``
    of item ``i`` is ``items[i].space.keys[a]``; the frozen ``target`` answers from the low view of ``high`` plus
    those crops (:func:`~zoomvlm.awares.protocol.crop_set_proposal`, the views of inference), ``R_ans`` =
    :func:`~zoomvlm.awares.rewards.answer_scores` (``metric``, ``contains`` for the reader's transcripts) against the
    sample's answers, ``C_tool`` = :class:`~zoomvlm.awares.rewards.ToolCost` of the crops (summed area sent,
    either crop set) with ``needs_hr`` the sample's label:

    - from ``labels`` (``zoomvlm curate awares``, :func:`load_awares_labels`) when the sample has one;
    - else ON THE FLY, by curation's metric-judge rule (:class:`~zoomvlm.awares.curation.MetricJudge`): HR iff the
      target's low-view score is < 0.5 and below its score from the high view alone. The high view is read only for
      samples whose low-view answer is wrong, and only when a NO_CROPS action needs the label.

    Answer scores (``R_ans`` per (sample, action), and the high view's) are memoised in ``cache`` (a
    :class:`~zoomvlm.cropvlm.proposal_grpo.RewardCache`, optionally on disk): the target is frozen, so a rerun or
    another ``lam`` reuses them. ``n_requests`` counts target requests actually sent.
    """

    def __init__(self, items: Sequence[ReaderItem], target, high: Budget | str, cost=None, cache=None,
                 labels: dict[str, str] | None = None, metric: str = "contains"):  # fmt: skip
        from zoomvlm.awares.rewards import ToolCost, check_answer_reward
        from zoomvlm.cropvlm.proposal_grpo import RewardCache

        check_answer_reward(metric)
        self.items, self.target, self.high = items, target, Budget.parse(high)
        self.cost = cost or ToolCost()
        self.cache = cache if cache is not None else RewardCache()
        self.labels = labels or {}
        self.metric = metric
        self.n_requests = 0

    def _score(self, todo: list[tuple[int, str]]) -> None:
        """Ask the target for every (item index, action key or HIGH_KEY) not cached yet; cache the scores."""
        from zoomvlm.awares.rewards import answer_scores
        from zoomvlm.core.pipeline import build_request
        from zoomvlm.data.samples import load_image_cached

        todo = list(dict.fromkeys((i, k) for i, k in todo if (self.items[i].sample.id, k) not in self.cache.values))
        if not todo:
            return
        requests = []
        for i, k in todo:
            s = self.items[i].sample
            img = load_image_cached(str(s.image))
            if k == HIGH_KEY:
                proposal = Proposal(global_budget=self.high)
            else:
                proposal = crop_set_proposal(img, [] if k == NO_CROPS else k.split(","), self.high)
            requests.append(build_request(img, s.question, proposal))
        self.n_requests += len(requests)
        texts = [g.text for g in self.target.generate(requests)]
        answers = [list(self.items[i].sample.answers) for i, _ in todo]
        for (i, k), v in zip(todo, answer_scores(self.metric, texts, answers), strict=True):
            self.cache.add((self.items[i].sample.id, k), float(v))

    def needs_hr(self, i: int) -> bool:
        """The LR/HR label of item ``i`` (see the class docstring); may ask the target for two answers."""
        sid = self.items[i].sample.id
        if sid in self.labels:
            return self.labels[sid] == "HR"
        self._score([(i, NO_CROPS)])
        low = self.cache.values[(sid, NO_CROPS)]
        if low >= 0.5:
            return False
        self._score([(i, HIGH_KEY)])
        return self.cache.values[(sid, HIGH_KEY)] > low

    def __call__(self, item_indices: Sequence[int], actions: Sequence[int]) -> list[float]:
        keys = [list(self.items[i].space.keys[a]) for i, a in zip(item_indices, actions, strict=True)]
        pairs = [(i, action_key(k)) for i, k in zip(item_indices, keys, strict=True)]
        self._score(pairs)  # one batch for every new (question, action) of the step
        no_crop = sorted({i for (i, k) in pairs if k == NO_CROPS and self.items[i].sample.id not in self.labels})
        lows = [i for i in no_crop if self.cache.values[(self.items[i].sample.id, NO_CROPS)] < 0.5]
        self._score([(i, HIGH_KEY) for i in lows])  # the high views the on-the-fly labels need, in one batch
        out = []
        for (i, k), crops in zip(pairs, keys, strict=True):
            r_ans = self.cache.values[(self.items[i].sample.id, k)]
            out.append(r_ans - self.cost(crops, self.needs_hr(i) if not crops else False))
        return out
