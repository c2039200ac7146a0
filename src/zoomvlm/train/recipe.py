"""Training recipes: one YAML file per run, with ``--set key.path=value`` overrides from the command line.

A recipe has four sections (see ``recipes/*.yaml``, bundled with the package):

- ``model``: ``init`` (a hub id, a local ``save_pretrained`` folder such as an SFT result, e.g. the tiny
  init that ``scripts/make_tiny_init.py`` writes;
  for a from-scratch tiny SmolVLM-architecture model with a locally built tokenizer), ``tiny`` (its size
  options), ``lora`` (peft ``LoraConfig`` keywords, or null for full fine-tuning), ``seed``.
- ``data``: ``sft_file`` (SFT: the ``sft.jsonl`` written by ``zoomvlm curate boxes``) or ``file`` (GRPO: a
  receipts-format JSONL with answers), ``limit``, and ``cropper_budget`` (the cropper's input size).
- ``trainer``: keyword arguments of TRL's ``SFTConfig`` / ``GRPOConfig``, passed through unchanged, so
  every TRL option (accelerate, DeepSpeed, vLLM rollouts, ``loss_type``...) is available.
- GRPO only: ``rewards`` (``{name: weight}``, names from :data:`zoomvlm.cropvlm.rewards.REWARDS`) and ``target``
  (``spec`` as in ``zoomvlm eval``, ``budget``, ``crop_budget``, ``metric``).
- AwaRes only: ``data.policy: crop_set`` + ``data.high`` (the external crop-set policy and its
  high-resolution budget) and ``awares`` (``answer_reward``: ``semantic`` or a metric; the tool-cost
  constants ``alpha_miss``, ``alpha_use``, ``lam`` of :class:`zoomvlm.cropvlm.rewards.ToolCost`).

Kinds: ``sft`` and ``grpo`` (CropVLM cropper, or the crop-set policy with ``data.policy: crop_set``),
``awares_sft`` (tool-call-weighted SFT on trajectories) and ``awares_grpo`` (multi-turn self-zoom GRPO).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

__all__ = ["Recipe", "RecipeError", "bundled_recipes", "load_recipe"]


class RecipeError(ValueError):
    """A recipe file is missing, malformed, or has an unknown section/key; the message says which."""


_SECTIONS = {"kind", "model", "data", "trainer", "rewards", "target", "awares"}


@dataclass
class Recipe:
    """A parsed recipe (sections as plain dicts; see the module docstring)."""

    kind: str
    model: dict
    data: dict
    trainer: dict
    rewards: dict = field(default_factory=dict)
    target: dict = field(default_factory=dict)
    awares: dict = field(default_factory=dict)
    source: str = ""


def bundled_recipes() -> dict[str, Path]:
    """``{name: path}`` of the recipes shipped in ``zoomvlm/train/recipes``."""
    folder = Path(str(resources.files("zoomvlm.train") / "recipes"))
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def _set(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
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


def load_recipe(
    path_or_name: str | Path, overrides: list[str] | tuple[str, ...] = (), kind: str | None = None
) -> Recipe:
    """Read a recipe from a YAML path or a bundled name (e.g. ``tiny_cpu_sft``), then apply overrides.

    Args:
        overrides: ``"section.key=value"`` strings; values are parsed as YAML (``3``, ``1e-4``, ``null``,
            ``[a, b]``).
        kind: expected ``kind`` (``sft``/``grpo``); a mismatch raises.

    Raises:
        RecipeError: unknown name/path, invalid YAML, unknown section, bad override, wrong kind.
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
    if not isinstance(tree, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(tree).__name__}")
    tree = copy.deepcopy(tree)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected section.key=value")
        key, value = item.split("=", 1)
        _set(tree, key.strip(), _parse_value(value))
    unknown = set(tree) - _SECTIONS
    if unknown:
        raise RecipeError(f"{path}: unknown section(s) {sorted(unknown)}; expected {sorted(_SECTIONS)}")
    for section in ("model", "data", "trainer"):
        if not isinstance(tree.get(section), dict):
            raise RecipeError(f"{path}: section {section!r} is missing or not a mapping")
    if kind is not None and tree.get("kind") != kind:
        raise RecipeError(f"{path}: this is a {tree.get('kind')!r} recipe, expected {kind!r}")
    if tree.get("kind") == "grpo" and not tree.get("rewards"):
        raise RecipeError(f"{path}: a grpo recipe needs `rewards: {{name: weight}}`")
    return Recipe(
        kind=tree.get("kind", ""),
        model=tree["model"],
        data=tree["data"],
        trainer=tree["trainer"],
        rewards=tree.get("rewards") or {},
        target=tree.get("target") or {},
        awares=tree.get("awares") or {},
        source=str(path),
    )
