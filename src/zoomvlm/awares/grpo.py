"""AwaRes stage 2: multi-turn GRPO of the SELF-ZOOMING VLM, on TRL's maintained ``GRPOTrainer``.

One rollout (awares_paper_excerpt sec. 3.4; METHODS.md, AwaRes): turn 1 sees the low-resolution view and the
question and either answers or emits ``GET_CROPS: [...]``; the requested crops at the high-resolution scale come
back as a new USER turn (:func:`zoomvlm.awares.protocol.trajectory_messages`, the SFT format); turn 2 answers. Each
rollout gets one reward ``R = R_ans - C_tool`` (:class:`~zoomvlm.awares.rewards.AwaResReward`); TRL turns the
group of G = 8 rollouts into advantages ``(R - mean) / std`` and takes a PPO-clipped step with a KL penalty
(``beta``) to the reference model, which is the starting (SFT) policy.

Actions and observations. The policy's own tokens (turn 1, tool call included, and turn 2) are actions; the
tool-output turn (its chat-template framing, the crops' image tokens and the tool text) is an observation:
``tool_mask`` 0, out of the loss and the KL.

How it sits on TRL (read against trl 1.16 ``grpo_trainer.py``):

- TRL's own multi-turn path (``tools=`` / ``environment_factory``) cannot be used as is: it parses tool calls
  with the tokenizer's response schema and renders them as ``tool_calls`` + a ``role: tool`` message, and it
  refuses a chat template that cannot render that (Qwen2.5-VL's cannot); AwaRes's call is plain text.
- ``rollout_func`` cannot be used as is either: TRL then restores the DATASET images for the loss forward pass,
  so the crops a rollout received would be missing from ``pixel_values`` (wrong log-probs).
- So :class:`AwaResGRPOTrainer` writes the rollout on :class:`~zoomvlm.train.trl_compat.MultiTurnGRPOTrainer`
  (the one module that touches TRL's private ``_generate``, ``_tokenize_prompts`` and ``_generate_single_turn``,
  so sampling settings and vLLM work as in TRL) and returns, per rollout, its images ``[low view, *crops]`` and
  its ``tool_images`` ``[*crops]``. With ``trainer.tools`` non-empty (the compat base registers
  :func:`~zoomvlm.train.trl_compat.tool_image_marker` there after ``__init__``) TRL's
  unmodified multimodal tool-response branch builds the loss/reference/old-policy forward inputs: every
  rollout's images through the image processor, and ``mm_token_type_ids`` rebuilt over the whole
  prompt + completion (Qwen's 3-D M-RoPE positions need them). ``tests/test_awares_grpo.py`` checks that the
  log-probs TRL uses in the loss and for the KL reference equal a direct forward pass of the full conversation
  with all its images.

Token layout of one completion (Qwen2.5-VL)::

    turn 1 (mask 1)          tool-output turn (mask 0)                                         turn 2 (mask 1)
    GET_CROPS: ['3']<|im_end|> \\n<|im_start|>user\\n<|vision_start|><|image_pad|>...<|vision_end|>High-resolution
    crops: '3' bottom-right.<|im_end|>\\n<|im_start|>assistant\\n                              9.00<|im_end|>

``max_completion_length`` caps EACH policy turn (tool tokens are not counted); a turn 1 cut at that length
whose text still holds a valid call gets its end-of-turn token from the tool (mask 0). Only models whose processor
returns ``image_grid_thw`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) are supported: TRL's tool-image forward path is
written for them. Unparseable tool calls (``GET_CROPS`` present but no valid list) are never replaced by the
full image: they are counted (``trainer.invalid_tool_calls``, metric ``tools/failure_frequency``) and the
turn-1 text is the final answer. Calls are read by :func:`~zoomvlm.awares.protocol.parse_get_crops` (tolerant, anywhere
in turn 1); one tool round per rollout, as in AwaRes (turn 2's text is final whatever it says).

Run it::

    zoomvlm train awares-grpo --config qwen25vl7b_awares_grpo [--set awares.lam=0.1]
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers.trainer_utils import SchedulerType
from trl import GRPOConfig

from zoomvlm.awares.protocol import (
    AWARES_SYSTEM_PROMPT,
    crop_set_sent_area,
    high_res_crops,
    parse_tool_call,
    tool_output_text,
)
from zoomvlm.awares.rewards import AwaResReward
from zoomvlm.core.geometry import Budget
from zoomvlm.data.samples import load_image_cached
from zoomvlm.train.common import (
    TrainerDefaults,
    build_cropper,
    check_resume,
    resumed_schedule_callback,
    save_final,
    train_resumable,
    trajectory_records,
)
from zoomvlm.train.recipe import Recipe
from zoomvlm.train.trl_compat import MultiTurnGRPOTrainer, Rollout

logger = logging.getLogger(__name__)

__all__ = [
    "AwaResGRPOConfig",
    "AwaResGRPOTrainer",
    "awares_grpo_dataset",
    "build_awares_grpo_trainer",
    "run_awares_grpo",
]


@dataclass
class AwaResGRPOConfig(TrainerDefaults, GRPOConfig):
    """TRL's ``GRPOConfig`` with AwaRes's GRPO defaults (sec. 3.4: G = 8, advantage (R - group mean) / group std,
    PPO-clipped objective, KL to the SFT policy); the ``trainer:`` section of ``awares_grpo`` recipes. The paper
    publishes no other constant; the rest are TRL's / DeepSeekMath's GRPO values."""

    num_generations: int | None = field(default=8, metadata={"help": "AwaRes: G = 8 rollouts per prompt."})
    scale_rewards: str = field(default="group", metadata={"help": "AwaRes: (R - group mean) / group std."})
    loss_type: str = field(default="grpo", metadata={"help": "DeepSeekMath's per-sequence mean (AwaRes's objective)."})
    beta: float = field(
        default=0.04, metadata={"help": "KL to the reference (= starting SFT) model; > 0 so TRL builds it."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of both turns."})
    learning_rate: float = field(default=1e-6, metadata={"help": "TRL's GRPO default."})
    lr_scheduler_type: SchedulerType | str = field(default="constant", metadata={"help": "Constant learning rate."})
    max_completion_length: int | None = field(
        default=64, metadata={"help": "Per POLICY turn: a tool call is ~10 tokens, AwaRes answers are brief."}
    )
    per_device_train_batch_size: int = field(default=8, metadata={"help": "1 prompt x G = 8 rollouts per step."})
    gradient_accumulation_steps: int = field(default=8, metadata={"help": "8 prompts per update."})
    logging_steps: float = field(default=1, metadata={"help": "Log every step."})
    save_steps: float = field(default=50, metadata={"help": "Checkpoint every N steps (resume point)."})
    bf16: bool | None = field(default=True, metadata={"help": "bf16 on GPUs; turned off where there is no CUDA."})


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def awares_grpo_dataset(path: str | Path, high: str | int | Budget | None = None, limit: int | None = None):
    """A ``datasets.Dataset`` for AwaRes GRPO from curated trajectory records (``zoomvlm curate awares``).

    Each record needs ``image`` (path, absolute or relative to the file), ``question``, ``answers`` (or
    ``answer``) and ``label`` (``LR``/``HR``); ``high`` comes from the argument or the record. Stored columns:
    ``prompt`` (``[system: AWARES_SYSTEM_PROMPT, user: question]``; TRL puts the image before the question, as
    :func:`~zoomvlm.awares.protocol.trajectory_messages`), ``image_path`` (the ORIGINAL image, crops are cut from it),
    ``question``, ``answers``, ``label``, ``high``. A transform adds ``image``, the turn-1 low-resolution view,
    when a row is read, so no image is held in memory up front.

    Raises:
        FileNotFoundError: no such file. ValueError: a record lacks a field, has no ``high``, an unknown label
            or a missing image (the message names ``file:line``).
    """
    import datasets

    cols: dict[str, list] = {k: [] for k in ("prompt", "image_path", "question", "answers", "label", "high")}
    for where, row, record_high, image in trajectory_records(path, high, required=("question",)):
        answers = row.get("answers") or ([row["answer"]] if row.get("answer") else [])
        if not row.get("question") or not answers:
            raise ValueError(f"{where}: a GRPO record needs image, question and answers")
        if row.get("label") not in ("LR", "HR"):
            raise ValueError(f"{where}: label must be 'LR' or 'HR', got {row.get('label')!r}")
        cols["prompt"].append(
            [{"role": "system", "content": AWARES_SYSTEM_PROMPT}, {"role": "user", "content": row["question"]}]
        )
        cols["image_path"].append(str(image.resolve()))
        cols["question"].append(row["question"])
        cols["answers"].append([str(a) for a in answers])
        cols["label"].append(row["label"])
        cols["high"].append(record_high)
        if limit and len(cols["prompt"]) >= limit:
            break
    if not cols["prompt"]:
        raise ValueError(f"{path}: no records")
    return datasets.Dataset.from_dict(cols).with_transform(_with_low_view)


def _with_low_view(batch: dict[str, list]) -> dict[str, list]:
    """``with_transform`` hook: adds ``image``, the turn-1 low-resolution view of each row's original image."""
    from zoomvlm.awares.protocol import low_res_view
    from zoomvlm.data.samples import load_image

    views = [
        low_res_view(load_image(p), Budget.parse(h)) for p, h in zip(batch["image_path"], batch["high"], strict=True)
    ]
    return {**batch, "image": views}


# ---------------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------------


class AwaResGRPOTrainer(MultiTurnGRPOTrainer):
    """TRL's ``GRPOTrainer`` with AwaRes's two-turn self-zoom rollout (see the module docstring).

    The train dataset is :func:`awares_grpo_dataset`'s (columns ``prompt``, ``image``, ``image_path``, ``high``,
    ``answers``, ``label``); ``reward_funcs`` default to ``[AwaResReward()]``. Everything else is
    ``GRPOTrainer``'s (``GRPOConfig``: ``num_generations``, ``beta``, ``epsilon``, ``loss_type``, vLLM...).
    TRL's private hooks are used through :class:`~zoomvlm.train.trl_compat.MultiTurnGRPOTrainer` only.

    Attributes:
        invalid_tool_calls, tool_calls: running counts of unparseable and valid turn-1 tool calls.

    Raises:
        ValueError: a processor without ``image_grid_thw`` (not Qwen-VL-style), a chat template that renders
            tool schemas or whose assistant turn does not end with the eos token.
    """

    def __init__(self, *args, reward_funcs=None, **kwargs):
        super().__init__(*args, reward_funcs=reward_funcs or [AwaResReward()], **kwargs)
        self.invalid_tool_calls = 0
        self.tool_calls = 0
        self._tool_turn_texts: dict[tuple, str] = {}
        self._check_processor()

    # -- set-up checks ------------------------------------------------------------------------------------------
    def _check_processor(self) -> None:
        from PIL import Image

        processor = self.processing_class
        if not self.is_vlm or self.image_pad_token_id is None:
            raise ValueError("AwaRes GRPO needs a Qwen-VL-style processor (an <|image_pad|> image token)")
        probe = Image.new("RGB", (56, 56))
        if "image_grid_thw" not in processor.image_processor(images=[probe], return_tensors="pt"):
            raise ValueError("AwaRes GRPO supports processors returning image_grid_thw (Qwen2-VL/2.5-VL/3-VL)")
        # TRL renders prompts with tools=trainer.tools; AwaRes's prompt must stay the SFT/inference prompt.
        messages = [{"role": "user", "content": [{"type": "text", "text": "q"}]}]
        plain = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        tooled = processor.apply_chat_template(messages, tools=self.tools, add_generation_prompt=True, tokenize=False)
        if plain != tooled:
            raise ValueError("the chat template renders tool schemas; AwaRes describes its tool in the system prompt")
        self.tool_turn_text(["0"])  # raises on a template the tool turn cannot be cut from

    def tool_turn_text(self, keys: Sequence[str]) -> str:
        """The tool-output turn for ``keys`` as the chat template renders it after turn 1's end-of-turn (eos)
        token, up to the next assistant header: the crops' user turn of
        :func:`~zoomvlm.awares.protocol.trajectory_messages`, one image placeholder per crop (not yet expanded).

        Raises:
            ValueError: the template does not end an assistant turn with the eos token, or is not prefix-preserving.
        """
        key = tuple(keys)
        if key not in self._tool_turn_texts:
            content = [{"type": "image"} for _ in keys] + [{"type": "text", "text": tool_output_text(keys)}]
            prefix = [
                {"role": "user", "content": [{"type": "text", "text": "q"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "a"}]},
            ]
            render = self.processing_class.apply_chat_template
            prefix_text = render(prefix, tokenize=False)
            full_text = render(prefix + [{"role": "user", "content": content}], add_generation_prompt=True,
                               tokenize=False)  # fmt: skip
            eos = self.tokenizer.eos_token
            cut = prefix_text.rfind(eos) + len(eos)
            if cut < len(eos) or not full_text.startswith(prefix_text[:cut]):
                raise ValueError(
                    "the chat template does not end an assistant turn with eos, or is not prefix-preserving"
                )
            self._tool_turn_texts[key] = full_text[cut:]
        return self._tool_turn_texts[key]

    def tool_turn_ids(self, keys: Sequence[str], crops: list) -> list[int]:
        """Token ids of :meth:`tool_turn_text` with each crop's image placeholder expanded by the processor."""
        text = self.tool_turn_text(keys)
        return self.processing_class(text=[text], images=crops, return_tensors="pt")["input_ids"][0].tolist()

    # -- rollout -----------------------------------------------------------------------------------------------
    def sample_turn(
        self, turn: int, rows: list[int], prompt_ids, images, fields: dict, num_generations: int, **kwargs
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """Sample policy turn ``turn`` (1 or 2) for the rollouts at batch positions ``rows``:
        ``(token ids per rollout, sampling log-probs or None)``. The one place the policy's tokens are drawn
        (tests replace it to build rollouts of a known shape)."""
        ids, logprobs = self.generate_turn(prompt_ids, images, fields, num_generations, **kwargs)
        return [list(t) for t in ids], logprobs

    def rollout(self, prompts: list, inputs: list[dict]) -> Rollout:
        """The AwaRes rollout: turn 1 -> (tool turn with the crops -> turn 2) for the rollouts that call the tool."""
        n = len(prompts)
        mode = "train" if self.model.training else "eval"

        # Turn 1: TRL's own tokenisation and sampling (transformers or vLLM).
        prompt_ids, images, fields = self.tokenize_prompts(prompts)
        if images is None or any(not imgs for imgs in images):
            raise ValueError("every AwaRes prompt needs its low-resolution view (dataset column `image`)")
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        turn1, logprobs1 = self.sample_turn(1, list(range(n)), prompt_ids, images, fields, num_generations)
        texts1 = self.tokenizer.batch_decode(turn1, skip_special_tokens=True)
        actions = [parse_tool_call(t) for t in texts1]

        # The tool: crops at the high-resolution scale, appended as a user turn.
        eos = self.tokenizer.eos_token_id
        calls = [i for i, (keys, _) in enumerate(actions) if keys]
        tool_images: list[list] = [[] for _ in range(n)]
        tool_ids: dict[int, list[int]] = {}
        for i in calls:
            keys = actions[i][0]
            tool_images[i] = high_res_crops(
                load_image_cached(inputs[i]["image_path"]), keys, Budget.parse(inputs[i]["high"])
            )
            closing = [] if turn1[i] and turn1[i][-1] in self.eos_token_ids else [eos]  # the tool closes the turn
            tool_ids[i] = closing + self.tool_turn_ids(keys, tool_images[i])

        # Turn 2, for the rollouts that called the tool: prompt + turn 1 + tool turn, all images.
        turn2: dict[int, list[int]] = {}
        logprobs2: dict[int, list[float]] | None = {}
        if calls:
            ids2 = [prompt_ids[i] + turn1[i] + tool_ids[i] for i in calls]
            images2 = [list(images[i]) + tool_images[i] for i in calls]
            pixels = self.processing_class.image_processor(
                images=[img for imgs in images2 for img in imgs], return_tensors="pt"
            )
            out2, lp2 = self.sample_turn(2, calls, ids2, images2, dict(pixels), 1, has_tool_images=True)
            turn2 = dict(zip(calls, out2, strict=True))
            logprobs2 = None if lp2 is None else dict(zip(calls, lp2, strict=True))

        # Assemble completions: turn 1 (actions) + tool turn (observation) + turn 2 (actions).
        completion_ids, tool_mask, completions = [], [], []
        logprobs = None if (logprobs1 is None or logprobs2 is None) else []
        texts2 = {i: self.tokenizer.decode(turn2[i], skip_special_tokens=True) for i in calls}
        for i in range(n):
            t1, tool, t2 = turn1[i], tool_ids.get(i, []), turn2.get(i, [])
            completion_ids.append(t1 + tool + t2)
            tool_mask.append([1] * len(t1) + [0] * len(tool) + [1] * len(t2))
            messages = [{"role": "assistant", "content": texts1[i]}]
            if i in tool_ids:
                keys = actions[i][0]
                content = [{"type": "image"} for _ in keys] + [{"type": "text", "text": tool_output_text(keys)}]
                messages += [{"role": "user", "content": content}, {"role": "assistant", "content": texts2[i]}]
            completions.append(messages)
            if logprobs is not None:
                logprobs.append(list(logprobs1[i]) + [0.0] * len(tool) + list(logprobs2.get(i, [])))
        self._log_tool_calls(mode, actions)
        return Rollout(prompt_ids, completion_ids, tool_mask, completions, logprobs,
                       [list(images[i]) + tool_images[i] for i in range(n)], tool_images)  # fmt: skip

    def _log_tool_calls(self, mode: str, actions) -> None:
        """Tool-call counts (running totals and the batch's frequencies over all processes) and the crop area."""
        import torch

        n_valid = sum(1 for keys, _ in actions if keys)
        n_invalid = sum(1 for _, err in actions if err)
        self.tool_calls += n_valid
        self.invalid_tool_calls += n_invalid
        if n_invalid:
            logger.info("%d unparseable tool call(s) in this batch, answered from turn 1", n_invalid)
        device, gather = self.accelerator.device, self.accelerator.gather
        counts = gather(torch.tensor([n_valid, n_invalid, len(actions)], device=device).unsqueeze(0)).sum(0).tolist()
        area = gather(torch.tensor([crop_set_sent_area(k) if k else 0.0 for k, _ in actions], device=device))
        self.log_metric(mode, "tools/call_frequency", counts[0] / counts[2])
        self.log_metric(mode, "tools/failure_frequency", counts[1] / max(1, counts[0] + counts[1]))
        self.log_metric(mode, "awares/crop_area", area.mean().item())


# ---------------------------------------------------------------------------------------------------------------
# Recipe -> trainer
# ---------------------------------------------------------------------------------------------------------------


def build_awares_grpo_trainer(recipe: Recipe, output_dir: str | Path | None = None, reward_funcs=None):
    """``(trainer, processor)``: an :class:`AwaResGRPOTrainer` for an ``awares_grpo`` recipe, ready to ``train()``.

    Recipe keys: ``data.file`` (trajectory records), ``data.high`` (else each record's), ``data.limit``;
    ``rewards`` (default ``{awares: 1.0}``, through the registry :mod:`zoomvlm.train.rewards`) with the ``awares:``
    section's ``answer_reward`` / ``alpha_miss`` / ``alpha_use`` / ``lam``, the same section the external crop-set
    policy's GRPO reads; ``trainer`` = :class:`AwaResGRPOConfig`; ``model`` as for
    :func:`~zoomvlm.train.common.build_cropper` (the SFT result).

    Raises:
        ValueError: no ``data.file``.
    """
    from zoomvlm.train.rewards import build_rewards, recipe_reward_context

    args = recipe.trainer_args(output_dir)
    if not recipe.data.file:
        raise ValueError("an awares_grpo recipe needs data.file (trajectories of `zoomvlm curate awares`)")
    dataset = awares_grpo_dataset(recipe.data.file, recipe.data.high, recipe.data.limit)
    if reward_funcs is None:
        reward_funcs, weights = build_rewards(recipe.rewards, recipe_reward_context(recipe))
        if args.reward_weights is None:
            args.reward_weights = weights
    model, processor, peft_config = build_cropper(recipe.model)
    trainer = AwaResGRPOTrainer(model=model, reward_funcs=list(reward_funcs), args=args, train_dataset=dataset,
                                processing_class=processor, peft_config=peft_config,
                                callbacks=[resumed_schedule_callback()])  # fmt: skip
    return trainer, processor


def run_awares_grpo(recipe: Recipe, output_dir: str | Path | None = None) -> Path:
    """Train the self-zooming VLM with AwaRes multi-turn GRPO; resumes from the newest checkpoint in ``output_dir``.

    Returns:
        ``output_dir/final`` (``save_pretrained`` layout, LoRA merged).
    """
    check_resume(recipe.trainer_args(output_dir).output_dir, recipe)  # before the model loads
    trainer, processor = build_awares_grpo_trainer(recipe, output_dir)
    start_step = train_resumable(trainer, trainer.args.output_dir)
    logger.info("tool calls: %d valid, %d unparseable", trainer.tool_calls, trainer.invalid_tool_calls)
    return save_final(trainer, processor, trainer.args.output_dir, recipe, start_step)
