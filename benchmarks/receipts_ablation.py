"""CropVLM's ablation on our testbed: none, center, SFT, SFT+GRPO(accuracy), SFT+GRPO(likelihood), oracle, full.

All rows are measured in one run on the receipts VAL split, OCR target at a 384 px budget, each policy with a
fresh target (so no row profits from another's memoised reads). Columns: read accuracy (``contains``),
evidence hit rate (share of proposed crops covering >= 90% of a human evidence box; human boxes are used
here for EVALUATION only), mean RTR, policy and target ms/question, format-failure rate, and the share of the
none -> oracle accuracy gap each row closes. Runs are resumable: results go to ``--out/<row>/``.

    zoomvlm curate boxes --data ../shared/data/receipts/train.jsonl --grounder ocr --out runs/curate_train
    zoomvlm train sft  --config tiny_cpu_sft
    zoomvlm train grpo --config tiny_cpu_grpo_accuracy          # 20 steps; copy to runs/tiny_grpo_accuracy_20step
    zoomvlm train grpo --config tiny_cpu_grpo                   # 20 steps; copy to runs/tiny_grpo_20step
    zoomvlm train grpo --config tiny_cpu_grpo_accuracy --set trainer.max_steps=60   # resumes to 60 steps
    zoomvlm train grpo --config tiny_cpu_grpo --set trainer.max_steps=60
    python benchmarks/receipts_ablation.py --out runs/ablation
"""

from __future__ import annotations

import argparse
from pathlib import Path

from zoomvlm.cli.argtypes import positive_int
from zoomvlm.core.geometry import Budget
from zoomvlm.data.samples import load_jsonl
from zoomvlm.evaluation.run import run_eval
from zoomvlm.policies import load_policy
from zoomvlm.targets.ocr import OCRTarget

ROWS = [
    ("none", "none"),
    ("center", "center"),
    ("SFT", "vlm:runs/tiny_sft/final"),
    ("SFT+GRPO(accuracy) 20 steps", "vlm:runs/tiny_grpo_accuracy_20step/final"),
    ("SFT+GRPO(likelihood) 20 steps", "vlm:runs/tiny_grpo_20step/final"),
    ("SFT+GRPO(accuracy) 60 steps", "vlm:runs/tiny_grpo_accuracy/final"),
    ("SFT+GRPO(likelihood) 60 steps", "vlm:runs/tiny_grpo/final"),
    ("SFT+GRPO(answer_probability) 20 of 60 steps", "vlm:runs/tiny_grpo_answer_probability/checkpoint-20"),
    ("oracle", "oracle"),
    ("full", "full"),
]


def _fmt(v, spec, scale=1.0):
    return "-" if v is None else format(v * scale, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/receipts/val.jsonl")
    parser.add_argument("--budget", default="384")
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--limit", type=positive_int, default=None, help="first N questions only")
    parser.add_argument("--rows", default=None, help="comma-separated row names (default: all)")
    args = parser.parse_args()

    wanted = args.rows.split(",") if args.rows else [name for name, _ in ROWS]
    unknown = [w for w in wanted if w not in dict(ROWS)]
    if unknown:  # a typo printed an empty table
        parser.error(f"unknown --rows {unknown}; choose from {[name for name, _ in ROWS]}")
    samples = load_jsonl(args.data)[: args.limit]
    results = {}
    for name, spec in ROWS:
        if name not in wanted:
            continue
        if spec.startswith("vlm:") and not Path(spec[4:]).is_dir():
            print(f"skipping {name}: {spec[4:]} not found (train it first, see the docstring)")
            continue
        target = OCRTarget(Budget.parse(args.budget))
        out = Path(args.out) / name.replace("+", "_").replace("(", "_").replace(")", "").replace(" ", "_")
        config = {"data": str(Path(args.data).resolve()), "target": target.name, "policy": spec, "metric": "contains",
                  "limit": args.limit}  # fmt: skip
        results[name] = run_eval(samples, load_policy(spec), target, out, metric="contains", config=config)

    lo = results.get("none", {}).get("accuracy")
    hi = results.get("oracle", {}).get("accuracy")
    print(f"\nreceipts val, {len(samples)} questions, OCR target at {args.budget} px\n")
    header = "| policy | accuracy | evidence hit | RTR | policy ms/q | target ms/q | format failures | gap closed |"
    print(header)
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, s in results.items():
        gap = (s["accuracy"] - lo) / (hi - lo) if lo is not None and hi is not None and hi > lo else None
        print(f"| {name} | {_fmt(s['accuracy'], '.1%')} | {_fmt(s['evidence_hit_rate'], '.1%')} | "
              f"{_fmt(s['rtr'], '.3f')} | {_fmt(s['policy_s'], '.0f', 1000)} | {_fmt(s['target_s'], '.0f', 1000)} | "
              f"{_fmt(s['format_failure_rate'], '.1%')} | {_fmt(gap, '.0%')} |")  # fmt: skip


if __name__ == "__main__":
    main()
