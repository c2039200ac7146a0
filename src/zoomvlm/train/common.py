"""What SFT and GRPO share: building the cropper, LoRA, trainer options, resuming, saving (``save_pretrained``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from zoomvlm.core.geometry import Budget, resize_to_budget
from zoomvlm.data.samples import iter_jsonl

logger = logging.getLogger(__name__)

FINAL = "final"
"""Sub-folder of ``output_dir`` holding the finished model + processor (load it with ``vlm:OUTPUT_DIR/final``)."""


def build_cropper(model_cfg: dict):
    """``(model, processor, peft_config)`` for a recipe's ``model`` section.

    ``init``: a hub id or a local ``save_pretrained`` folder, loaded with :func:`zoomvlm.targets.hf.load_vlm`
    (LoRA adapters are merged on load). The CPU recipes start from a from-scratch tiny model written by
    ``python scripts/make_tiny_init.py`` (the command is in each recipe's comment).
    ``lora``: peft ``LoraConfig`` keywords (CropVLM: r 128, alpha 256, dropout 0.05; q/k/v/o/gate/up/down/fc1/fc2
    + connector proj), or null to train all weights.

    Raises:
        FileNotFoundError: ``init`` names a local folder (absolute, ``./``, ``runs/...``) that does not exist.
        ImportError: LoRA without peft.
    """
    init = str(model_cfg["init"])
    if not Path(init).exists() and (Path(init).is_absolute() or init.startswith(".") or init.count("/") != 1):
        raise FileNotFoundError(
            f"model.init folder {init!r} not found; for the tiny CPU recipes write it first with "
            f"`python scripts/make_tiny_init.py --out {init} ...` (see the recipe's comment)"
        )
    from zoomvlm.targets.hf import load_vlm

    model, processor = load_vlm(init, device="cpu", dtype=model_cfg.get("dtype", "auto"))
    model.train()
    peft_config = None
    if model_cfg.get("lora"):
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", **model_cfg["lora"])
    return model, processor, peft_config


def trainer_kwargs(defaults: dict, recipe_trainer: dict, output_dir=None) -> dict:
    """TRL config keywords: ``defaults`` < recipe ``trainer`` < ``output_dir``; bf16 off where no GPU can run it.

    Raises:
        ValueError: no ``output_dir`` anywhere.
    """
    import torch

    kw = {**defaults, **recipe_trainer}
    if output_dir is not None:
        kw["output_dir"] = str(output_dir)
    if "output_dir" not in kw:
        raise ValueError("set trainer.output_dir in the recipe or pass --output-dir")
    if not torch.cuda.is_available():
        if kw.get("bf16"):
            logger.warning("no CUDA device: training in float32 on CPU (recipe asked for bf16)")
        kw["bf16"] = False  # TRL defaults to bf16, which CPU training rejects
    return kw


def trajectory_records(
    path: str | Path, high: str | int | Budget | None, required: tuple[str, ...]
) -> Iterator[tuple[str, dict, str, Path]]:
    """Read AwaRes trajectory records (``zoomvlm curate awares``) one by one, with what every loader checks.

    Args:
        path: the JSONL file; image paths are absolute or relative to its folder.
        high: the high-resolution budget for every record; ``None`` keeps each record's own ``high``.
        required: fields every record must have (besides ``image``).

    Yields:
        ``(where, record, high, image)``: ``where`` is ``"file:line"`` for the caller's own error messages,
        ``high`` the record's budget in canonical form (e.g. ``"side:768"``), ``image`` the resolved image path.

    Raises:
        FileNotFoundError: no such file. ValueError: a record is not JSON, lacks a required field, has no
            (or an unparseable) ``high``, or names a missing image; the message names ``file:line``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trajectories file {path} not found; write it with `zoomvlm curate awares`")
    override = None if high is None else str(Budget.parse(high))
    for where, row in iter_jsonl(path):
        if not isinstance(row, dict):
            raise ValueError(f"{where}: a record must be a JSON object")
        missing = sorted({"image", *required} - set(row))
        if missing:
            raise ValueError(f"{where}: a record needs {', '.join(('image', *required))} (missing {missing})")
        record_high = override or row.get("high")
        if record_high is None:
            raise ValueError(f"{where}: no `high` budget in the record; pass high= (recipe data.high)")
        try:
            record_high = str(Budget.parse(record_high))
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from err
        image = Path(row["image"]).expanduser()
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise ValueError(f"{where}: image not found: {image}")
        yield where, row, record_high, image


def cropper_view(path: str | Path, budget: Budget) -> Image.Image:
    """The cropper's input: the image shrunk to ``budget`` (its processor may resize/tile further)."""
    from zoomvlm.data.samples import load_image

    return resize_to_budget(load_image(path), budget)


def cropper_views(paths, budget: Budget, desc: str = "loading images") -> list[Image.Image]:
    """:func:`cropper_view` of each path, decoding each distinct file once (questions share images)."""
    from tqdm.auto import tqdm

    cache: dict[str, Image.Image] = {}
    out = []
    for p in tqdm(paths, desc=desc, unit="q", leave=False):
        key = str(p)
        if key not in cache:
            cache[key] = cropper_view(p, budget)
        out.append(cache[key])
    return out


def resume_checkpoint(output_dir: str | Path) -> str | None:
    """The newest ``checkpoint-N`` folder in ``output_dir`` (HF Trainer layout), to resume a crashed run."""
    folders = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(folders[-1]) if folders else None


def _recipe_name(source: str) -> str:
    """A bundled recipe by its name (portable), any other recipe by its path."""
    from zoomvlm.train.recipe import bundled_recipes

    for name, path in bundled_recipes().items():
        if str(path) == source:
            return f"{name} (bundled recipe)"
    return source


def save_final(trainer, processor, output_dir: str | Path, recipe) -> Path:
    """Save the trained cropper to ``output_dir/final`` in ``save_pretrained`` layout (LoRA merged), plus the recipe.

    A peft model is merged into its base weights first, so ``vlm:output_dir/final`` loads like any checkpoint.
    """
    final = Path(output_dir) / FINAL
    model = trainer.model
    model = trainer.accelerator.unwrap_model(model) if hasattr(trainer, "accelerator") else model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(final)
    processor.save_pretrained(final)
    (final / "zoomvlm_recipe.json").write_text(
        json.dumps(
            {
                "kind": recipe.kind,
                "source": recipe.source,
                "model": recipe.model,
                "data": recipe.data,
                "trainer": recipe.trainer,
                "rewards": recipe.rewards,
                "target": recipe.target,
                "awares": recipe.awares,  # lam etc.: without it a lambda sweep's checkpoints look identical
            },
            indent=2,
            default=str,
        )
        + "\n"  # fmt: skip
    )
    logger.info("saved %s", final)
    return final
