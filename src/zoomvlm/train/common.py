"""What SFT and GRPO share: building the cropper, LoRA, trainer options, resuming, saving (``save_pretrained``)."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from zoomvlm.core.geometry import Budget, resize_to_budget
from zoomvlm.data.samples import iter_jsonl

if TYPE_CHECKING:
    from zoomvlm.train.recipe import ModelArgs

logger = logging.getLogger(__name__)

FINAL = "final"
"""Sub-folder of ``output_dir`` holding the finished model + processor (load it with ``vlm:OUTPUT_DIR/final``)."""


@dataclass
class TrainerDefaults:
    """Defaults every zoomvlm trainer config shares, mixed in before TRL's ``SFTConfig``/``GRPOConfig``.

    ``class CropperSFTConfig(TrainerDefaults, SFTConfig)``: these fields override TRL's defaults, and
    :meth:`__post_init__` turns bf16 off where no CUDA device can run it (TRL defaults to bf16, which
    transformers refuses on CPU) before TRL's own checks run.

    Raises:
        ValueError: ``use_vllm`` without CUDA (the message says what to use instead).
    """

    save_total_limit: int | None = field(
        default=2, metadata={"help": "Keep the 2 newest checkpoints: enough to resume, bounded disk use."}
    )
    remove_unused_columns: bool | None = field(
        default=False,
        metadata={"help": "Keep every dataset column: the rewards and image transforms read image_path, answers..."},
    )

    def __post_init__(self) -> None:
        import torch

        if getattr(self, "use_vllm", False) and not torch.cuda.is_available():
            raise ValueError(
                "use_vllm needs CUDA GPUs (vLLM has no CPU path in TRL); on CPU drop trainer.use_vllm: rollouts then "
                "use transformers' generate, also under `accelerate launch --cpu`"
            )
        if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Launched on several processes without GPUs (accelerate launch / torchrun): transformers sets up
            # CPU DDP (gloo) only with use_cpu; without it every process would train alone.
            self.use_cpu = True
        if not torch.cuda.is_available() and self.bf16 is not False:
            if self.bf16:
                logger.warning("no CUDA device: training in float32 on CPU (recipe asked for bf16)")
            self.bf16 = False
        super().__post_init__()


def build_cropper(model_cfg: ModelArgs):
    """``(model, processor, peft_config)`` for a recipe's ``model`` section (:class:`~zoomvlm.train.recipe.ModelArgs`).

    ``init``: a hub id or a local ``save_pretrained`` folder, loaded with :func:`zoomvlm.targets.hf.load_vlm`
    (LoRA adapters are merged on load). The CPU recipes start from a from-scratch tiny model written by
    ``python scripts/make_tiny_init.py`` (the command is in each recipe's comment).
    ``lora``: peft ``LoraConfig`` keywords (CropVLM: r 128, alpha 256, dropout 0.05; q/k/v/o/gate/up/down/fc1/fc2
    + connector proj), or null to train all weights.

    Raises:
        FileNotFoundError: ``init`` names a local folder (absolute, ``./``, ``runs/...``) that does not exist.
        ImportError: LoRA without peft.
    """
    check_init(model_cfg)
    init = str(model_cfg.init)
    import torch

    from zoomvlm.targets.hf import align_training_processor, load_vlm

    dtype = model_cfg.dtype
    if not torch.cuda.is_available() and str(dtype) not in ("float32", "torch.float32"):
        # TrainerDefaults trains in float32 without CUDA (no bf16/fp16 on CPU): load the weights so too
        logger.warning("no CUDA device: loading %s in float32 (recipe asked for %s)", init, dtype)
        dtype = "float32"
    model, processor = load_vlm(init, device="cpu", dtype=dtype)
    align_training_processor(processor)  # train on the views inference reads (saved with the model in final/)
    model.train()
    peft_config = None
    if model_cfg.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", **model_cfg.lora)
    return model, processor, peft_config


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


def cropper_view(path: str | Path, budget: Budget, high: Budget | None = None) -> Image.Image:
    """The policy's input: the image shrunk to ``budget`` (its processor may resize/tile further); with ``high``
    (the crop-set policy), AwaRes's low view of it instead (:func:`~zoomvlm.awares.protocol.low_res_view`: the
    ``high`` view halved, SMALLER than ``budget`` for an image under ``high``), exactly what it sees at inference."""
    from zoomvlm.data.samples import load_image

    if high is not None:
        from zoomvlm.awares.protocol import low_res_view

        return low_res_view(load_image(path), high)
    return resize_to_budget(load_image(path), budget)


def cropper_views(
    paths, budget: Budget, desc: str = "loading images", high: Budget | None = None
) -> list[Image.Image]:
    """:func:`cropper_view` of each path, decoding each distinct file once (questions share images)."""
    from tqdm.auto import tqdm

    cache: dict[str, Image.Image] = {}
    out = []
    for p in tqdm(paths, desc=desc, unit="q", leave=False):
        key = str(p)
        if key not in cache:
            cache[key] = cropper_view(p, budget, high)
        out.append(cache[key])
    return out


def _new_schedule_lr(lr_scheduler) -> list[float] | None:
    """The learning rates the scheduler's CURRENT lambdas give at its step (``LambdaLR``: HF's warmup / cosine /
    linear schedules), or None for another scheduler."""
    lambdas = getattr(lr_scheduler, "lr_lambdas", None)
    if not lambdas:
        return None
    return [base * fn(lr_scheduler.last_epoch) for base, fn in zip(lr_scheduler.base_lrs, lambdas, strict=True)]


def resumed_schedule_callback():
    """A ``TrainerCallback`` that sets the first step after a resume to the learning rate of the schedule the run
    NOW has. Resuming with another ``max_steps`` (README: runs extended 20 -> 80 -> 60 steps) restores the
    optimiser's learning rate as the OLD schedule left it at the checkpoint (0 at the end of a finished cosine);
    the scheduler follows the new length only from the next step, so that first step was wasted."""
    from transformers import TrainerCallback

    class ResumedSchedule(TrainerCallback):
        def __init__(self):
            self.checked = False

        def on_step_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
            if self.checked:
                return
            self.checked = True
            if state.global_step == 0 or optimizer is None or lr_scheduler is None:
                return  # a fresh run: the optimiser's lr is the schedule's already
            lrs = _new_schedule_lr(lr_scheduler)
            if lrs is not None:
                for group, lr in zip(optimizer.param_groups, lrs, strict=True):
                    group["lr"] = lr
                # what get_last_lr() reports, and the Trainer logs as this step's learning_rate (torch keeps it in
                # _last_lr; the checkpoint restored the old schedule's value)
                lr_scheduler._last_lr = list(lrs)

    return ResumedSchedule()


RESUMABLE_CHANGES = (
    "source",
    "trainer.max_steps",
    "trainer.num_train_epochs",
    "trainer.save_steps",
    "trainer.save_total_limit",
    "trainer.save_strategy",
    "trainer.logging_steps",
    "trainer.logging_strategy",
    "trainer.output_dir",
    "trainer.gradient_checkpointing",
    "trainer.activation_checkpointing",  # transformers' new name for it
    "trainer.gradient_checkpointing_kwargs",
    "trainer.report_to",
    "trainer.run_name",
    "trainer.dataloader_num_workers",
)
"""Recipe settings a resumed run may change: how long it runs, how it saves and logs, where the recipe file lies,
and memory-only switches. Anything else (reward, learning rate, data, model, target...) would continue the old
checkpoint's optimiser and data order under settings it was not trained with."""

RUN_RECIPE = "zoomvlm_recipe.json"


def check_init(model_cfg) -> None:
    """Refuse a ``model.init`` that names a local folder (absolute, ``./``, ``runs/...``: not a hub id
    ``owner/name``) that does not exist (``FileNotFoundError`` with the command that writes the tiny ones)."""
    init = str(model_cfg.init)
    if not Path(init).exists() and (Path(init).is_absolute() or init.startswith(".") or init.count("/") != 1):
        raise FileNotFoundError(
            f"model.init folder {init!r} not found; for the tiny CPU recipes write it first with "
            f"`python scripts/make_tiny_init.py --out {init} ...` (see the recipe's comment)"
        )


def check_resume(output_dir: str | Path, recipe) -> None:
    """Before a TRL run starts (before its data is read or its model loads): refuse a ``model.init`` folder that
    does not exist (:func:`check_init`), and refuse to continue ``output_dir``'s checkpoints under other settings.

    The recipe (:meth:`~zoomvlm.train.recipe.Recipe.to_json`) is kept in ``output_dir/zoomvlm_recipe.json``. When
    ``output_dir`` holds a checkpoint and that file, the two must agree except for :data:`RESUMABLE_CHANGES`
    (:func:`zoomvlm.core.resume.settings_diff`); then the file is rewritten with the new recipe (a longer
    ``max_steps`` becomes the run's). A run from before this file existed resumes as it did and gains it.

    Raises:
        FileNotFoundError: see :func:`check_init`.
        RecipeError: the recipe differs from the one the checkpoints were trained with (the differences listed).
    """
    from zoomvlm.core.resume import settings_diff
    from zoomvlm.train.recipe import RecipeError

    check_init(recipe.model)
    out = Path(output_dir)
    now = recipe.to_json()
    path = out / RUN_RECIPE
    if _checkpoints(out) and path.is_file():
        saved = json.loads(path.read_text())
        # nested settings are compared key by key ("trainer.gradient_checkpointing_kwargs.use_reentrant"): a key
        # under an allowed one is allowed
        diff = [d for d in settings_diff(saved, now) if not _resumable(d.split(":")[0])]
        if diff:
            raise RecipeError(
                f"{out} holds checkpoints trained with other settings ({'; '.join(diff)}): resuming would continue "
                f"them under the new ones while the saved recipe named them. Rerun with the same recipe (only "
                f"{', '.join(k.removeprefix('trainer.') for k in RESUMABLE_CHANGES[1:])} may change), or use another "
                "output_dir (or delete its checkpoint-* folders to start over)"
            )
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # every process of a multi-process run writes the same
    tmp.write_text(json.dumps(now, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _resumable(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUMABLE_CHANGES)


def _checkpoints(output_dir: Path) -> list[Path]:
    """``checkpoint-N`` folders, newest (largest N) first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def resume_checkpoint(output_dir: str | Path) -> str | None:
    """The newest COMPLETE ``checkpoint-N`` folder in ``output_dir`` (HF Trainer layout), to resume a crashed run;
    ``None`` when there is none. Only folders named exactly ``checkpoint-<digits>`` count (a copied
    ``checkpoint-20-backup`` or a stray file is not the trainer's), as in ``transformers.trainer_utils
    .get_last_checkpoint``; unlike it, a folder without ``trainer_state.json`` (the Trainer writes it last: the
    run was killed while saving) or with one cut short (it is written in place, not atomically) is skipped, with
    a warning, for the newest complete one before it."""
    for ckpt in _checkpoints(Path(output_dir)):
        state = ckpt / "trainer_state.json"
        try:
            json.loads(state.read_text(encoding="utf-8"))
            return str(ckpt)
        except FileNotFoundError:
            why = "no trainer_state.json"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            why = f"trainer_state.json unreadable: {err}"
        logger.warning("%s is incomplete (%s: killed while saving?); resuming from an older one", ckpt, why)
    return None


def train_resumable(trainer, output_dir: str | Path) -> int:
    """``trainer.train`` resumed from the newest complete checkpoint of ``output_dir`` (:func:`resume_checkpoint`);
    returns the step it resumed from (0: from scratch), for :func:`save_final` (read before training: the
    checkpoint may be rotated away by ``save_total_limit`` during it).

    A run whose checkpoint already reached its planned steps (``max_steps``, or its epochs: the same command rerun
    after it finished) trains nothing: transformers' ``train`` would take one more step past the end (it checks the
    limit after a step). Its weights and state are loaded from the checkpoint instead, so ``final/`` can be
    rebuilt if it is missing.
    """
    from transformers import TrainerState

    from zoomvlm.train.trl_compat import load_checkpoint_weights

    resumed_from = resume_checkpoint(output_dir)
    start = checkpoint_step(resumed_from)
    if resumed_from is not None and start >= _planned_steps(trainer):
        logger.info("%s already reached the run's %d steps: nothing to train", resumed_from, _planned_steps(trainer))
        load_checkpoint_weights(trainer, resumed_from)
        trainer.state = TrainerState.load_from_json(str(Path(resumed_from) / "trainer_state.json"))
        return start
    trainer.train(resume_from_checkpoint=resumed_from)
    return start


def _planned_steps(trainer) -> int:
    """The optimiser steps the run is set to take: ``max_steps``, or with ``max_steps <= 0``
    ``ceil(num_train_epochs x update steps per epoch)`` as transformers computes it (fractional epochs included)."""
    args = trainer.args
    if args.max_steps > 0:
        return args.max_steps
    batches = len(trainer.get_train_dataloader())
    per_epoch = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
    return math.ceil(args.num_train_epochs * per_epoch)


def run_metrics(trainer, start_step: int = 0) -> dict:
    """What the run measured, from TRL's log history: steps, runtime, steps/s, and the last logged value of every
    training metric (loss, ``rewards/<name>/mean``, ``reward``...). Written to ``final/zoomvlm_run.json`` and the
    model card.

    ``start_step``: the step this session resumed from (0 = a run from scratch). Runtime and steps/s are this
    session's (steps ``start_step + 1 .. global_step``: earlier sessions' are not in the checkpoint); ``train_loss``
    covers the whole run: TRL's for a run from scratch, else the mean of every loss logged since step 1 (the
    checkpoint carries the earlier sessions' log; TRL's own would be this session's only).
    """
    history = trainer.state.log_history
    summary = next((e for e in reversed(history) if "train_runtime" in e), {})
    last: dict[str, float] = {}
    for entry in history:
        if "train_runtime" not in entry:
            last.update({k: v for k, v in entry.items() if isinstance(v, int | float)})
    train_loss = summary.get("train_loss")
    if start_step:
        losses = [e["loss"] for e in history if "loss" in e and "train_runtime" not in e]
        train_loss = sum(losses) / len(losses) if losses else None
    return {
        "global_step": trainer.state.global_step,
        "resumed_from_step": start_step,
        "num_processes": trainer.accelerator.num_processes,
        "train_runtime_s": summary.get("train_runtime"),
        "train_steps_per_second": summary.get("train_steps_per_second"),
        "train_loss": train_loss,
        "last_logged": last,
    }


def read_final_step(final: Path) -> int | None:
    """The ``global_step`` a ``final/`` folder's ``zoomvlm_run.json`` records; None without a readable one."""
    try:
        return int(json.loads((final / "zoomvlm_run.json").read_text(encoding="utf-8"))["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def checkpoint_step(checkpoint: str | Path | None) -> int:
    """The global step a ``checkpoint-N`` folder was saved at (its ``trainer_state.json``); 0 for None."""
    if checkpoint is None:
        return 0
    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))["global_step"])


def save_final(trainer, processor, output_dir: str | Path, recipe, start_step: int = 0) -> Path:
    """Save the trained model to ``output_dir/final``, publishable as is: ``save_pretrained`` layout (LoRA merged),
    the processor, the recipe (``zoomvlm_recipe.json``), the run's metrics (``zoomvlm_run.json``,
    :func:`run_metrics`) and a model card (``README.md``, :func:`zoomvlm.train.model_card.write_model_card`).

    ``start_step``: the step this session resumed from (:func:`train_resumable`; 0 = from scratch). A session
    that trained no step (the same command rerun after the run finished) leaves an existing ``final/`` of that
    step as it is: its metrics and card were the run's, this session's would be zeros.

    Under ``accelerate launch`` every process calls this; only the main process writes (the others wait for it), so
    ``final/`` is written once. A peft model is merged into its base weights first, so ``vlm:output_dir/final``
    loads like any checkpoint. (DeepSpeed ZeRO-3 shards the weights: save with ``trainer.save_model`` there.)

    Returns:
        The ``final`` folder (on every process).
    """
    from zoomvlm.train.model_card import write_model_card

    final = Path(output_dir) / FINAL
    accelerator = trainer.accelerator
    accelerator.wait_for_everyone()
    start = start_step
    done = read_final_step(final)
    if start == trainer.state.global_step and done == start:
        logger.info("%s already holds step %d, and this session trained no step: left as it is", final, start)
        accelerator.wait_for_everyone()
        return final
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(trainer.model)
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        model.save_pretrained(final)
        processor.save_pretrained(final)
        (final / "zoomvlm_recipe.json").write_text(json.dumps(recipe.to_json(), indent=2, default=str) + "\n")
        metrics = run_metrics(trainer, start)
        (final / "zoomvlm_run.json").write_text(json.dumps(metrics, indent=2) + "\n")
        write_model_card(final, recipe, metrics)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()
    return final
