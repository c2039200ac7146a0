"""Typed training recipes: one YAML file per run, parsed into dataclasses, with ``--set section.key=value`` overrides.

A recipe has these sections (see ``recipes/*.yaml``, bundled with the package); each is a dataclass whose fields
carry the ONE default and a ``help`` text, parsed by transformers' ``HfArgumentParser`` (TRL's parsers build on
it). An unknown key anywhere is an error that names it (``data.cropper_budjet``), never silently ignored.

- ``kind``: ``sft``, ``grpo`` (CropVLM cropper, or the external crop-set policy with ``data.policy: crop_set``),
  ``awares_sft`` (tool-call-weighted SFT on trajectories), ``awares_grpo`` (multi-turn self-zoom GRPO).
- ``model``: :class:`ModelArgs`. ``data``: :class:`DataArgs`. ``target``: :class:`TargetArgs` (GRPO's reward
  target). ``awares``: :class:`AwaResArgs` (the settings of the ``awares`` reward, both AwaRes variants).
- ``rewards``: ``{name: weight}``; names from :data:`zoomvlm.train.rewards.REWARDS` or a dotted path
  ``pkg.module:callable`` to a user's own TRL reward function.
- ``trainer``: fields of the kind's TRL config: :class:`~zoomvlm.train.sft.CropperSFTConfig`,
  :class:`~zoomvlm.train.grpo.CropperGRPOConfig`, :class:`~zoomvlm.awares.weighted_sft.WeightedSFTConfig`,
  :class:`~zoomvlm.awares.grpo.AwaResGRPOConfig` (TRL's ``SFTConfig``/``GRPOConfig`` with our defaults and
  fields added), so every TRL option (accelerate, DeepSpeed, vLLM rollouts, ``loss_type``...) is available.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from zoomvlm.awares.policies import DEFAULT_HIGH as _DEFAULT_HIGH_BUDGET
from zoomvlm.awares.rewards import ToolCost, check_answer_reward
from zoomvlm.core.geometry import Budget
from zoomvlm.cropvlm import DEFAULT_CROPPER_BUDGET
from zoomvlm.cropvlm.rewards import DEFAULT_METRIC

__all__ = [
    "KINDS",
    "AwaResArgs",
    "DataArgs",
    "ModelArgs",
    "Recipe",
    "RecipeError",
    "TargetArgs",
    "bundled_recipes",
    "load_recipe",
    "recipe_from_dict",
]


class RecipeError(ValueError):
    """A recipe file is missing, malformed, or has an unknown section/key; the message says which."""


# The one place of each default, imported from the module that uses it at inference too.
DEFAULT_HIGH = str(_DEFAULT_HIGH_BUDGET)  # "side:768": AwaRes's high view on the receipts testbed


@dataclass
class ModelArgs:
    """The policy model a run starts from (section ``model``)."""

    init: str = field(metadata={"help": "Hub id or local save_pretrained folder (e.g. a tiny init or an SFT result)."})
    dtype: str = field(default="auto", metadata={"help": "torch dtype to load with (auto, float32, bfloat16...)."})
    lora: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "peft LoraConfig keywords (CropVLM: r 128, alpha 256, dropout 0.05), or null to train all."},
    )

    def __post_init__(self) -> None:
        if not str(self.init):
            raise ValueError("model.init is empty: name a hub id or a local folder")
        if self.lora is not None and not isinstance(self.lora, dict):
            raise ValueError(f"model.lora must be a mapping of LoraConfig keywords or null, got {self.lora!r}")
        if self.lora == {}:
            raise ValueError(
                "model.lora is empty, which would train every weight: give LoraConfig keywords "
                "(e.g. {r: 8, lora_alpha: 16, target_modules: all-linear}) or null to train all"
            )
        if self.lora:
            try:
                from peft import LoraConfig
            except ImportError:
                pass
            else:
                try:
                    LoraConfig(task_type="CAUSAL_LM", **self.lora)
                except (TypeError, ValueError) as err:
                    raise ValueError(f"model.lora: {err}") from err
        if self.dtype != "auto":
            import torch

            if not isinstance(getattr(torch, str(self.dtype), None), torch.dtype):
                raise ValueError(f"model.dtype {self.dtype!r} is not a torch dtype (auto, float32, bfloat16, ...)")


@dataclass
class DataArgs:
    """Training data and the policy's view (section ``data``)."""

    sft_file: str | None = field(
        default=None, metadata={"help": "SFT: sft.jsonl of `zoomvlm curate boxes` or actions.jsonl of curate awares."}
    )
    file: str | None = field(
        default=None, metadata={"help": "GRPO / AwaRes: a JSONL with answers (receipts format or trajectories)."}
    )
    limit: int | None = field(default=None, metadata={"help": "Use the first N records only."})
    policy: str = field(
        default="cropper",
        metadata={"help": "cropper (CropVLM's box) or crop_set (the external AwaRes crop-set policy)."},
    )
    cropper_budget: int | str | None = field(
        default=None,
        metadata={
            "help": f"The cropper's input view (budget spec); default {DEFAULT_CROPPER_BUDGET}. Not for crop_set, "
            "whose view is the low view of `high`."
        },
    )
    high: str | int | None = field(
        default=None,
        metadata={
            "help": f"AwaRes high-resolution budget; default {DEFAULT_HIGH} (trajectories keep their own `high` "
            "in awares_* kinds when unset)."
        },
    )
    augment: float = field(
        default=0.0, metadata={"help": "SFT: probability a row is replaced by a box-preserving random crop."}
    )

    def __post_init__(self) -> None:
        if self.policy not in ("cropper", "crop_set"):
            raise ValueError(f"data.policy must be cropper or crop_set, got {self.policy!r}")
        if not 0.0 <= float(self.augment) <= 1.0:
            raise ValueError(f"data.augment is a probability in [0, 1], got {self.augment}")
        if self.limit is not None and int(self.limit) < 1:
            raise ValueError(f"data.limit must be >= 1 or null, got {self.limit}")
        if self.cropper_budget is not None:
            Budget.parse(self.cropper_budget)  # a clear error on a bad spec, at load time
        if self.high is not None:
            Budget.parse(self.high)
        if self.policy == "crop_set":
            if self.cropper_budget is not None:
                raise ValueError(
                    "data.cropper_budget is not used with data.policy: crop_set: the crop-set policy sees the low "
                    "view (data.high with sides halved), exactly as at inference; drop the key"
                )
            high = Budget.parse(self.high_budget)
            if high.max_side is None or high.max_pixels is not None:
                raise ValueError(
                    f"data.high must be a side budget (e.g. side:768) for the crop-set policy, got {high}"
                )

    @property
    def high_budget(self) -> str:
        """``high`` or its default, in canonical form (e.g. ``"side:768"``)."""
        return str(Budget.parse(self.high if self.high is not None else DEFAULT_HIGH))

    @property
    def policy_high(self) -> Budget | None:
        """The crop-set policy's high view (its input is that view halved, per image); None for the cropper."""
        return Budget.parse(self.high_budget) if self.policy == "crop_set" else None

    @property
    def view_budget(self) -> Budget:
        """The policy's input: ``cropper_budget`` (default 512) or, for ``crop_set``, ``high`` with sides halved."""
        if self.policy == "crop_set":
            return Budget(max_side=Budget.parse(self.high_budget).max_side // 2)
        return Budget.parse(self.cropper_budget if self.cropper_budget is not None else DEFAULT_CROPPER_BUDGET)


@dataclass
class TargetArgs:
    """The frozen reward target of GRPO (section ``target``); specs as in ``zoomvlm eval``."""

    spec: str | None = field(default=None, metadata={"help": "ocr, hf:MODEL or openai:MODEL (OPENAI_BASE_URL)."})
    budget: int | str | None = field(default=None, metadata={"help": "The target's view budget (None: its own)."})
    crop_budget: int | str | None = field(default=None, metadata={"help": "The crop's budget (None: the target's)."})
    metric: str = field(
        default=DEFAULT_METRIC,
        metadata={"help": "Metric of the accuracy reward when a row names none (contains, anls, vqa_accuracy...)."},
    )

    def __post_init__(self) -> None:
        from zoomvlm.core.metrics import METRICS

        if self.metric not in METRICS:
            raise ValueError(f"target.metric {self.metric!r} is not a metric; choose from {sorted(METRICS)}")
        for name in ("budget", "crop_budget"):
            if getattr(self, name) is not None:
                Budget.parse(getattr(self, name))


@dataclass
class AwaResArgs:
    """Settings of AwaRes's ``R = R_ans - C_tool`` reward (section ``awares``), for both AwaRes variants.

    Defaults are :class:`~zoomvlm.awares.rewards.ToolCost`'s (AwaRes publishes no constants; see there why).
    """

    answer_reward: str = field(
        default="semantic",
        metadata={"help": "R_ans: semantic (AwaRes: sentence-embedding cosine) or a metric name (contains, anls)."},
    )
    alpha_miss: float = field(
        default=ToolCost.alpha_miss, metadata={"help": "C_tool when HR was needed and no crop was requested."}
    )
    alpha_use: float = field(default=ToolCost.alpha_use, metadata={"help": "C_tool base cost of any crop request."})
    lam: float = field(
        default=ToolCost.lam, metadata={"help": "C_tool per unit of requested crop area (trades accuracy for RTR)."}
    )

    def __post_init__(self) -> None:
        check_answer_reward(self.answer_reward)
        self.cost  # noqa: B018 - ToolCost refuses bad constants (negative, or alpha_miss <= alpha_use) and says why

    @property
    def cost(self) -> ToolCost:
        """The :class:`~zoomvlm.awares.rewards.ToolCost` of these constants."""
        return ToolCost(float(self.alpha_miss), float(self.alpha_use), float(self.lam))


KINDS: dict[str, str] = {
    "sft": "zoomvlm.train.sft:CropperSFTConfig",
    "grpo": "zoomvlm.train.grpo:CropperGRPOConfig",
    "awares_sft": "zoomvlm.awares.weighted_sft:WeightedSFTConfig",
    "awares_grpo": "zoomvlm.awares.grpo:AwaResGRPOConfig",
}
"""Recipe kind -> the TRL config class of its ``trainer`` section (imported when a recipe of that kind loads)."""

_SECTIONS = {"kind", "model", "data", "trainer", "rewards", "target", "awares"}
_SECTION_TYPES = {"model": ModelArgs, "data": DataArgs, "target": TargetArgs, "awares": AwaResArgs}


@dataclass
class Recipe:
    """A parsed recipe: typed sections (see the module docstring) and the tree they were parsed from.

    ``trainer`` is an instance of the kind's TRL config (:data:`KINDS`); :meth:`trainer_args` rebuilds it with
    another ``output_dir``. ``tree`` is the YAML after overrides: what checkpoints store (``zoomvlm_recipe.json``).
    """

    kind: str
    model: ModelArgs
    data: DataArgs
    trainer: Any
    rewards: dict[str, float]
    target: TargetArgs
    awares: AwaResArgs
    source: str
    tree: dict

    def trainer_args(self, output_dir: str | Path | None = None):
        """A fresh instance of the kind's TRL config (trainers may edit theirs), ``output_dir`` replaced when given."""
        trainer = dict(self.tree.get("trainer", {}))
        if output_dir is not None:
            trainer["output_dir"] = str(output_dir)
        return _parse_section(trainer_config_class(self.kind), trainer, "trainer", self.source)

    def to_json(self) -> dict:
        """What a checkpoint stores: every typed section with its defaults filled in, and the recipe's trainer keys."""
        return {
            "kind": self.kind,
            "source": self.source,
            "model": dataclasses.asdict(self.model),
            # awares_* kinds without data.high train on each trajectory's own high view: say so, not the default
            "data": {
                **dataclasses.asdict(self.data),
                "high": "per record"
                if self.kind.startswith("awares") and self.data.high is None
                else self.data.high_budget,
            },  # fmt: skip
            "trainer": dict(self.tree.get("trainer", {})),
            "rewards": dict(self.rewards),
            "target": dataclasses.asdict(self.target),
            "awares": dataclasses.asdict(self.awares),  # lam etc.: without it a lambda sweep's checkpoints look alike
        }


def trainer_config_class(kind: str) -> type:
    """The TRL config class of a recipe ``kind``.

    Raises:
        RecipeError: an unknown kind.
    """
    if kind not in KINDS:
        raise RecipeError(f"unknown recipe kind {kind!r}; use one of {sorted(KINDS)}")
    module, name = KINDS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def bundled_recipes() -> dict[str, Path]:
    """``{name: path}`` of the recipes shipped in ``zoomvlm/train/recipes``."""
    folder = Path(str(resources.files("zoomvlm.train") / "recipes"))
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def _set(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    if len(keys) < 2 and not (keys[0] == "kind" or (keys[0] in _SECTIONS and isinstance(value, dict))):
        raise RecipeError(
            f"--set {dotted}=...: expected section.key=value, or section={{...}} to replace a whole section "
            f"(sections: {sorted(_SECTIONS)})"
        )
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {dotted}: {k!r} is not a section")
    node[keys[-1]] = value


def _parse_value(text: str):
    """YAML value of an override; ``1e-4`` is a float (YAML 1.1 would read it as a string)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _type_ok(value, hint) -> bool | None:
    """Whether ``value`` fits the type hint ``hint``; ``None`` when the hint is not one this check reads."""
    import types
    import typing

    if hint is Any:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        verdicts = [_type_ok(value, arg) for arg in typing.get_args(hint)]
        return True if any(v is True for v in verdicts) else (None if None in verdicts else False)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple) or hint in (list, tuple):
        return isinstance(value, list | tuple)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return None


def _check_types(cls: type, values: dict, section: str, source: str) -> None:
    """Refuse values of the wrong type (``trainer.max_steps=ten``): ``HfArgumentParser.parse_dict`` builds the
    dataclass without converting or checking them, so they would fail, or train wrong, after the model loads."""
    import typing

    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - a hint that does not resolve is not checked, not an error of the recipe
        hints = {f.name: f.type for f in dataclasses.fields(cls) if not isinstance(f.type, str)}
    bad = []
    for key, value in values.items():
        if key in hints and isinstance(value, str) and _type_ok(value, hints[key]) is not True:
            try:  # YAML 1.1 reads `1e-4` in a recipe file as a string: a number field takes it as the number
                number = float(value)
            except ValueError:
                pass
            else:
                if _type_ok(number, hints[key]) is True:
                    values[key] = value = number
        if key in hints and _type_ok(value, hints[key]) is False:
            bad.append(f"{section}.{key}={value!r} (expected {getattr(hints[key], '__name__', hints[key])})")
    if bad:
        raise RecipeError(f"{source}: wrong type: {', '.join(bad)}")


def _parse_section(cls: type, values: dict, section: str, source: str):
    """One section through ``HfArgumentParser.parse_dict``; unknown keys and refused values name ``section.key``."""
    from transformers import HfArgumentParser

    if not isinstance(values, dict):
        raise RecipeError(f"{source}: section {section!r} must be a mapping, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hints.append(f"{section}.{key}" + (f" (did you mean {section}.{close[0]}?)" if close else ""))
        raise RecipeError(f"{source}: unknown key(s) {', '.join(hints)}; {cls.__name__} has no such field")
    _check_types(cls, values, section, source)
    try:
        (parsed,) = HfArgumentParser(cls).parse_dict(values, allow_extra_keys=False)
    except (TypeError, ValueError, KeyError) as err:
        raise RecipeError(f"{source}: section {section!r}: {err.args[0] if err.args else err}") from err
    return parsed


def _trl_choices(cls: type, name: str) -> set[str] | None:
    """The values TRL's help for field ``name`` lists after "Supported values are" (``None`` if it lists none):
    read from the installed TRL, so the check follows its version."""
    field = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    text = (field.metadata.get("help") or "") if field is not None else ""
    m = re.search(r"Supported values are:?(.*?)(?:\.\s|$)", text, re.S)
    return set(re.findall(r"[`']+([A-Za-z_]+)[`']+", m.group(1))) if m else None


def _check_trainer_values(trainer, source: str) -> None:
    """Refuse, when the recipe is read, trainer values TRL would refuse only after the model has loaded and the
    first rollout was scored (an unknown ``loss_type``) or would run with silently (a learning rate <= 0).

    Raises:
        RecipeError: naming ``trainer.<key>`` and the accepted values.
    """
    positive = ("learning_rate", "temperature", "per_device_train_batch_size", "gradient_accumulation_steps",
                "num_iterations", "num_generations")  # fmt: skip
    for key in positive:
        value = getattr(trainer, key, None)
        if value is not None and not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise RecipeError(f"{source}: trainer.{key} must be > 0, got {value!r}")
    for key in ("loss_type", "importance_sampling_level", "scale_rewards"):
        value = getattr(trainer, key, None)
        if value is None or isinstance(value, bool):
            continue
        choices = _trl_choices(type(trainer), key)
        if key == "scale_rewards":
            choices = (choices or set()) | {"group", "batch", "none"}
        if choices and str(value) not in choices:
            raise RecipeError(f"{source}: trainer.{key}={value!r} is not one of {sorted(choices)}")


def recipe_from_dict(
    tree: dict, overrides: list[str] | tuple[str, ...] = (), kind: str | None = None, source: str = "<dict>"
) -> Recipe:
    """Parse a recipe tree (the YAML as a dict) after applying ``overrides``; see :func:`load_recipe`."""
    if not isinstance(tree, dict):
        raise RecipeError(f"{source}: a recipe is a mapping of sections, got {type(tree).__name__}")
    tree = copy.deepcopy(tree)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected section.key=value")
        key, value = item.split("=", 1)
        _set(tree, key.strip(), _parse_value(value))
    unknown = set(tree) - _SECTIONS
    if unknown:
        raise RecipeError(f"{source}: unknown section(s) {sorted(unknown)}; expected {sorted(_SECTIONS)}")
    for section in ("model", "trainer"):
        if not isinstance(tree.get(section), dict):
            raise RecipeError(f"{source}: section {section!r} is missing or not a mapping")
    recipe_kind = tree.get("kind")
    if kind is not None and recipe_kind != kind:
        raise RecipeError(f"{source}: this is a {recipe_kind!r} recipe, expected {kind!r}")
    config_cls = trainer_config_class(recipe_kind)
    if "output_dir" not in tree["trainer"]:
        raise RecipeError(f"{source}: set trainer.output_dir in the recipe or pass --output-dir")
    sections = {name: _parse_section(cls, tree.get(name) or {}, name, source) for name, cls in _SECTION_TYPES.items()}
    rewards = tree.get("rewards") or {}
    if recipe_kind == "awares_grpo" and not rewards:
        rewards = {"awares": 1.0}  # self-zoom GRPO's one reward, R = R_ans - C_tool
    if not isinstance(rewards, dict) or not all(
        isinstance(w, int | float) and not isinstance(w, bool) for w in rewards.values()
    ):  # YAML's `true` is a bool, which Python counts as the int 1
        raise RecipeError(f"{source}: rewards must be a mapping {{name: weight}}, got {rewards!r}")
    bad = {k: w for k, w in rewards.items() if not math.isfinite(w)}
    if bad:
        raise RecipeError(f"{source}: reward weights must be finite numbers, got {bad} (rewards.{next(iter(bad))})")
    if recipe_kind in ("grpo", "awares_grpo"):
        if not rewards:
            raise RecipeError(f"{source}: a {recipe_kind} recipe needs `rewards: {{name: weight}}`")
        from zoomvlm.train.rewards import check_reward_names

        try:
            check_reward_names(rewards, "self_zoom" if recipe_kind == "awares_grpo" else sections["data"].policy)
        except (KeyError, ValueError) as err:
            raise RecipeError(f"{source}: {err.args[0]}") from err
    elif rewards:
        raise RecipeError(f"{source}: a {recipe_kind} recipe trains no reward; drop the `rewards:` section")
    if tree["trainer"].get("reward_weights") is not None:
        raise RecipeError(
            f"{source}: trainer.reward_weights would silently replace the weights of the rewards section, which "
            "the recipe records; set them there (rewards: {name: weight})"
        )
    trainer = _parse_section(config_cls, tree["trainer"], "trainer", source)
    _check_trainer_values(trainer, source)
    return Recipe(kind=recipe_kind, trainer=trainer, rewards={k: float(v) for k, v in rewards.items()},
                  source=source, tree=tree, **sections)  # fmt: skip


def load_recipe(
    path_or_name: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    kind: str | None = None,
    output_dir: str | Path | None = None,
) -> Recipe:
    """Read a recipe from a YAML path or a bundled name (e.g. ``tiny_cpu_sft``), then apply overrides.

    Args:
        overrides: ``"section.key=value"`` strings; values are parsed as YAML (``3``, ``1e-4``, ``null``,
            ``[a, b]``).
        kind: expected ``kind`` (``sft``/``grpo``/``awares_sft``/``awares_grpo``); a mismatch raises.
        output_dir: replaces ``trainer.output_dir`` (the CLI's ``--output-dir``).

    Raises:
        RecipeError: unknown name/path, invalid YAML, unknown section or key (named, with the closest field),
            a value a section's ``__post_init__`` refuses (the message says why), bad override, wrong kind.
    """
    bundled = bundled_recipes()
    path = Path(path_or_name)
    if not path.is_file():
        if str(path_or_name) in bundled:
            path = bundled[str(path_or_name)]
        else:
            raise RecipeError(f"recipe {path_or_name!r} not found: not a file and not one of {sorted(bundled)}")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: invalid YAML: {err}") from err
    overrides = list(overrides) + ([f"trainer.output_dir={output_dir}"] if output_dir is not None else [])
    return recipe_from_dict(tree, overrides, kind=kind, source=str(path))
