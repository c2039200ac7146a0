"""AwaRes cold-start SFT (awares_paper_excerpt sec. 3.3): TRL's ``SFTTrainer`` with the tool-call turn up-weighted.

Training data are the trajectories written by ``zoomvlm curate awares`` (one JSONL record each, see
:mod:`zoomvlm.awares.protocol`): direct-answer (LR) conversations
``[system, user(low view, question), assistant(answer)]`` and tool-call (HR) conversations
``[system, user(low view, question), assistant(GET_CROPS: [...]), user(crops, tool text), assistant(answer)]``.

What is supervised comes from TRL itself: ``assistant_only_loss=True`` renders the conversation with a training
chat template whose ``{% generation %}`` markers give the assistant-token mask, so the system prompt, the
question, every image token and the whole tool-output turn (the crops are observations, not actions) get label
-100. On top of that mask, :class:`ToolCallWeightCollator` adds ``loss_weights`` [B, T]: ``tool_call_weight``
(default 5, AwaRes sec. 3.3: accuracy 77.9 -> 79.7) on the tokens of the assistant turn holding the
``GET_CROPS`` call, 1 on the other assistant tokens, 0 where the label is -100; and
:class:`ToolWeightedSFTTrainer` minimises the weighted token-level NLL.

Run it::

    zoomvlm train awares-sft --config qwen25vl7b_awares_sft

with a recipe of ``kind: awares_sft`` whose ``data.file`` is the trajectories JSONL, ``data.high`` an optional
budget overriding the records' ``high``, and ``trainer.tool_call_weight`` the up-weighting factor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from trl import SFTConfig, SFTTrainer

from zoomvlm.awares.protocol import ToolCallError, parse_get_crops
from zoomvlm.core.geometry import Budget
from zoomvlm.train.common import (
    build_cropper,
    check_resume,
    resumed_schedule_callback,
    save_final,
    train_resumable,
    trajectory_records,
)
from zoomvlm.train.recipe import Recipe
from zoomvlm.train.sft import CropperSFTConfig
from zoomvlm.train.trl_compat import KeepColumnsMixin, weighted_fused_model

logger = logging.getLogger(__name__)

__all__ = [
    "SMOLVLM_TRAINING_CHAT_TEMPLATE",
    "TRAJECTORY_COLUMNS",
    "ToolCallWeightCollator",
    "ToolWeightedSFTTrainer",
    "WeightedSFTConfig",
    "build_weighted_sft_trainer",
    "run_weighted_sft",
    "tool_call_loss_weights",
    "training_chat_template",
    "trajectory_dataset",
]

TRAJECTORY_COLUMNS = ("messages", "image_path", "crops", "high")
"""Stored columns of :func:`trajectory_dataset`; a transform turns them into ``messages`` + ``images`` on access."""


# ----------------------------------------------------------------------------------------------------------------
# Data: trajectories -> {"messages", "images"}, images decoded only when a row is read
# ----------------------------------------------------------------------------------------------------------------


def trajectory_dataset(path: str | Path, high: str | int | Budget | None = None, limit: int | None = None):
    """A ``datasets.Dataset`` of AwaRes trajectories whose rows read as ``{"messages", "images"}`` (TRL's
    conversational vision format).

    ``messages`` is :func:`~zoomvlm.awares.protocol.trajectory_messages` (image placeholders ``{"type": "image"}``);
    ``images`` is :func:`~zoomvlm.awares.protocol.trajectory_images` ``[low-res view, *high-res crops]`` (PIL, RGB).
    Only the text and the image PATHS are stored: a ``with_transform`` decodes the image and cuts the views when a row
    is read (by the collator, in the dataloader workers), so a large file costs no memory up front.

    Args:
        path: trajectories JSONL (``zoomvlm curate awares``); image paths are absolute or relative to its folder.
        high: the high-resolution budget (e.g. ``"side:768"``) for every record; ``None`` keeps each record's
            own ``high``.
        limit: first N records only.

    Raises:
        FileNotFoundError: no such file. ValueError: a record lacks a field, its ``label`` disagrees with its
            ``crops``, no ``high`` is known, or its image file is missing (the message names ``file:line``).
        ToolCallError: a record names an unknown crop.
    """
    import datasets

    from zoomvlm.awares.protocol import trajectory_messages

    columns: dict[str, list] = {name: [] for name in TRAJECTORY_COLUMNS}
    for where, row, record_high, image in trajectory_records(path, high, required=("question", "answer")):
        crops = [str(c) for c in row.get("crops") or []]
        if "label" in row and row["label"] != ("HR" if crops else "LR"):
            raise ValueError(f"{where}: label {row['label']!r} but crops {crops}")
        try:
            messages = trajectory_messages(row["question"], row["answer"], crops)
        except ToolCallError as err:
            raise ToolCallError(f"{where}: {err}") from err
        columns["messages"].append(messages)
        columns["image_path"].append(str(image))
        columns["crops"].append(crops)
        columns["high"].append(record_high)
        if limit and len(columns["messages"]) >= limit:
            break
    if not columns["messages"]:
        raise ValueError(f"{path}: no trajectories")
    return datasets.Dataset.from_dict(columns).with_transform(_with_images)


def _with_images(batch: dict[str, list]) -> dict[str, list]:
    """``with_transform`` hook: the stored columns -> ``{"messages", "images"}`` (decodes the images now)."""
    from zoomvlm.awares.protocol import trajectory_images
    from zoomvlm.data.samples import load_image

    images = [
        trajectory_images(load_image(p), crops, Budget.parse(high))
        for p, crops, high in zip(batch["image_path"], batch["crops"], batch["high"], strict=True)
    ]
    return {"messages": batch["messages"], "images": images}


# ----------------------------------------------------------------------------------------------------------------
# Chat templates with {% generation %} markers
# ----------------------------------------------------------------------------------------------------------------

# The chat template of zoomvlm's from-scratch tiny SmolVLM checkpoints (the shipped assets/cropper and
# assets/crop_set_policy, and those tests/tiny_models.py builds): SmolVLM-Instruct's template plus <video>.
TINY_SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}"
    "{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# TINY_SMOLVLM_CHAT_TEMPLATE with TRL's smolvlm_training.jinja
# change: the assistant turn gets its own branch whose content and <end_of_utterance>\n sit inside
# {% generation %}. Renders byte-identically to the stock template (tested), so a processor saved with it still
# prompts the same at inference.
SMOLVLM_TRAINING_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{% if message['role'] == 'assistant' %}{{ 'Assistant:' }}"
    "{% generation %}{% if message['content'][0]['type'] != 'image' %}{{ ' ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}"
    "{% endif %}{% endfor %}{{ '<end_of_utterance>\n' }}{% endgeneration %}"
    "{% else %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}"
    "{% endif %}{% endfor %}<end_of_utterance>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _our_training_templates() -> dict[str, str]:
    return {TINY_SMOLVLM_CHAT_TEMPLATE: SMOLVLM_TRAINING_CHAT_TEMPLATE}


def training_chat_template(processor) -> str | None:
    """The chat template with ``{% generation %}`` markers that assistant-only loss needs for ``processor``.

    ``None`` when the processor's own template already has the markers. Otherwise TRL's
    ``get_training_chat_template`` (it covers Qwen2/2.5-VL, Qwen3-VL, stock SmolVLM, Idefics3, LLaVA-NeXT...) or,
    for templates TRL does not know, ours (:data:`SMOLVLM_TRAINING_CHAT_TEMPLATE` for the tiny SmolVLM's).

    Raises:
        ValueError: neither TRL nor this module has a training variant of the template.
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = processor.chat_template
    if has_generation_markers(template):
        return None
    ours = _our_training_templates().get(template) if isinstance(template, str) else None
    return ours if ours is not None else get_training_chat_template(processor)


# ----------------------------------------------------------------------------------------------------------------
# Loss weights
# ----------------------------------------------------------------------------------------------------------------


def _message_text(message: dict) -> str:
    content = message.get("content") or ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text") or "" for part in content if part.get("type") == "text")


def _is_tool_call(text: str) -> bool:
    """True for an assistant turn holding a ``GET_CROPS`` call, malformed ones included (they are still actions)."""
    try:
        return parse_get_crops(text) is not None
    except ToolCallError:
        return True


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """``[start, end)`` spans of the contiguous True runs of a 1-D bool tensor."""
    edges = torch.diff(mask.int(), prepend=mask.new_zeros(1).int(), append=mask.new_zeros(1).int())
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    return list(zip(starts, ends, strict=True))


def tool_call_loss_weights(
    labels: torch.Tensor, messages: Sequence[Sequence[dict]], tool_call_weight: float
) -> torch.Tensor:
    """Per-token loss weights [B, T] (float32) for a batch whose ``labels`` keep only assistant tokens.

    Each contiguous run of supervised tokens (``labels != -100``) in row ``b`` is one assistant turn of
    ``messages[b]``, in order: the ``{% generation %}`` span is the turn's content plus its end-of-turn token,
    and turns are separated by unsupervised role headers. A turn whose text holds a ``GET_CROPS`` call
    (:func:`~zoomvlm.awares.protocol.parse_get_crops`) gets ``tool_call_weight``, every other supervised token 1.0,
    unsupervised tokens 0. Fewer runs than turns is allowed (``max_length`` truncation drops trailing turns).

    Raises:
        ValueError: a row has more runs than assistant turns (the template's markers do not match the turns).
    """
    supervised = labels != -100
    weights = supervised.float()
    for b, conversation in enumerate(messages):
        turns = [m for m in conversation if m["role"] == "assistant"]
        runs = _runs(supervised[b])
        if len(runs) > len(turns):
            raise ValueError(
                f"row {b}: {len(runs)} supervised spans but {len(turns)} assistant turns; the chat template's "
                "{% generation %} markers do not delimit one span per assistant turn"
            )
        for (start, end), turn in zip(runs, turns, strict=False):
            if _is_tool_call(_message_text(turn)):
                weights[b, start:end] = tool_call_weight
    return weights


@dataclass
class ToolCallWeightCollator:
    """Wraps a collator that yields ``labels`` masked to the assistant turns (TRL's
    ``DataCollatorForVisionLanguageModeling`` with ``assistant_only_loss=True``) and adds ``loss_weights`` [B, T]
    from :func:`tool_call_loss_weights`. Examples need ``messages`` (and whatever the wrapped collator reads)."""

    collator: Callable[[list[dict]], dict]
    tool_call_weight: float = 5.0

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        messages = [example["messages"] for example in examples]  # read first: the collator may edit examples
        batch = self.collator(examples)
        batch["loss_weights"] = tool_call_loss_weights(batch["labels"], messages, self.tool_call_weight)
        return batch


# ----------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class WeightedSFTConfig(CropperSFTConfig):
    """The ``trainer:`` section of ``awares_sft`` recipes: ``SFTConfig`` plus ``tool_call_weight``.

    AwaRes publishes no SFT hyperparameters in the excerpt; CropVLM's SFT defaults (:class:`CropperSFTConfig`: lr
    5e-5 cosine, warmup 0.03, effective batch 16, 1 epoch, no truncation) apply, with the assistant mask instead of
    completion-only loss.
    """

    tool_call_weight: float = field(
        default=5.0,
        metadata={"help": "Loss weight of the tokens of the GET_CROPS tool-call turn (AwaRes sec. 3.3: 5)."},
    )
    assistant_only_loss: bool = field(
        default=True,
        metadata={"help": "Required: the loss weights are laid over TRL's assistant-token mask."},
    )
    completion_only_loss: bool | None = field(
        default=None, metadata={"help": "Unused: the assistant mask decides what is supervised."}
    )


class ToolWeightedSFTTrainer(KeepColumnsMixin, SFTTrainer):
    """``SFTTrainer`` minimising the weighted token NLL of AwaRes sec. 3.3.

    Loss over one optimizer step (all gradient-accumulation micro-batches ``m``, all processes when
    ``average_tokens_across_devices``)::

        loss = sum_{m,b,t} w[m,b,t+1] * -log p(x[m,b,t+1] | x[m,b,<=t]) / sum_{m,b,t} w[m,b,t+1]

    with ``w`` the collator's ``loss_weights`` (``tool_call_weight`` on the tool-call turn, 1 on other assistant
    tokens, 0 elsewhere). Normalising by the total WEIGHT (not the token count, TRL's default) keeps it a weighted
    mean: the loss scale and so the effective learning rate do not depend on how many HR trajectories a batch holds,
    ``tool_call_weight=1`` is exactly TRL's ``assistant_only_loss`` SFT, and the weight only redistributes the
    gradient towards the tool-call decision. The denominator is the weight sum of the whole accumulated batch
    (:meth:`get_batch_samples` returns it as ``num_items_in_batch``), so gradient accumulation gives the same
    gradient as one large batch. In evaluation (no ``num_items_in_batch``) each batch is normalised by its own
    weight sum.

    Everything else is TRL's ``compute_loss``: the fused LM head (no full logits), the ``entropy`` and
    ``mean_token_accuracy`` metrics (unweighted, over the supervised tokens), token counting. The weights enter by
    scaling the per-token log-probabilities the fused head returns. ``loss_type="dft"``, label smoothing, a
    ``compute_loss_func`` and sequence/context parallelism (which take other loss paths) are rejected.

    ``tool_call_weight`` comes from :class:`WeightedSFTConfig`; with a plain ``SFTConfig`` pass it here.
    """

    loss_is_scaled_for_ga = True  # the loss is divided by the weight sum of the whole accumulated batch
    keep_columns = TRAJECTORY_COLUMNS  # the image transform reads image_path/crops/high (KeepColumnsMixin)

    def __init__(self, model, args: SFTConfig, *, tool_call_weight: float | None = None, **kwargs):
        if tool_call_weight is None:
            tool_call_weight = getattr(args, "tool_call_weight", 5.0)
        if tool_call_weight < 0:
            raise ValueError(f"tool_call_weight must be >= 0, got {tool_call_weight}")
        if not args.assistant_only_loss:
            raise ValueError("ToolWeightedSFTTrainer needs assistant_only_loss=True (WeightedSFTConfig's default)")
        if args.loss_type != "nll" or args.label_smoothing_factor > 0 or kwargs.get("compute_loss_func"):
            raise ValueError("ToolWeightedSFTTrainer needs loss_type='nll', no label smoothing, no compute_loss_func")
        processor = kwargs.get("processing_class")
        template = getattr(processor, "chat_template", None)
        ours = _our_training_templates().get(template) if isinstance(template, str) else None
        if ours is not None:
            # TRL has no training variant of this template and would refuse it; ours renders identically, so the
            # processor prompts (and is saved) as before.
            processor.chat_template = ours
        self.tool_call_weight = float(tool_call_weight)
        super().__init__(model, args, **kwargs)
        pc = getattr(self.accelerator, "parallelism_config", None)
        if pc is not None and (pc.sp_enabled or pc.cp_enabled):
            raise NotImplementedError("ToolWeightedSFTTrainer does not support sequence or context parallelism")
        self.data_collator = ToolCallWeightCollator(self.data_collator, self.tool_call_weight)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The micro-batches of one optimizer step and, as ``num_items_in_batch``, their total loss weight
        (summed over processes with ``average_tokens_across_devices``) instead of their supervised-token count."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batch_samples and "loss_weights" in batch_samples[0]:
            total = sum(batch["loss_weights"][:, 1:].sum() for batch in batch_samples).to(device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                total = self.accelerator.gather(total).sum()
            num_items_in_batch = total
        return batch_samples, num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Weighted NLL (see the class docstring); ``inputs["loss_weights"]`` [B, T] is consumed here."""
        if "loss_weights" not in inputs:
            raise KeyError("inputs carry no loss_weights: use ToolCallWeightCollator (the trainer's default collator)")
        # Position t of the fused head's log_probs [B, T-1] scores token t+1, so the weights shift like the labels.
        weights = inputs.pop("loss_weights")[:, 1:]
        if num_items_in_batch is None:
            # TRL then divides by the batch's supervised-token count; rescale so the result is / sum(weights).
            n_tokens = (inputs["labels"][:, 1:] != -100).sum()
            weights = weights * n_tokens / weights.sum().clamp(min=1e-8)

        return super().compute_loss(weighted_fused_model(model, weights), inputs, return_outputs, num_items_in_batch)


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------


def build_weighted_sft_trainer(recipe: Recipe, output_dir: str | Path | None = None):
    """``(trainer, processor)`` for an ``awares_sft`` recipe (``data.file``, ``data.high``, ``data.limit``,
    ``trainer.tool_call_weight``; ``model`` as in :func:`~zoomvlm.train.common.build_cropper`).

    Raises:
        ValueError: no ``data.file``.
    """
    args = recipe.trainer_args(output_dir)
    if not recipe.data.file:
        raise ValueError("recipe data.file (the trajectories JSONL of `zoomvlm curate awares`) is required")
    dataset = trajectory_dataset(recipe.data.file, recipe.data.high, recipe.data.limit)
    model, processor, peft_config = build_cropper(recipe.model)
    trainer = ToolWeightedSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                                     peft_config=peft_config, callbacks=[resumed_schedule_callback()])  # fmt: skip
    return trainer, processor


def run_weighted_sft(recipe: Recipe, output_dir: str | Path | None = None) -> Path:
    """AwaRes cold-start SFT with ``ToolWeightedSFTTrainer``; resumes from the newest checkpoint in ``output_dir``.

    Returns:
        The ``output_dir/final`` folder (``save_pretrained`` layout, LoRA merged), the GRPO stage's starting point.
    """
    check_resume(recipe.trainer_args(output_dir).output_dir, recipe)  # before the model loads
    trainer, processor = build_weighted_sft_trainer(recipe, output_dir)
    start_step = train_resumable(trainer, trainer.args.output_dir)
    return save_final(trainer, processor, trainer.args.output_dir, recipe, start_step)
