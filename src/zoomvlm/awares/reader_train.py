"""``zoomvlm train crop-set-reader``: GRPO for the AwaRes reader crop-set policy (:mod:`zoomvlm.awares.reader_policy`).

1. Perception of every training image from the reader-pass cache (``--reads``, shared with ``zoomvlm train
   proposals``: the same files, read once, resumable), with the settings of
   :func:`~zoomvlm.awares.reader_policy.perception_settings` (``--text-view low``, default: text from the AwaRes low
   view, line boxes from the detector at the scorer's budget; or ``--view-budget`` / ``--detect-budget``).
2. The frozen proposals scorer ranks the candidates; each question gets its action space (NO_CROPS + ``--m``
   distinct crop subsets of ``--crop-set``, :func:`~zoomvlm.awares.reader_policy.action_space`).
3. GRPO from the hand-set initial head (:func:`~zoomvlm.awares.reader_policy.hand_set_head`, also the KL reference)
   on AwaRes's ``R = R_ans - C_tool`` with the ``--target`` (:class:`~zoomvlm.awares.reader_policy.ActionReward`;
   ``R_ans`` = ``contains``), through the proposals GRPO loop (:func:`~zoomvlm.cropvlm.proposal_grpo.train_grpo`):
   checkpoint every ``--save-every`` steps, rerun the same command to continue, answer scores memoised in
   ``OUT/answers.jsonl``. ``needs_hr`` (for ``alpha_miss``): the ``zoomvlm curate awares`` labels of ``--labels``
   when given, else computed on the fly from the target's low- vs high-view answers (curation's metric rule).

Human ``evidence_boxes`` are dropped as the data is loaded (never read). The result, ``OUT/final``, is used as
``--policy crop-set-reader:OUT/final``; ``OUT/init`` is the hand-set initial policy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from zoomvlm.cli.argtypes import group_size, non_negative_float, non_negative_int, positive_float, positive_int

_EPILOG = """\
example (receipts train, ocr target, AwaRes's crop set and the fine one):
  zoomvlm train crop-set-reader --data ../shared/data/receipts/train.jsonl --out runs/crop_set_reader_lam0.3 \\
      --lam 0.3 --crop-set awares
  zoomvlm train crop-set-reader --data ../shared/data/receipts/train.jsonl --out runs/crop_set_reader_fine_lam0.3 \\
      --lam 0.3 --crop-set fine
  zoomvlm eval --data ../shared/data/receipts/val.jsonl --policy crop-set-reader:runs/crop_set_reader_lam0.3/final \\
      --out runs/eval_reader
Rerun the same command to continue an interrupted run. Human evidence boxes in the data are never read.
"""


def _load_samples(paths, limit):
    """(samples, groups): each --data file's samples, evidence stripped before parsing; ``limit``: first N overall."""
    from zoomvlm.cropvlm.proposal_data import load_training_samples

    samples, groups = [], {}
    for data in paths:
        part = load_training_samples(data)
        if limit is not None:
            part = part[: max(0, limit - len(samples))]
        groups[data] = part
        samples += part
    return samples, groups


def _perceptions(groups, settings: dict, reads: str) -> dict:
    """Cached reader passes, in the files ``zoomvlm train proposals`` uses (``READS/{dir}_{stem}_{budget}.jsonl``)."""
    from zoomvlm.cropvlm.proposal_data import cached_passes, cached_reads, reads_stem

    out = {}
    for data, subset in groups.items():
        if not subset:
            continue
        stem = reads_stem(data)
        view, detect = str(settings["view_budget"]), settings["detect_budget"]
        if detect:
            out.update(cached_passes(subset, view, str(detect), reads, stem, legible=settings["legible"],
                                     max_recognise=settings["max_recognise"],
                                     part_px=settings.get("part_px")))  # fmt: skip
        else:
            out.update(cached_reads(subset, view, Path(reads) / f"{stem}_{view}.jsonl",
                                    part_px=settings.get("part_px")))  # fmt: skip
    return out


def cmd_train(args) -> int:
    """``zoomvlm train crop-set-reader``: GRPO of the reader-perception crop-set head on ``R_ans - C_tool`` from the
    hand-set head (see the module docstring); resumable in ``--out``. Returns the exit code 0.

    Raises:
        ValueError: ``--out`` was started with other settings, or bad options.
    """
    from dataclasses import asdict

    import numpy as np
    import torch

    from zoomvlm.awares.reader_policy import (
        ActionReward,
        ReaderConfig,
        build_reader_items,
        hand_set_head,
        load_awares_labels,
        load_reader,
        perception_settings,
        save_reader,
    )
    from zoomvlm.awares.rewards import ToolCost
    from zoomvlm.core.geometry import Budget
    from zoomvlm.cropvlm.proposal_grpo import GRPOConfig, RewardCache, train_grpo
    from zoomvlm.cropvlm.proposals import default_proposals_path, load_scorer
    from zoomvlm.policies.perception import QuestionEncoder
    from zoomvlm.targets import load_target

    # The head and the scorer are tiny: one thread avoids OpenMP spin-waiting on a shared, oversubscribed CPU.
    torch.set_num_threads(1)
    for path in [*args.data, *(args.labels or [])]:
        if not Path(path).exists():
            raise ValueError(f"{path} does not exist")
    high = Budget.parse(args.high)
    cost = ToolCost(alpha_miss=args.alpha_miss, alpha_use=args.alpha_use, lam=args.lam)  # validates the constants
    scorer_path = args.scorer or default_proposals_path()
    scorer = load_scorer(scorer_path)
    given = {"view_budget": args.view_budget, "detect_budget": args.detect_budget, "legible": args.legible,
             "max_recognise": args.max_recognise}  # fmt: skip
    overrides = {k: v for k, v in given.items() if v is not None}
    if overrides.get("detect_budget") in ("none", "", "0"):
        overrides["detect_budget"] = None
    config = ReaderConfig(crop_set=args.crop_set, m=args.m, hidden=args.hidden, high=str(high), scorer=args.scorer,
                          text_view=args.text_view, perception=overrides)  # fmt: skip
    settings = perception_settings(scorer.config, config)
    config = ReaderConfig(**{**asdict(config), "perception": settings})  # resolved: perceives as trained

    samples, groups = _load_samples(args.data, args.limit)
    perceptions = _perceptions(groups, settings, args.reads)
    items = build_reader_items(samples, perceptions, scorer, QuestionEncoder(), config)
    target = load_target(args.target, budget=high)
    if hasattr(target, "cache_size"):
        target.cache_size = 64  # a step's questions come from a few images; keep their low views and crops
    labels = load_awares_labels(args.labels) if args.labels else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    answers = RewardCache(out / "answers.jsonl", {"target": target.name, "high": str(high), "metric": "contains",
                                                  "crop_set": config.crop_set})  # fmt: skip
    reward = ActionReward(items, target, high, cost, answers, labels)
    init = hand_set_head(config)
    if (out / "init" / "head.pt").exists():  # a rerun: the KL reference is the initial policy the run started from
        init = load_reader(out / "init")
        if init.config != config:
            raise ValueError(f"{out} was started with other settings ({out / 'init/config.json'}): use a new --out")
    recipe = {
        "stage": "grpo",
        "data": args.data,
        "limit": args.limit,
        "n_questions": len(items),
        "scorer": scorer_path,
        "perception": settings,
        "crop_set": args.crop_set,
        "target": args.target,
        "high": str(high),
        "reward": "awares: R_ans (contains) - C_tool",
        "tool_cost": {"alpha_miss": cost.alpha_miss, "alpha_use": cost.alpha_use, "lam": cost.lam},
        "needs_hr": f"curate awares labels {args.labels}" if args.labels else "on the fly: target low vs high view",
        "init": "hand-set (zoomvlm.awares.reader_policy.HAND_SET)",
        "labels": "no human box (evidence stripped on load)",
    }
    if not (out / "init" / "head.pt").exists():
        save_reader(init, out / "init", {**recipe, "stage": "init"})
    gcfg = GRPOConfig(steps=args.steps, prompts_per_step=args.prompts, group=args.group, beta=args.beta, lr=args.lr,
                      temperature=args.temperature, seed=args.seed, save_every=args.save_every)  # fmt: skip
    model = train_grpo(init, items, reward, gcfg, out, recipe=recipe, grouped=True, save=save_reader)

    # greedy decisions on the training questions before / after (no target call: the action spaces are known)
    from zoomvlm.awares.protocol import crop_set_sent_area
    from zoomvlm.cropvlm.proposals import pad_batch

    def summary(head) -> str:
        with torch.no_grad():
            picks = [int(head(*pad_batch([(it.q, it.x)]))[0].argmax()) for it in items]
        keys = [items[i].space.keys[a] for i, a in enumerate(picks)]
        asked = [k for k in keys if k]
        area = float(np.mean([crop_set_sent_area(k) for k in asked])) if asked else 0.0
        return f"NO_CROPS {1 - len(asked) / max(1, len(keys)):.1%}, mean crop area when asking {area:.3f}"

    print(f"greedy on the {len(items)} training questions: init {summary(init)}; trained {summary(model)}")
    print(f"target requests this run: {reward.n_requests}", file=sys.stderr)
    print(f"reader crop-set policy saved to {out / 'final'}; use it with --policy crop-set-reader:{out / 'final'}")
    (out / "summary.json").write_text(json.dumps({"n_questions": len(items), "target_requests": reward.n_requests},
                                                 indent=2) + "\n")  # fmt: skip
    return 0


def add_parser(tsub) -> None:
    """Register ``crop-set-reader`` under ``zoomvlm train``."""
    p = tsub.add_parser(
        "crop-set-reader",
        help="AwaRes crop-set policy that looks with the reader: GRPO on R_ans - C_tool",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", action="append", required=True, help="training JSONL (repeatable)")
    p.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    p.add_argument("--crop-set", choices=("awares", "fine"), default="awares",
                   help="AwaRes's 10 regions, or those + bands for text. Default: %(default)s")  # fmt: skip
    p.add_argument(
        "--lam", type=non_negative_float, default=0.3, help="C_tool area weight lambda. Default: %(default)s"
    )
    p.add_argument(
        "--alpha-miss", type=non_negative_float, default=0.5, help="C_tool of a missed HR sample. Default: %(default)s"
    )
    p.add_argument(
        "--alpha-use", type=non_negative_float, default=0.1, help="C_tool of any crop request. Default: %(default)s"
    )
    p.add_argument("--labels", action="append", default=None, metavar="DIR",
                   help="`zoomvlm curate awares` folder(s) with LR/HR labels (repeatable). Default: labels are "
                   "computed on the fly from the target's low- vs high-view answers")  # fmt: skip
    p.add_argument("--target", default="ocr", help="reward target spec. Default: %(default)s")
    p.add_argument("--high", default="side:768", help="high-resolution budget (low view = sides halved). "
                   "Default: %(default)s")  # fmt: skip
    p.add_argument("--scorer", default=None, help="proposals checkpoint (frozen). Default: the shipped one")
    p.add_argument("--reads", default="runs/reads", help="cache of reader passes. Default: %(default)s")
    p.add_argument("--text-view", choices=("low", "scorer"), default="low",
                   help="low: the text pass reads the AwaRes low view (the target's first turn; boxes from the "
                   "detector at the scorer's budget); scorer: the scorer's perception as is. "
                   "Default: %(default)s")  # fmt: skip
    p.add_argument("--view-budget", default=None, help="perception text view budget. Default: by --text-view")
    p.add_argument("--detect-budget", default=None,
                   help="two-pass perception detection budget (none = one pass). Default: by --text-view")  # fmt: skip
    p.add_argument("--legible", type=float, default=None, help="two-pass legibility rule. Default: the scorer's")
    p.add_argument(
        "--max-recognise", type=positive_int, default=None, help="two-pass recognition cap. Default: the scorer's"
    )
    p.add_argument("--m", type=positive_int, default=3, help="GET_CROPS actions per question. Default: %(default)s")
    p.add_argument(
        "--hidden", type=non_negative_int, default=16, help="head MLP width (0 = linear). Default: %(default)s"
    )
    p.add_argument("--steps", type=positive_int, default=30, help="GRPO steps. Default: %(default)s")
    p.add_argument("--prompts", type=positive_int, default=16, help="questions per step. Default: %(default)s")
    p.add_argument(
        "--group", type=group_size, default=6, help="actions sampled per question (G). Default: %(default)s"
    )
    p.add_argument(
        "--beta", type=non_negative_float, default=0.01, help="KL weight to the initial policy. Default: %(default)s"
    )
    p.add_argument("--lr", type=positive_float, default=1e-2, help="AdamW learning rate. Default: %(default)s")
    p.add_argument(
        "--temperature", type=positive_float, default=1.0, help="sampling temperature. Default: %(default)s"
    )
    p.add_argument(
        "--save-every", type=positive_int, default=1, help="checkpoint period in steps. Default: %(default)s"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed. Default: %(default)s")
    p.add_argument("--limit", type=positive_int, default=None, help="first N questions only (smoke runs)")
    p.set_defaults(func=cmd_train)
