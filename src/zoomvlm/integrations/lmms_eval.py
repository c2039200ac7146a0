"""lmms-eval plugin: any zoomvlm target + zoom policy as an lmms-eval model.

Registered through the ``lmms_eval.models`` entry point (pyproject), so once zoomvlm is installed::

    lmms-eval --model zoomvlm --model_args target=hf:Qwen/Qwen2.5-VL-7B-Instruct,policy=vlm:ckpt,budget=448 \\
        --tasks textvqa_val,docvqa_val

``model_args``: ``target`` and ``policy`` are spec strings as ``zoomvlm eval`` takes them
(:func:`zoomvlm.targets.load_target`, :func:`zoomvlm.policies.load_policy`); ``budget`` / ``crop_budget`` as
``--budget`` / ``--crop-budget``; ``batch_size`` requests per target call; ``greedy_check`` (default false)
makes ``loglikelihood`` also generate, to report whether the continuation is the greedy answer.

This module imports without lmms-eval: the base class is lmms-eval's ``lmms`` when it is installed, else a
plain stand-in with the same attributes (so the class can be used and tested against lmms-eval's documented
request shapes anyway).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:
    from zoomvlm.policies.base import ZoomPolicy
    from zoomvlm.targets.base import Target

logger = logging.getLogger(__name__)

LMMS_EVAL_PASSED = frozenset({"device", "max_batch_size"})
"""model_args lmms-eval adds from its own flags (``--device``, ``--batch_size``'s max); accepted and unused."""

try:  # lmms-eval's base class validates plugins (issubclass(cls, lmms)); without it, a stand-in
    from lmms_eval.api.model import lmms as _LmmsBase
except ImportError:  # pragma: no cover - depends on the environment

    class _LmmsBase:  # type: ignore[no-redef]
        """Stand-in for ``lmms_eval.api.model.lmms`` when lmms-eval is not installed."""

        is_simple = True

        def __init__(self) -> None:
            self._rank = 0
            self._world_size = 1
            self.task_dict: dict = {}

        @property
        def rank(self) -> int:
            return self._rank

        @property
        def world_size(self) -> int:
            return self._world_size


__all__ = ["ZoomVLM", "manifest"]


def manifest():
    """The ``lmms_eval.models`` entry point: lmms-eval's ``ModelManifest`` for ``--model zoomvlm``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="zoomvlm", simple_class_path="zoomvlm.integrations.lmms_eval.ZoomVLM")


def _as_bool(value: Any) -> bool:
    # model_args arrive as strings ("greedy_check=true") or already parsed by lmms-eval's arg parser.
    if isinstance(value, str):
        if value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if value.strip().lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    return bool(value)


def _flatten(visuals: Any) -> list:
    if visuals is None:
        return []
    if isinstance(visuals, (list, tuple)):
        return [v for item in visuals for v in _flatten(item)]
    return [visuals]


class ZoomVLM(_LmmsBase):
    """A zoomvlm target behind a zoom policy, answering lmms-eval requests.

    Each request's first image goes to the policy at native resolution; the target answers from the global
    view plus the policy's crops (:func:`zoomvlm.core.pipeline.build_request`), exactly as ``zoomvlm eval`` does.
    After a run, ``self.usage`` holds one dict per answered request (``rtr``, ``view_pixels``, tokens).

    Args:
        target, policy: spec strings, e.g. ``"ocr"``, ``"hf:HuggingFaceTB/SmolVLM-256M-Instruct"``; ``"center"``
            (or, from Python, ready Target / ZoomPolicy objects; ``budget`` then applies to specs only).
        budget, crop_budget: per-view budgets (``"384"``, ``"pixels:200000"``, ``"native"``); None = defaults.
        batch_size: requests per policy/target call.
        greedy_check: in ``loglikelihood``, also generate to tell whether the continuation is greedy
            (otherwise ``is_greedy`` is reported False).
        rtr_reference: the view RTR is counted against (``"side:768"``); None = the policy's high view for
            crop-set and self-zoom policies (AwaRes counts RTR against it), else the native image, as ``zoomvlm
            eval --rtr-reference`` does.

    Raises:
        ValueError: a bad spec, budget or batch size (from the loaders, with the accepted forms).
    """

    is_simple = True

    def __init__(
        self,
        target: str | Target = "ocr",
        policy: str | ZoomPolicy = "none",
        budget: str | int | None = None,
        crop_budget: str | int | None = None,
        batch_size: int | str = 1,
        greedy_check: bool | str = False,
        rtr_reference: str | int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        from zoomvlm.core.geometry import Budget
        from zoomvlm.policies import load_policy
        from zoomvlm.targets import load_target

        unknown = sorted(set(kwargs) - LMMS_EVAL_PASSED)
        if unknown:
            # lmms-eval splits model_args on commas, so "policy=vlm@boxes=2,t=0.7" arrives as policy + t: a policy
            # option after a comma would be dropped while the run went on without it
            raise ValueError(
                f"unknown model_args {unknown}: zoomvlm takes target, policy, budget, crop_budget, batch_size, "
                "greedy_check and rtr_reference; lmms-eval splits model_args on commas, so separate a policy's "
                "options with @ "
                "(policy=vlm@boxes=2@t=0.7, policy=crop-set-fixed:0+1)"
            )
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        parsed = Budget.parse(str(budget)) if budget is not None else None
        self.target = load_target(target, budget=parsed) if isinstance(target, str) else target
        self.policy = load_policy(policy) if isinstance(policy, str) else policy
        self.crop_budget = Budget.parse(str(crop_budget)) if crop_budget is not None else None
        self.greedy_check = _as_bool(greedy_check)
        # as zoomvlm eval: RTR against --rtr-reference, else a crop-set / self-zoom policy's high view, else native
        self.rtr_reference = (Budget.parse(str(rtr_reference)) if rtr_reference is not None
                              else getattr(self.policy, "high", None))  # fmt: skip
        self.usage: list[dict] = []

    # ---- request unpacking ------------------------------------------------------------------------------
    def _image(self, doc_to_visual, doc_id, task, split) -> Image.Image:
        doc = self.task_dict[task][split][doc_id]
        images = [v for v in _flatten(doc_to_visual(doc)) if isinstance(v, Image.Image)]
        if not images:
            raise ValueError(f"{task}/{split} doc {doc_id}: no image; a zoom policy needs one (video/text tasks "
                             "are not supported)")  # fmt: skip
        if len(images) > 1:
            logger.warning("%s doc %s has %d images; the policy zooms into the first", task, doc_id, len(images))
        return images[0].convert("RGB")

    def _requests(self, images: Sequence[Image.Image], texts: Sequence[str], answers=None):
        from zoomvlm.core.pipeline import build_request
        from zoomvlm.targets.base import TargetRequest

        if hasattr(self.policy, "bind_target"):  # reads the target's internals (--policy attention)
            self.policy.bind_target(self.target)
        proposals = self.policy.propose(images, texts)
        reqs = [build_request(img, q, p, self.crop_budget) for img, q, p in zip(images, texts, proposals, strict=True)]
        if answers is not None:
            reqs = [TargetRequest(r.images, r.question, a, r.view_budgets) for r, a in zip(reqs, answers, strict=True)]
        return reqs

    # ---- the lmms-eval model API ------------------------------------------------------------------------
    def generate_until(self, requests) -> list:
        """Answer lmms-eval ``generate_until`` Instances.

        Each ``request.args`` is ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)`` (lmms-eval's
        ``lmms.generate_until``); ``context`` is the question text the task built. The answer is cut at the
        first of ``gen_kwargs["until"]`` (a string or list), as lmms-eval's models do; other generation
        kwargs are the target's own (greedy).

        Returns:
            One answer per request, in order: lmms-eval ``GenerationResult`` (text + token counts) when
            lmms-eval is installed, else the text.
        """
        from zoomvlm.core.pipeline import rtr_of

        out = []
        for start in range(0, len(requests), self.batch_size):
            chunk = [r.args for r in requests[start : start + self.batch_size]]
            images = [self._image(a[2], a[3], a[4], a[5]) for a in chunk]
            texts = [a[0] for a in chunk]
            if hasattr(self.policy, "answer_with"):  # self-zoom: the target decides and answers over two turns
                gens = [g for _, g in self.policy.answer_with(self.target, images, texts)]
            else:
                gens = self.target.generate(self._requests(images, texts))
            for args, img, gen in zip(chunk, images, gens, strict=True):
                text = gen.text
                until = (args[1] or {}).get("until") or []
                for stop in [until] if isinstance(until, str) else until:
                    if stop:
                        text = text.split(stop)[0]
                u = gen.usage
                rtr, unit = rtr_of(self.target, img, u, img.width, img.height, self.rtr_reference)
                self.usage.append(
                    {"rtr": rtr, "rtr_unit": unit, "rtr_reference": str(self.rtr_reference or "native"),
                     "visual_tokens": u.visual_tokens,
                     "view_pixels": list(u.view_pixels), "prompt_tokens": u.prompt_tokens,
                     "completion_tokens": u.completion_tokens}
                )  # fmt: skip
                out.append(_result(text, u.prompt_tokens, u.completion_tokens))
        return out

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """Score lmms-eval ``loglikelihood`` Instances.

        Each ``request.args`` is ``(context, continuation, doc_to_visual, doc_id, task, split)``, where
        ``continuation`` may also be a ``doc_to_target`` callable of the doc (as lmms-eval's models accept).

        Returns:
            ``(log-probability in nats of the continuation given the views and context, is_greedy)`` per
            request; ``is_greedy`` is computed only with ``greedy_check``, else False.

        Raises:
            NotImplementedError: the target cannot score text (e.g. an API without prompt log-probs).
        """
        out: list[tuple[float, bool]] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = [r.args for r in requests[start : start + self.batch_size]]
            images = [self._image(a[2], a[3], a[4], a[5]) for a in chunk]
            conts = [a[1] if isinstance(a[1], str) else a[1](self.task_dict[a[4]][a[5]][a[3]]) for a in chunk]
            reqs = self._requests(images, [a[0] for a in chunk], conts)
            scores = self.target.loglikelihood(reqs)
            greedy = [False] * len(chunk)
            if self.greedy_check:
                greedy = [g.text.strip() == c.strip() for g, c in zip(self.target.generate(reqs), conts, strict=True)]
            out.extend((float(s), bool(g)) for s, g in zip(scores, greedy, strict=True))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        """Not supported: a zoom policy answers single-turn questions."""
        raise NotImplementedError("zoomvlm answers single-turn questions; multi-round tasks are not supported")


def _result(text: str, prompt_tokens: int | None, completion_tokens: int | None):
    """lmms-eval's typed result (text + TokenCounts) when available, else the plain text."""
    try:
        from lmms_eval.api.instance import GenerationResult, TokenCounts
    except ImportError:
        return text
    return GenerationResult(text, TokenCounts(input_tokens=prompt_tokens, output_tokens=completion_tokens))
