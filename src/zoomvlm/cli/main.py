"""The ``zoomvlm`` command line: ask | eval | report | demo | curate | train | serve.

Heavy libraries (torch, transformers, onnxruntime) are imported inside the command that needs them, so
``zoomvlm --help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shutil
import sys
import traceback
from importlib import resources
from pathlib import Path

from zoomvlm.cli.argtypes import non_negative_int, positive_int
from zoomvlm.core.metrics import METRICS

# proposals = the reader-candidate cropper (default of ask: 98.0 % on receipts val vs vlm 79.1 %, docs/proposals.md)
DEMO_POLICIES = ("none", "center", "vlm", "proposals", "oracle", "full")

_BUDGETS_HELP = """\
budgets (--budget, --crop-budget):
  384 | side:384 longest side in pixels;  pixels:200000 pixel cap;  native no limit
"""


def _specs_epilog() -> str:
    """The targets/policies part of --help, generated from the registries (one source for every spec)."""
    from zoomvlm.policies import POLICY_SPECS
    from zoomvlm.targets import TARGET_SPECS

    def block(title: str, specs: dict[str, str]) -> str:
        import textwrap

        width = max(len(k) for k in specs) + 2
        return f"{title}:\n" + "".join(
            textwrap.fill(v, 110, initial_indent=f"  {k:<{width}}", subsequent_indent=" " * (width + 2)) + "\n"
            for k, v in specs.items()
        )

    return block("targets (--target)", TARGET_SPECS) + block("policies (--policy)", POLICY_SPECS) + _BUDGETS_HELP


def _add_run_options(p: argparse.ArgumentParser, policy_default: str) -> None:
    p.add_argument("--target", default="ocr", help="who answers (see below). Default: %(default)s")
    p.add_argument("--policy", default=policy_default, help="where to look (see below). Default: %(default)s")
    p.add_argument(
        "--budget",
        default=None,
        help="per-view budget of the target: the global view and (by default) the crops are shrunk to it. "
        "Default: the target's own (ocr 384 px, openai 512 px, hf: its processor's)",
    )
    p.add_argument("--crop-budget", default=None, help="budget of the crops only (e.g. native). Default: --budget")
    p.add_argument("--rtr-reference", default=None, metavar="BUDGET",
                   help="count RTR against the whole image at this budget instead of native resolution, "
                   "e.g. side:768 for an AwaRes run whose high-resolution view is 768 px. Default: a crop-set "
                   "policy's high view, else native")  # fmt: skip


def _check_run_args(args):
    """``(budget, crop_budget)`` parsed, and the target/policy specs checked: no model has loaded yet, so a typo
    costs nothing (raises ValueError with the accepted forms)."""
    from zoomvlm.core.geometry import Budget
    from zoomvlm.policies import check_policy_spec
    from zoomvlm.targets import check_target_spec

    budget = Budget.parse(args.budget) if args.budget is not None else None
    crop_budget = Budget.parse(args.crop_budget) if args.crop_budget is not None else None
    if args.rtr_reference:
        Budget.parse(args.rtr_reference)
    check_target_spec(args.target)
    check_policy_spec(args.policy)
    if args.policy.startswith("crop-set") and (budget is not None or crop_budget is not None):
        # the crop-set views are the policy's own (low = HIGH halved, crops at HIGH's scale): the budgets would be
        # ignored while the target's name, and so run.json and the reports, carried them
        raise ValueError(
            "--budget and --crop-budget do not apply to crop-set policies: they send their own low view (the high "
            "view halved) and crops at the high view's scale; choose the high view with @HIGH, e.g. "
            "--policy crop-set-fixed:0,1@side:1024"
        )
    return budget, crop_budget


def _build(args):
    """``(policy, target, crop_budget)``: the arguments checked first (:func:`_check_run_args`), then loaded."""
    from zoomvlm.policies import load_policy
    from zoomvlm.targets import load_target

    budget, crop_budget = _check_run_args(args)
    return load_policy(args.policy), load_target(args.target, budget=budget), crop_budget


def _recorded_override(out: str | Path, explicit: bool) -> bool:
    """A JSONL run whose run.json recorded ``metric_override`` when ANY line carried a metric (before the rule
    became "a line whose metric the override changes"): an explicit ``--metric`` keeps recording it, so that run
    still resumes under the same command."""
    if not explicit:
        return False
    try:
        return bool(json.loads((Path(out) / "run.json").read_text(encoding="utf-8")).get("metric_override"))
    except (OSError, ValueError, AttributeError):
        return False


def _default_metric(target_spec: str) -> str:
    # A reader answers with a whole transcript, so exact-style metrics would always fail it.
    return "contains" if target_spec.split(":")[0] == "ocr" else "anls"


def _rtr_reference(args, policy):
    """--rtr-reference, else a crop-set or self-zoom policy's high view (AwaRes counts RTR against it), else None."""
    from zoomvlm.core.geometry import Budget

    if args.rtr_reference:
        return Budget.parse(args.rtr_reference)
    high = getattr(policy, "high", None)
    if high is not None:
        print(f"RTR counted against the policy's high view {high} (set --rtr-reference to change)",
              file=sys.stderr)  # fmt: skip
    return high


def _finite(value):
    """``value`` with every NaN / infinite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def cmd_ask(args) -> int:
    from zoomvlm.core.geometry import Box
    from zoomvlm.core.pipeline import run_batch
    from zoomvlm.core.prompts import clean_question
    from zoomvlm.core.viz import draw_crops
    from zoomvlm.data.samples import Sample, load_image

    clean_question(args.question)  # a blank question is refused before anything loads, by every policy
    kind = re.split(r"[:@]", args.policy)[0]
    if kind in ("oracle", "crop-set-oracle"):
        raise ValueError(f"the {kind} policy needs human evidence boxes: use it with `zoomvlm eval` on labelled data")
    _check_run_args(args)
    if args.save:  # checked now: the picture must not be lost after the models have loaded and answered
        from PIL import Image

        save = Path(args.save)
        if save.suffix.lower() not in Image.registered_extensions():
            raise ValueError(f"--save {args.save}: unknown picture format {save.suffix!r}; use .png, .jpg or .webp")
        if not save.parent.is_dir():
            raise ValueError(f"--save {args.save}: folder {save.parent} does not exist")
    image = load_image(args.image)  # an unreadable image fails before any model loads
    policy, target, crop_budget = _build(args)
    sample = Sample("ask", Path(args.image), args.question, tuple(args.answer or ()), image.width, image.height)
    record = run_batch([sample], policy, target, metric=_default_metric(args.target), crop_budget=crop_budget,
                       images=[image], rtr_reference=_rtr_reference(args, policy))[0]  # fmt: skip
    if args.json:  # strict JSON: an unscored answer (no --answer) has score null, not NaN
        print(json.dumps(_finite(record.to_json()), indent=2, ensure_ascii=False, allow_nan=False))
    else:
        print(record.prediction)
        print("---")
        boxes = ", ".join(str(b) for b in record.boxes) or "none (global view only)"
        print(f"policy {policy.name}: boxes (normalised x0, y0, x1, y1) {boxes}")
        if record.policy_error:
            fallback = "fell back to the whole image" if record.boxes else "answered from the global view alone"
            print(f"policy output invalid ({record.policy_error}); {fallback}")
        views = " + ".join(str(p) for p in record.view_pixels)
        print(f"target {target.name}: views {views} px, RTR {record.rtr:.3f}, "
              f"policy {record.policy_seconds:.2f} s, target {record.target_seconds:.2f} s")  # fmt: skip
        if args.answer:
            print(f"{record.metric} vs {list(args.answer)}: {record.score:.2f}")
    if args.save:
        boxes = [Box(*b) for b in record.boxes]
        draw_crops(
            image, boxes, caption=f"Q: {args.question}\nA: {' | '.join(record.prediction.splitlines())[:300]}"
        ).save(args.save)
        print(f"saved {args.save}", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    import dataclasses

    from zoomvlm.data.benchmarks import BENCHMARKS
    from zoomvlm.data.samples import load_samples
    from zoomvlm.evaluation.run import Shard, check_shards, format_table, run_eval

    shard = Shard.parse(args.shard) if args.shard else Shard()
    check_shards(args.out, shard)  # fail before a model loads, not after

    samples = load_samples(args.data, split=args.split, limit=args.limit)
    policy, target, crop_budget = _build(args)
    if args.cache:
        from zoomvlm.targets.cache import CachedTarget

        target = CachedTarget(target, args.cache)
    bench = BENCHMARKS.get(args.data.lower())
    # an explicit --metric overrides the samples' own (a benchmark's, e.g. OCRBench's HME rule, or a JSONL line's);
    # run.json says so, since "metric" alone would read the same for the auto and the overridden scoring (an
    # OCRBench run resumed with --metric ocrbench scored its HME rows by the plain rule). A benchmark only when the
    # override changes some sample's metric (runs made before the key resume unchanged otherwise)
    # decided from what the data may hold, not from the loaded --limit prefix (a prefix without HME rows would
    # record no override, and the same command without --limit then refused to resume)
    explicit = args.metric != "auto"
    if bench:
        overridden = explicit and any(m != args.metric for m in bench.row_metrics)
    else:
        overridden = explicit and any(s.metric and s.metric != args.metric for s in samples)
        overridden = overridden or _recorded_override(args.out, explicit)
    if args.metric != "auto":
        samples = [dataclasses.replace(s, metric=args.metric) for s in samples]
    metric = args.metric if args.metric != "auto" else (bench.metric if bench else _default_metric(args.target))
    config = {
        "data": bench.name if bench else str(Path(args.data).resolve()),
        "target": target.name,
        "policy": policy.name,
        "crop_budget": str(crop_budget),
        "metric": metric,
    }
    if overridden:  # only then, so that runs made before this key resume unchanged
        config["metric_override"] = True
    views = getattr(getattr(policy, "protocol", None), "views", "same_scale")
    if views != "same_scale":  # self-zoom's released protocol cut same-scale views before: not one run
        config["self_zoom_views"] = views
    if bench:  # load_samples(config["data"], split=config["split"]) gives the run's samples back
        config["split"] = args.split or bench.split
    rtr_reference = _rtr_reference(args, policy)
    if rtr_reference is not None:  # only when set, so runs made before the option resume unchanged
        config["rtr_reference"] = str(rtr_reference)
    summary = run_eval(samples, policy, target, args.out, metric=metric, crop_budget=crop_budget,
                       batch_size=args.batch_size, config=config, progress=not args.no_progress,
                       shard=shard, rtr_reference=rtr_reference)  # fmt: skip
    print(format_table([(f"{policy.name} -> {target.name}", summary)], markdown=args.markdown))
    if summary.get("visual_tokens") is not None:
        print(f"visual tokens per question: {summary['visual_tokens']:.1f} (RTR counted in {summary['rtr_unit']})")
    if summary["by_field"]:
        print("by field: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in summary["by_field"].items()))
    extra = {k: v for k, v in summary.items() if k.startswith(("pope_", "ocrbench_"))}  # metrics.aggregate
    if extra:
        print("benchmark: " + ", ".join(f"{k} {v:.4g}" for k, v in extra.items()))
    if summary["n"] < summary["n_expected"]:
        print(f"{summary['n']} of {summary['n_expected']} samples done: run the other shards (the same command "
              f"with --shard i/{shard.count}) to complete the run", file=sys.stderr)  # fmt: skip
    if args.cache:
        print(f"cache {args.cache}: {target.hits} hits, {target.misses} computed", file=sys.stderr)
    print(f"wrote {Path(args.out) / shard.filename} and summary.json", file=sys.stderr)
    return 0


def cmd_report(args) -> int:
    from zoomvlm.evaluation.report import write_report

    paths = write_report(args.runs, args.out, per_run=args.per_run)
    print((Path(args.out) / "report.md").read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0


def demo_data_path() -> Path:
    """The bundled demo dataset (4 receipts, 12 questions) inside the installed package."""
    return Path(str(resources.files("zoomvlm") / "assets" / "receipts" / "demo.jsonl"))


DEMO_MARK = ".zoomvlm-demo"
"""Marks a run folder the demo wrote (and may replace)."""


def _old_demo_run(run_dir: Path, name: str) -> bool:
    """A run folder the demo wrote before it marked them: only its three files, a run of policy ``name`` on the
    bundled demo data."""
    files = {p.name for p in run_dir.iterdir()}
    if not files <= {"run.json", "results.jsonl", "summary.json"} or "run.json" not in files:
        return False
    try:
        config = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return False
    # the demo called run_eval without a config, so its run.json has no "data"; every `zoomvlm eval` run has one
    # (`eval --policy none --out runs/none` on the user's own data was otherwise indistinguishable, and deleted)
    return (
        isinstance(config, dict)
        and "data" not in config
        and config.get("policy") == name
        and str(config.get("target", "")).startswith("ocr@")
    )


def cmd_demo(args) -> int:
    from zoomvlm.core.geometry import Box, Budget
    from zoomvlm.core.viz import draw_crops
    from zoomvlm.data.samples import load_jsonl
    from zoomvlm.evaluation.run import format_table, run_eval
    from zoomvlm.policies import load_policy
    from zoomvlm.targets import load_target

    samples = load_jsonl(demo_data_path())[: args.limit]
    if args.no_progress:  # transformers' own "Loading weights" bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if args.picture >= len(samples):
        print(f"zoomvlm demo: --picture {args.picture} is past the {len(samples)} questions: drawing the last one",
              file=sys.stderr)  # fmt: skip
    target = load_target("ocr", budget=Budget.parse(args.budget))
    out = Path(args.out)
    print(f"zoomvlm demo: {len(samples)} questions on {len({s.image for s in samples})} bundled receipts, "
          f"target {target.name}, policies {', '.join(DEMO_POLICIES)}", file=sys.stderr)  # fmt: skip
    # a demo always runs afresh, but deletes only folders it made itself (marked): "--out runs" must never wipe
    # the user's own runs/none or runs/oracle
    for name in DEMO_POLICIES:
        run_dir = out / name
        if run_dir.exists() and not (run_dir / DEMO_MARK).exists() and not _old_demo_run(run_dir, name):
            raise ValueError(f"{run_dir} exists and was not written by zoomvlm demo: pass another --out "
                             "(the demo replaces its own run folders)")  # fmt: skip
    rows = []
    for name in DEMO_POLICIES:
        policy = load_policy(name)
        run_dir = out / name
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        (run_dir / DEMO_MARK).write_text("written by zoomvlm demo, which replaces this folder on its next run\n")
        summary = run_eval(samples, policy, target, run_dir, metric="contains", progress=not args.no_progress)
        rows.append((name, summary))
        first = json.loads((run_dir / "results.jsonl").read_text().splitlines()[min(args.picture, len(samples) - 1)])
        sample = next(s for s in samples if s.id == first["id"])
        verdict = "right" if first["score"] else "wrong"
        caption = (f"policy {name}: {sample.question} (answer: {sample.answers[0]}) -> {verdict}, "
                   f"RTR {first['rtr']:.3f}\nread: {' | '.join(first['prediction'].splitlines())[:300]}")  # fmt: skip
        picture = draw_crops(sample.load_image(), [Box(*b) for b in first["boxes"]], sample.evidence_boxes, caption)
        picture.save(out / f"{name}.png")
    print(format_table(rows))
    print(
        f"\npictures (red: crop, green: human evidence box): {', '.join(str(out / f'{n}.png') for n in DEMO_POLICIES)}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zoomvlm",
        description="Make vision-language models look where it matters: a zoom policy picks high-resolution "
        "regions, the target model answers from a cheap global view plus those crops.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_specs_epilog(),
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log progress details, and show the full traceback of an error")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ask", help="answer one question about one image", epilog=_specs_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("image", help="image file")
    p.add_argument("question", help="the question, quoted")
    _add_run_options(p, policy_default="proposals")
    p.add_argument("--answer", action="append", help="a reference answer to score against (repeatable)")
    p.add_argument("--save", help="save the image with the crop drawn (PNG/JPEG path)")
    p.add_argument("--json", action="store_true", help="print the full record as JSON")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("eval", help="evaluate a policy + target on a benchmark or JSONL dataset (resumable)",
                       epilog=_specs_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--data", required=True,
                   help="a benchmark (textvqa, docvqa, chartqa, ocrbench, vstar, hrbench4k, hrbench8k, pope, "
                        "realworldqa; from the HF hub, or $ZOOMVLM_DATA_DIR/<hub id>) or a JSONL file in the "
                        "receipts format")  # fmt: skip
    p.add_argument("--split", default=None, help="benchmark split. Default: the one the field reports")
    _add_run_options(p, policy_default="none")
    p.add_argument("--metric", default="auto", choices=("auto", *METRICS), metavar="METRIC",
                   help="answer metric: contains, anls, exact, relaxed_accuracy, vqa_accuracy, ocrbench, pope, "
                        "multiple_choice; auto = the benchmark's (or a JSONL line's) own, else contains for ocr "
                        "and anls for other targets; an explicit METRIC scores every sample with it")  # fmt: skip
    p.add_argument("--limit", type=positive_int, default=None, help="first N samples only")
    p.add_argument("--batch-size", type=positive_int, default=4,
                   help="samples per policy/target call. Default: %(default)s")  # fmt: skip
    p.add_argument("--out", required=True, help="run directory; rerunning the same command resumes it")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="run only part I of N (0-based: 0/2 and 1/2 are the halves), e.g. one per machine or "
                        "process, all with the same --out; each writes results-IIIII-of-NNNNN.jsonl and the "
                        "summary merges the shards present. Default: the whole benchmark")  # fmt: skip
    p.add_argument("--cache", default=None, metavar="PATH",
                   help="response cache (an SQLite file, created if missing, shareable by runs and processes): "
                        "requests already answered by the same target with the same budget (same view pixels, "
                        "question, view budgets) are not recomputed; records say cached: true and keep the "
                        "original call's timings. Delete the file after changing a target's code. "
                        "Default: off")  # fmt: skip
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="table, accuracy-vs-RTR plot and gallery of one or more eval runs")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by zoomvlm eval --out "
                   "(sharded runs are merged from the shards present)")  # fmt: skip
    p.add_argument("--out", default="zoomvlm-report",
                   help="where report.md, accuracy_vs_rtr.png, gallery.html and gallery/ go. "
                        "Default: %(default)s")  # fmt: skip
    p.add_argument("--per-run", type=non_negative_int, default=8,
                   help="gallery questions per run, right and wrong mixed. Default: %(default)s")  # fmt: skip
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="run the main job offline on bundled receipts: policies side by side")
    p.add_argument("--out", default="zoomvlm-demo", help="where results and pictures go. Default: %(default)s")
    p.add_argument("--budget", default="384", help="the reader's per-view budget. Default: %(default)s")
    p.add_argument("--picture", type=non_negative_int, default=2,
                   help="which question (index, from 0) to draw; with --limit, at most the last one. "
                   "Default: %(default)s")  # fmt: skip
    p.add_argument("--limit", type=positive_int, default=None, help="first N bundled questions only (of 12)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars (the models' loading bars too)")
    p.set_defaults(func=cmd_demo)

    from zoomvlm.cli.train import add_commands as add_train_commands

    add_train_commands(sub)
    add_serve_command(sub)
    return parser


def add_serve_command(sub) -> None:
    """``zoomvlm serve``: its options come from :class:`zoomvlm.serve.config.ServeConfig` (no heavy imports)."""
    from zoomvlm.serve.config import ServeConfig

    p = sub.add_parser("serve", help="OpenAI-compatible zoom server: local target or proxy in front of an endpoint",
                       description="Serve POST /v1/chat/completions with a zoom policy in front of a target (local "
                       "mode, --target) or an OpenAI-compatible endpoint (proxy mode, --upstream). Clients must "
                       "send $ZOOMVLM_API_KEY when it is set; the upstream gets $OPENAI_API_KEY.")  # fmt: skip
    ServeConfig.add_arguments(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from zoomvlm.serve.config import ServeConfig
    from zoomvlm.serve.server import build_service, serve

    config = ServeConfig.from_namespace(args)
    service = build_service(config)
    what = f"target {config.target}" if config.mode == "local" else f"upstream {config.upstream}"
    print(f"zoomvlm serve: policy {config.policy} in front of {what}; listening on "
          f"http://{config.host}:{config.port}/v1", file=sys.stderr, flush=True)  # fmt: skip
    serve(service)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    import sqlite3

    from zoomvlm.data.samples import DatasetError, UnreadableImageError
    from zoomvlm.evaluation.run import RunMismatchError
    from zoomvlm.targets.openai import OpenAIAuthError, OpenAIRequestError
    from zoomvlm.train.recipe import RecipeError

    try:
        return args.func(args)
    except (DatasetError, UnreadableImageError, RunMismatchError, RecipeError, ValueError, OSError,
            sqlite3.Error, OpenAIAuthError, OpenAIRequestError) as err:  # fmt: skip
        # user errors read as one line; -v shows where it came from (an internal bug can raise these types too)
        if args.verbose:
            traceback.print_exc()
        hint = "" if args.verbose else " (run with -v for the traceback)"
        print(f"zoomvlm {args.command}: error: {err}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
