"""``zoomvlm curate boxes`` and ``zoomvlm train sft|grpo``: the training half of the command line."""

from __future__ import annotations

import argparse
import sys

from zoomvlm.cli.argtypes import positive_int, unit_interval

_CURATE_EPILOG = """\
grounders (--grounder):
  ocr   the OCR reader finds the line(s) holding the answer; their union (offline, CPU)
  vlm   a grounding VLM answers CropVLM's bbox_2d prompt (default Qwen/Qwen2.5-VL-7B-Instruct; --model)
Human evidence boxes in the data are never read. Outputs in --out: raw.jsonl (resumable), seeds.jsonl,
sft.jsonl (TRL prompt-completion conversations), curation.json (failure count, percentile thresholds).
"""

_TRAIN_EPILOG = """\
recipes (--config): a YAML path or a bundled name:
  tiny_cpu_sft, tiny_cpu_grpo (likelihood reward), tiny_cpu_grpo_accuracy   cropper, this machine, no GPU
  smolvlm256m_lora_sft, smolvlm256m_lora_grpo                               SmolVLM-256M + LoRA (GPU)
  smolvlm256m_lora_grpo_vllm          the same on 4 GPUs with vLLM rollouts and a shared openai: reward target
  tiny_cpu_crop_set_sft, tiny_cpu_crop_set_grpo          AwaRes external crop-set policy, OCR target, CPU
  qwen25vl7b_awares_sft (awares-sft), qwen25vl7b_awares_grpo (awares-grpo)  AwaRes self-zoom (GPUs)
override any key: --set trainer.max_steps=10 --set data.limit=32 (an unknown key is an error naming it)
sections: model, data, target, awares, rewards {name: weight}, trainer (TRL's SFTConfig/GRPOConfig fields)
A run resumes from the newest checkpoint in its output_dir; the result lands in OUTPUT_DIR/final (model,
recipe, run metrics, model card README.md), usable as --policy vlm:OUTPUT_DIR/final; publish it with
`zoomvlm train push OUTPUT_DIR REPO_ID`. Several processes: accelerate launch --multi_gpu --num_processes N
"$(which zoomvlm)" train ... (GPUs: --config_file configs/accelerate/*.yaml; no GPU: CPU DDP over gloo).
"""


def cmd_curate_boxes(args) -> int:
    from zoomvlm.cropvlm.curation import OCRGrounder, VLMGrounder, curate_boxes
    from zoomvlm.data.samples import load_jsonl

    samples = load_jsonl(args.data)
    if args.limit is not None:
        samples = samples[: args.limit]
    if args.grounder == "ocr":
        grounder = OCRGrounder(budget=args.ocr_budget)
    else:
        grounder = VLMGrounder(args.model)
    info = curate_boxes(samples, grounder, args.out, progress=not args.no_progress)
    print(f"{info['n']} seed boxes from the {info['grounder']} grounder; {info['n_failed']} not found "
          f"({100 * info['failure_rate']:.1f}%, whole image used)")  # fmt: skip
    print("area thresholds p20..p80: " + ", ".join(f"{t:.4f}" for t in info["thresholds"]))
    print(f"wrote {args.out}/sft.jsonl, seeds.jsonl, curation.json", file=sys.stderr)
    return 0


_AWARES_EPILOG = """\
The target answers from the low-resolution view (--high with sides halved) and from the --high view; the
judge labels each sample LR (low resolution suffices, or ties) or HR; HR samples get the evidence boxed by
the grounder and mapped to the crop subset with IoU >= --iou-threshold (fallback: the smallest containing
crop). Human evidence boxes are never read. Outputs in --out: raw.jsonl (resumable), trajectories.jsonl
(self-zoom SFT/GRPO), actions.jsonl (external crop-set policy SFT: NO_CROPS / GET_CROPS), curation.json.
judges (--judge):
  metric[:NAME]   the dataset metric: LR iff score(low) >= 0.5 or >= score(high). Default: metric:contains
  llm:MODEL       an OpenAI-compatible LLM judge ($OPENAI_BASE_URL, $OPENAI_API_KEY); its prompt:
                  JUDGE_PROMPT in zoomvlm/awares/curation.py
"""


def cmd_curate_awares(args) -> int:
    from zoomvlm.awares.curation import SeedReplayGrounder, curate_awares, load_judge
    from zoomvlm.core.geometry import Budget
    from zoomvlm.cropvlm.curation import OCRGrounder, VLMGrounder
    from zoomvlm.data.samples import load_jsonl
    from zoomvlm.targets import load_target

    samples = load_jsonl(args.data)
    if args.limit is not None:
        samples = samples[: args.limit]
    grounder = OCRGrounder(budget=args.ocr_budget) if args.grounder == "ocr" else VLMGrounder(args.model)
    if args.seeds:
        grounder = SeedReplayGrounder(args.seeds, fallback=grounder)
    judge = load_judge(args.judge)
    high = Budget.parse(args.high)
    target = load_target(args.target, budget=high)
    info = curate_awares(samples, target, high, judge, grounder, args.out, iou_threshold=args.iou_threshold,
                         progress=not args.no_progress)  # fmt: skip
    print(
        f"{info['n']} samples: {info['n_lr']} LR, {info['n_hr']} HR; target accuracy low "
        f"{100 * info['low_accuracy']:.1f}% vs high {100 * info['high_accuracy']:.1f}% ({info['judge']} judge)"
    )
    print(f"HR crops: {info['crop_histogram']}; grounder failures {info['grounder_failures']}")  # fmt: skip
    print(f"wrote {args.out}/trajectories.jsonl, actions.jsonl, curation.json", file=sys.stderr)
    return 0


def cmd_train(args) -> int:
    from zoomvlm.train.recipe import load_recipe

    recipe = load_recipe(args.config, args.set or [], kind=args.stage.replace("-", "_"), output_dir=args.output_dir)
    if args.stage == "sft":
        from zoomvlm.train.sft import run_sft as run
    elif args.stage == "grpo":
        from zoomvlm.train.grpo import run_grpo as run
    elif args.stage == "awares-sft":
        from zoomvlm.awares.weighted_sft import run_weighted_sft as run
    else:
        from zoomvlm.awares.grpo import run_awares_grpo as run
    final = run(recipe)
    if args.stage.startswith("awares"):
        # our recipes train our prompt and same-scale views: --policy self-zoom:zoomvlm, at the trained high view
        high = f"@{recipe.data.high_budget}" if recipe.data.high is not None else ""
        print(f"trained self-zoom model saved to {final}; evaluate it with --target hf:{final} "
              f"--policy self-zoom:zoomvlm{high}"
              + ("" if high else " (add @HIGH: it trained on each trajectory's own high view)"))  # fmt: skip
    elif recipe.data.policy == "crop_set":
        print(f"trained crop-set policy saved to {final}; use it with --policy crop-set:{final}")
    else:
        print(f"trained cropper saved to {final}; use it with --policy vlm:{final}")
    return 0


def cmd_push(args) -> int:
    from zoomvlm.train.model_card import push_final

    info = push_final(args.output_dir, args.repo_id, private=args.private, commit_message=args.message)
    print(f"pushed {args.output_dir} to {args.repo_id}: {getattr(info, 'commit_url', info)}")
    return 0


def add_commands(sub) -> None:
    """Register ``curate`` and ``train`` on the top-level subparsers ``sub``."""
    raw = argparse.RawDescriptionHelpFormatter
    curate = sub.add_parser("curate", help="build training data without human boxes (seed boxes for SFT)")
    csub = curate.add_subparsers(dest="what", required=True)
    p = csub.add_parser("boxes", help="seed boxes from a grounding model -> percentile expansion -> SFT file",
                        epilog=_CURATE_EPILOG, formatter_class=raw)  # fmt: skip
    p.add_argument("--data", required=True, help="JSONL dataset with answers (receipts format)")
    p.add_argument(
        "--grounder", choices=("ocr", "vlm"), default="ocr", help="who proposes boxes. Default: %(default)s"
    )
    p.add_argument("--model", default="Qwen/Qwen2.5-VL-7B-Instruct", help="grounding VLM for --grounder vlm")
    p.add_argument("--ocr-budget", default="side:2048",
                   help="reading resolution of --grounder ocr (native = no limit). Default: %(default)s")  # fmt: skip
    p.add_argument("--limit", type=positive_int, default=None, help="first N samples only")
    p.add_argument("--out", required=True, help="output folder (rerun to resume)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_curate_boxes)

    p = csub.add_parser("awares", help="AwaRes labels: LR/HR by a judge, HR evidence -> crop subset; trajectories",
                        epilog=_AWARES_EPILOG, formatter_class=raw)  # fmt: skip
    p.add_argument("--data", required=True, help="JSONL dataset with answers (receipts format)")
    p.add_argument("--target", default="ocr", help="the model whose low/high answers are judged. Default: ocr")
    p.add_argument("--high", default="side:768", help="high-resolution budget. Default: %(default)s")
    p.add_argument("--judge", default="metric:contains", help="metric[:NAME] or llm:MODEL. Default: %(default)s")
    p.add_argument("--grounder", choices=("ocr", "vlm"), default="ocr", help="boxes HR evidence. Default: ocr")
    p.add_argument("--model", default="Qwen/Qwen2.5-VL-7B-Instruct", help="grounding VLM for --grounder vlm")
    p.add_argument("--ocr-budget", default="side:2048",
                   help="reading resolution of --grounder ocr. Default: %(default)s")  # fmt: skip
    p.add_argument("--seeds", default=None, metavar="DIR",
                   help="replay seed boxes from a `zoomvlm curate boxes` output folder (same samples)")  # fmt: skip
    p.add_argument("--iou-threshold", type=unit_interval, default=0.2,
                   help="box -> crop subset IoU threshold. Default: %(default)s (README: measured)")  # fmt: skip
    p.add_argument("--limit", type=positive_int, default=None, help="first N samples only")
    p.add_argument("--out", required=True, help="output folder (rerun to resume)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_curate_awares)

    train = sub.add_parser("train", help="train a cropper: sft on seed boxes, then grpo on the target's reward")
    tsub = train.add_subparsers(dest="stage", required=True)
    for stage, text in (("sft", "supervised fine-tuning on seed boxes or crop-set actions (TRL SFTTrainer)"),
                        ("grpo", "GRPO on the reward target's accuracy/likelihood or AwaRes reward (GRPOTrainer)"),
                        ("awares-sft", "AwaRes self-zoom cold-start SFT on trajectories, tool-call turn x5"),
                        ("awares-grpo", "AwaRes self-zoom multi-turn GRPO, R = R_ans - C_tool")):  # fmt: skip
        p = tsub.add_parser(stage, help=text, epilog=_TRAIN_EPILOG, formatter_class=raw)
        p.add_argument("--config", required=True, help="recipe YAML path or bundled recipe name")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key (repeatable)")
        p.add_argument("--output-dir", default=None, help="overrides trainer.output_dir")
        p.set_defaults(func=cmd_train)
    p = tsub.add_parser("push", help="upload a finished run's final/ (model, recipe, model card) to the hub")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="the run's output_dir (or its final/ folder)")
    p.add_argument("repo_id", metavar="REPO_ID", help="hub repository, user/name (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--message", default=None, help="commit message (default: names the recipe)")
    p.set_defaults(func=cmd_push)

    from zoomvlm.awares.reader_train import add_parser as add_crop_set_reader
    from zoomvlm.cropvlm.proposal_train import add_parser as add_proposals

    add_proposals(tsub)
    add_crop_set_reader(tsub)
