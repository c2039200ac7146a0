"""The ONE reward registry of every GRPO recipe: name -> factory, plus a dotted path for users' own rewards.

In TRL's style (``trl/scripts/grpo.py``, ``trl/rewards/other_rewards.py``): a recipe's ``rewards: {name: weight}``
names a reward; each name maps to a small factory that validates its settings and returns a callable with TRL's
reward signature ``fn(prompts, completions, **columns) -> list[float]`` and a readable ``__name__`` (it names
the logged metric ``rewards/<name>/mean``). Factories return module-level functions or instances of module-level
classes, so rewards pickle (the target they hold must too, for process-based launchers).

A name that is not in :data:`REWARDS` but is a dotted path, ``pkg.module:callable`` (or TRL's
``pkg.module.callable``), imports that callable and uses it AS the reward function, unchanged, as TRL's GRPO
script does.

Which rewards fit which policy (the completion each one reads):

- CropVLM cropper (``grpo``, ``data.policy: cropper``; the completion is a box): ``format``, ``accuracy``,
  ``likelihood``, ``answer_probability`` (:mod:`zoomvlm.cropvlm.rewards`).
- AwaRes external crop-set policy (``grpo``, ``data.policy: crop_set``; the completion is an action):
  ``crop_set_format``, ``awares``; self-zoom (``awares_grpo``; the completion is the rollout): ``awares``
  (:mod:`zoomvlm.awares.rewards`). ``awares`` is one reward, ``R = R_ans - C_tool``, its settings in the recipe's
  ``awares:`` section for both.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zoomvlm.train.recipe import Recipe

__all__ = ["REWARDS", "RewardContext", "build_rewards", "check_reward_names", "import_reward"]


@dataclass
class RewardContext:
    """What reward factories read, from a recipe: the reward target (built on first use) and reward settings.

    Attributes:
        policy: ``cropper``, ``crop_set`` or ``self_zoom`` (which completions the rewards will see).
        metric: the accuracy reward's default metric (``target.metric``). crop_budget: the crop's budget.
        high: the AwaRes high-resolution budget (``data.high``). awares: the ``awares:`` section.
        target_factory: builds the frozen reward target (``target.spec``); ``None`` = the recipe has none.
    """

    policy: str
    metric: str
    crop_budget: str | int | None
    high: str
    awares: object
    target_factory: Callable[[], object] | None = None
    _target: object = field(default=None, repr=False)

    def target(self, reward: str):
        """The reward target, built once; ``ValueError`` naming ``reward`` when the recipe has no ``target.spec``."""
        if self._target is None:
            if self.target_factory is None:
                raise ValueError(
                    f"reward {reward!r} needs a reward target: set target.spec (ocr, hf:MODEL, openai:MODEL)"
                )
            self._target = self.target_factory()
        return self._target


def _format(ctx: RewardContext):
    from zoomvlm.cropvlm.rewards import format_reward

    return format_reward


def _accuracy(ctx: RewardContext):
    from zoomvlm.cropvlm.rewards import AccuracyReward

    return AccuracyReward(ctx.target("accuracy"), ctx.metric, ctx.crop_budget)


def _likelihood(ctx: RewardContext):
    from zoomvlm.cropvlm.rewards import LikelihoodReward

    return LikelihoodReward(ctx.target("likelihood"), ctx.crop_budget)


def _answer_probability(ctx: RewardContext):
    from zoomvlm.cropvlm.rewards import AnswerProbabilityReward

    return AnswerProbabilityReward(ctx.target("answer_probability"), ctx.crop_budget)


def _crop_set_format(ctx: RewardContext):
    from zoomvlm.awares.rewards import crop_set_format_reward

    return crop_set_format_reward


def _awares(ctx: RewardContext):
    from zoomvlm.awares.rewards import AwaResReward

    settings = ctx.awares
    if ctx.policy == "crop_set":  # a frozen target answers from the requested views
        return AwaResReward(settings.answer_reward, settings.cost, target=ctx.target("awares"), high=ctx.high)
    return AwaResReward(settings.answer_reward, settings.cost)  # self-zoom: the rollout's own answer


REWARDS: dict[str, Callable[[RewardContext], Callable]] = {
    "format": _format,
    "accuracy": _accuracy,
    "likelihood": _likelihood,
    "answer_probability": _answer_probability,
    "crop_set_format": _crop_set_format,
    "awares": _awares,
}
"""Reward name -> factory ``(RewardContext) -> reward function``."""

_POLICIES = {
    "format": {"cropper"},
    "accuracy": {"cropper"},
    "likelihood": {"cropper"},
    "answer_probability": {"cropper"},
    "crop_set_format": {"crop_set"},
    "awares": {"crop_set", "self_zoom"},
}
_READS = {"cropper": "a box", "crop_set": "a NO_CROPS / GET_CROPS action", "self_zoom": "a multi-turn rollout"}


def import_reward(path: str) -> Callable:
    """A user's reward function from ``pkg.module:callable`` (or ``pkg.module.callable``), used as is.

    Raises:
        KeyError: not importable or not callable (the message names the path).
    """
    module_path, _, name = path.rpartition(":") if ":" in path else path.rpartition(".")
    try:
        func = getattr(importlib.import_module(module_path), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise KeyError(f"reward {path!r}: cannot import it ({err})") from err
    if not callable(func):
        raise KeyError(f"reward {path!r} is not callable")
    return func


def _is_path(name: str) -> bool:
    return ":" in name or "." in name


def check_reward_names(weights: dict[str, float], policy: str) -> None:
    """Validate a recipe's ``rewards`` for a policy (``cropper``, ``crop_set``, ``self_zoom``) without building any.

    Raises:
        KeyError: an unknown name (not registered, not an importable dotted path).
        ValueError: a reward that reads another policy's completions (the message says what it reads).
    """
    for name in weights:
        if name in REWARDS:
            if policy not in _POLICIES[name]:
                fits = " or ".join(sorted(_POLICIES[name]))
                raise ValueError(
                    f"reward {name!r} reads {_READS[sorted(_POLICIES[name])[0]]} ({fits} policy), but this recipe's "
                    f"completions are {_READS[policy]}; rewards for it: "
                    f"{sorted(n for n, p in _POLICIES.items() if policy in p)}"
                )
        elif _is_path(name):
            import_reward(name)
        else:
            raise KeyError(f"unknown reward {name!r}; choose from {sorted(REWARDS)} or give pkg.module:callable")


def build_rewards(weights: dict[str, float], ctx: RewardContext) -> tuple[list[Callable], list[float]]:
    """Reward functions and their weights, in the recipe's order (see the module docstring).

    Raises:
        KeyError / ValueError: as :func:`check_reward_names`; ValueError: a reward needs a target and there is none.
    """
    check_reward_names(weights, ctx.policy)
    funcs = [REWARDS[name](ctx) if name in REWARDS else import_reward(name) for name in weights]
    return funcs, [float(w) for w in weights.values()]


def recipe_reward_context(recipe: Recipe) -> RewardContext:
    """The :class:`RewardContext` of a ``grpo`` / ``awares_grpo`` recipe (the target is built on first use)."""
    target_factory = None
    if recipe.target.spec:

        def target_factory():
            from zoomvlm.targets import load_target

            return load_target(recipe.target.spec, budget=recipe.target.budget)

    return RewardContext(
        policy="self_zoom" if recipe.kind == "awares_grpo" else recipe.data.policy,
        metric=recipe.target.metric,
        crop_budget=recipe.target.crop_budget,
        high=recipe.data.high_budget,
        awares=recipe.awares,
        target_factory=target_factory,
    )
