"""GRPO for the ``proposals`` cropper on the target's own reward (a small loop: this policy is not a language model).

The policy (:class:`~zoomvlm.cropvlm.proposals.RegionScorer`) is a categorical distribution over the
candidate regions of one (image, question): ``pi_theta(a | q) = softmax(logits(q) / temperature)_a``. An
action is one region; it becomes the crop ``crop_box(region)`` and its reward is the target's, through the
SAME reward functions as the VLM cropper's GRPO (:mod:`zoomvlm.cropvlm.rewards`: ``likelihood``, ``accuracy``,
``answer_probability``), fed the box in CropVLM's ``"[x1, y1, x2, y2]."`` text.

Equations implemented (each completion ``o_i`` here is ONE action, so ``|o_i| = 1`` and the per-token sums
of the papers have a single term):

- Group sampling and the group-relative advantage, Dr-GRPO (Liu et al. 2025, "Understanding R1-Zero-Like
  Training", eq. 3 / sec. 3.1): ``A_i = r_i - mean_j r_j`` over the ``G`` actions of one question, WITHOUT
  GRPO's division by ``std_j r_j`` (DeepSeekMath, Shao et al. 2024, eq. 3 divides; ``scale_rewards="group"``
  here reproduces that variant), and without the ``1/|o_i|`` length normalisation (irrelevant at length 1).
- The clipped surrogate of GRPO (DeepSeekMath eq. 3, PPO-style):
  ``J = 1/(B G) sum_q sum_i [ min(rho_i A_i, clip(rho_i, 1 - eps, 1 + eps) A_i) ] - beta KL(pi_theta || pi_ref)``
  with ``rho_i = pi_theta(o_i | q) / pi_old(o_i | q)``; with ``mu = 1`` update per rollout (CropVLM's setting)
  ``rho = 1`` and the gradient is the policy gradient ``A_i grad log pi_theta(o_i | q)``. The constant
  ``1/(B G)`` normaliser is Dr-GRPO's (no per-sequence length).
- The KL to the reference (the seed policy): DeepSeekMath eq. 4 estimates it per sampled token with
  ``pi_ref/pi_theta - log(pi_ref/pi_theta) - 1`` (Schulman's k3). With a few dozen candidates the EXACT
  ``KL(pi_theta || pi_ref) = sum_a pi_theta(a) (log pi_theta(a) - log pi_ref(a))`` is cheap, and it is what
  the estimator is unbiased for, so the exact value is used.

Rewards of one (question, box) never change (the target is frozen and the candidates are fixed), so they
are memoised across steps (:class:`RewardCache`, optionally on disk), as the reward functions already do
within one call: identical crops of a question are scored once.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from zoomvlm.core.geometry import format_percent_box
from zoomvlm.core.resume import settings_diff
from zoomvlm.cropvlm.proposals import RegionScorer, ScorerConfig, crop_box, legible_window, pad_batch, save_scorer

logger = logging.getLogger(__name__)

__all__ = [
    "GRPOConfig",
    "RewardCache",
    "export_checkpoint",
    "grpo_step",
    "make_target_reward",
    "parse_reward_mix",
    "train_grpo",
    "weighted_reward",
]

REWARD_NAMES = ("likelihood", "accuracy", "answer_probability")
"""Target rewards the proposals GRPO can use (:mod:`zoomvlm.cropvlm.rewards`), alone or in a weighted mix."""

RewardFn = Callable[[Sequence[int], Sequence[int]], list[float]]
"""``reward(item_indices, actions) -> rewards``: one reward per (question index, chosen candidate index)."""


@dataclass
class GRPOConfig:
    """Settings of :func:`train_grpo` (defaults: CropVLM's G = 6, beta = 0.01, one update per rollout).

    Args:
        steps: optimiser steps.
        prompts_per_step: questions per step (B).
        group: actions sampled per question (G), with replacement.
        temperature: sampling temperature of the categorical policy.
        beta: weight of KL(pi_theta || pi_seed).
        lr: AdamW learning rate (constant).
        epsilon: PPO clip range (used when ``mu > 1``).
        mu: policy updates per rollout (1 = plain on-policy gradient, ``rho = 1``).
        scale_rewards: ``"none"`` (Dr-GRPO, default) or ``"group"`` (GRPO: divide by the group's std).
        max_grad_norm: gradient clipping.
        save_every: checkpoint period in steps (resume from ``checkpoint.pt``).
        seed: sampling / shuffling seed.
    """

    steps: int = 30
    prompts_per_step: int = 16
    group: int = 6
    temperature: float = 1.0
    beta: float = 0.01
    lr: float = 1e-3
    epsilon: float = 0.2
    mu: int = 1
    scale_rewards: str = "none"
    max_grad_norm: float = 1.0
    save_every: int = 5
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.group < 2:
            raise ValueError("group must be >= 2: a group-relative advantage needs at least two samples")
        if self.scale_rewards not in ("none", "group"):
            raise ValueError(f"scale_rewards must be 'none' (Dr-GRPO) or 'group' (GRPO), got {self.scale_rewards!r}")
        if self.mu < 1 or self.steps < 0 or self.prompts_per_step < 1:
            raise ValueError("mu and prompts_per_step must be >= 1 and steps >= 0")
        if self.save_every < 1:  # checked here, not after the first (expensive) step's rewards
            raise ValueError(f"save_every must be >= 1 (steps between checkpoints), got {self.save_every}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (sampling divides the logits by it), got {self.temperature}")
        if not (self.lr > 0 and self.beta >= 0 and self.epsilon > 0 and self.max_grad_norm > 0):
            raise ValueError(
                f"lr, epsilon and max_grad_norm must be > 0 and beta >= 0, got lr={self.lr}, epsilon={self.epsilon}, "
                f"max_grad_norm={self.max_grad_norm}, beta={self.beta}"
            )


def _log_probs(model: RegionScorer, items, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    q, x, mask = pad_batch([(it.q, it.x) for it in items])
    return torch.log_softmax(model(q, x, mask) / temperature, dim=-1), mask


def grpo_step(
    model: RegionScorer,
    ref: RegionScorer,
    items: Sequence,
    reward_fn: RewardFn,
    item_indices: Sequence[int],
    opt: torch.optim.Optimizer,
    config: GRPOConfig,
    rng: np.random.Generator,
    step_questions: int | None = None,
) -> dict:
    """One GRPO step on the questions ``items`` (objects with ``q [384]`` and ``x [N, F]``); see module docs.

    Under torch.distributed (``model`` wrapped in DDP), ``items`` is this process's share of the step's questions,
    whole groups, and ``step_questions`` the step's questions over all processes: the local loss is scaled by
    ``world_size / step_questions`` so that DDP's gradient average is the gradient of the one-process loss over
    all the step's questions, and the returned statistics are reduced over the processes.

    Returns:
        ``{"reward": mean reward of the sampled actions, "kl": exact KL to ref, "loss": last loss,
        "advantage_abs": mean |A|}``. Questions without candidates are skipped.
    """
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if len(item_indices) != len(items):
        raise ValueError(f"{len(items)} items but {len(item_indices)} item indices")
    keep = [(i, it) for i, it in zip(item_indices, items, strict=True) if it.x.shape[0] > 0]
    idx, items = [i for i, _ in keep], [it for _, it in keep]  # filtered together: indices stay aligned
    if not items:
        if world > 1:
            raise ValueError("every process needs at least one question with candidates per step")
        return {"reward": float("nan"), "kl": 0.0, "loss": 0.0, "advantage_abs": 0.0}
    # questions the loss is averaged over, per process (one process: len(items), the plain mean)
    denom = (step_questions or len(items) * world) / world
    with torch.no_grad():
        old_logp, mask = _log_probs(model, items, config.temperature)  # [B, N]
    probs = old_logp.exp().numpy()
    actions = np.stack([rng.choice(probs.shape[1], size=config.group, p=p / p.sum()) for p in probs])  # [B, G]
    flat_q = [i for i in idx for _ in range(config.group)]
    rewards = np.asarray(reward_fn(flat_q, actions.reshape(-1).tolist()), np.float64).reshape(actions.shape)
    adv = rewards - rewards.mean(axis=1, keepdims=True)  # Dr-GRPO: no std division
    if config.scale_rewards == "group":
        adv = adv / (rewards.std(axis=1, keepdims=True) + 1e-4)
    adv_t = torch.as_tensor(adv, dtype=torch.float32)
    act_t = torch.as_tensor(actions)
    old_sel = old_logp.gather(1, act_t)  # [B, G]
    with torch.no_grad():
        ref_logp, _ = _log_probs(ref, items, config.temperature)
    loss_value = 0.0
    kl_value = 0.0
    for _ in range(config.mu):
        logp, _ = _log_probs(model, items, config.temperature)
        ratio = (logp.gather(1, act_t) - old_sel).exp()
        surrogate = torch.minimum(ratio * adv_t, ratio.clamp(1 - config.epsilon, 1 + config.epsilon) * adv_t)
        p = logp.exp()
        # exact KL(pi || ref), [B]; padded candidates are -inf in both, so their difference is zeroed BEFORE
        # the product (0 * NaN in the backward pass would poison every parameter)
        kl = (p * (logp - ref_logp).masked_fill(~mask, 0.0)).sum(-1)
        loss = -surrogate.sum() / (denom * config.group) + config.beta * kl.sum() / denom
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        opt.step()
        loss_value, kl_value = float(loss.detach()), float(kl.detach().mean())
    if world > 1:  # sums over the processes, then the same means as one process over all the questions
        t = torch.tensor([rewards.sum(), np.abs(adv).sum(), rewards.size, kl_value * len(items), len(items),
                          loss_value], dtype=torch.float64)  # fmt: skip
        dist.all_reduce(t)
        r_sum, a_sum, n_act, kl_sum, n_q, loss_sum = t.tolist()
        return {"reward": r_sum / n_act, "kl": kl_sum / n_q, "loss": loss_sum / world, "advantage_abs": a_sum / n_act}
    return {
        "reward": float(rewards.mean()),
        "kl": kl_value,
        "loss": loss_value,
        "advantage_abs": float(np.abs(adv).mean()),
    }


class RewardCache:
    """Memo of ``(sample id, box text) -> reward`` for one reward, optionally appended to a JSONL file.

    Args:
        path: the JSONL file (``None`` = in memory only). A line torn by a kill is cut off before appending, so
            the next row does not glue onto it (:func:`~zoomvlm.data.samples.read_appended_jsonl`).
        settings: what the rewards depend on besides the key (target and its budget, reward, metric, crop set...),
            kept beside the file in ``<path>.settings.json``. Rewards computed under other settings are never
            reused: a file whose saved settings differ is refused (a file from before settings were saved is
            adopted as is).

    Raises:
        ValueError: ``path`` holds rewards computed under other ``settings`` (the differences listed).
    """

    def __init__(self, path: str | Path | None = None, settings: dict | None = None):
        from zoomvlm.core.resume import settings_diff
        from zoomvlm.data.samples import read_appended_jsonl

        self.path = Path(path) if path else None
        self.values: dict[tuple[str, str], float] = {}
        if self.path and settings is not None:
            sidecar = self.path.with_name(self.path.name + ".settings.json")
            if sidecar.exists():
                diff = settings_diff(json.loads(sidecar.read_text()), settings)
                if diff:
                    raise ValueError(
                        f"{self.path} holds rewards computed under other settings ({'; '.join(diff)}): they would be "
                        "reused as this run's. Use another --out, or delete the file and its .settings.json to "
                        "compute them again"
                    )
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                sidecar.write_text(json.dumps(settings, indent=2, default=str) + "\n")
        if self.path and self.path.exists():
            for row in read_appended_jsonl(self.path, repair=True):
                self.values[(row["id"], row["box"])] = row["reward"]

    def add(self, key: tuple[str, str], value: float) -> None:
        self.values[key] = value
        if self.path:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"id": key[0], "box": key[1], "reward": value}) + "\n")


def make_target_reward(items: Sequence, reward, config: ScorerConfig, cache: RewardCache | None = None) -> RewardFn:
    """Adapt a :mod:`zoomvlm.cropvlm.rewards` function (TRL signature) to :data:`RewardFn` over ``items``.

    The chosen region of ``items[i]`` becomes ``format_percent_box(box)``, the completion the reward parses, with
    ``box`` the crop the policy cuts for it at inference: its legibility window (:func:`legible_window`) when
    ``config`` always widens (``window_line_px`` set, ``window_below`` None), else its own padded box
    (:func:`crop_box`; a gated config is rewarded on the tight crops, as before windows existed).
    ``image_path``, ``question`` and ``answers`` come from the item's sample.
    """
    windows = config.window_line_px is not None and config.window_below is None
    cache = cache or RewardCache()

    def fn(item_indices: Sequence[int], actions: Sequence[int]) -> list[float]:
        keys = []
        for i, a in zip(item_indices, actions, strict=True):
            it = items[i]
            region = it.perception.regions[a]
            if windows:
                box = legible_window(region, config, (it.sample.width, it.sample.height))
            else:
                box = crop_box(region, config)
            keys.append((it.sample.id, format_percent_box(box)))
        todo = list(dict.fromkeys(k for k in keys if k not in cache.values))
        if todo:
            by_id = {items[i].sample.id: items[i].sample for i in item_indices}
            samples = [by_id[k[0]] for k in todo]
            values = reward(
                prompts=[None] * len(todo),
                completions=[k[1] for k in todo],
                image_path=[str(s.image) for s in samples],
                question=[s.question for s in samples],
                answers=[list(s.answers) for s in samples],
            )
            for k, v in zip(todo, values, strict=True):
                cache.add(k, float(v))
        return [cache.values[k] for k in keys]

    return fn


def parse_reward_mix(spec: str) -> dict[str, float]:
    """``"accuracy"`` or ``"accuracy=1,answer_probability=0.5"`` -> ``{name: weight}`` (order kept).

    A name without ``=w`` has weight 1. The GRPO reward is then ``r = sum_k w_k r_k`` (the same weighted sum
    TRL forms over a recipe's ``rewards: {name: weight}`` for the VLM cropper). Why a mix: with the
    ``accuracy`` reward, a question the global view already answers gives every crop 1, so its group has
    no advantage and the policy learns nothing about where that answer is; a small ``answer_probability``
    term still ranks a sharp crop of the answer above a crop elsewhere.

    Raises:
        ValueError: an empty spec, an unknown or repeated name, or a weight that is not a finite number > 0.
    """
    mix: dict[str, float] = {}
    for part in spec.split(","):
        name, _, weight = part.strip().partition("=")
        name = name.strip()
        if not name:
            raise ValueError(f"empty reward name in {spec!r}; write e.g. 'accuracy=1,answer_probability=0.5'")
        if name not in REWARD_NAMES:
            raise ValueError(f"unknown reward {name!r} in {spec!r}; choose from {', '.join(REWARD_NAMES)}")
        if name in mix:
            raise ValueError(f"reward {name!r} given twice in {spec!r}")
        try:
            w = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise ValueError(f"weight {weight!r} of reward {name!r} is not a number") from None
        if not np.isfinite(w) or w <= 0:
            raise ValueError(f"weight of reward {name!r} must be a finite number > 0, got {weight!r}")
        mix[name] = w
    return mix


def weighted_reward(parts: Sequence[tuple[RewardFn, float]], gate: RewardFn | None = None) -> RewardFn:
    """``r(q, a) = sum_k w_k r_k(q, a)`` over ``parts = [(reward_fn, weight), ...]``, each called once per batch
    in the given order (put the reward whose reads the others can reuse first).

    ``gate`` (one of the ``parts``' functions, e.g. the accuracy reward): the OTHER terms are multiplied by its
    value, ``r = w_g g + g sum_{k != g} w_k r_k``, so they only rank actions the gate already rewards (among
    correct crops, prefer the one the target reads most surely) and a group the gate scores 0 throughout keeps
    zero advantage, as under the gate alone. Without a gate, such a group would be ranked by the other terms
    alone: the answer's probability among crops that do not show it.

    Raises:
        ValueError: no parts, or a ``gate`` that is not one of them.
    """
    if not parts:
        raise ValueError("a weighted reward needs at least one part")
    if gate is not None and all(f is not gate for f, _ in parts):
        raise ValueError("the gate must be one of the weighted reward's parts")

    def fn(item_indices: Sequence[int], actions: Sequence[int]) -> list[float]:
        values = [(part, w, np.asarray(part(item_indices, actions), np.float64)) for part, w in parts]
        g = next((v for part, _, v in values if part is gate), None)
        total = np.zeros(len(actions), np.float64)
        for part, w, v in values:
            total += w * v if g is None or part is gate else w * g * v
        return total.tolist()

    return fn


def _init_distributed() -> tuple[int, int, bool]:
    """``(rank, world_size, started_here)``: joins the process group a launcher set up (``WORLD_SIZE`` > 1)."""
    if not (dist.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1):
        return 0, 1, False
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), started


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def train_grpo(
    seed_model: RegionScorer,
    items: Sequence,
    reward_fn: RewardFn,
    config: GRPOConfig,
    out_dir: str | Path,
    recipe: dict | None = None,
    progress: bool = True,
    grouped: bool = False,
    save: Callable | None = None,
) -> RegionScorer:
    """GRPO from ``seed_model`` (also the KL reference), resumable, checkpointing into ``out_dir``.

    Writes ``checkpoint.pt`` every ``save_every`` steps (model, optimiser, step, RNG), ``log.jsonl`` (one line
    per step) and, at the end, the scorer in ``out_dir/final`` (:func:`~zoomvlm.cropvlm.proposals.save_scorer`, or
    ``save(model, folder, recipe)`` when given: another categorical policy over per-question candidates, such as
    the AwaRes reader head of :mod:`zoomvlm.awares.reader_policy`, whose ``forward(q, x, mask)`` has the scorer's
    shapes).
    Rerun the same call after a crash to continue from the last checkpoint. ``grouped``: a step's questions
    are all the questions of a few images drawn at random (a reader target then reads each global view once
    per step from its memo), else questions drawn independently.

    Several processes (``torchrun --nproc_per_node N`` or ``accelerate launch --multi_gpu --num_processes N``;
    ``WORLD_SIZE`` > 1): the process group is joined (gloo without CUDA) and the scorer wrapped in DDP. A step
    is the SAME step as on one process, split: every process draws the step's questions with the same RNG
    (``prompts_per_step`` is global), takes a disjoint contiguous share of them (at least one each, so
    ``prompts_per_step`` >= N), samples the ``G`` actions of each of its questions with its own RNG and scores
    them, so a question's group, and its group-relative advantage, stay on one process. DDP averages the
    gradients (the local loss is scaled so the average is the gradient of the one-process loss over all the
    step's questions), so the parameters stay identical on every process; ``log.jsonl`` holds statistics over
    all processes. Only rank 0 writes ``recipe.json``, ``log.jsonl``, ``checkpoint.pt`` (with every process's
    sampling RNG) and ``final/``, with barriers around the saves; on a rerun every process resumes from the same
    checkpoint. On one process nothing changes (one RNG draws the questions and the actions, as before).
    """
    usable = [i for i, it in enumerate(items) if it.x.shape[0] > 0]
    if not usable:
        raise ValueError(
            f"GRPO needs questions with candidate regions: none of the {len(items)} has one "
            "(the reader found no text line in any image)"
        )
    rank, world, started = _init_distributed()
    main = rank == 0
    out = Path(out_dir)
    settings = run_settings(recipe, config)
    model = copy.deepcopy(seed_model).train()
    ref = copy.deepcopy(seed_model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    rng = np.random.default_rng(config.seed)  # the step's questions: the same draws on every process
    # the actions: one process keeps the single RNG of old; several sample with one RNG per process
    act_rng = rng if world == 1 else np.random.default_rng([config.seed, rank])
    start = 0
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        _check_resume(state.get("settings"), settings, ckpt)
        if config.steps < state["step"]:  # final/ would be the longer-trained model, labelled with fewer steps
            raise ValueError(
                f"{ckpt} is at step {state['step']}, past --steps {config.steps}: rerun with --steps >= "
                f"{state['step']}, or write to another --out"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state = state["rng"]
        act_states = state.get("action_rngs") or []
        if world > 1 and len(act_states) == world:
            act_rng.bit_generator.state = act_states[rank]
        elif world > 1:  # another number of processes: fresh per-process streams for the rest of the run
            act_rng = np.random.default_rng([config.seed, rank, state["step"]])
        start = state["step"]
        logger.info("resuming GRPO at step %d", start)
    if main:  # after the resume check: a refused resume leaves the run's recipe as it was
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.json").write_text(json.dumps({**(recipe or {}), "grpo": asdict(config)}, indent=2) + "\n")
        _truncate_log(out / "log.jsonl", start)
    _barrier(world)
    if world > 1 and min(config.prompts_per_step, len(usable)) < world:
        raise ValueError(f"{world} processes need prompts_per_step >= {world} questions with candidates")
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    by_image: dict[str, list[int]] = {}
    for i in usable:
        by_image.setdefault(str(getattr(items[i], "sample", None) and items[i].sample.image), []).append(i)
    log = (out / "log.jsonl").open("a", encoding="utf-8") if main else None
    for step in tqdm(range(start, config.steps), desc="GRPO", unit="step", disable=not (progress and main),
                     initial=start, total=config.steps):  # fmt: skip
        if grouped:
            batch_idx = []
            for img in rng.permutation(sorted(by_image)):
                batch_idx += by_image[img]
                if len(batch_idx) >= config.prompts_per_step:
                    break
        else:
            batch_idx = rng.choice(usable, size=min(config.prompts_per_step, len(usable)), replace=False).tolist()
        share = [int(i) for i in np.array_split(np.asarray(batch_idx), world)[rank]] if world > 1 else batch_idx
        stats = grpo_step(ddp, ref, [items[i] for i in share], reward_fn, share, opt, config, act_rng,
                          step_questions=len(batch_idx))  # fmt: skip
        stats["step"] = step + 1
        if main:
            log.write(json.dumps(stats) + "\n")
            log.flush()
            logger.info("GRPO step %d: %s", step + 1, {k: round(v, 4) for k, v in stats.items() if k != "step"})
        if (step + 1) % config.save_every == 0 or step + 1 == config.steps:
            act_states = [act_rng.bit_generator.state] * world
            if world > 1:
                dist.all_gather_object(act_states, act_rng.bit_generator.state)
            if main:
                tmp = out / "checkpoint.pt.tmp"
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": rng.bit_generator.state,
                            "action_rngs": act_states if world > 1 else None, "step": step + 1,
                            "settings": settings, "model_config": _config_dict(model)}, tmp)  # fmt: skip
                tmp.replace(ckpt)
            _barrier(world)
    if log:
        log.close()
    model.eval()
    if main:
        (save or save_scorer)(model, out / "final", {**(recipe or {}), "grpo": asdict(config)})
    _barrier(world)
    if started:
        dist.destroy_process_group()
    return model


def run_settings(recipe: dict | None, config: GRPOConfig) -> dict:
    """What a GRPO run's resume must agree on: its recipe and :class:`GRPOConfig`, less ``steps`` (a finished run
    may be extended) and ``save_every`` (how often to checkpoint changes nothing learned). JSON-normalised."""
    grpo = {k: v for k, v in asdict(config).items() if k not in ("steps", "save_every")}
    return json.loads(json.dumps({"recipe": recipe or {}, "grpo": grpo}, default=str))


def _check_resume(saved: dict | None, now: dict, ckpt: Path) -> None:
    """Refuse to resume ``ckpt`` with other settings than it was trained with (``ValueError`` listing them).

    A resume with another learning rate, reward, target or crop setting would silently continue under the old
    ones (the optimiser state restores the old lr, the reward cache holds the old target's rewards) while the
    recipe claimed the new. Checkpoints written before settings were saved (``saved`` None) resume as before.
    """
    if saved is None:
        logger.warning("%s predates saved run settings: resuming without checking them", ckpt)
        return
    # a checkpoint from before the recipe kept the seed's data apart recorded the SEED's data as "data" (or none,
    # for an init without a recipe): compare what it recorded, not this stage's own --data
    recipe_now = dict(now.get("recipe", {}))
    saved = {**saved, "recipe": dict(saved.get("recipe", {}))}
    for recipe in (saved["recipe"], recipe_now):  # derived from the data, not a training setting
        recipe.pop("licence", None)
    if "seed_data" not in saved.get("recipe", {}):
        recipe_now.pop("data", None)
        recipe_now.pop("curation", None)
        seed_data, seed_curation = recipe_now.pop("seed_data", None), recipe_now.pop("seed_curation", None)
        if seed_data is not None:
            recipe_now["data"] = seed_data
            if seed_curation is not None:
                recipe_now["curation"] = seed_curation
    diff = settings_diff(saved, {**now, "recipe": recipe_now})
    if diff:
        raise ValueError(
            f"{ckpt} was trained with other settings; resuming would mix the two runs. Rerun with the run's own "
            f"settings (its recipe.json), or write to another --out (or delete {ckpt.name} to start over). "
            "Differences (checkpoint -> now): " + "; ".join(diff)
        )


def _truncate_log(path: Path, start: int) -> None:
    """Keep the lines of ``log.jsonl`` for steps <= ``start`` (the checkpoint's): the steps after it are run
    again on resume, and would otherwise be logged twice."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= start:
                keep.append(line)
        except json.JSONDecodeError:  # a line torn by the crash
            continue
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(f"{line}\n" for line in keep), encoding="utf-8")
    tmp.replace(path)


def _config_dict(model) -> dict | None:
    config = getattr(model, "config", None)
    return asdict(config) if dataclasses.is_dataclass(config) else None


def export_checkpoint(out_dir: str | Path, dest: str | Path | None = None) -> Path:
    """Save the scorer of a running (or stopped) GRPO run's last ``checkpoint.pt`` as a loadable checkpoint.

    ``dest`` defaults to ``out_dir/step_N``. The scorer's config (``k``, windows, features) is the one the run
    trained with: saved in ``checkpoint.pt``; for checkpoints written before that, ``out_dir/final/config.json``
    if present, else the seed's (``init`` in the run's ``recipe.json``) with the recipe's ``k`` and window
    settings. Returns the folder.

    Raises:
        FileNotFoundError: ``out_dir`` has no ``checkpoint.pt`` or ``recipe.json``.
    """
    from zoomvlm.cropvlm.proposals import load_scorer

    out = Path(out_dir)
    for name in ("checkpoint.pt", "recipe.json"):
        if not (out / name).exists():
            raise FileNotFoundError(f"{out} is not a GRPO run folder: no {name}")
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    recipe = json.loads((out / "recipe.json").read_text())
    if state.get("model_config"):
        model = RegionScorer(ScorerConfig(**state["model_config"]))
    elif (out / "final" / "config.json").exists():
        model = load_scorer(out / "final")
    else:
        model = load_scorer(recipe["init"])
        names = {f.name for f in dataclasses.fields(ScorerConfig)}
        model.config = dataclasses.replace(model.config, **{k: v for k, v in recipe.items() if k in names and
                                                            (k == "k" or k.startswith("window_"))})  # fmt: skip
    model.load_state_dict(state["model"])
    return save_scorer(model, dest or out / f"step_{state['step']}", {**recipe, "step": state["step"]})


def expected_reward(
    model: RegionScorer, items: Sequence, reward_table: Sequence[np.ndarray], temperature: float = 1.0
) -> float:
    """``mean_q sum_a pi(a | q) r(q, a)`` for known per-candidate rewards (tests, toy problems)."""
    with torch.no_grad():
        logp, _ = _log_probs(model, items, temperature)
    p = logp.exp().numpy()
    return float(np.mean([float((p[i, : len(r)] * r).sum()) for i, r in enumerate(reward_table)]))
