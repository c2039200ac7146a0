"""The model card (``final/README.md``) of a training run, so ``final/`` is publishable as is (``zoomvlm train push``).

It states the base model, the recipe, the training data and its licence, the reward, and the metrics the run
itself logged (``zoomvlm_run.json``). The data licence comes from :data:`KNOWN_DATA` (the bundled testbeds'
READMEs); for any other data the card says the licence is unknown and must be filled in before publishing.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["KNOWN_DATA", "data_licence", "inherited_licences", "model_card", "write_model_card"]

TARGET_REWARDS = ("accuracy", "likelihood", "answer_probability")
"""Rewards computed with the recipe's target model, as is ``awares`` for a crop-set policy (the card names the
target only when one of them is used)."""

KNOWN_DATA: dict[str, tuple[str, str]] = {
    "receipts": (
        "receipts: scanned receipts of the ICDAR 2019 SROIE competition (company/date/total questions)",
        "SROIE 2019 competition data, research use (see the dataset's README)",
    ),
    "documents": (
        "documents: pages of public reports, papers and slides from MMLongBench-Doc (commit d73f0dc)",
        "CC BY-NC 4.0, research use only: this checkpoint inherits the non-commercial licence",
    ),
}
"""Folder name of a bundled dataset -> (description, licence), from ``shared/data/<name>/README.md``."""

_KIND_TEXT = {
    "sft": "supervised fine-tuning (TRL SFTTrainer)",
    "grpo": "GRPO (TRL GRPOTrainer)",
    "awares_sft": "AwaRes cold-start SFT, tool-call turn up-weighted (TRL SFTTrainer subclass)",
    "awares_grpo": "AwaRes multi-turn self-zoom GRPO (TRL GRPOTrainer subclass)",
}


_UNKNOWN = "UNKNOWN: state the data's licence before publishing"
_SCAN_LINES = 10_000  # rows of a data file whose image paths are read to find the dataset they come from


def _known(path: str | Path) -> str | None:
    """The :data:`KNOWN_DATA` name a path lies in (by folder name), else None."""
    return next((part for part in reversed(Path(path).parts) if part in KNOWN_DATA), None)


def data_licence(path: str | None) -> tuple[str, str]:
    """``(description, licence)`` of a training-data path.

    A known bundled dataset by folder name; else, for a JSONL file made from them elsewhere (a curation's
    ``sft.jsonl`` under ``runs/``), the datasets its rows' images (``image`` / ``image_path``) lie in, every
    licence named (so CC BY-NC is never dropped); else unknown.
    """
    if path:
        name = _known(path)
        if name:
            return KNOWN_DATA[name]
        names = _image_datasets(Path(path))
        if names == {None}:
            pass
        elif names:
            found = sorted(n for n in names if n)
            description = "; ".join(KNOWN_DATA[n][0] for n in found)
            licences = [KNOWN_DATA[n][1] for n in found] + ([_UNKNOWN + " (some images)"] if None in names else [])
            return (f"{description} (`{path}`'s images)", "; ".join(licences))
    return (str(path), _UNKNOWN)


def _image_datasets(path: Path) -> set[str | None]:
    """The :data:`KNOWN_DATA` names (None: another source) of the images a JSONL file's rows name; empty when
    the file cannot be read as JSONL with image paths."""
    names: set[str | None] = set()
    try:
        with path.open(encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if i >= _SCAN_LINES:
                    break
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                image = row.get("image") or row.get("image_path") if isinstance(row, dict) else None
                if isinstance(image, str):
                    names.add(_known(image if Path(image).is_absolute() else path.parent / image))
    except (OSError, UnicodeDecodeError):
        return set()
    return names


def inherited_licences(init: str | None) -> list[str]:
    """The licences a base model's own card (``init/README.md``, a zoomvlm ``final/``) states, its own and what it
    inherited: a checkpoint trained from one keeps them (GRPO on receipts from an SFT on documents is still
    CC BY-NC). Empty for a hub id or a folder without such a card."""
    card = Path(init) / "README.md" if init else None
    if card is None or not card.is_file():
        return []
    out = []
    for line in card.read_text(encoding="utf-8").splitlines():
        for prefix in ("- licence: ", "- inherited licence: "):
            if line.startswith(prefix) and line[len(prefix) :] not in out:
                out.append(line[len(prefix) :])
    return out


def _recipe_name(source: str) -> str:
    """A bundled recipe by its name (portable), any other recipe by its path."""
    from zoomvlm.train.recipe import bundled_recipes

    for name, path in bundled_recipes().items():
        if str(path) == source:
            return f"`{name}` (bundled with zoomvlm)"
    return f"`{source}`"


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card(recipe, metrics: dict) -> str:
    """The card's Markdown text (YAML front matter for the hub, then the sections); see the module docstring."""
    data_path = recipe.data.sft_file or recipe.data.file
    description, licence = data_licence(data_path)
    policy = recipe.data.policy if recipe.kind in ("sft", "grpo") else "self_zoom"
    use = {
        "cropper": "`zoomvlm eval --policy vlm:PATH` (a CropVLM cropper: one box per question)",
        "crop_set": "`zoomvlm eval --policy crop-set:PATH` (an AwaRes crop-set policy)",
        "self_zoom": "`zoomvlm.awares.self_zoom` (a self-zooming VLM: it asks for crops itself)",
    }[policy]
    lines = [
        "---",
        "library_name: transformers",
        "tags: [zoomvlm, vision-language-model, " + ("cropvlm" if policy == "cropper" else "awares") + "]",
        f"base_model: {recipe.model.init}",
        "---",
        "",
        f"# zoomvlm {policy.replace('_', '-')} policy",
        "",
        f"Trained with zoomvlm: {_KIND_TEXT.get(recipe.kind, recipe.kind)}. Use it with {use}.",
        "",
        "## Base model",
        "",
        f"`{recipe.model.init}`" + (f", LoRA {recipe.model.lora} (merged)" if recipe.model.lora else ", all weights"),
        "",
        "## Recipe",
        "",
        f"{_recipe_name(recipe.source)}; the parsed recipe is `zoomvlm_recipe.json` in this folder.",
        "",
        "## Training data and licence",
        "",
        f"- data: {description} (`{data_path}`)",
        f"- licence: {licence}",
        *(f"- inherited licence: {x}" for x in inherited_licences(recipe.model.init) if x != licence),
        "- human evidence boxes were never used in training (model-made seed boxes, target rewards only)",
        "",
    ]
    if recipe.rewards:
        lines += ["## Reward", ""]
        for name, weight in recipe.rewards.items():
            lines.append(f"- `{name}` x {_fmt(weight)}")
        if "awares" in recipe.rewards:
            a = recipe.awares
            lines.append(f"- `awares` = R_ans - C_tool: R_ans `{a.answer_reward}`, alpha_miss {a.alpha_miss}, "
                         f"alpha_use {a.alpha_use}, lam {a.lam}")  # fmt: skip
        uses_target = any(n in TARGET_REWARDS for n in recipe.rewards) or (
            "awares" in recipe.rewards and policy == "crop_set"
        )
        if recipe.target.spec and uses_target:
            lines.append(f"- reward target `{recipe.target.spec}` (budget {recipe.target.budget}, "
                         f"metric `{recipe.target.metric}`)")  # fmt: skip
        lines.append("")
    lines += ["## Metrics of the run that made this checkpoint", "", "| metric | value |", "|---|---:|"]
    for key in ("global_step", "resumed_from_step", "num_processes", "train_runtime_s", "train_steps_per_second",
                "train_loss"):  # fmt: skip
        if metrics.get(key) is not None and not (key == "resumed_from_step" and not metrics[key]):
            lines.append(f"| {key} | {_fmt(metrics[key])} |")
    for key, value in sorted(metrics.get("last_logged", {}).items()):
        lines.append(f"| last logged {key} | {_fmt(value)} |")
    if metrics.get("resumed_from_step"):
        lines += ["", "Resumed: runtime and steps/s are the last session's (the steps after `resumed_from_step`); "
                  "`train_loss` is the mean of every loss logged since step 1."]  # fmt: skip
    lines += ["", "Training-time metrics only: evaluate with `zoomvlm eval` before relying on this checkpoint.", ""]
    return "\n".join(lines)


def write_model_card(folder: str | Path, recipe, metrics: dict) -> Path:
    """Write :func:`model_card` to ``folder/README.md`` and return its path."""
    path = Path(folder) / "README.md"
    path.write_text(model_card(recipe, metrics), encoding="utf-8")
    return path


def read_run(folder: str | Path) -> dict:
    """The ``zoomvlm_run.json`` metrics of a ``final/`` folder (``{}`` if absent)."""
    path = Path(folder) / "zoomvlm_run.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def push_final(output_dir: str | Path, repo_id: str, private: bool = False, commit_message: str | None = None):
    """Upload a run's ``final/`` folder as is to the hub repository ``repo_id`` (created if missing).

    Args:
        output_dir: the run's ``output_dir`` (its ``final/`` is pushed) or a ``final/`` folder itself.
        repo_id: ``user/name``. private: create the repository private. commit_message: default names the recipe.

    Returns:
        huggingface_hub's ``CommitInfo`` of the upload (``.commit_url``).

    Raises:
        FileNotFoundError: no ``final/`` folder, or it lacks the model, the recipe or the model card (written by
            ``zoomvlm train``; the message names what is missing).
    """
    from huggingface_hub import HfApi

    from zoomvlm.train.common import FINAL

    folder = Path(output_dir)
    if (folder / FINAL).is_dir():
        folder = folder / FINAL
    missing = [n for n in ("config.json", "zoomvlm_recipe.json", "README.md") if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a finished zoomvlm run (missing {', '.join(missing)}); push OUTPUT_DIR of "
            "`zoomvlm train ...` after it finished"
        )
    recipe = json.loads((folder / "zoomvlm_recipe.json").read_text())
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        commit_message=commit_message or f"zoomvlm {recipe.get('kind', 'train')} run ({Path(recipe['source']).stem})",
    )
