"""Every use of a PRIVATE TRL / transformers API in zoomvlm, fenced in this one module.

Read against trl 1.16 (``trl/trainer/grpo_trainer.py``, ``sft_trainer.py``) and transformers 5.24;
``pyproject.toml`` pins ``trl>=1.16,<1.17`` because these signatures change between TRL minor versions
(``_generate_single_turn`` gained ``has_tool_images`` and ``_generate`` its 8-tuple in the 1.x series). When TRL
moves, this module is the one to update; the tests that exercise it are ``tests/test_awares_grpo.py`` (rollout,
masks, loss and reference log-probs against a direct forward pass) and ``tests/test_weighted_sft.py``.

Why private APIs at all:

- AwaRes's self-zoom rollout is two turns with crop images appended by the tool. TRL's public ``rollout_func``
  restores only the DATASET images for the loss pass, and TRL's ``tools=`` path needs a chat template that
  renders ``tool_calls`` (Qwen2.5-VL's cannot) and executes the tool itself. So :class:`MultiTurnGRPOTrainer`
  overrides ``_generate`` and reuses ``_tokenize_prompts`` / ``_generate_single_turn`` (sampling settings and
  vLLM as in TRL), and returns each rollout's images so TRL's tool-image branch builds the loss inputs.
- That branch is taken only when ``trainer.tools`` is non-empty; :func:`tool_image_marker` is the one entry
  registered there after ``__init__`` (TRL never calls it: our rollout executes the call). Removing it would
  mean copying TRL's forward-input construction, which is worse.
- A finished run rerun: ``Trainer.train`` resumed at ``max_steps`` trains one step more (it checks the limit after
  a step), so :func:`load_checkpoint_weights` loads the last checkpoint through the private
  ``_load_from_checkpoint`` instead.
- The tool-call-weighted SFT keeps its trajectory columns through the Trainer's private
  ``_set_signature_columns_if_needed`` and scales TRL's fused-LM-head log-probs (``fused_lm_head``).
- A GRPO run resumed in its second epoch or later replayed the FIRST epoch's prompt order: TRL's ``RepeatSampler``
  draws each epoch's permutation from one generator seeded once, and a resumed run builds a fresh one.
  :class:`EpochSeededSamplerMixin` overrides the private ``_get_train_sampler`` to give that sampler the
  ``set_epoch`` (the generator put where an uninterrupted run's is), so the order depends on the epoch alone and
  equals TRL's own; it overrides the private ``_run_epoch`` to set the epoch on the sampler itself, because the
  Trainer's own ``set_epoch`` does not reach it through accelerate's multi-process wrappers on a resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from trl import GRPOTrainer

__all__ = [
    "EpochSeededSamplerMixin",
    "KeepColumnsMixin",
    "load_checkpoint_weights",
    "MultiTurnGRPOTrainer",
    "Rollout",
    "tool_image_marker",
    "weighted_fused_model",
]


class _EpochSeeded(torch.utils.data.Sampler):
    """TRL's ``RepeatSampler`` with ``set_epoch``: before epoch ``e`` its generator is put where an uninterrupted
    run's is (seeded, then ``e`` permutations drawn), so the order is TRL's own and depends on the epoch alone."""

    def __init__(self, inner):
        self.inner = inner

    def set_epoch(self, epoch: int) -> None:
        if getattr(self.inner, "shuffle", False) and self.inner.seed is not None:
            self.inner.generator.manual_seed(self.inner.seed)
            for _ in range(epoch):  # one randperm per earlier epoch, as RepeatSampler.__iter__ draws
                torch.randperm(self.inner.num_samples, generator=self.inner.generator)

    def __iter__(self):
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)


class EpochSeededSamplerMixin:
    """For a ``GRPOTrainer`` subclass: each epoch's prompt order depends on ``(seed, epoch)`` only, so a run resumed
    in epoch 2 or later sees the order the uninterrupted run saw (TRL's sampler replayed epoch 1's).

    The epoch is set on the sampler itself at the start of every epoch (the private ``_run_epoch``): on several
    processes accelerate wraps it as ``BatchSamplerShard(BatchSampler(sampler))``, and a resume mid-epoch wraps
    that again in ``SkipBatchSampler``; neither forwards ``set_epoch``, so the resumed epoch followed epoch 1's
    order, repeating some prompts and skipping others.
    """

    def _get_train_sampler(self, dataset=None):
        sampler = super()._get_train_sampler(dataset)
        if hasattr(sampler, "generator"):
            sampler = _EpochSeeded(sampler)
            self._epoch_seeded = sampler
        return sampler

    def _run_epoch(self, model, epoch, *args, **kwargs):
        seeded = getattr(self, "_epoch_seeded", None)
        if seeded is not None:
            seeded.set_epoch(int(epoch))
        return super()._run_epoch(model, epoch, *args, **kwargs)


def load_checkpoint_weights(trainer, checkpoint: str) -> None:
    """The model weights of ``checkpoint`` into ``trainer.model`` without training (transformers' private
    ``Trainer._load_from_checkpoint``, what ``train(resume_from_checkpoint=...)`` does first): a finished run's
    ``final/`` is rebuilt from its last checkpoint without the step ``train`` would add past ``max_steps``."""
    trainer._load_from_checkpoint(checkpoint)


def tool_image_marker(crops: list[str]) -> str:
    """Fetch high-resolution crops of the image from the AwaRes crop set.

    Registered in ``trainer.tools`` only so that TRL routes rollout images through its multimodal tool-response
    forward path (see the module docstring); the call itself is executed by the subclass's rollout.

    Args:
        crops: crop-set keys, e.g. ["3"] or ["0", "5"].
    """
    raise RuntimeError("executed by the multi-turn rollout (MultiTurnGRPOTrainer.rollout), never by TRL")


@dataclass
class Rollout:
    """One generation batch of multi-turn rollouts, in TRL 1.16's ``_generate`` terms (lists of length N).

    ``completion_ids[i]``: every token after the prompt (policy turns and tool turns); ``tool_mask[i]``: 1 on the
    policy's tokens (actions), 0 on tool-output tokens (observations, out of the loss and the KL);
    ``completions[i]``: the conversational completion the rewards read; ``logprobs``: sampling log-probs per
    completion token (0 on tool tokens) or ``None``; ``images[i]``: every image of rollout ``i`` in placeholder
    order; ``tool_images[i]``: the images the tool returned.
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    tool_mask: list[list[int]]
    completions: list
    logprobs: list[list[float]] | None
    images: list[list]
    tool_images: list[list]


class MultiTurnGRPOTrainer(EpochSeededSamplerMixin, GRPOTrainer):
    """``GRPOTrainer`` whose generation is :meth:`rollout` (written by a subclass), with TRL's loss unchanged.

    Subclasses implement ``rollout(prompts, inputs) -> Rollout`` with :meth:`tokenize_prompts` and
    :meth:`sample_turn`, and may override :meth:`log_rollout` for their own metrics.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Non-empty tools route the loss/reference forward inputs through TRL's tool-image branch (module doc).
        self.tools = [tool_image_marker]
        self._rollout_inputs: list[dict] | None = None

    # -- what subclasses use ------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The text tokenizer inside the processor."""
        return self._tokenizer

    @property
    def image_pad_token_id(self) -> int | None:
        return self._image_pad_token_id

    @property
    def is_vlm(self) -> bool:
        return self._is_vlm

    def tokenize_prompts(self, prompts: list) -> tuple[list[list[int]], list | None, dict]:
        """TRL's prompt rendering + tokenisation: ``(prompt_ids, images per prompt, multimodal fields)``."""
        return self._tokenize_prompts(prompts)

    def generate_turn(
        self, prompt_ids, images, fields: dict, num_generations: int, has_tool_images: bool = False
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """One sampled turn with TRL's sampler (transformers or vLLM): ``(completion ids, logprobs or None)``."""
        return self._generate_single_turn(prompt_ids, images, fields, num_generations, has_tool_images=has_tool_images)

    def log_metric(self, mode: str, name: str, value: float) -> None:
        """Append ``value`` to TRL's logged metric ``name`` (averaged per logging step)."""
        self._metrics[mode][name].append(value)

    def rollout(self, prompts: list, inputs: list[dict]) -> Rollout:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- TRL's private hooks ------------------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        self._rollout_inputs = inputs  # _generate(prompts) gets only the prompts; the rollout needs the rows
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self._rollout_inputs = None

    def _generate(self, prompts: list):
        """TRL 1.16's ``_generate`` contract, from :meth:`rollout`."""
        inputs = self._rollout_inputs
        if inputs is None or len(inputs) != len(prompts):
            raise RuntimeError("MultiTurnGRPOTrainer._generate runs inside _generate_and_score_completions")
        mode = "train" if self.model.training else "eval"
        r = self.rollout(prompts, inputs)
        self._log_lengths(mode, r)
        return r.prompt_ids, r.completion_ids, r.tool_mask, r.completions, r.logprobs, {}, r.images, r.tool_images

    def _log_lengths(self, mode: str, r: Rollout) -> None:
        """TRL's completion-length metrics, counting the policy's tokens only (the tool turn is not generated)."""
        device = self.accelerator.device
        gather = self.accelerator.gather
        lengths = gather(torch.tensor([sum(m) for m in r.tool_mask], device=device)).float()
        prompt_tokens = gather(torch.tensor([len(p) for p in r.prompt_ids], device=device)).sum()
        if mode == "train":
            completion_tokens = gather(torch.tensor([len(c) for c in r.completion_ids], device=device)).sum()
            self.state.num_input_tokens_seen += (prompt_tokens + completion_tokens).item()
        metrics = self._metrics[mode]
        metrics["num_tokens"] = [self.state.num_input_tokens_seen]
        metrics["completions/mean_length"].append(lengths.mean().item())
        metrics["completions/min_length"].append(lengths.min().item())
        metrics["completions/max_length"].append(lengths.max().item())
        ends = [*self.eos_token_ids, self._tokenizer.pad_token_id]
        clipped = gather(torch.tensor([bool(c) and c[-1] not in ends for c in r.completion_ids], device=device))
        metrics["completions/clipped_ratio"].append(clipped.float().mean().item())


class KeepColumnsMixin:
    """Keeps ``keep_columns`` when the Trainer drops the dataset columns the model's signature does not name
    (``remove_unused_columns=True``): image transforms read them when a row is loaded."""

    keep_columns: Sequence[str] = ()

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        missing = [c for c in self.keep_columns if c not in self._signature_columns]
        self._signature_columns = [*self._signature_columns, *missing]


def weighted_fused_model(model, weights: torch.Tensor):
    """``model`` wrapped so that TRL's fused LM head returns per-token log-probs times ``weights`` [B, T-1].

    TRL's ``SFTTrainer.compute_loss`` calls the model with ``fused_lm_head=True`` and sums ``outputs.log_probs``;
    scaling them here weights the NLL without copying TRL's loss code.
    """

    def weighted_model(**kwargs):
        outputs = model(**kwargs)
        if kwargs.get("fused_lm_head"):
            outputs.log_probs = outputs.log_probs * weights.to(outputs.log_probs)
        return outputs

    return weighted_model
