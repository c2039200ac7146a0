"""Where the time goes per question: image loading, policy, cropping/resizing, target.

Runs on the receipts val split with the OCR target, all policies in one run, side by side, and prints
seconds per question for each stage plus the cropping/resizing overhead as a fraction of the target's
time. The target is timed on views that were already cropped and resized, so the two never overlap.

    python benchmarks/pipeline_overhead.py --data ../shared/data/receipts/val.jsonl --budget 384
"""

from __future__ import annotations

import argparse
import time

from PIL import Image

from zoomvlm.cli.argtypes import positive_int
from zoomvlm.core.geometry import Budget
from zoomvlm.core.pipeline import build_request
from zoomvlm.data.samples import load_jsonl
from zoomvlm.policies import load_policy
from zoomvlm.targets.base import TargetRequest
from zoomvlm.targets.ocr import OCRTarget


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/receipts/val.jsonl")
    parser.add_argument("--budget", default="384")
    parser.add_argument("--policies", default="none,center,oracle")
    parser.add_argument("--limit", type=positive_int, default=None, help="first N questions only")
    args = parser.parse_args()

    samples = load_jsonl(args.data)[: args.limit]
    target = OCRTarget(Budget.parse(args.budget))
    # model load is not per-question cost; warm up on a blank image, NOT a measured one, whose view the reader
    # would then answer from its memo (the first receipt's questions would cost no reading)
    target.generate([TargetRequest([Image.new("RGB", (64, 64), "white")], "warm-up")])
    rows = []
    for name in args.policies.split(","):
        policy = load_policy(name)
        t = dict.fromkeys(("load", "policy", "crop_resize", "target"), 0.0)
        for s in samples:
            t0 = time.perf_counter()
            image = s.load_image()
            t1 = time.perf_counter()
            (proposal,) = policy.propose([image], [s.question], evidence=[s.evidence_boxes])
            t2 = time.perf_counter()
            views = build_request(image, s.question, proposal).views(target.budget)
            t3 = time.perf_counter()
            target.generate([TargetRequest(views, s.question, view_budgets=(Budget(),) * len(views))])
            t4 = time.perf_counter()
            for key, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                t[key] += dt
        n = len(samples)
        rows.append((name, {k: v / n for k, v in t.items()}))

    print(f"{len(samples)} questions, target {target.name}; seconds per question")
    head = ("load", "policy", "crop+resize", "target", "total", "crop+resize/target")
    print(f"{'policy':8} " + " ".join(f"{h:>{max(7, len(h))}}" for h in head))
    for name, t in rows:
        total = sum(t.values())
        print(f"{name:8} {t['load']:7.4f} {t['policy']:7.4f} {t['crop_resize']:11.4f} {t['target']:7.4f} {total:7.4f} "
              f"{t['crop_resize'] / t['target']:18.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
