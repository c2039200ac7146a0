"""AwaRes's Table 1 on our testbed: accuracy against RTR for crop-set policies on receipts val, OCR target.

High-resolution view: 768 px (OCR reads 96.6 % of val questions there, against 51.4 % at the 384 px low view).
RTR is counted against that 768 px view (``rtr_reference``): the low view alone is 0.25, a quadrant adds 0.25.
Rows, all measured in one run with a fresh target each: low-res only, high-res only, always-all-crops
(low view + the whole image at high resolution), oracle subset (the crops whose IoU with the HUMAN evidence
box passes the threshold; evaluation only, the upper bound of the crop-set interface), the SFT crop-set
policy, and SFT + GRPO at three values of lambda (the area cost). Columns: accuracy (``contains``), RTR,
fraction of no-crop decisions, mean crops per request, format failures, policy and target ms/question.
A last row, "oracle decision + subset (derived)", is computed per question from the low-res and oracle rows
(low view when it was right, else the oracle subset): the ceiling of the crop-set interface on this testbed.
Learned rows whose checkpoint is missing are skipped with a message. Results in ``--out/<row>/`` (resumable);
``--out/report`` gets the accuracy-vs-RTR plot with its Pareto front (``zoomvlm report``).

    zoomvlm curate awares --data ../shared/data/receipts/train.jsonl --seeds runs/curate_train \\
        --out runs/curate_awares_train
    zoomvlm train sft  --config tiny_cpu_crop_set_sft
    zoomvlm train grpo --config tiny_cpu_crop_set_grpo --set awares.lam=0.1 \
        --set trainer.output_dir=runs/tiny_crop_set_grpo_lam0.1       (same for lam 0.3 and 1.0)
    python benchmarks/receipts_awares.py --out runs/awares_table
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from zoomvlm.awares.policies import CropSetPolicy, FixedCropSet, OracleCropSet
from zoomvlm.core.geometry import Budget
from zoomvlm.data.samples import load_jsonl
from zoomvlm.evaluation.run import read_run, run_eval
from zoomvlm.policies.baselines import NoZoom
from zoomvlm.targets.ocr import OCRTarget

LAMBDAS = ("0.1", "0.3", "1.0")


def rows(high: Budget) -> list[tuple[str, object]]:
    """(row name, policy or a checkpoint folder for a learned crop-set policy)."""
    return [
        ("low-res only", FixedCropSet([], high, name="low-res only")),
        ("high-res only", NoZoom()),  # the target's own budget is the high view
        ("always-all-crops", FixedCropSet(["all"], high, name="always-all-crops")),
        ("oracle subset", OracleCropSet(high)),
        ("SFT", "runs/tiny_crop_set_sft/final"),
        *[(f"SFT+GRPO lambda={lam}", f"runs/tiny_crop_set_grpo_lam{lam}/final") for lam in LAMBDAS],
    ]


def _fmt(v, spec, scale=1.0):
    return "-" if v is None else format(v * scale, spec)


def decisions(out: Path) -> tuple[float | None, float | None]:
    """(fraction of no-crop decisions, mean crops per request that asked for crops) from a run's records."""
    records = list(read_run(out))
    if not records:
        return None, None
    asked = [len(r["boxes"]) for r in records if r["boxes"]]
    return 1 - len(asked) / len(records), (sum(asked) / len(asked) if asked else 0.0)


def oracle_decision(low: Path, oracle: Path) -> dict | None:
    """The crop-set interface's ceiling, derived per question from two measured rows (EVALUATION ONLY).

    Answer from the low view when the low-res row got it right (what the curation judge labels LR), else
    take the oracle subset's answer and cost: accuracy = mean(max(low, oracle)), RTR = mean of the chosen
    row's RTR. Needs gold answers and human boxes, so it bounds what any learned decision can reach.
    """
    lows = {r["id"]: r for r in read_run(low)}
    oracles = {r["id"]: r for r in read_run(oracle)}
    ids = sorted(lows.keys() & oracles.keys())
    if not ids:
        return None
    chosen = [lows[i] if lows[i]["score"] >= 0.5 else oracles[i] for i in ids]
    return {
        "n": len(ids),
        "accuracy": sum(max(lows[i]["score"], oracles[i]["score"]) for i in ids) / len(ids),
        "rtr": sum(r["rtr"] for r in chosen) / len(ids),
        "no_crop": sum(not r["boxes"] for r in chosen) / len(ids),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/receipts/val.jsonl")
    parser.add_argument("--high", default="side:768", help="high-resolution budget (RTR reference)")
    parser.add_argument("--out", default="runs/awares_table")
    parser.add_argument("--limit", type=int, default=None, help="first N questions only")
    parser.add_argument("--rows", default=None, help="comma-separated row names (default: all)")
    args = parser.parse_args()

    high = Budget.parse(args.high)
    samples = load_jsonl(args.data)[: args.limit]
    wanted = args.rows.split(",") if args.rows else None
    results, outs = {}, []
    for name, policy in rows(high):
        if wanted and name not in wanted:
            continue
        if isinstance(policy, str):
            if not Path(policy).is_dir():
                print(f"skipping {name}: {policy} not found (train it first, see the docstring)")
                continue
            policy = CropSetPolicy(policy, high=high, name=name)
        target = OCRTarget(high)
        out = Path(args.out) / name.replace(" ", "_").replace("=", "")
        config = {"data": str(Path(args.data).resolve()), "target": target.name, "policy": policy.name,
                  "metric": "contains", "limit": args.limit, "rtr_reference": str(high)}  # fmt: skip
        results[name] = run_eval(samples, policy, target, out, metric="contains", config=config, rtr_reference=high)
        outs.append(out)

    print(
        f"\nreceipts val, {len(samples)} questions, OCR target, high view {high}, low view = high with sides halved\n"
    )
    print("| policy | accuracy | RTR | no-crop decisions | crops per request | format failures | policy ms/q | "
          "target ms/q |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for (name, s), out in zip(results.items(), outs, strict=True):
        no_crop, per_request = decisions(out)
        if name == "high-res only":
            no_crop, per_request = None, None  # no crop-set decision: the whole image at high resolution
        print(f"| {name} | {_fmt(s['accuracy'], '.1%')} | {_fmt(s['rtr'], '.3f')} | {_fmt(no_crop, '.1%')} | "
              f"{_fmt(per_request, '.2f')} | {_fmt(s['format_failure_rate'], '.1%')} | "
              f"{_fmt(s['policy_s'], '.0f', 1000)} | {_fmt(s['target_s'], '.0f', 1000)} |")  # fmt: skip
    by_name = dict(zip(results, outs, strict=True))
    if "low-res only" in by_name and "oracle subset" in by_name:
        d = oracle_decision(by_name["low-res only"], by_name["oracle subset"])
        if d is not None:
            results["oracle decision + subset (derived)"] = d
            print(f"| oracle decision + subset (derived, {d['n']} q) | {d['accuracy']:.1%} | {d['rtr']:.3f} | "
                  f"{d['no_crop']:.1%} | - | - | - | - |")  # fmt: skip
    if outs:
        from zoomvlm.evaluation.report import write_report

        paths = write_report([str(o) for o in outs], Path(args.out) / "report")
        print(f"\nplot and report: {', '.join(str(p) for p in paths.values())}")
    (Path(args.out) / "table.json").write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
