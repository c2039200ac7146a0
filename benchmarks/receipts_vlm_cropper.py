"""The VLM cropper before/after constrained decoding, multi-box output and a larger view, in ONE invocation.

Rows (all the shipped ``vlm`` cropper unless ``--checkpoint`` says otherwise; OCR target at 384 px on receipts
val; a fresh target per row so no row profits from another's memoised reads):

* ``free, greedy`` (before) vs ``constrained, greedy`` (after, the default of ``--policy vlm``);
* ``free, T=0.8`` vs ``constrained, T=0.8``: sampled as GRPO's rollouts are (CropVLM's temperature), where a
  cropper makes more malformed boxes; both seeded the same;
* ``constrained, up to 2 boxes`` (``@boxes=2``): the multi-box grammar, each box one crop;
* ``constrained, 512 px split`` (``@side=512``): the cropper's view split into 256 px tiles plus the global
  tile (more image tokens) -- the shipped checkpoint was NOT trained with it, so this row only says what the
  unchanged weights do with more tokens.

Columns: format failures (invalid answers, each fell back to the whole image), generated tokens per box
(end-of-turn token included), policy ms per box and per question, boxes per question, accuracy (``contains``),
evidence hit (the crop covers >= 90 % of a human box; human boxes are used for EVALUATION only), RTR, and the
y-centre correlation of ``receipts_cropper_ceiling.py`` (about 0 = the box ignores the image, 1 = it follows
the answer's line). Token counts come from the policy object and are summed in ``cropper_counts.json`` over the
invocations that ran part of a row; questions done by an interrupted invocation are not counted (the script
says so under the table). ``--fresh`` starts every listed row again.

    python benchmarks/receipts_vlm_cropper.py --out runs/vlm_cropper
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from receipts_cropper_ceiling import y_centre_correlation

from zoomvlm.cli.argtypes import positive_int
from zoomvlm.core.geometry import Budget
from zoomvlm.data.samples import load_jsonl
from zoomvlm.evaluation.run import read_results, run_eval, summarize
from zoomvlm.policies import load_policy
from zoomvlm.targets.cache import CachedTarget
from zoomvlm.targets.ocr import OCRTarget

ROWS = [
    ("free, greedy (before)", "@free"),
    ("constrained, greedy (after)", ""),
    ("free, T=0.8 (before)", "@free,t=0.8"),
    ("constrained, T=0.8 (after)", "@t=0.8"),
    ("constrained, up to 2 boxes", "@boxes=2"),
    ("constrained, 512 px split (untrained)", "@side=512"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/receipts/val.jsonl")
    parser.add_argument("--checkpoint", default="", help="cropper folder (default: the shipped `vlm`)")
    parser.add_argument("--budget", default="384")
    parser.add_argument("--out", default="runs/vlm_cropper")
    parser.add_argument("--limit", type=positive_int, default=None, help="first N questions only")
    parser.add_argument("--rows", default=None, help="comma-separated row numbers, 0-based (default: all)")
    parser.add_argument("--fresh", action="store_true", help="delete each row's folder first (clean counts)")
    parser.add_argument("--report-only", action="store_true", help="print the table of what --out holds, run nothing")
    parser.add_argument("--seed", type=int, default=0, help="torch seed set before each row (sampled rows)")
    parser.add_argument("--cache", default=None, help="OCR response cache (default OUT/cache.sqlite; 'none': off)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared 2-core "
                        "machine two threads per process measured ~20x slower from contention)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    samples = load_jsonl(args.data)[: args.limit]
    wanted = [int(i) for i in args.rows.split(",")] if args.rows else range(len(ROWS))
    base = f"vlm:{args.checkpoint}" if args.checkpoint else "vlm"
    cache = args.cache or str(Path(args.out) / "cache.sqlite")
    lines, notes = [], []
    for i in wanted:
        name, opts = ROWS[i]
        spec = base + opts
        out = Path(args.out) / f"row{i}"
        if args.fresh and out.exists():
            shutil.rmtree(out)
        if args.report_only:
            if not (out / "results.jsonl").exists() or not read_results(out / "results.jsonl"):
                continue
            policy = None
            records = read_results(out / "results.jsonl")
            s = summarize(records)
        else:
            torch.manual_seed(args.seed)
            policy = load_policy(spec)
            target = OCRTarget(Budget.parse(args.budget))
            if cache != "none":  # rows with the same crop (e.g. greedy free vs constrained) read it once
                target = CachedTarget(target, cache)
            config = {"data": str(Path(args.data).resolve()), "target": target.name, "policy": policy.name,
                      "metric": "contains", "limit": args.limit, "seed": args.seed}  # fmt: skip
            s = run_eval(samples, policy, target, out, metric="contains", config=config)
            records = read_results(out / "results.jsonl")
        boxes_per_q = sum(len(r["boxes"]) for r in records) / len(records)
        counts = _add_counts(out / "cropper_counts.json", policy)
        tokens_per_box = counts["n_tokens"] / counts["n_boxes"] if counts["n_boxes"] else None
        if counts["n_total"] < len(records):
            notes.append(f"{name}: tokens/box counted over {counts['n_total']} of {len(records)} questions "
                         "(the rest ran in an interrupted invocation)")  # fmt: skip
        corr = y_centre_correlation(out, samples)
        lines.append(
            f"| {name} | `{spec}` | {len(records)} | {s['format_failure_rate']:.1%} | {_num(tokens_per_box, '.1f')} | "
            f"{1000 * s['policy_s'] / boxes_per_q:.0f} | {1000 * s['policy_s']:.0f} | {boxes_per_q:.2f} | "
            f"{s['accuracy']:.1%} | {_num(s['evidence_hit_rate'], '.1%')} | {s['rtr']:.3f} | {_num(corr, '.2f')} |"
        )
    print(f"\nreceipts val, {len(samples)} questions, OCR target at {args.budget} px, cropper {base}\n")
    print("| row | policy | n | format failures | tokens/box | policy ms/box | policy ms/q | boxes/q | accuracy | "
          "evidence hit | RTR | y-centre corr |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(lines))
    if notes:
        print("\n" + "\n".join(notes))


def _add_counts(path: Path, policy) -> dict:
    """The cropper's generated-token / box / question counts of this row, summed over the invocations that ran
    part of it (kept in ``path``), so a row finished by a resumed run still reports all questions it counted."""
    keys = ("n_tokens", "n_boxes", "n_total")
    counts = json.loads(path.read_text()) if path.exists() else dict.fromkeys(keys, 0)
    if policy is not None:
        counts = {k: counts[k] + getattr(policy, k) for k in keys}
        path.write_text(json.dumps(counts))
    return counts


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
