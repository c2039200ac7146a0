"""Policies that look: the reader-proposal cropper against the baselines, on receipts val and documents val.

One invocation measures every row of one table per dataset (OCR target at 384 px, ``contains``) and prints
them; results go to ``--out/<dataset>/<row>/`` and an interrupted run resumes (every row is a resumable
``run_eval``). Each row gets a FRESH target, so no row profits from another's memoised reads. For the
``proposals`` rows the policy reads the target's own global view through the target
(:meth:`~zoomvlm.policies.perception.Perceiver.bind`): that first pass is charged to the TARGET column
(``none`` pays the same pass), the policy column holds only what the policy adds (features, MiniLM, scorer);
``total`` = policy + target per question, to compare with ``none``.

Columns: accuracy; evidence hit (a crop covers >= 90 % of a human box; evaluation only); RTR; seconds per
question (policy, target, total); policy / target seconds; gap closed = (acc - none) / (oracle - none); y-centre
corr = Pearson correlation of the first box's y-centre with the human box's, within each field, weighted by
questions (0 = image-blind, 1 = follows the answer). ``oracle`` rows read human boxes (evaluation only).

    python benchmarks/proposals_ablation.py --out runs/proposals_ablation \\
        --row "seed=proposals:runs/proposals_seed" \\
        --row "GRPO accuracy=proposals:runs/proposals_grpo_accuracy/final" \\
        --row "GRPO likelihood=proposals:runs/proposals_grpo_likelihood/final"
"""

from __future__ import annotations

import argparse
from pathlib import Path

from receipts_cropper_ceiling import y_centre_correlation, y_centre_correlations  # one definition

from zoomvlm.cli.argtypes import positive_int
from zoomvlm.core.geometry import Budget
from zoomvlm.data import load_jsonl
from zoomvlm.evaluation.run import run_eval
from zoomvlm.policies import load_policy
from zoomvlm.policies.registry import check_policy_spec
from zoomvlm.targets.ocr import OCRTarget

DATASETS = {
    "receipts": "../shared/data/receipts/val.jsonl",
    "documents": "../shared/data/documents/val.jsonl",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/proposals_ablation")
    parser.add_argument("--datasets", default="receipts,documents")
    parser.add_argument("--row", action="append", default=[], metavar="NAME=SPEC",
                        help="extra policy rows (repeatable), e.g. 'seed=proposals:runs/proposals_seed'")  # fmt: skip
    parser.add_argument("--baselines", default="none,center,vlm,prior,proposals,oracle",
                        help="built-in policy rows, in order (oracle last)")  # fmt: skip
    parser.add_argument("--budget", default="384")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="first N questions only (a prefix of the same resumable runs)")  # fmt: skip
    parser.add_argument("--shared", default="../shared", help="folder holding data/ (the repo's sibling)")
    args = parser.parse_args()

    extra = [r.split("=", 1) for r in args.row]
    if any(len(e) != 2 or not all(e) for e in extra):
        parser.error(f"--row takes NAME=SPEC, got {args.row}")
    unknown = [d for d in args.datasets.split(",") if d not in DATASETS]
    if unknown:
        parser.error(f"unknown --datasets {unknown}; choose from {list(DATASETS)}")
    for spec in [b for b in args.baselines.split(",") if b] + [spec for _, spec in extra]:
        try:  # a bad spec fails now, not after the rows before it ran
            check_policy_spec(spec)
        except ValueError as e:
            parser.error(str(e))
    for name in args.datasets.split(","):
        data = Path(args.shared) / DATASETS[name].removeprefix("../shared/")
        samples = load_jsonl(data)[: args.limit]
        specs = [(b, b) for b in args.baselines.split(",") if b and b != "oracle"] + extra
        specs += [("oracle", "oracle")] if "oracle" in args.baselines.split(",") else []
        results, dirs = {}, {}
        for row, spec in specs:
            policy = load_policy(spec)
            target = OCRTarget(Budget.parse(args.budget))  # fresh per row: no memoised reads from other rows
            out = dirs[row] = Path(args.out) / name / "".join(c if c.isalnum() or c in ".-" else "_" for c in row)
            config = {"data": str(data.resolve()), "target": target.name, "policy": spec,
                      "metric": "contains", "limit": None}  # fmt: skip
            # ("limit" stays None: --limit only selects the first N questions of the same resumable run, so
            # rows measured on more questions are summarised on the same N as the others.)
            results[row] = run_eval(samples, policy, target, out, metric="contains", config=config)
        lo = results["none"]["accuracy"] if "none" in results else float("nan")
        hi = results["oracle"]["accuracy"] if "oracle" in results else float("nan")
        print(f"\n{name} val, {len(samples)} questions, OCR target at {args.budget} px, contains\n")
        print("| policy | accuracy | evidence hit | RTR | policy s/q | target s/q | total s/q | policy/target "
              "| gap closed | y-centre corr |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for row, s in results.items():
            gap = (s["accuracy"] - lo) / (hi - lo) if hi > lo else float("nan")
            ps, ts = s["policy_s"], s["target_s"]
            corr = y_centre_correlation(dirs[row], samples)
            hit = s.get("evidence_hit_rate")
            print(f"| {row} | {s['accuracy']:.1%} | {'-' if hit is None else f'{hit:.1%}'} | {s['rtr']:.3f} "
                  f"| {ps:.3f} | {ts:.3f} | {ps + ts:.3f} | {ps / ts if ts else float('nan'):.2f} | {gap:.0%} "
                  f"| {'-' if corr is None else f'{corr:.2f}'} |")  # fmt: skip
        fields = sorted({f for s in results.values() for f in s.get("by_field", {})})
        if fields:
            print("\nby field (accuracy %): " + ", ".join(fields))
            for row, s in results.items():
                by = s.get("by_field", {})
                print(f"- {row}: " + " / ".join(f"{100 * by[f]:.1f}" if f in by else "-" for f in fields))
            print("\ny-centre corr by field: " + ", ".join(fields))
            for row in results:
                by = y_centre_correlations(dirs[row], samples)
                print(f"- {row}: " + " / ".join(f"{by[f][0]:.2f}" if f in by else "-" for f in fields))


if __name__ == "__main__":
    main()
