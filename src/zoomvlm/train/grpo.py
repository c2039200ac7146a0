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
from dataclasses import replace
from pathlib import Path

from zoomvlm.core.geometry import Budget
from zoomvlm.core.prompts import cropper_prompt
from zoomvlm.cropvlm.rewards import build_rewards
from zoomvlm.train.common import build_cropper, cropper_views, resume_checkpoint, save_final, trainer_kwargs
from zoomvlm.train.recipe import Recipe

logger = logging.getLogger(__name__)

__all__ = ["GRPO_DEFAULTS", "build_grpo_trainer", "build_reward_target", "grpo_dataset", "run_grpo"]

GRPO_DEFAULTS = {
    # CropVLM (METHODS.md): G 6, temperature 0.8, beta 0.01, lr 5e-6 cosine, effective batch 16,
    # max_grad_norm 0.1, 32 completion tokens, advantage = reward - group mean (no std), one update per rollout.
    "num_generations": 6,
    "temperature": 0.8,
    "beta": 0.01,
    "learning_rate": 5e-6,
    "lr_scheduler_type": "cosine",
    "max_grad_norm": 0.1,
    "max_completion_length": 32,
    "scale_rewards": "none",
    "num_iterations": 1,
    "per_device_train_batch_size": 12,  # completions per device step: 2 prompts x G=6
    "gradient_accumulation_steps": 8,  # 16 prompts x 6 boxes per update
    "logging_steps": 1,
    "save_strategy": "steps",
    "save_steps": 25,
    "save_total_limit": 2,
    "report_to": [],
    "remove_unused_columns": False,
}


def grpo_dataset(samples, budget: Budget, policy: str = "cropper"):
    """A ``datasets.Dataset`` for GRPO from :class:`~zoomvlm.data.samples.Sample` objects (answers required).

    Columns: ``image`` (the policy's view, shrunk to ``budget``), ``prompt`` (one user turn, text only: TRL
    adds the image), and for the rewards ``image_path`` (the ORIGINAL image), ``question``, ``answers``,
    ``metric``, ``label`` (AwaRes curation's ``LR``/``HR`` where the data has it, else ``""``). Human
    ``evidence_boxes`` are dropped first: they never reach training.

    Args:
        policy: ``cropper`` (CropVLM's prompt) or ``crop_set`` (the external AwaRes crop-set policy's prompt;
            ``budget`` is then its low-resolution view, the high budget with sides halved).

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
    views = cropper_views([s.image for s in samples], budget)
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


def policy_view_budget(data_cfg: dict) -> tuple[str, Budget]:
    """``(policy kind, view budget)`` from a recipe's ``data`` section: the cropper's ``cropper_budget`` (default
    512), or for ``policy: crop_set`` the low view of ``high`` (a ``side:N`` budget; the low view is ``N // 2``).

    Raises:
        ValueError: ``crop_set`` without a side budget in ``data.high``.
    """
    policy = data_cfg.get("policy", "cropper")
    if policy != "crop_set":
        return policy, Budget.parse(data_cfg.get("cropper_budget", 512))
    high = Budget.parse(data_cfg.get("high", "side:768"))
    if high.max_side is None or high.max_pixels is not None:
        raise ValueError(f"data.high must be a side budget (e.g. side:768) for the crop-set policy, got {high}")
    return policy, Budget(max_side=high.max_side // 2)


def build_reward_target(target_cfg: dict):
    """The frozen reward target from a recipe's ``target`` section (``spec``, ``budget``; specs as in ``eval``)."""
    from zoomvlm.targets import load_target

    spec = target_cfg.get("spec")
    if not spec:
        raise ValueError("a GRPO recipe with accuracy/likelihood rewards needs target.spec (e.g. ocr, hf:MODEL)")
    kwargs = {k: v for k, v in target_cfg.items() if k not in {"spec", "budget", "crop_budget", "metric"}}
    return load_target(spec, budget=target_cfg.get("budget"), **kwargs)


def build_grpo_trainer(recipe: Recipe, output_dir: str | Path | None = None, reward_funcs=None, reward_weights=None):
    """``(trainer, processor)``: a TRL ``GRPOTrainer`` for ``recipe``, ready to ``train()``.

    Args:
        reward_funcs, reward_weights: replace the recipe's rewards (e.g. a custom reward in a test or a
            user's own TRL-style reward function); by default they are built from ``recipe.rewards``.
    """
    from trl import GRPOConfig, GRPOTrainer

    from zoomvlm.data.samples import load_jsonl

    trainer_kw = trainer_kwargs(GRPO_DEFAULTS, recipe.trainer, output_dir)
    samples = load_jsonl(recipe.data["file"])
    if recipe.data.get("limit"):
        samples = samples[: int(recipe.data["limit"])]
    policy, view_budget = policy_view_budget(recipe.data)
    dataset = grpo_dataset(samples, view_budget, policy)
    if reward_funcs is None:
        needs_target = any(name not in ("format", "crop_set_format") for name in recipe.rewards)
        target = build_reward_target(recipe.target) if needs_target else None
        reward_funcs, reward_weights = build_rewards(
            recipe.rewards,
            target,
            metric=recipe.target.get("metric", "anls"),
            crop_budget=recipe.target.get("crop_budget"),
            awares={"high": recipe.data.get("high", "side:768"), **recipe.awares},
        )
    if reward_weights is not None:
        trainer_kw.setdefault("reward_weights", list(reward_weights))
    model, processor, peft_config = build_cropper(recipe.model)
    args = GRPOConfig(**trainer_kw)
    trainer = GRPOTrainer(model=model, reward_funcs=list(reward_funcs), args=args, train_dataset=dataset,
                          processing_class=processor, peft_config=peft_config)  # fmt: skip
    return trainer, processor


def run_grpo(recipe: Recipe, output_dir: str | Path | None = None) -> Path:
    """Train a cropper with ``GRPOTrainer``; resumes from the newest checkpoint in ``output_dir``.

    Returns:
        ``output_dir/final`` (``save_pretrained`` layout, LoRA merged), loadable as ``vlm:PATH``.
    """
    trainer, processor = build_grpo_trainer(recipe, output_dir)
    trainer.train(resume_from_checkpoint=resume_checkpoint(trainer.args.output_dir))
    return save_final(trainer, processor, trainer.args.output_dir, recipe)
