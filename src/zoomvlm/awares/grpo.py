"""AwaRes stage 2: multi-turn GRPO of the SELF-ZOOMING VLM, on TRL's maintained ``GRPOTrainer``.

One rollout (awares_paper_excerpt sec. 3.4; METHODS.md, AwaRes): turn 1 sees the low-resolution view and the
question and either answers or emits ``GET_CROPS: [...]``; the requested crops at the high-resolution scale come
back as a new USER turn (:func:`zoomvlm.awares.protocol.trajectory_messages`, the SFT format); turn 2 answers. Each
rollout gets one reward ``R = R_ans - C_tool`` (:class:`AwaResReward`); TRL turns the group of G = 8 rollouts
into advantages ``(R - mean) / std`` and takes a PPO-clipped step with a KL penalty (``beta``) to the reference
model, which is the starting (SFT) policy.

Actions and observations. The policy's own tokens (turn 1, tool call included, and turn 2) are actions; the
tool-output turn (its chat-template framing, the crops' image tokens and the tool text) is an observation:
``tool_mask`` 0, out of the loss and the KL.

How it sits on TRL (read against trl 1.16 ``grpo_trainer.py``):

- TRL's own multi-turn path (``tools=`` / ``environment_factory``) cannot be used as is: it parses tool calls
  with the tokenizer's response schema and renders them as ``tool_calls`` + a ``role: tool`` message, and it
  refuses a chat template that cannot render that (Qwen2.5-VL's cannot); AwaRes's call is plain text.
- ``rollout_func`` cannot be used as is either: TRL then restores the DATASET images for the loss forward pass,
  so the crops a rollout received would be missing from ``pixel_values`` (wrong log-probs).
- So :class:`AwaResGRPOTrainer` overrides ``_generate`` (the rollout; it reuses TRL's
  ``_tokenize_prompts`` and ``_generate_single_turn`` for both turns, so sampling settings and vLLM work as in
  TRL) and returns, per rollout, its images ``[low view, *crops]`` and its ``tool_images`` ``[*crops]``. With
  ``trainer.tools`` non-empty (the subclass registers :func:`get_crops` there after ``__init__``) TRL's
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

Run it (no CLI stage is wired yet)::

    from zoomvlm.train.recipe import load_recipe
    from zoomvlm.awares.grpo import run_awares_grpo

    run_awares_grpo(load_recipe("qwen25vl7b_awares_grpo.yaml"), output_dir="runs/awares_grpo")
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from trl import GRPOTrainer

from zoomvlm.awares.protocol import (
    AWARES_SYSTEM_PROMPT,
    ToolCallError,
    crop_set_area,
    high_res_crops,
    parse_get_crops,
    tool_output_text,
)
from zoomvlm.core.geometry import Budget
from zoomvlm.cropvlm.rewards import SemanticSimilarity, ToolCost, answer_scores
from zoomvlm.train.common import build_cropper, resume_checkpoint, save_final, trainer_kwargs, trajectory_records
from zoomvlm.train.recipe import Recipe

logger = logging.getLogger(__name__)

__all__ = [
    "AWARES_GRPO_DEFAULTS",
    "AwaResGRPOTrainer",
    "AwaResReward",
    "awares_action",
    "awares_grpo_dataset",
    "build_awares_grpo_trainer",
    "get_crops",
    "parse_tool_call",
    "run_awares_grpo",
]

AWARES_GRPO_DEFAULTS = {
    # AwaRes sec. 3.4: G = 8, advantage (R - group mean) / group std, PPO-clipped objective, KL to the SFT policy.
    # The paper publishes no other constant; these are TRL's/DeepSeekMath's GRPO values.
    "num_generations": 8,
    "scale_rewards": "group",
    "loss_type": "grpo",  # DeepSeekMath's per-sequence mean, the objective AwaRes writes
    "beta": 0.04,  # KL to the reference (= starting SFT) model; > 0 so TRL builds the reference
    "epsilon": 0.2,  # PPO clip
    "temperature": 1.0,
    "learning_rate": 1e-6,
    "lr_scheduler_type": "constant",
    "max_grad_norm": 1.0,
    "max_completion_length": 64,  # per policy turn: a tool call is ~10 tokens, AwaRes answers are brief
    "num_iterations": 1,
    "per_device_train_batch_size": 8,  # 1 prompt x G = 8 rollouts per device step
    "gradient_accumulation_steps": 8,
    "logging_steps": 1,
    "save_strategy": "steps",
    "save_steps": 50,
    "save_total_limit": 2,
    "report_to": [],
    "remove_unused_columns": False,  # the rollout and the reward read image_path, high, answers, label
    "bf16": True,
}


def get_crops(crops: list[str]) -> str:
    """Fetch high-resolution crops of the image from the AwaRes crop set.

    Registered in ``trainer.tools`` so that TRL routes rollout images through its multimodal tool-response
    forward path; the call itself is executed by :meth:`AwaResGRPOTrainer._generate`, which knows the image.

    Args:
        crops: crop-set keys, e.g. ["3"] or ["0", "5"].
    """
    raise RuntimeError("get_crops is executed by AwaResGRPOTrainer's rollout, which knows the image")


# ---------------------------------------------------------------------------------------------------------------
# Actions and reward
# ---------------------------------------------------------------------------------------------------------------


def parse_tool_call(text: str) -> tuple[list[str] | None, str | None]:
    """Turn 1's action: ``(None, None)`` a direct answer, ``(keys, None)`` a valid ``GET_CROPS`` call,
    ``(None, error)`` an unparseable one (counted by the caller; its text is the final answer)."""
    try:
        return parse_get_crops(text), None
    except ToolCallError as err:
        return None, str(err)


def _assistant_texts(completion) -> list[str]:
    if isinstance(completion, str):
        return [completion]
    texts = []
    for message in completion:
        if message.get("role") != "assistant":
            continue
        content = message.get("content") or ""
        texts.append(content if isinstance(content, str) else "".join(c.get("text", "") for c in content))
    return texts


def awares_action(completion) -> tuple[list[str] | None, str, str | None]:
    """``(crops, final answer, tool-call error)`` of one rollout (a TRL conversational completion or a string).

    ``crops`` are the keys of turn 1's valid ``GET_CROPS`` call, else ``None``. The final answer is the last
    assistant turn after a valid call (``""`` if the rollout ended before turn 2), else turn 1's text: a direct
    answer, or an unparseable call (``error`` set), which is never replaced by the full image.
    """
    texts = _assistant_texts(completion) or [""]
    keys, error = parse_tool_call(texts[0])
    if keys:
        return keys, (texts[-1] if len(texts) > 1 else ""), None
    return None, texts[0], error


class AwaResReward:
    """``awares``: AwaRes's ``R = R_ans - C_tool`` for one self-zoom rollout (sec. 3.4.1), a TRL reward function.

    ``R_ans`` = :func:`~zoomvlm.cropvlm.rewards.answer_scores` of the final answer (:func:`awares_action`) against the
    ``answers`` column: ``"semantic"`` (AwaRes: sentence-embedding cosine) or a metric name (``contains``,
    ``anls``...), in ``[0, 1]``. ``C_tool`` = :class:`~zoomvlm.cropvlm.rewards.ToolCost` of the requested crops, with
    ``needs_hr`` = (``label`` column == ``"HR"``); an unparseable call requests nothing. Logs ``awares/r_ans``
    and ``awares/c_tool`` (batch means) through TRL's ``log_metric``.

    Raises:
        KeyError: an unknown answer reward name.
    """

    __name__ = "awares"

    def __init__(self, answer: str = "semantic", cost: ToolCost | None = None, semantic=None):
        self.answer = answer
        self.cost = cost or ToolCost()
        self.semantic = semantic if semantic is not None else (SemanticSimilarity() if answer == "semantic" else None)
        if answer != "semantic":
            answer_scores(answer, [], [])  # fail early on an unknown name

    def __call__(self, prompts=None, completions=(), answers=(), label=None, log_metric=None, **_) -> list[float]:
        actions = [awares_action(c) for c in completions]
        labels = label if label is not None else ["LR"] * len(actions)
        r_ans = answer_scores(self.answer, [a for _, a, _ in actions], list(answers), self.semantic)
        c_tool = [self.cost(keys, str(lab).upper() == "HR") for (keys, _, _), lab in zip(actions, labels, strict=True)]
        if log_metric is not None and actions:
            log_metric("awares/r_ans", sum(r_ans) / len(r_ans))
            log_metric("awares/c_tool", sum(c_tool) / len(c_tool))
        return [r - c for r, c in zip(r_ans, c_tool, strict=True)]


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


class AwaResGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` with AwaRes's two-turn self-zoom rollout (see the module docstring).

    The train dataset is :func:`awares_grpo_dataset`'s (columns ``prompt``, ``image``, ``image_path``, ``high``,
    ``answers``, ``label``); ``reward_funcs`` default to ``[AwaResReward()]``. Everything else is
    ``GRPOTrainer``'s (``GRPOConfig``: ``num_generations``, ``beta``, ``epsilon``, ``loss_type``, vLLM...).

    Attributes:
        script: test/debug hook, ``None`` in training. ``script(turn, index) -> str | None`` is asked for each
            rollout of a generation batch (``turn`` 1 or 2, ``index`` its position in the batch); a string
            REPLACES the sampled turn (its tokens + the end-of-turn token), ``None`` keeps the sample. Scripted
            tokens are not the policy's samples: use it to build rollouts of a known shape, not to train.
        invalid_tool_calls, tool_calls: running counts of unparseable and valid turn-1 tool calls.

    Raises:
        ValueError: a processor without ``image_grid_thw`` (not Qwen-VL-style), a chat template that renders
            tool schemas or whose assistant turn does not end with the eos token.
    """

    def __init__(self, *args, reward_funcs=None, script: Callable[[int, int], str | None] | None = None, **kwargs):
        super().__init__(*args, reward_funcs=reward_funcs or [AwaResReward()], **kwargs)
        # Non-empty tools route the loss/reference forward inputs through TRL's tool-image branch (module doc).
        self.tools = [get_crops]
        self.script = script
        self.invalid_tool_calls = 0
        self.tool_calls = 0
        self._rollout_inputs: list[dict] | None = None
        self._originals: OrderedDict[str, object] = OrderedDict()
        self._tool_turn_texts: dict[tuple, str] = {}
        self._check_processor()

    # -- set-up checks ------------------------------------------------------------------------------------------
    def _check_processor(self) -> None:
        from PIL import Image

        processor = self.processing_class
        if not self._is_vlm or self._image_pad_token_id is None:
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
            eos = self._tokenizer.eos_token
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
    def _generate_and_score_completions(self, inputs):
        self._rollout_inputs = inputs  # _generate(prompts) needs each rollout's image_path and high
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self._rollout_inputs = None

    def _original(self, path: str):
        """The original image at ``path`` (a small LRU cache: the G rollouts of a prompt share it)."""
        from zoomvlm.data.samples import load_image

        if path not in self._originals:
            self._originals[path] = load_image(path)
            while len(self._originals) > 16:
                self._originals.popitem(last=False)
        self._originals.move_to_end(path)
        return self._originals[path]

    def _script_turn(self, turn: int, ids: list[list[int]], indices: list[int]) -> tuple[list[list[int]], bool]:
        if self.script is None:
            return ids, False
        out, scripted = [], False
        for row, index in zip(ids, indices, strict=True):
            text = self.script(turn, index)
            if text is None:
                out.append(row)
            else:
                out.append(self._tokenizer.encode(text, add_special_tokens=False) + [self._tokenizer.eos_token_id])
                scripted = True
        return out, scripted

    def _generate(self, prompts: list):
        """The AwaRes rollout; same return contract as ``GRPOTrainer._generate`` (trl 1.16)."""
        device = self.accelerator.device
        mode = "train" if self.model.training else "eval"
        inputs = self._rollout_inputs
        if inputs is None or len(inputs) != len(prompts):
            raise RuntimeError("AwaResGRPOTrainer._generate runs inside _generate_and_score_completions")
        n = len(prompts)

        # Turn 1: TRL's own tokenisation and sampling (transformers or vLLM).
        prompt_ids, images, fields = self._tokenize_prompts(prompts)
        if images is None or any(not imgs for imgs in images):
            raise ValueError("every AwaRes prompt needs its low-resolution view (dataset column `image`)")
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        turn1, logprobs1 = self._generate_single_turn(prompt_ids, images, fields, num_generations)
        turn1, scripted1 = self._script_turn(1, [list(t) for t in turn1], list(range(n)))
        texts1 = self._tokenizer.batch_decode(turn1, skip_special_tokens=True)
        actions = [parse_tool_call(t) for t in texts1]

        # The tool: crops at the high-resolution scale, appended as a user turn.
        eos = self._tokenizer.eos_token_id
        calls = [i for i, (keys, _) in enumerate(actions) if keys]
        tool_images: list[list] = [[] for _ in range(n)]
        tool_ids: dict[int, list[int]] = {}
        for i in calls:
            keys = actions[i][0]
            tool_images[i] = high_res_crops(
                self._original(inputs[i]["image_path"]), keys, Budget.parse(inputs[i]["high"])
            )
            closing = [] if turn1[i] and turn1[i][-1] in self.eos_token_ids else [eos]  # the tool closes the turn
            tool_ids[i] = closing + self.tool_turn_ids(keys, tool_images[i])

        # Turn 2, for the rollouts that called the tool: prompt + turn 1 + tool turn, all images.
        turn2: dict[int, list[int]] = {}
        logprobs2: dict[int, list[float]] = {}
        if calls:
            ids2 = [prompt_ids[i] + turn1[i] + tool_ids[i] for i in calls]
            images2 = [list(images[i]) + tool_images[i] for i in calls]
            pixels = self.processing_class.image_processor(
                images=[img for imgs in images2 for img in imgs], return_tensors="pt"
            )
            fields2 = dict(pixels)  # _generate_single_turn moves them to the device
            out2, lp2 = self._generate_single_turn(ids2, images2, fields2, num_generations=1, has_tool_images=True)
            out2, scripted2 = self._script_turn(2, [list(t) for t in out2], calls)
            scripted1 = scripted1 or scripted2
            for k, i in enumerate(calls):
                turn2[i] = out2[k]
                if lp2 is not None:
                    logprobs2[i] = lp2[k]

        # Assemble completions: turn 1 (actions) + tool turn (observation) + turn 2 (actions).
        completion_ids, tool_mask, completions = [], [], []
        logprobs = None if (logprobs1 is None or scripted1) else []
        texts2 = {i: self._tokenizer.decode(turn2[i], skip_special_tokens=True) for i in calls}
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
        rollout_images = [list(images[i]) + tool_images[i] for i in range(n)]

        self._log_rollouts(mode, prompt_ids, completion_ids, tool_mask, actions, device)
        return prompt_ids, completion_ids, tool_mask, completions, logprobs, {}, rollout_images, tool_images

    def _log_rollouts(self, mode, prompt_ids, completion_ids, tool_mask, actions, device) -> None:
        """TRL's completion-length metrics (policy tokens only) plus the tool-call counts."""
        n_valid = sum(1 for keys, _ in actions if keys)
        n_invalid = sum(1 for _, err in actions if err)
        self.tool_calls += n_valid
        self.invalid_tool_calls += n_invalid
        if n_invalid:
            logger.info("%d unparseable tool call(s) in this batch, answered from turn 1", n_invalid)
        gather = self.accelerator.gather
        lengths = gather(torch.tensor([sum(m) for m in tool_mask], device=device)).float()
        prompt_tokens = gather(torch.tensor([len(p) for p in prompt_ids], device=device)).sum()
        if mode == "train":
            self.state.num_input_tokens_seen += (prompt_tokens + gather(
                torch.tensor([len(c) for c in completion_ids], device=device)).sum()).item()  # fmt: skip
        metrics = self._metrics[mode]
        metrics["num_tokens"] = [self.state.num_input_tokens_seen]
        metrics["completions/mean_length"].append(lengths.mean().item())
        metrics["completions/min_length"].append(lengths.min().item())
        metrics["completions/max_length"].append(lengths.max().item())
        ends = [*self.eos_token_ids, self._tokenizer.pad_token_id]
        clipped = gather(torch.tensor([bool(c) and c[-1] not in ends for c in completion_ids], device=device))
        metrics["completions/clipped_ratio"].append(clipped.float().mean().item())
        counts = gather(torch.tensor([n_valid, n_invalid, len(actions)], device=device).unsqueeze(0)).sum(0).tolist()
        area = gather(torch.tensor([crop_set_area(k) if k else 0.0 for k, _ in actions], device=device))
        metrics["tools/call_frequency"].append(counts[0] / counts[2])
        metrics["tools/failure_frequency"].append(counts[1] / max(1, counts[0] + counts[1]))
        metrics["awares/crop_area"].append(area.mean().item())


# ---------------------------------------------------------------------------------------------------------------
# Recipe -> trainer
# ---------------------------------------------------------------------------------------------------------------


def build_awares_grpo_trainer(recipe: Recipe, output_dir: str | Path | None = None, reward_funcs=None):
    """``(trainer, processor)``: an :class:`AwaResGRPOTrainer` for an ``awares_grpo`` recipe, ready to ``train()``.

    Recipe keys: ``data.file`` (trajectory records), ``data.high``, ``data.limit``; ``awares.answer_reward``
    (``semantic`` | a metric), ``awares.alpha_miss`` / ``alpha_use`` / ``lam`` (:class:`ToolCost`), the same
    section the external crop-set policy's GRPO reads (a ``rewards:`` section with these keys, ``answer`` for
    ``answer_reward``, is accepted too);
    ``trainer.*`` = ``GRPOConfig`` keywords over :data:`AWARES_GRPO_DEFAULTS`; ``model`` as for
    :func:`~zoomvlm.train.common.build_cropper` (the SFT result).

    Raises:
        KeyError: an unknown ``rewards`` key or answer reward.
    """
    from trl import GRPOConfig

    trainer_kw = trainer_kwargs(AWARES_GRPO_DEFAULTS, recipe.trainer, output_dir)
    dataset = awares_grpo_dataset(recipe.data["file"], recipe.data.get("high"), recipe.data.get("limit"))
    if reward_funcs is None:
        rewards = {**dict(recipe.rewards), **dict(getattr(recipe, "awares", {}) or {})}
        unknown = set(rewards) - {"answer", "answer_reward", "alpha_miss", "alpha_use", "lam"}
        if unknown:
            raise KeyError(
                f"unknown awares_grpo reward setting(s) {sorted(unknown)}; use answer_reward, alpha_miss, "
                "alpha_use, lam"
            )
        cost = ToolCost(**{k: float(rewards[k]) for k in ("alpha_miss", "alpha_use", "lam") if k in rewards})
        answer = rewards.get("answer_reward", rewards.get("answer", "semantic"))
        reward_funcs = [AwaResReward(str(answer), cost)]
    model, processor, peft_config = build_cropper(recipe.model)
    args = GRPOConfig(**trainer_kw)
    trainer = AwaResGRPOTrainer(model=model, reward_funcs=list(reward_funcs), args=args, train_dataset=dataset,
                                processing_class=processor, peft_config=peft_config)  # fmt: skip
    return trainer, processor


def run_awares_grpo(recipe: Recipe, output_dir: str | Path | None = None) -> Path:
    """Train the self-zooming VLM with AwaRes multi-turn GRPO; resumes from the newest checkpoint in ``output_dir``.

    Returns:
        ``output_dir/final`` (``save_pretrained`` layout, LoRA merged).
    """
    trainer, processor = build_awares_grpo_trainer(recipe, output_dir)
    trainer.train(resume_from_checkpoint=resume_checkpoint(trainer.args.output_dir))
    logger.info("tool calls: %d valid, %d unparseable", trainer.tool_calls, trainer.invalid_tool_calls)
    return save_final(trainer, processor, trainer.args.output_dir, recipe)
