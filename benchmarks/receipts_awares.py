"""AwaRes's Table 1 on our testbed: accuracy against RTR for crop-set policies on receipts val, OCR target.

High-resolution view: 768 px (OCR reads 96.6 % of val questions there, against 51.4 % at the 384 px low view).
RTR is counted against that 768 px view (``rtr_reference``): the low view alone is 0.25, a quadrant adds 0.25.
Rows, all measured in one run with a fresh target each: low-res only, high-res only, always-all-crops
(low view + the whole image at high resolution), oracle subset (the crops whose IoU with the HUMAN evidence
box passes the threshold; evaluation only, the upper bound of the crop-set interface), the SFT crop-set
policy, and SFT + GRPO at three values of lambda (the area cost); then the reader-perception policy
``crop-set-reader`` (:mod:`zoomvlm.awares.reader_policy`: the reader's pass + the proposals scorer find the answer's
region, a small head picks NO_CROPS or the crops covering it): its hand-set initial head and its GRPO checkpoints
(``--reader``, ``--reader-fine``), with AwaRes's crop set and the fine one (eighth-height bands), and the fine set's
oracle (the smallest fine subset covering the human box; evaluation only). Columns: accuracy (``contains``), RTR,
fraction of no-crop decisions, mean crops per request, format failures, policy and target ms/question.
A last row, "oracle decision + subset (derived)", is computed per question from the low-res and oracle rows
(low view when it was right, else the oracle subset): the ceiling of the crop-set interface on this testbed; the
same with the fine oracle gives the fine interface's ceiling. Learned rows whose checkpoint is missing are skipped
with a message. The reader rows' ``ocr`` target has the low view's budget (``--high`` halved) as its own: a
crop-set proposal gives every view its budget, so answers are the same, and a perceiver that reads the low view
(a checkpoint with ``view_budget`` 384 at ``--high side:768``) shares the target's first pass as
``Perceiver.bind`` allows; the shipped proposals scorer reads at 512 px, so its pass is the policy's own cost.
Results in ``--out/<row>/`` (resumable); ``--out/report`` gets the accuracy-vs-RTR plot with its Pareto front
(``zoomvlm report``).

    zoomvlm curate awares --data ../shared/data/receipts/train.jsonl --seeds runs/curate_train \\
        --out runs/curate_awares_train
    zoomvlm train sft  --config tiny_cpu_crop_set_sft
    zoomvlm train grpo --config tiny_cpu_crop_set_grpo --set awares.lam=0.1 \
        --set trainer.output_dir=runs/tiny_crop_set_grpo_lam0.1       (same for lam 0.3 and 1.0)
    zoomvlm train crop-set-reader --data ../shared/data/receipts/train.jsonl --lam 0.3 --crop-set awares \
        --scorer runs/proposals2_seed --steps 12 --prompts 12 --out runs/crop_set_reader_lam0.3
    zoomvlm train crop-set-reader --data ../shared/data/receipts/train.jsonl --lam 0.3 --crop-set fine \
        --scorer runs/proposals2_seed --steps 12 --prompts 12 --out runs/crop_set_reader_fine_lam0.3
    python benchmarks/receipts_awares.py --out runs/awares_table
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from zoomvlm.awares.policies import CropSetPolicy, FixedCropSet, OracleCropSet
from zoomvlm.awares.protocol import covering_crops, crop_set_proposal
from zoomvlm.cli.argtypes import positive_int
from zoomvlm.core.geometry import Box, Budget
from zoomvlm.data.samples import load_jsonl
from zoomvlm.evaluation.run import read_run, run_eval
from zoomvlm.policies.baselines import NoZoom
from zoomvlm.targets.ocr import OCRTarget

LAMBDAS = ("0.1", "0.3", "1.0")


class OracleCover:
    """EVALUATION ONLY: the subset of ``crop_set`` that sends least while covering each human evidence box
    (:func:`~zoomvlm.awares.protocol.covering_crops`), merged: the upper bound of a crop set's interface."""

    def __init__(self, high: Budget, crop_set: str = "fine"):
        self.high, self.crop_set = high, crop_set
        self.name = f"crop-set-oracle-cover:{crop_set}"

    def propose(self, images, questions, evidence: list[list[Box]] | None = None):
        if evidence is None:
            raise ValueError("the oracle needs human evidence boxes (evaluation only)")
        out = []
        for img, boxes in zip(images, evidence, strict=True):
            keys: list[str] = []
            for box in boxes:
                keys += [k for k in covering_crops(box, self.crop_set) if k not in keys]
            out.append(crop_set_proposal(img, keys, self.high))
        return out


def rows(high: Budget, reader: str, reader_fine: str) -> list[tuple[str, object]]:
    """(row name, policy, or ``(kind, checkpoint folder)`` for a learned ``crop-set`` / ``crop-set-reader`` policy).

    The reader rows' policies are built when their row runs (:func:`_reader_policy`), so ``--rows`` without them
    loads nothing of theirs.
    """
    return [
        ("low-res only", FixedCropSet([], high, name="low-res only")),
        ("high-res only", NoZoom()),  # the target's own budget is the high view
        ("always-all-crops", FixedCropSet(["all"], high, name="always-all-crops")),
        ("oracle subset", OracleCropSet(high)),
        ("SFT", ("crop-set", "runs/tiny_crop_set_sft/final")),
        *[(f"SFT+GRPO lambda={lam}", ("crop-set", f"runs/tiny_crop_set_grpo_lam{lam}/final")) for lam in LAMBDAS],
        ("oracle cover fine", OracleCover(high, "fine")),
        ("reader hand-set", ("crop-set-reader", "awares")),
        ("reader hand-set fine", ("crop-set-reader", "fine")),
        ("reader GRPO", ("crop-set-reader", reader)),
        ("reader GRPO fine", ("crop-set-reader", reader_fine)),
    ]


def _reader_policy(arg: str, high: Budget, name: str, encoder, scorer: str | None = None):
    """A ``crop-set-reader`` policy: the hand-set initial head for ``arg`` ``awares`` / ``fine`` (its regions ranked
    by ``scorer``, a proposals checkpoint; ``None`` = the shipped one), else a checkpoint."""
    from zoomvlm.awares.reader_policy import ReaderConfig, ReaderCropSetPolicy

    if arg in ("awares", "fine"):
        config = ReaderConfig(crop_set=arg, high=str(high), scorer=scorer)
        return ReaderCropSetPolicy(config=config, high=high, name=name, encoder=encoder)
    return ReaderCropSetPolicy(arg, high=high, name=name, encoder=encoder)


def _trained_scorer(reader: str) -> str | None:
    """The proposals scorer a ``crop-set-reader`` checkpoint was trained with (``None`` if it does not exist yet):
    the hand-set rows use it, so that they are exactly where the GRPO rows started."""
    config = Path(reader) / "config.json"
    return json.loads(config.read_text()).get("scorer") if config.exists() else None


def _low_budget(high: Budget) -> Budget:
    """The AwaRes low view's budget for images at least ``high`` in size (``high`` halved per side)."""
    return Budget(max_side=max(1, high.max_side // 2)) if high.max_side and not high.max_pixels else high


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
    parser.add_argument("--limit", type=positive_int, default=None, help="first N questions only")
    parser.add_argument("--rows", default=None, help="comma-separated row names (default: all)")
    parser.add_argument("--reader", default="runs/crop_set_reader_lam0.3/final",
                        help="crop-set-reader checkpoint, AwaRes's crop set (row 'reader GRPO')")  # fmt: skip
    parser.add_argument("--reader-fine", default="runs/crop_set_reader_fine_lam0.3/final",
                        help="crop-set-reader checkpoint, fine crop set (row 'reader GRPO fine')")  # fmt: skip
    args = parser.parse_args()

    high = Budget.parse(args.high)
    samples = load_jsonl(args.data)[: args.limit]
    wanted = [r.strip() for r in args.rows.split(",")] if args.rows else None
    known = [name for name, _ in rows(high, args.reader, args.reader_fine)]
    unknown = [r for r in wanted or () if r not in known]
    if unknown:  # a typo used to print an empty table and overwrite table.json with {}
        parser.error(f"unknown row(s) {unknown}; the rows are: {', '.join(known)}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results, outs = {}, []
    encoder = None  # one MiniLM for every reader row
    for name, policy in rows(high, args.reader, args.reader_fine):
        if wanted and name not in wanted:
            continue
        target = OCRTarget(high)
        if isinstance(policy, tuple):
            kind, path = policy
            hand_set = kind == "crop-set-reader" and path in ("awares", "fine")  # no checkpoint needed
            if not hand_set and not Path(path).is_dir():
                print(f"skipping {name}: {path} not found (train it first, see the docstring)")
                continue
            if kind == "crop-set":
                policy = CropSetPolicy(path, high=high, name=name)
            else:
                if encoder is None:
                    from zoomvlm.policies.perception import QuestionEncoder

                    encoder = QuestionEncoder()
                trained = args.reader_fine if path == "fine" else args.reader
                policy = _reader_policy(path, high, name, encoder, scorer=_trained_scorer(trained))
                target = OCRTarget(_low_budget(high))  # same answers; lets a low-view perceiver share the pass
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
    for oracle, label in (("oracle subset", "oracle decision + subset"), ("oracle cover fine", "oracle decision + "
                                                                           "fine cover")):  # fmt: skip
        if "low-res only" in by_name and oracle in by_name:
            d = oracle_decision(by_name["low-res only"], by_name[oracle])
            if d is not None:
                results[f"{label} (derived)"] = d
                print(f"| {label} (derived, {d['n']} q) | {d['accuracy']:.1%} | {d['rtr']:.3f} | "
                      f"{d['no_crop']:.1%} | - | - | - | - |")  # fmt: skip
    if outs:
        from zoomvlm.evaluation.report import write_report

        paths = write_report([str(o) for o in outs], Path(args.out) / "report")
        print(f"\nplot and report: {', '.join(str(p) for p in paths.values())}")
    # merged: a run of some --rows updates their entries and keeps the others'
    table = Path(args.out) / "table.json"
    previous = json.loads(table.read_text()) if table.exists() else {}
    table.write_text(json.dumps({**previous, **results}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
