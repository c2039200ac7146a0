"""``zoomvlm train proposals {seed,grpo,prior}``: train the reader-proposal cropper and the prior, no human boxes.

1. ``seed``: the reader's pass over every training image at the view budget (cached in ``--reads``), the
   model-made seed boxes of ``zoomvlm curate boxes --grounder ocr`` (one curation folder per dataset), a soft
   label over the candidates (:func:`~zoomvlm.cropvlm.proposals.seed_targets`) and the listwise cross-entropy
   fit (:func:`~zoomvlm.cropvlm.proposals.train_seed`). Reported on a held-out 20 % of the TRAINING images
   (split by image): how often the top candidate matches the model-made seed box (IoU >= 0.3).
2. ``grpo``: GRPO from the seed checkpoint on the target's own reward
   (:mod:`zoomvlm.cropvlm.proposal_grpo`), resumable (rerun the same command).
3. ``prior``: the non-reading control (:mod:`zoomvlm.policies.prior`) from the same curation folders.

Human ``evidence_boxes`` are dropped as the data is loaded
(:func:`~zoomvlm.cropvlm.proposal_data.load_training_samples`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from zoomvlm.cli.argtypes import group_size, non_negative_float, positive_float, positive_int

logger = logging.getLogger(__name__)

_EPILOG = """\
example (receipts + documents, the shipped recipe):
  zoomvlm train proposals seed --data ../shared/data/receipts/train.jsonl --curation runs/curate_receipts \\
      --data ../shared/data/documents/train.jsonl --curation runs/curate_documents --out runs/proposals_seed
  zoomvlm train proposals grpo --data ... --curation ... --init runs/proposals_seed --reward likelihood \\
      --out runs/proposals_grpo_likelihood
  zoomvlm train proposals prior --data ... --curation ... --out runs/prior
--data and --curation pair up in order: each dataset with the `zoomvlm curate boxes --grounder ocr` folder
made from it. Human evidence boxes in the data are dropped on load and never read.
"""


def _load(args):
    """(samples, seeds, groups) over all --data/--curation pairs, evidence stripped; ``groups`` maps each data
    file to its samples (one reads cache per file)."""
    from zoomvlm.cropvlm.proposal_data import load_seed_boxes, load_training_samples, refine_seed_boxes

    samples, seeds, groups = [], {}, {}
    for data, cur in zip(args.data, args.curation, strict=True):
        part = load_training_samples(data)
        groups[data] = part
        samples += part
        part_px = getattr(args, "part_px", None)
        seeds.update(refine_seed_boxes(cur, part, part_px) if part_px else load_seed_boxes(cur))
    missing = [s.id for s in samples if s.id not in seeds]
    if missing:
        logger.warning("%d samples have no seed box yet (curation unfinished?): they get no seed label", len(missing))
    return samples, seeds, groups


def _items(args, samples, seeds, groups):
    from zoomvlm.cropvlm.proposal_data import build_items, cached_passes, cached_reads, reads_stem
    from zoomvlm.policies.perception import QuestionEncoder

    perceptions = {}
    for data, subset in groups.items():
        stem = reads_stem(data)
        if args.detect_budget:
            perceptions.update(cached_passes(subset, args.view_budget, args.detect_budget, args.reads, stem,
                                             legible=args.legible, max_recognise=args.max_recognise,
                                             part_px=args.part_px))  # fmt: skip
        else:
            path = Path(args.reads) / f"{stem}_{args.view_budget}.jsonl"
            perceptions.update(cached_reads(subset, args.view_budget, path, part_px=args.part_px))
    encoder = QuestionEncoder()
    return build_items(samples, perceptions, encoder, seeds, version=args.features), encoder


def _config(args, **kw):
    """The :class:`ScorerConfig` of the perception options on the command line."""
    from zoomvlm.cropvlm.proposals import ScorerConfig

    return ScorerConfig(view_budget=str(args.view_budget), detect_budget=args.detect_budget or None,
                        legible=args.legible, max_recognise=args.max_recognise, features=args.features,
                        part_px=args.part_px, lexical=getattr(args, "lexical", False),
                        window_line_px=getattr(args, "window_line_px", None),
                        window_below=getattr(args, "window_below", None),
                        window_max_area=getattr(args, "window_max_area", 1.0),
                        window_fit=getattr(args, "window_fit", "shift"),
                        window_tiles=getattr(args, "window_tiles", 1), **kw)  # fmt: skip


def _scored(model, items, labelled) -> list[tuple[object, np.ndarray]]:
    """``[(item, logits [N])]`` for the items ``labelled(item)`` keeps, scored by ``model`` without gradients."""
    import torch

    from zoomvlm.cropvlm.proposals import pad_batch

    out = []
    with torch.no_grad():
        for it in items:
            if labelled(it):
                q, x, mask = pad_batch([(it.q, it.x)])
                out.append((it, model(q, x, mask)[0].numpy()))
    return out


def seed_hit_rate(model, items, min_iou: float = 0.3) -> float:
    """Share of items (with a seed label) whose top candidate overlaps the model-made seed box (IoU >= min_iou)."""
    scored = _scored(model, items, lambda it: it.target is not None)
    if not scored:
        return float("nan")
    hits = sum(it.perception.regions[int(lg.argmax())].box.iou(it.seed_box) >= min_iou for it, lg in scored)
    return hits / len(scored)


def seed_cover_rate(model, items, config, k: int, min_cover: float = 0.9) -> float:
    """Share of items with a seed box where one of the policy's ``k`` crops covers >= ``min_cover`` of it."""
    from zoomvlm.cropvlm.proposals import crop_box, select_boxes

    scored = _scored(model, items, lambda it: it.seed_box is not None)
    if not scored:
        return float("nan")
    hits = 0
    for it, lg in scored:
        crops = [crop_box(r, config) for r in it.perception.regions]
        idx = select_boxes(it.perception.regions, lg, config, k, crops)  # suppressed on the padded crops, as cut
        hits += any(crops[i].coverage(it.seed_box) >= min_cover for i in idx)
    return hits / len(scored)


def _repeats(args, groups) -> dict[str, int]:
    """``{sample id: times its question enters the seed loss}`` from ``--repeat`` (one per ``--data``)."""
    reps = args.repeat or [1] * len(args.data)
    if len(reps) != len(args.data) or min(reps) < 1:
        raise ValueError(f"--repeat needs one integer >= 1 per --data ({len(args.data)}), got {reps}")
    return {s.id: r for (data, subset), r in zip(groups.items(), reps, strict=True) for s in subset}


def _data_licences(data: Sequence[str]) -> str:
    """The licences of the training data files, each named once (:func:`~zoomvlm.train.model_card.data_licence`:
    the documents' CC BY-NC is never dropped for a mix)."""
    from zoomvlm.train.model_card import data_licence

    out: list[str] = []
    for path in data:
        licence = data_licence(path)[1]
        if licence not in out:
            out.append(licence)
    return "; ".join(out)


def cmd_seed(args) -> int:
    from zoomvlm.cropvlm.proposal_data import split_train
    from zoomvlm.cropvlm.proposals import save_scorer, train_seed

    samples, seeds, groups = _load(args)
    config = _config(args, k=args.k)  # settings are checked BEFORE the reader passes (minutes on a train set)
    repeat = _repeats(args, groups)
    items, _ = _items(args, samples, seeds, groups)
    fit, held = split_train(items, holdout=0.2, seed=0)
    data = [(it.q, it.x, it.target) for it in fit for _ in range(repeat[it.sample.id]) if it.target is not None]
    n_lab = sum(it.target is not None for it in items)
    print(f"{len(items)} questions, {n_lab} with a seed label the low-resolution pass can match "
          f"({n_lab / max(1, len(items)):.1%}); fit {len(data)}, held-out train images {len(held)} questions",
          file=sys.stderr)  # fmt: skip
    model = train_seed(data, config, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed)
    held_rate, fit_rate = seed_hit_rate(model, held), seed_hit_rate(model, fit)
    print(f"seed top-1 vs model-made box (IoU >= 0.3): fit {fit_rate:.1%}, held-out train {held_rate:.1%}")
    for data, subset in groups.items():
        ids = {s.id for s in subset}
        part = [it for it in held if it.sample.id in ids]
        cover = ", ".join(f"k={k} {seed_cover_rate(model, part, config, k):.1%}" for k in (1, 2, 3, 4))
        print(f"held-out {data}: a crop covers >= 90 % of the model-made box: {cover}")
    # the shipped model is refit on all training questions with the same settings
    full = [(it.q, it.x, it.target) for it in items for _ in range(repeat[it.sample.id]) if it.target is not None]
    model = train_seed(full, config, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed)
    recipe = {
        "stage": "seed",
        "data": args.data,
        "curation": args.curation,
        "view_budget": str(args.view_budget),
        "detect_budget": args.detect_budget,
        "part_px": args.part_px,
        "features": args.features,
        "lexical": args.lexical,
        "k": args.k,
        "window_line_px": args.window_line_px,
        "window_below": args.window_below,
        "window_max_area": args.window_max_area,
        "window_fit": args.window_fit,
        "window_tiles": args.window_tiles,
        "epochs": args.epochs,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "seed": args.seed,
        "n_questions": len(items),
        "n_seed_labels": sum(it.target is not None for it in items),
        "repeat": args.repeat,
        "heldout_train_seed_hit": held_rate,
        "labels": "zoomvlm curate boxes --grounder ocr (model-made); no human box",
        "licence": _data_licences(args.data),
    }
    save_scorer(model, args.out, recipe)
    print(f"seed scorer saved to {args.out}; use it with --policy proposals:{args.out}")
    return 0


def cmd_grpo(args) -> int:
    from zoomvlm.core.geometry import Budget
    from zoomvlm.cropvlm.proposal_grpo import (
        GRPOConfig,
        RewardCache,
        make_target_reward,
        parse_reward_mix,
        train_grpo,
        weighted_reward,
    )
    from zoomvlm.cropvlm.proposals import load_scorer
    from zoomvlm.cropvlm.rewards import AccuracyReward, AnswerProbabilityReward, LikelihoodReward
    from zoomvlm.targets import load_target

    mix = parse_reward_mix(args.reward)
    if args.gate_by_accuracy and "accuracy" not in mix:
        raise ValueError("--gate-by-accuracy needs accuracy in the --reward mix")
    seed_model = load_scorer(args.init)
    if args.window_line_px is not None:  # windows in the loop: the reward reads the windows inference cuts
        seed_model.config = replace(seed_model.config, window_line_px=args.window_line_px, window_below=None,
                                    window_max_area=args.window_max_area, window_fit=args.window_fit,
                                    window_tiles=args.window_tiles)  # fmt: skip
    if args.k is not None:
        seed_model.config = replace(seed_model.config, k=args.k)
    c = seed_model.config  # the perception the seed was trained with (not the command line's defaults)
    args.view_budget, args.detect_budget, args.legible = c.view_budget, c.detect_budget, c.legible
    args.max_recognise, args.features, args.part_px = c.max_recognise, c.features, c.part_px
    samples, seeds, groups = _load(args)
    items, _ = _items(args, samples, seeds, groups)
    target = load_target(args.target, budget=Budget.parse(args.budget))
    if hasattr(target, "cache_size"):
        # a step's questions come from a few images: keep their global reads; with a mix, the second reward
        # reads the same crops as the first, so keep the step's crop reads too (~1 MB per read line)
        target.cache_size = 16 if len(mix) == 1 else 64
    if (
        mix.keys() == {"accuracy"}
        and args.replay_reads
        and str(Budget.parse(args.budget)) == str(Budget.parse(args.view_budget))
    ):  # the replayed reads carry no log-probabilities: accuracy alone
        _replay_global_reads(target, items, args, groups)
    build = {
        "likelihood": lambda: LikelihoodReward(target),
        "accuracy": lambda: AccuracyReward(target, metric="contains"),
        "answer_probability": lambda: AnswerProbabilityReward(target),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # likelihood-type rewards first: their reads (with log-probabilities) serve the accuracy reward's misses
    order = sorted(mix, key=lambda name: name == "accuracy")
    parts = [
        (make_target_reward(items, build[name](), seed_model.config,
                            RewardCache(out / f"rewards_{name}.jsonl", {"reward": name, "target": target.name})),
         mix[name])
        for name in order
    ]  # fmt: skip
    gate = parts[order.index("accuracy")][0] if args.gate_by_accuracy else None
    reward_fn = parts[0][0] if len(parts) == 1 and parts[0][1] == 1.0 else weighted_reward(parts, gate=gate)
    config = GRPOConfig(steps=args.steps, prompts_per_step=args.prompts, group=args.group, beta=args.beta,
                        lr=args.lr, temperature=args.temperature, seed=args.seed,
                        save_every=args.save_every)  # fmt: skip
    recipe_path = Path(args.init) / "zoomvlm_recipe.json"
    recipe = json.loads(recipe_path.read_text()) if recipe_path.exists() else {}
    recipe = {**recipe, "earlier_grpo": _earlier_grpo(recipe)} if recipe.get("stage") == "grpo" else recipe
    # the stage's own data below; the init's (a seed's; None without a recipe) under seed_*, always present: their
    # presence tells a resume that "data" is this stage's (see proposal_grpo._check_resume)
    recipe = {**recipe, "seed_data": recipe.get("data"), "seed_curation": recipe.get("curation")}
    recipe = {**recipe, "stage": "grpo", "init": args.init, "reward": args.reward, "reward_mix": mix,
              "data": args.data, "curation": args.curation,
              "gate_by_accuracy": bool(args.gate_by_accuracy),
              "target": args.target, "budget": args.budget, "k": c.k, "window_line_px": c.window_line_px,
              "window_max_area": c.window_max_area, "window_fit": c.window_fit,
              "window_tiles": c.window_tiles, "window_below": c.window_below}  # fmt: skip
    # the init's licence (a seed on documents is CC BY-NC) and this stage's data, each named once
    licences = [x for x in (recipe.get("licence"), _data_licences(args.data)) if x]
    recipe["licence"] = "; ".join(dict.fromkeys(part for x in licences for part in x.split("; ")))
    train_grpo(seed_model, items, reward_fn, config, out, recipe=recipe, grouped=True)
    if os.environ.get("RANK", "0") == "0":  # several processes (torchrun): rank 0 wrote final/
        print(f"GRPO scorer saved to {out / 'final'}; use it with --policy proposals:{out / 'final'}")
    return 0


def _earlier_grpo(recipe: dict) -> list[dict]:
    """The GRPO stages a checkpoint's recipe already holds (when GRPO continues from a GRPO checkpoint), oldest
    first, so that the new recipe keeps them instead of overwriting the stage's ``init``/``reward``/``grpo``."""
    keys = ("init", "reward", "reward_mix", "gate_by_accuracy", "target", "budget", "grpo")
    return [*recipe.get("earlier_grpo", []), {k: recipe[k] for k in keys if k in recipe}]


def _replay_global_reads(target, items, args, groups) -> None:
    """Put the cached reads of the training images' global views into the ocr target's memo (accuracy reward).

    The cache (``--reads``, the text pass at ``--view-budget``) holds the SAME reader's pass over the SAME
    view (the target's global view at its budget), so ``generate`` returns the transcript it would compute;
    only the per-frame log-probabilities are missing, which the accuracy reward does not use. Saves one
    full-page read per image and step on a busy CPU.
    """
    from zoomvlm.core.geometry import resize_to_budget
    from zoomvlm.cropvlm.proposal_data import cached_rows, reads_stem
    from zoomvlm.targets.ocr import OCRLine

    rows = {}
    for data, subset in groups.items():
        stem = reads_stem(data)
        rows.update(cached_rows(subset, args.view_budget, Path(args.reads) / f"{stem}_{args.view_budget}.jsonl"))
    seen = set()
    for it in items:
        if str(it.sample.image) in seen:
            continue
        seen.add(str(it.sample.image))
        view = resize_to_budget(it.sample.load_image().convert("RGB"), target.budget)
        lines = [
            OCRLine(text, score, np.asarray(quad, np.float32), np.zeros((0, 0), np.float32))
            for quad, text, score in rows[str(it.sample.image)]["lines"]
        ]
        target.preload(view, lines)


def cmd_prior(args) -> int:
    from zoomvlm.core.geometry import Box
    from zoomvlm.policies.perception import ink_outline
    from zoomvlm.policies.prior import fit_prior

    samples, seeds, _ = _load(args)
    # the prior learns from the EXPANDED seed boxes (curation's seeds.jsonl): it cannot see the line, so it
    # needs the safety margin CropVLM's expansion adds
    expanded = {}
    for cur in args.curation:
        for line in (Path(cur) / "seeds.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row["found"]:
                expanded[row["id"]] = Box(*row["box"])
    use = [s for s in samples if s.id in expanded]
    inks = {}
    for s in use:
        if str(s.image) not in inks:
            inks[str(s.image)] = ink_outline(s.load_image())
    sources = {"data": args.data, "curation": args.curation, "labels": "curate boxes --grounder ocr, expanded"}
    questions, boxes = [s.question for s in use], [expanded[s.id] for s in use]
    fit_prior(questions, boxes, [inks[str(s.image)] for s in use], args.out, k=args.k, lo=args.lo, hi=args.hi,
              sources=sources)  # fmt: skip
    print(f"prior fitted on {len(use)} questions; saved to {args.out}; use it with --policy prior:{args.out}")
    return 0


def add_parser(tsub) -> None:
    """Register ``proposals {seed,grpo,prior}`` under ``zoomvlm train``."""
    raw = argparse.RawDescriptionHelpFormatter
    p = tsub.add_parser("proposals", help="the reader-proposal cropper (seed, grpo) and the prior control",
                        epilog=_EPILOG, formatter_class=raw)  # fmt: skip
    psub = p.add_subparsers(dest="proposals_stage", required=True)
    for stage, func, text in (("seed", cmd_seed, "fit the scorer to model-made seed boxes"),
                              ("grpo", cmd_grpo, "GRPO on the target's reward from a seed checkpoint"),
                              ("prior", cmd_prior, "fit the non-reading prior control")):  # fmt: skip
        q = psub.add_parser(stage, help=text, epilog=_EPILOG, formatter_class=raw)
        q.add_argument("--data", action="append", required=True, help="training JSONL (repeatable)")
        q.add_argument("--curation", action="append", required=True,
                       help="its `curate boxes --grounder ocr` folder (repeatable, same order)")  # fmt: skip
        q.add_argument("--out", required=True, help="output folder")
        q.add_argument("--reads", default="runs/reads", help="cache of reader passes. Default: %(default)s")
        q.add_argument(
            "--view-budget",
            default="384",
            help="perception text view budget (the ocr target's global view). Default: %(default)s",
        )
        q.add_argument(
            "--detect-budget",
            default=None,
            help="two-pass perception: line boxes from the detector alone at this budget, text from "
            "the --view-budget pass (e.g. 1024). Default: one pass",
        )
        q.add_argument(
            "--legible",
            type=float,
            default=0.5,
            help="two-pass: recognise unread lines on pages whose text pass reads fewer than this "
            "share of the detected lines. Default: %(default)s",
        )
        q.add_argument(
            "--max-recognise",
            type=int,
            default=96,
            help="two-pass: most lines recognised per page. Default: %(default)s",
        )
        q.add_argument(
            "--features",
            type=int,
            choices=(1, 2, 3),
            default=2,
            help="region feature version (2: part windows + legibility at the target; 3: as 2, question words "
            "also match through typos and inflections). Default: %(default)s",
        )
        q.add_argument("--part-px", type=int, default=None,
                       help="offer windows of lines wider than this many original pixels (e.g. 512). "
                       "Default: none")  # fmt: skip
        q.add_argument("--seed", type=int, default=0, help="random seed. Default: %(default)s")
        if stage == "seed":
            q.add_argument("--epochs", type=positive_int, default=60, help="Default: %(default)s")
            q.add_argument("--lr", type=positive_float, default=3e-3, help="Default: %(default)s")
            q.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay. Default: %(default)s")
            q.add_argument(
                "--k", type=positive_int, default=2, help="boxes per question at inference. Default: %(default)s"
            )
            q.add_argument(
                "--lexical",
                action="store_true",
                help="a direct path from the question-text overlaps to the score (ScorerConfig.lexical)",
            )
            q.add_argument(
                "--window-line-px",
                type=float,
                default=None,
                help="widen each crop into its legibility window: the largest box around the chosen region whose "
                "text the target still sees this many pixels high (e.g. 17). Default: crop the region itself",
            )
            q.add_argument(
                "--window-below",
                type=float,
                default=None,
                help="with --window-line-px: widen only when the scorer's probability mass on its k most "
                "probable candidates is below this ('zoom out when unsure'). Default: always",
            )
            q.add_argument(
                "--window-max-area",
                type=float,
                default=1.0,
                help="with --window-line-px: largest window, as a fraction of the page. Default: 1",
            )
            q.add_argument(
                "--window-fit",
                choices=("shift", "clip", "centre"),
                default="centre",
                help="with --window-line-px: at the page's edge, cut the window there (clip), cut it evenly on both "
                "sides so its centre stays the region's centre (centre; the shipped policy's), or slide it back "
                "inside the page (shift; what checkpoints written before this option do). Default: %(default)s",
            )
            q.add_argument(
                "--window-tiles",
                type=positive_int,
                default=1,
                help="with --window-line-px: cut a window wider than the target can read (a wide table row) into up "
                "to this many legible tiles, each its own crop (more crops per request: worth it for a fixed-budget "
                "reader such as the ocr target, 3 on held-out train documents); 1 = never. Default: %(default)s",
            )
            q.add_argument("--repeat", type=int, action="append", default=None,
                           help="times each question of the matching --data enters the loss (repeatable, one per "
                           "--data; e.g. to keep 77 document questions from drowning in 763 receipts). "
                           "Default: 1 each")  # fmt: skip
        if stage == "grpo":
            q.add_argument("--init", required=True, help="seed checkpoint folder")
            q.add_argument(
                "--reward",
                default="likelihood",
                type=_reward_spec,
                help="the target's reward: likelihood, accuracy or answer_probability, or a weighted sum "
                "'accuracy=1,answer_probability=0.5' (the probability term still ranks crops when the global view "
                "already answers and every crop's accuracy is 1; on documents val every mix tried read fewer "
                "questions than accuracy alone, which the shipped scorer uses). Default: %(default)s",
            )
            q.add_argument(
                "--gate-by-accuracy",
                action="store_true",
                help="with a mix that has accuracy: the other terms count only for crops the target answers "
                "right (r = acc + acc * w * answer_probability), so a group where no crop is right keeps zero "
                "advantage instead of being ranked by the answer's probability in crops that do not show it",
            )
            q.add_argument("--target", default="ocr", help="reward target spec. Default: %(default)s")
            q.add_argument("--budget", default="384", help="reward target budget. Default: %(default)s")
            q.add_argument("--steps", type=positive_int, default=30, help="Default: %(default)s")
            q.add_argument("--prompts", type=positive_int, default=16, help="questions per step. Default: %(default)s")
            q.add_argument(
                "--group", type=group_size, default=6, help="actions per question (G). Default: %(default)s"
            )
            q.add_argument("--beta", type=non_negative_float, default=0.01, help="KL weight. Default: %(default)s")
            q.add_argument("--lr", type=positive_float, default=1e-3, help="Default: %(default)s")
            q.add_argument("--temperature", type=positive_float, default=2.0,
                           help="sampling temperature (a confident seed samples one candidate G times at 1.0, "
                           "so every advantage is 0). Default: %(default)s")  # fmt: skip
            q.add_argument("--save-every", type=positive_int, default=1, help="checkpoint period in steps. Default: 1")
            q.add_argument(
                "--k",
                type=positive_int,
                default=None,
                help="boxes per question at inference, written to the checkpoint. Default: the seed's",
            )
            q.add_argument(
                "--window-line-px",
                type=float,
                default=None,
                help="windows in the loop: every sampled region is rewarded as its legibility window "
                "(text this many px high at --budget), and the checkpoint always cuts windows. "
                "Default: the seed's setting (its tight crops are rewarded unless it always widens)",
            )
            q.add_argument(
                "--window-max-area",
                type=float,
                default=1.0,
                help="with --window-line-px: largest window, fraction of the page. Default: 1",
            )
            q.add_argument("--window-fit", choices=("shift", "clip", "centre"), default="centre",
                           help="with --window-line-px: at the page's edge, cut the window there (clip), evenly "
                           "around the region (centre) or slide it inside (shift). Default: %(default)s")  # fmt: skip
            q.add_argument("--window-tiles", type=positive_int, default=1,
                           help="with --window-line-px: cut a window wider than the target can read into up to this "
                           "many legible tiles at inference (the reward reads the whole window). Default: "
                           "%(default)s")  # fmt: skip
            q.add_argument("--replay-reads", action="store_true",
                           help="accuracy reward with the ocr target: take its global-view reads from --reads "
                           "(same reader, same view) instead of reading every image again")  # fmt: skip
        if stage == "prior":
            q.add_argument(
                "--k", type=positive_int, default=20, help="nearest training questions. Default: %(default)s"
            )
            q.add_argument("--lo", type=float, default=0.2, help="quantile of left/top edges. Default: %(default)s")
            q.add_argument(
                "--hi", type=float, default=0.8, help="quantile of right/bottom edges. Default: %(default)s"
            )
        q.set_defaults(func=_validated(func))


def _reward_spec(spec: str) -> str:
    """argparse type of ``--reward``: checked by :func:`~zoomvlm.cropvlm.proposal_grpo.parse_reward_mix`."""
    from zoomvlm.cropvlm.proposal_grpo import parse_reward_mix

    try:
        parse_reward_mix(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return spec


def _validated(func):
    def run(args) -> int:
        import torch

        # The scorer's ops are tiny: one thread avoids OpenMP spin-waiting on a shared, oversubscribed CPU.
        torch.set_num_threads(1)
        if len(args.data) != len(args.curation):
            raise ValueError(f"--data given {len(args.data)} times but --curation {len(args.curation)} times")
        for path in [*args.data, *args.curation]:
            if not Path(path).exists():
                raise ValueError(f"{path} does not exist")
        return func(args)

    return run
