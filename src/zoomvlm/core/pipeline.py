"""One code path from (image, question) to a scored Record: policy -> views -> target -> metrics + usage.

Inference (``zoomvlm ask``), evaluation (``zoomvlm eval``) and training rewards all build their views
here, so a crop means the same thing everywhere:

- the global view is the whole ORIGINAL image, shrunk by the target to its budget (native for ``full``);
- each crop is cut from the ORIGINAL image (never from the shrunk view) and shrunk to the crop budget;
- the request is ``[global, crop, ...]`` + question (CropVLM's target input).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from PIL import Image

from zoomvlm.core.geometry import Budget, crop_image
from zoomvlm.core.metrics import GENERIC_METRICS, METRICS, evidence_hit, score_answer
from zoomvlm.data.samples import Sample
from zoomvlm.policies.base import Proposal, ZoomPolicy
from zoomvlm.targets.base import Target, TargetRequest

__all__ = ["Record", "build_request", "run_batch"]


@dataclass(frozen=True)
class Record:
    """The result of one sample, one line of ``results.jsonl``.

    Units: pixels are counted per view as the target consumed them; ``rtr`` (Retain Token Ratio, AwaRes
    sec. 4) = visual tokens of all views / visual tokens of the whole image processed once at the run's RTR
    reference (native, i.e. the model's full resolution, unless ``rtr_reference`` says otherwise) where the
    target counts tokens (``hf:``; ``rtr_unit`` "tokens"), else the same ratio in pixels (``rtr_unit``
    "pixels"); seconds are
    wall-clock, batch time split evenly over the batch. ``cached``: the target's answer came from a response
    cache (:class:`~zoomvlm.targets.cache.CachedTarget`); its usage and ``target_seconds`` are then those measured
    by the call that computed it, not the lookup's. ``evidence_hit`` is 0 when the policy's output was invalid
    and it fell back to the whole image (that box covers everything but found nothing). Self-zoom records
    (``--policy self-zoom``) also carry ``action`` (``direct``, ``crops:3,0`` or ``tool_error``) and
    ``turn_seconds`` (each turn's wall time); their ``target_seconds`` is both turns together.
    """

    id: str
    question: str
    answers: list[str]
    prediction: str
    metric: str
    score: float
    metrics: dict[str, float]
    boxes: list[list[float]]
    policy_raw: str | None
    policy_error: str | None
    evidence_hit: float | None
    view_pixels: list[int]
    rtr: float
    visual_tokens: int | None
    prompt_tokens: int | None
    completion_tokens: int | None
    policy_seconds: float
    target_seconds: float
    width: int
    height: int
    field: str | None = None
    cached: bool = False
    rtr_unit: str = "pixels"
    action: str | None = None
    turn_seconds: list[float] | None = None

    def to_json(self) -> dict:
        return asdict(self)


def build_request(
    image: Image.Image, question: str, proposal: Proposal, crop_budget: Budget | None = None
) -> TargetRequest:
    """The target request for one proposal: ``[global view, crops...]`` cut from the ORIGINAL ``image``.

    Budgets: the global view gets ``proposal.global_budget`` (else the target's own); each crop gets its
    ``proposal.crop_budgets`` entry, else ``proposal.crop_budget``, else ``crop_budget``, else the
    target's own. ``None`` entries are resolved
    by the target, so the request stays target-agnostic.
    """
    crops = [crop_image(image, box) for box in proposal.boxes]
    per_crop = proposal.crop_budgets or [proposal.crop_budget or crop_budget] * len(crops)
    budgets = [proposal.global_budget, *per_crop]
    if all(b is None for b in budgets):
        return TargetRequest((image, *crops), question)
    return TargetRequest((image, *crops), question, view_budgets=tuple(budgets))


def _reference_pixels(width: int, height: int, reference: Budget | None) -> int:
    w, h = (width, height) if reference is None else reference.fit(width, height)
    return w * h


def rtr_of(target: Target, image: Image.Image, usage, width: int, height: int, reference: Budget | None = None):
    """``(rtr, unit)`` of one answered request: visual tokens over the reference's visual tokens where the target
    counts both (the model's own currency, AwaRes sec. 3.1; ``unit`` ``"tokens"``), else processed pixels over the
    reference's pixels (``"pixels"``). ``image`` is the original image of ``width x height`` pixels; ``reference``
    ``None`` = that image at native resolution (else e.g. AwaRes's high view)."""
    count = getattr(target, "reference_visual_tokens", None)
    if usage.visual_tokens is not None and count is not None:
        full = count(image, reference)
        if full:
            return usage.visual_tokens / full, "tokens"
    return usage.pixels / _reference_pixels(width, height, reference), "pixels"


def run_batch(
    samples: Sequence[Sample],
    policy: ZoomPolicy,
    target: Target,
    metric: str = "contains",
    crop_budget: Budget | None = None,
    images: Sequence[Image.Image] | None = None,
    rtr_reference: Budget | None = None,
) -> list[Record]:
    """Answer and score a batch of samples.

    Args:
        samples: the questions; their ``evidence_boxes`` reach only the policy's ``evidence`` argument
            (read by the evaluation-only oracle) and the ``evidence_hit`` metric.
        policy, target: see :class:`~zoomvlm.policies.base.ZoomPolicy`, :class:`~zoomvlm.targets.base.Target`.
        metric: name in :data:`~zoomvlm.core.metrics.METRICS` used for ``score`` (a sample's own ``metric`` wins).
        crop_budget: budget of the crops; ``None`` = the target's budget.
        images: the samples' images if already loaded (native resolution); loaded from disk otherwise.
        rtr_reference: the view RTR is counted against: pixels processed / pixels of the whole image under
            this budget. ``None`` = native resolution. AwaRes compares with its HIGH-resolution view (e.g.
            ``side:768`` on the receipts testbed), so a low view plus one quadrant is 0.25 + 0.25.

    Raises:
        UnreadableImageError: an image cannot be read (names the file).
        DatasetError: a sample with evidence boxes whose image's decoded (upright) size differs from its
            ``width`` x ``height``: the boxes, normalised with the declared size, would land elsewhere and the
            oracle crop and evidence hit would be wrong without a sign. (RTR always uses the decoded size.)
        KeyError: an unknown metric name.
    """
    if images is None:
        images = [s.load_image() for s in samples]
    for s, img in zip(samples, images, strict=True):
        if s.evidence_boxes and img.size != (s.width, s.height):
            from zoomvlm.data.samples import DatasetError

            raise DatasetError(
                f"sample {s.id!r}: its image {s.image} is {img.width}x{img.height} px (upright, after EXIF "
                f"orientation) but the data says {s.width}x{s.height}: fix width/height (they are those of the "
                "upright image; evidence boxes are pixels of it)"
            )
    questions = [s.question for s in samples]
    start = time.perf_counter()
    turn_seconds = actions = None
    if hasattr(policy, "bind_target"):  # reads the target's internals (ViCrop) or shares its first pass (proposals)
        policy.bind_target(target)
    if hasattr(policy, "answer_with"):  # self-zoom: the target decides and answers itself, over two turns
        pairs = policy.answer_with(target, images, questions)
        proposals, generations = [p for p, _ in pairs], [g for _, g in pairs]
        turn_seconds, actions = policy.last_turn_seconds, policy.last_actions
        policy_seconds = 0.0
    else:
        proposals = policy.propose(images, questions, evidence=[s.evidence_boxes for s in samples])
        # A first pass made for the target (Proposal.shared_seconds) is charged by the target, not here.
        shared = sum(p.shared_seconds for p in proposals)
        policy_seconds = max(0.0, time.perf_counter() - start - shared) / max(1, len(samples))
    if len(proposals) != len(samples):
        raise RuntimeError(f"policy {policy.name} returned {len(proposals)} proposals for {len(samples)} samples")
    if turn_seconds is None:
        reqs = [build_request(img, q, p, crop_budget) for img, q, p in zip(images, questions, proposals, strict=True)]
        generations = target.generate(reqs)
    records = []
    for i, (sample, prop, gen) in enumerate(zip(samples, proposals, generations, strict=True)):
        name = sample.metric or metric
        if name not in METRICS:
            raise KeyError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")
        # The generic metrics for comparison, plus the sample's own (which may need its options).
        names = dict.fromkeys([*GENERIC_METRICS, name])
        scores = {m: score_answer(m, gen.text, sample.answers, sample.meta) for m in names} if sample.answers else {}
        usage = gen.usage
        rtr, rtr_unit = rtr_of(target, images[i], usage, images[i].width, images[i].height, rtr_reference)
        hit = evidence_hit(prop.boxes, sample.evidence_boxes)
        if prop.error and prop.boxes and hit is not None:
            hit = 0.0  # the whole-image fallback of an invalid output covers everything; it found nothing
        records.append(
            Record(
                id=sample.id,
                question=sample.question,
                answers=list(sample.answers),
                prediction=gen.text,
                metric=name,
                score=scores.get(name, float("nan")),
                metrics=scores,
                boxes=[b.as_list() for b in prop.boxes],
                policy_raw=prop.raw,
                policy_error=prop.error,
                evidence_hit=hit,
                view_pixels=list(usage.view_pixels),
                rtr=rtr,
                visual_tokens=usage.visual_tokens,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                policy_seconds=policy_seconds,
                target_seconds=usage.seconds,
                width=sample.width,
                height=sample.height,
                field=sample.field,
                cached=getattr(gen, "cached", False),
                rtr_unit=rtr_unit,
                action=actions[i] if actions is not None else None,
                turn_seconds=turn_seconds[i] if turn_seconds is not None else None,
            )
        )
    return records
