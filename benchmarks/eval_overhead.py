"""What ``zoomvlm eval`` costs beyond the target: loading, cropping/resizing, scoring, writing, the cache.

Runs the real :func:`zoomvlm.evaluation.run.run_eval` (fresh run directories in a temporary folder) on the receipts
val split with the OCR target, for each policy three times side by side: response cache off, cache on
and cold (an empty cache file: every request computed and stored), cache on and warm (the same file
again: every request served from it). Each stage is timed by wrapping the library's own functions for
the duration of the run, so the measured path is the one users run:

- load: ``Sample.load_image`` (decode the native image);  policy: ``policy.propose``;
- crop: ``pipeline.crop_image`` (cut crops from the native image);
- resize: ``TargetRequest.views`` (shrink each view to its budget; called inside the target);
- target: the target's ``generate`` minus its resize time (what a faster model would save);
- score: every metric of ``zoomvlm.core.metrics.METRICS`` and ``evidence_hit``;
- cache: ``CachedTarget.generate`` minus the target inside it (pixel hashing, SQLite lookups and writes);
- write+other: the rest of the wall time of ``run_eval`` (JSON + fsync of results, summary, bookkeeping).

Prints ms per question per stage and two ratios: overhead (every stage but the target) / the target
time of the same run, and / the target time of the cache-off run of that policy (a warm run has no
target time of its own; this ratio says what fraction of the saved cost an evaluation still pays).

    python benchmarks/eval_overhead.py --data ../shared/data/receipts/val.jsonl --budget 384 --limit 30
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

import zoomvlm.core.pipeline as pipeline
from zoomvlm.cli.argtypes import positive_int
from zoomvlm.core.geometry import Budget
from zoomvlm.core.metrics import METRICS
from zoomvlm.data.samples import Sample, load_jsonl
from zoomvlm.evaluation.run import run_eval
from zoomvlm.policies import load_policy
from zoomvlm.targets.base import TargetRequest
from zoomvlm.targets.cache import CachedTarget
from zoomvlm.targets.ocr import OCRTarget

STAGES = ("load", "policy", "crop", "resize", "target", "score", "cache", "write+other")


class Clock:
    """Seconds spent per stage; ``wrap`` returns a timed version of a function."""

    def __init__(self) -> None:
        self.t = dict.fromkeys(STAGES + ("target_call", "cached_call"), 0.0)

    def wrap(self, stage, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.t[stage] += time.perf_counter() - start

        return timed


@contextmanager
def instrumented(clock: Clock):
    """Time the library's stage functions (restored afterwards)."""
    saved = (Sample.load_image, TargetRequest.views, pipeline.crop_image, pipeline.evidence_hit,
             dict(METRICS))  # fmt: skip
    Sample.load_image = clock.wrap("load", Sample.load_image)
    TargetRequest.views = clock.wrap("resize", TargetRequest.views)
    pipeline.crop_image = clock.wrap("crop", pipeline.crop_image)
    pipeline.evidence_hit = clock.wrap("score", pipeline.evidence_hit)
    for name, fn in saved[4].items():  # run_batch reads this very dict
        METRICS[name] = clock.wrap("score", fn)
    try:
        yield
    finally:
        (
            Sample.load_image,
            TargetRequest.views,
            pipeline.crop_image,
            pipeline.evidence_hit,
        ) = saved[:4]
        METRICS.update(saved[4])


class TimedTarget:
    """The OCR target with its ``generate`` time recorded (inside the cache, so hits cost it nothing)."""

    def __init__(self, target, clock: Clock, key: str):
        self.name, self.budget = target.name, target.budget
        self.generate = clock.wrap(key, target.generate)
        self.loglikelihood = target.loglikelihood


class TimedPolicy:
    def __init__(self, policy, clock: Clock):
        self.name = policy.name
        self.propose = clock.wrap("policy", policy.propose)


def measure(samples, policy_name, ocr, mode, cache_path, out_dir, batch_size) -> dict[str, float]:
    clock = Clock()
    policy = TimedPolicy(load_policy(policy_name), clock)
    target = TimedTarget(ocr, clock, "target_call")
    if mode != "off":
        target = CachedTarget(target, cache_path)
        target.generate = clock.wrap("cached_call", target.generate)
    with instrumented(clock):
        start = time.perf_counter()
        run_eval(samples, policy, target, out_dir, batch_size=batch_size, progress=False)
        wall = time.perf_counter() - start
    t = clock.t
    resize_in_target = t["resize"] if t["target_call"] else 0.0  # views() runs only inside the OCR target
    t["target"] = t["target_call"] - resize_in_target
    t["cache"] = t["cached_call"] - t["target_call"] if mode != "off" else 0.0
    t["write+other"] = wall - sum(t[k] for k in STAGES if k != "write+other")
    n = len(samples)
    return {**{k: t[k] / n for k in STAGES}, "wall": wall / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/receipts/val.jsonl")
    parser.add_argument("--budget", default="384")
    parser.add_argument("--policies", default="none,oracle")
    parser.add_argument("--limit", type=positive_int, default=None, help="first N questions only")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    samples = load_jsonl(args.data)[: args.limit]
    ocr = OCRTarget(Budget.parse(args.budget))
    # model load is not per-question cost; warm up on a blank image, NOT a measured one, whose view the reader
    # would then answer from its memo (the first receipt's questions would cost no reading)
    ocr.generate([TargetRequest([Image.new("RGB", (64, 64), "white")], "warm-up")])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.policies.split(","):
            cache = Path(tmp) / f"cache-{name}.sqlite"
            for mode in ("off", "cold", "warm"):
                rows.append((name, mode, measure(samples, name, ocr, mode, cache, Path(tmp) / f"{name}-{mode}",
                                                 args.batch_size)))  # fmt: skip

    print(f"{len(samples)} questions, target {ocr.name}, batch {args.batch_size}; ms per question")
    head = ["policy", "cache", *STAGES, "wall", "overhead/target", "overhead/target(off)"]
    print("  ".join(f"{h:>{max(7, len(h))}}" for h in head))
    for name, mode, r in rows:
        off = next(x for p, m, x in rows if p == name and m == "off")
        overhead = sum(r[k] for k in STAGES if k != "target")
        own = f"{overhead / r['target']:.3f}" if r["target"] > 0 else "-"
        vs_off = f"{overhead / off['target']:.3f}"
        cells = [name, mode, *(f"{1000 * r[k]:.1f}" for k in (*STAGES, "wall")), own, vs_off]
        print("  ".join(f"{c:>{max(7, len(h))}}" for c, h in zip(cells, head, strict=True)))


if __name__ == "__main__":
    main()
