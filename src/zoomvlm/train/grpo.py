"""Stage 2 of CropVLM: GRPO on the reward target's own signal, with TRL's maintained ``GRPOTrainer``.

For each prompt (image + question) the policy (the cropper) samples G boxes (``num_generations``, default 6, at
temperature 0.8); the rewards of :mod:`zoomvlm.cropvlm.rewards` score each box by what the reward target makes of
``[global view, crop]``; TRL turns the weighted sum into advantages and takes one policy-gradient step with a KL
penalty (beta 0.01) to the starting model. CropVLM's advantage is reward minus group mean with no division by
the group's std (Dr-GRPO, ``scale_rewards: none``); ``loss_type: dr_grpo`` gives Dr-GRPO's length-unbiased
token aggregation too. Unlike the official trainer (batch size 1, a dead vLLM path), batches of several prompts,
accelerate/DeepSpeed and vLLM rollouts come with TRL.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from transformers.trainer_utils import SchedulerType
from trl import GRPOConfig, GRPOTrainer

from zoomvlm.core.geometry import Budget
from zoomvlm.core.prompts import cropper_prompt
from zoomvlm.train.common import (
    TrainerDefaults,
    build_cropper,
    check_resume,
    cropper_views,
    resumed_schedule_callback,
    save_final,
    train_resumable,
)
from zoomvlm.train.recipe import Recipe
from zoomvlm.train.trl_compat import EpochSeededSamplerMixin

logger = logging.getLogger(__name__)

__all__ = ["CropperGRPOConfig", "build_grpo_trainer", "grpo_dataset", "run_grpo"]


@dataclass
class CropperGRPOConfig(TrainerDefaults, GRPOConfig):
    """TRL's ``GRPOConfig`` with CropVLM's GRPO defaults (METHODS.md: G 6, temperature 0.8, beta 0.01, lr 5e-6
    cosine, effective batch 16 prompts, max_grad_norm 0.1, 32 completion tokens, advantage = reward - group mean,
    one update per rollout); the ``trainer:`` section of ``grpo`` recipes (cropper and crop-set policy)."""

    num_generations: int | None = field(default=6, metadata={"help": "CropVLM: G = 6 boxes per prompt."})
    temperature: float = field(default=0.8, metadata={"help": "CropVLM: 0.8."})
    beta: float = field(default=0.01, metadata={"help": "CropVLM: KL coefficient 0.01 to the starting model."})
    learning_rate: float = field(default=5e-6, metadata={"help": "CropVLM: 5e-6 (cosine)."})
    lr_scheduler_type: SchedulerType | str = field(default="cosine", metadata={"help": "CropVLM: cosine."})
    max_grad_norm: float = field(default=0.1, metadata={"help": "CropVLM: 0.1."})
    max_completion_length: int | None = field(default=32, metadata={"help": "CropVLM: 32 tokens (a box is ~16)."})
    scale_rewards: str = field(
        default="none", metadata={"help": "CropVLM (Dr-GRPO): advantage = reward - group mean, no std division."}
    )
    per_device_train_batch_size: int = field(default=12, metadata={"help": "Completions per device step: 2 x G."})
    gradient_accumulation_steps: int = field(default=8, metadata={"help": "16 prompts x G per update."})
    logging_steps: float = field(default=1, metadata={"help": "Log every step (rewards move fast)."})
    save_steps: float = field(default=25, metadata={"help": "Checkpoint every N steps (resume point)."})


class CropperGRPOTrainer(EpochSeededSamplerMixin, GRPOTrainer):
    """TRL's ``GRPOTrainer`` whose prompt order depends on ``(seed, epoch)`` only, so that a run resumed after its
    first epoch sees the prompts the uninterrupted run saw
    (:class:`~zoomvlm.train.trl_compat.EpochSeededSamplerMixin`).
    """


def grpo_dataset(samples, budget: Budget, policy: str = "cropper", high: Budget | None = None):
    """A ``datasets.Dataset`` for GRPO from :class:`~zoomvlm.data.samples.Sample` objects (answers required).

    Columns: ``image`` (the policy's view, shrunk to ``budget``), ``prompt`` (one user turn, text only: TRL
    adds the image), and for the rewards ``image_path`` (the ORIGINAL image), ``question``, ``answers``,
    ``metric``, ``label`` (AwaRes curation's ``LR``/``HR`` where the data has it, else ``""``). Human
    ``evidence_boxes`` are dropped first: they never reach training.

    Args:
        policy: ``cropper`` (CropVLM's prompt) or ``crop_set`` (the external AwaRes crop-set policy's prompt;
            ``budget`` is then its low-resolution view, the high budget with sides halved).
        high: for ``crop_set``, the high view: each image's view is then AwaRes's low view of it, as at
            inference (smaller than ``budget`` for an image under ``high``).

    Raises:
        ValueError: a sample without answers, or an unknown ``policy``.
    """
    import datasets

    from zoomvlm.awares.protocol import crop_set_policy_prompt

    prompt_fn = {"cropper": cropper_prompt, "crop_set": crop_set_policy_prompt}.get(policy)
    if prompt_fn is None:
        raise ValueError(f"unknown data.policy {policy!r}; use cropper or crop_set")
    samples = [replace(s, evidence_boxes=()) for s in samples]
    for s in samples:
        if not s.answers:
            raise ValueError(f"sample {s.id!r} has no answer: GRPO rewards need the gold answer")
    views = cropper_views([s.image for s in samples], budget, high=high if policy == "crop_set" else None)
    return datasets.Dataset.from_dict(
        {
            "image": views,
            "prompt": [[{"role": "user", "content": prompt_fn(s.question)}] for s in samples],
            "image_path": [str(Path(s.image).resolve()) for s in samples],
            "question": [s.question for s in samples],
            "answers": [list(s.answers) for s in samples],
            "metric": [s.metric or "" for s in samples],
            "label": [str((s.meta or {}).get("label", "")) for s in samples],
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "prompt": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
                "image_path": datasets.Value("string"),
                "question": datasets.Value("string"),
                "answers": datasets.Sequence(datasets.Value("string")),
                "metric": datasets.Value("string"),
                "label": datasets.Value("string"),
            }
        ),
    )


def build_grpo_trainer(recipe: Recipe, output_dir: str | Path | None = None, reward_funcs=None, reward_weights=None):
    """``(trainer, processor)``: a TRL ``GRPOTrainer`` for a ``grpo`` recipe, ready to ``train()``.

    Args:
        reward_funcs, reward_weights: replace the recipe's rewards (e.g. a custom reward in a test); by default
            they come from ``recipe.rewards`` through the registry :func:`zoomvlm.train.rewards.build_rewards`.

    Raises:
        ValueError: no ``data.file``; a reward that needs a target without ``target.spec``.
    """
    from zoomvlm.data.samples import load_jsonl
    from zoomvlm.train.rewards import build_rewards, recipe_reward_context

    args = recipe.trainer_args(output_dir)
    if not recipe.data.file:
        raise ValueError("a grpo recipe needs data.file (a JSONL with answers, or curated trajectories)")
    samples = load_jsonl(recipe.data.file)
    if recipe.data.limit:
        samples = samples[: recipe.data.limit]
    dataset = grpo_dataset(samples, recipe.data.view_budget, recipe.data.policy, high=recipe.data.policy_high)
    if reward_funcs is None:
        reward_funcs, reward_weights = build_rewards(recipe.rewards, recipe_reward_context(recipe))
    if reward_weights is not None and args.reward_weights is None:
        args.reward_weights = [float(w) for w in reward_weights]
    model, processor, peft_config = build_cropper(recipe.model)
    trainer = CropperGRPOTrainer(model=model, reward_funcs=list(reward_funcs), args=args, train_dataset=dataset,
                          processing_class=processor, peft_config=peft_config,
                          callbacks=[resumed_schedule_callback()])  # fmt: skip
    return trainer, processor


def run_grpo(recipe: Recipe, output_dir: str | Path | None = None) -> Path:
    """Train a cropper with ``GRPOTrainer``; resumes from the newest checkpoint in ``output_dir``.

    Returns:
        ``output_dir/final`` (``save_pretrained`` layout, LoRA merged), loadable as ``vlm:PATH``.
    """
    check_resume(recipe.trainer_args(output_dir).output_dir, recipe)  # before the model loads
    trainer, processor = build_grpo_trainer(recipe, output_dir)
    start_step = train_resumable(trainer, trainer.args.output_dir)
    return save_final(trainer, processor, trainer.args.output_dir, recipe, start_step)
