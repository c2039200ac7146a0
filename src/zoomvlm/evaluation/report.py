"""Reports over finished (or partly finished) runs: a markdown table, an accuracy-vs-RTR plot, a gallery.

    zoomvlm report runs/val_none runs/val_oracle --out report/

writes into ``--out``:

- ``report.md``: one row per run, grouped by benchmark (the ``data`` of its ``run.json``): n, accuracy,
  RTR, latency (ms per question, policy and target), evidence hit rate, the share of answers served
  from the response cache;
- ``accuracy_vs_rtr.png``: one point per run (x = mean RTR, y = accuracy), one colour per benchmark,
  the Pareto front of each benchmark drawn (no other run is both cheaper and more accurate);
- ``gallery.html`` + ``gallery/*.jpg``: a deterministic sample of questions per run, right and wrong
  mixed, the crops drawn on the image (red; human evidence boxes green), question, prediction, gold
  answers and the verdict; runs of one benchmark that share a question are shown side by side.

Runs split with ``--shard i/n`` are merged from the shards present (see :func:`zoomvlm.evaluation.run.read_run`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from zoomvlm.core.geometry import Box
from zoomvlm.data.samples import DatasetError, Sample, UnreadableImageError, load_jsonl
from zoomvlm.evaluation.run import read_run, render_table, results_files, summarize

logger = logging.getLogger(__name__)

__all__ = [
    "Run",
    "gallery_rows",
    "load_benchmark_samples",
    "load_run",
    "markdown_table",
    "pareto_front",
    "plot_accuracy_vs_rtr",
    "rtr_groups",
    "write_gallery",
    "write_report",
]

RIGHT_AT = 0.5
"""A record counts as right in the gallery when its score is at least this (scores are in [0, 1];
binary metrics give 0 or 1, ANLS/VQA accuracy give partial credit)."""

GALLERY_IMAGE_SIDE = 520
"""Longest side (px) of the gallery pictures: large enough to see a crop, small enough for 100s of them."""


@dataclass(frozen=True)
class Run:
    """One run directory, loaded.

    Args:
        path: the run directory.
        label: a short unique name (the directory name, with parents added if two runs share it).
        config: its ``run.json`` (``data``, ``target``, ``policy``, ``crop_budget``, ``metric``...).
        records: merged results of all shards present, as written (see :class:`~zoomvlm.core.pipeline.Record`).
        shards: the number of shards the run is split into (1 = unsplit).
        shards_present: how many of them have a results file.
    """

    path: Path
    label: str
    config: dict
    records: list[dict]
    shards: int = 1
    shards_present: int = 1

    @property
    def data(self) -> str:
        """The data spec of ``run.json`` (a JSONL path or a benchmark name); ``?`` when missing."""
        return str(self.config.get("data", "?"))

    @property
    def benchmark(self) -> str:
        """What the report groups by: :attr:`data`, plus `` (split)`` for a hub benchmark (``chartqa (test)``): runs
        on two splits of one benchmark share question ids but not questions, so they are never one group."""
        split = self.config.get("split")
        return f"{self.data} ({split})" if split else self.data

    def stats(self) -> dict:
        """:func:`~zoomvlm.evaluation.run.summarize` of the records plus ``cached_rate`` (share of answers served
        from the response cache; their seconds are those of the original call) and latencies in ms."""
        s = summarize(self.records)
        n = len(self.records)
        s["cached_rate"] = sum(bool(r.get("cached")) for r in self.records) / n if n else None
        s["policy_ms"] = None if s["policy_s"] is None else 1000 * s["policy_s"]
        s["target_ms"] = None if s["target_s"] is None else 1000 * s["target_s"]
        return s


def load_run(path: str | Path, label: str | None = None) -> Run:
    """Read a run directory written by :func:`zoomvlm.evaluation.run.run_eval` (``zoomvlm eval --out``).

    Raises:
        ValueError: ``path`` has no ``run.json`` (not a run directory), or its results are corrupt.
        RunMismatchError: its results files disagree on the number of shards.
    """
    path = Path(path)
    config_path = path / "run.json"
    if not config_path.is_file():
        raise ValueError(f"{path} is not a run directory (no run.json): pass folders written by zoomvlm eval --out")
    files = results_files(path)
    count = next(iter(files)).count if files else 1
    return Run(path, label or path.name, json.loads(config_path.read_text()), read_run(path), count, len(files))


def _unique_labels(paths: Sequence[Path]) -> list[str]:
    # The directory name, plus as many parent names as it takes to tell runs apart.
    resolved = [p.resolve() for p in paths]
    for depth in range(1, max(len(p.parts) for p in resolved) + 1):
        labels = ["/".join(p.parts[-depth:]) for p in resolved]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in resolved]


def benchmark_label(spec: str) -> str:
    """A short name for a data spec: ``folder/file.jsonl`` for a path, the name itself otherwise."""
    p = Path(spec)
    return f"{p.parent.name}/{p.name}" if p.suffix == ".jsonl" and p.parent.name else spec


def load_benchmark_samples(spec: str, split: str | None = None) -> dict[str, Sample]:
    """The samples of a run's ``data`` spec (a JSONL path or a benchmark name + split), by id.

    This is the one place that turns a data spec into samples for reports (images, human evidence boxes).

    Raises:
        DatasetError: the spec cannot be read (see :func:`zoomvlm.data.samples.load_samples`).
    """
    from pathlib import Path

    from zoomvlm.data.samples import load_samples

    if Path(spec).is_file():
        return {s.id: s for s in load_jsonl(spec, check_images=False)}
    return {s.id: s for s in load_samples(spec, split=split)}


def _pct(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def markdown_table(runs: Sequence[Run]) -> str:
    """The report table (GitHub markdown): one row per run, grouped by benchmark in first-seen order.

    Columns: benchmark, run, policy, target, metric (``(forced)``: an explicit ``--metric`` overrode the samples'
    own), RTR vs (what RTR divides by and counts: ``native`` or the run's ``--rtr-reference``, e.g. an AwaRes high
    view, in pixels or a VLM's tokens; RTRs of two references are not comparable), n (with ``shards k/n`` when
    shards are missing), accuracy % (mean score), RTR (mean Retain Token Ratio, AwaRes sec. 4), policy and target
    ms per question (wall-clock; for cached answers those of the original call), evidence hit % (where a crop was
    proposed and evidence exists), cached % (answers served from the response cache).
    """
    header = ["benchmark", "run", "policy", "target", "metric", "RTR vs", "n", "accuracy %", "RTR", "policy ms/q",
              "target ms/q", "evidence hit %", "cached %"]  # fmt: skip
    body = []
    order = list(dict.fromkeys(r.benchmark for r in runs))
    for bench in order:
        for run in (r for r in runs if r.benchmark == bench):
            s = run.stats()
            n = str(s["n"])
            if run.shards_present < run.shards:
                n += f" (shards {run.shards_present}/{run.shards})"
            unit = "/".join(sorted({r.get("rtr_unit", "pixels") for r in run.records})) or "pixels"
            reference = f"{run.config.get('rtr_reference') or 'native'} ({unit})"
            cells = [benchmark_label(bench), run.label, str(run.config.get("policy", "?")),
                     str(run.config.get("target", "?")), _scoring(run), reference, n, _pct(s["accuracy"]),
                     _num(s["rtr"], ".3f"), _num(s["policy_ms"], ".1f"), _num(s["target_ms"], ".1f"),
                     _pct(s["evidence_hit_rate"]), _pct(s["cached_rate"])]  # fmt: skip
            body.append(cells)
    return render_table(header, body, markdown=True, text_columns=6)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, accuracy) that no other point dominates, sorted by cost then index.

    A point is dominated when another has cost <= and accuracy >= with at least one strict (lower cost
    is better, higher accuracy is better); identical points do not dominate each other.

    >>> pareto_front([(0.1, 0.5), (0.2, 0.4), (0.3, 0.9), (1.0, 0.9)])
    [0, 2]
    """
    # Written out (O(n^2), n = runs, a handful) rather than taken from a library: it is four lines and
    # the packages that do it (paretoset, pymoo) are far heavier than the problem.
    front = [
        i
        for i, (c, a) in enumerate(points)
        if not any(c2 <= c and a2 >= a and (c2 < c or a2 > a) for c2, a2 in points)
    ]
    return sorted(front, key=lambda i: (points[i][0], i))


def _scoring(run: Run) -> str:
    """How a run's accuracy was scored: its metric, marked when an explicit ``--metric`` overrode the samples' own
    (OCRBench's HME rule, a JSONL line's metric), which scores some questions differently under the same name."""
    metric = str(run.config.get("metric", "?"))
    return f"{metric} (forced)" if run.config.get("metric_override") else metric


def rtr_groups(runs: Sequence[Run]) -> dict[tuple[str, str, str], list[Run]]:
    """Runs whose RTRs can share one Pareto front: ``{(benchmark, reference, unit): runs}`` in first-seen order.

    ``reference`` is what RTR divides by (``run.json``'s ``rtr_reference``, e.g. ``side:768`` for AwaRes's high
    view; ``native`` = the whole image at native resolution) and ``unit`` what it counts (``pixels`` or a VLM's
    ``tokens``, from the records). An RTR of 0.4 against a 768 px view and one of 0.4 in tokens are different
    costs, so they never share a front. Nor do accuracies under two metrics: where the runs of one benchmark were
    scored differently, ``benchmark`` names the metric too (``receipts/val.jsonl · anls``; ``(forced)`` when an
    explicit ``--metric`` overrode the samples' own).
    """
    metrics: dict[str, set[str]] = {}
    for run in runs:
        metrics.setdefault(run.benchmark, set()).add(_scoring(run))
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        unit = "/".join(sorted({r.get("rtr_unit", "pixels") for r in run.records})) or "pixels"
        bench = run.benchmark + (f" · {_scoring(run)}" if len(metrics[run.benchmark]) > 1 else "")
        key = (bench, str(run.config.get("rtr_reference") or "native"), unit)
        groups.setdefault(key, []).append(run)
    return groups


def _rtr_axis_label(keys: Sequence[tuple[str, str, str]]) -> str:
    measures = {(ref, unit) for _, ref, unit in keys}
    if len(measures) != 1:
        return "mean RTR (each colour its own reference and unit: see the legend)"
    ref, unit = measures.pop()
    whole = "native pixels" if ref == "native" and unit == "pixels" else f"whole image at {ref}"
    return f"mean RTR ({unit} processed / {whole if unit == 'pixels' else f'{unit} of the {whole}'})"


def plot_accuracy_vs_rtr(runs: Sequence[Run], path: str | Path) -> Path:
    """Save the accuracy-vs-RTR scatter (PNG, matplotlib Agg): one labelled point per run, one colour per
    benchmark and RTR measure (:func:`rtr_groups`), and each group's Pareto front as a staircase (the best
    accuracy reachable at or below each RTR). The x axis is logarithmic when the RTRs span 10x or more. Runs
    without records are left out; a run on fewer questions than the largest of its group (``--limit``, or not
    finished) is drawn hollow, labelled ``n/N q`` and kept off the front (its accuracy is over another set).

    Returns:
        ``path``.
    """
    from matplotlib.figure import Figure  # the OO API: no pyplot global state, no display needed

    path = Path(path)
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    rtrs = []
    groups = rtr_groups(runs)
    several = len({(ref, unit) for _, ref, unit in groups}) > 1
    for k, ((bench, ref, unit), members) in enumerate(groups.items()):
        color = colors[k % len(colors)]
        pts, labels, sizes = [], [], []
        for run in members:
            s = run.stats()
            if s["n"] and s["rtr"] is not None and s["accuracy"] is not None:
                pts.append((s["rtr"], 100 * s["accuracy"]))
                labels.append(run.label)
                sizes.append(s["n"])
        if not pts:
            continue
        rtrs += [p[0] for p in pts]
        # a run on fewer questions than the group's largest (--limit, unfinished) is an accuracy on another set:
        # drawn hollow, labelled n / N, and kept off the Pareto front
        full = [i for i, n in enumerate(sizes) if n == max(sizes)]
        labels = [
            lab if sizes[i] == max(sizes) else f"{lab} ({sizes[i]}/{max(sizes)} q)" for i, lab in enumerate(labels)
        ]
        legend = benchmark_label(bench) + (f" (RTR: {unit} vs {ref})" if several else "")
        ax.scatter([pts[i][0] for i in full], [pts[i][1] for i in full], color=color, s=40, zorder=3, label=legend)
        partial = [i for i in range(len(pts)) if i not in full]
        if partial:
            ax.scatter([pts[i][0] for i in partial], [pts[i][1] for i in partial], facecolors="none",
                       edgecolors=color, s=40, zorder=3)  # fmt: skip
        seen: dict[tuple[float, float], int] = {}
        for (x, y), label in zip(pts, labels, strict=True):
            k = seen[(round(x, 3), round(y, 1))] = seen.get((round(x, 3), round(y, 1)), -1) + 1
            # runs on the same point (e.g. two policies that never crop) get stacked labels, not overprinted
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5 + 10 * k), fontsize=8)
        front = [pts[full[i]] for i in pareto_front([pts[i] for i in full])]
        xs, ys = [p[0] for p in front], [p[1] for p in front]
        ax.step(xs + [max(p[0] for p in pts)], ys + [ys[-1]], where="post", color=color, alpha=0.6, lw=1.5, zorder=2)
    if rtrs and min(rtrs) > 0 and max(rtrs) / min(rtrs) >= 10:
        ax.set_xscale("log")
        # plain-number ticks at 1-2-5 steps (the default 10^-1 labels hide where the points are)
        ticks = [m * 10.0**e for e in range(-4, 1) for m in (1, 2, 5) if min(rtrs) / 2 <= m * 10.0**e <= max(rtrs) * 2]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_xticks([], minor=True)
    ax.margins(x=0.15, y=0.12)  # room for the labels of the outermost points
    ax.set_xlabel(_rtr_axis_label(list(groups)))
    ax.set_ylabel("accuracy %")
    ax.set_title("accuracy vs cost (line: Pareto front)")
    ax.grid(True, alpha=0.3)
    if rtrs:
        ax.legend(loc="best", fontsize=8)
    fig.savefig(path, dpi=120)
    return path


def _stable_order(ids: Sequence[str]) -> list[str]:
    # Deterministic and unrelated to dataset order or to right/wrong: sha1 of the id.
    return sorted(ids, key=lambda i: hashlib.sha1(i.encode()).hexdigest())


def gallery_rows(runs: Sequence[Run], per_run: int = 8) -> list[tuple[str, list[str]]]:
    """Which questions the gallery shows: ``[(benchmark, [sample ids...]), ...]``.

    For each run, ``per_run`` questions: half right and half wrong (score >= :data:`RIGHT_AT` is right),
    filled from the other kind when one runs short, each picked in sha1-of-id order, so the choice is
    deterministic and runs of one benchmark mostly pick the same questions. The ids of all runs of a
    benchmark are then merged (in the same order) so that shared questions appear once, side by side.

    Raises:
        ValueError: ``per_run < 0``.
    """
    if per_run < 0:  # a negative count would slice from the end and silently show the wrong questions
        raise ValueError(f"per_run must be >= 0, got {per_run}")
    out = []
    for bench in dict.fromkeys(r.benchmark for r in runs):
        chosen: set[str] = set()
        for run in (r for r in runs if r.benchmark == bench):
            score = {r["id"]: r["score"] for r in run.records}
            ordered = _stable_order(list(score))
            right = [i for i in ordered if score[i] >= RIGHT_AT]  # NaN (unscored) counts as wrong
            wrong = [i for i in ordered if not score[i] >= RIGHT_AT]
            n_right = min(len(right), max(per_run - len(wrong), (per_run + 1) // 2))
            chosen.update(right[:n_right] + wrong[: per_run - n_right])
        out.append((bench, _stable_order(list(chosen))))
    return out


_GALLERY_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>zoomvlm gallery</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
.q { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 0.8em; margin: 1em 0; }
.question { font-weight: 600; font-size: 1.05em; }
.gold { color: #555; margin: 0.3em 0 0.6em; }
.runs { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.run { border: 1px solid #eee; padding: 0.5em; width: 300px; }
.run img { max-width: 100%; max-height: 480px; display: block; margin: 0.4em 0; }
.right { color: #17803d; font-weight: 700; } .wrong { color: #c0262d; font-weight: 700; }
pre { white-space: pre-wrap; max-height: 9em; overflow: auto; background: #f4f4f4; padding: 0.4em; margin: 0.3em 0; }
.meta { color: #666; font-size: 0.85em; } .note { color: #a15c00; }
</style></head><body>
<h1>zoomvlm gallery</h1>
<p class="meta">Red: the policy's crops; green: human evidence boxes. {{ per_run }} questions per run
(right and wrong mixed, chosen by a hash of the id); runs of one benchmark side by side.</p>
{% for group in groups %}
<h2>{{ group.benchmark }}</h2>
{% if group.note %}<p class="note">{{ group.note }}</p>{% endif %}
{% for q in group.questions %}
<div class="q">
  <div class="question">{{ q.question }}</div>
  <div class="gold">id {{ q.id }} &middot; gold: {{ q.answers | join(" | ") }}</div>
  <div class="runs">
  {% for cell in q.cells %}
    <div class="run">
      <div><b>{{ cell.run }}</b>
      {% if cell.record %}
        &middot; <span class="{{ cell.verdict }}">{{ cell.verdict }}</span>
        <span class="meta">({{ cell.metric }} {{ cell.score }}, RTR {{ cell.rtr }}
        {%- if cell.cached %}, cached{% endif %})</span></div>
        {% if cell.image %}<img src="{{ cell.image }}" alt="crops of {{ cell.run }} on {{ q.id }}">{% else %}
        <div class="note">image unavailable</div>{% endif %}
        <div class="meta">prediction:</div><pre>{{ cell.prediction }}</pre>
        {% if cell.policy_error %}<div class="note">policy output invalid: {{ cell.policy_error }}</div>{% endif %}
      {% else %}</div><div class="meta">not in this run</div>{% endif %}
    </div>
  {% endfor %}
  </div>
</div>
{% endfor %}
{% endfor %}
</body></html>
"""


def write_gallery(runs: Sequence[Run], out_dir: str | Path, per_run: int = 8) -> Path:
    """Write ``gallery.html`` and its pictures (``gallery/*.jpg``) into ``out_dir`` (see :func:`gallery_rows`).

    Images and human evidence boxes come from each benchmark's samples (:func:`load_benchmark_samples`);
    when they cannot be read the page says so and shows the rest. All text from runs and datasets is
    HTML-escaped (jinja2 autoescape).

    Returns:
        The path of ``gallery.html``.
    """
    import jinja2

    from zoomvlm.core.viz import draw_crops

    out_dir = Path(out_dir)
    pictures = out_dir / "gallery"
    pictures.mkdir(parents=True, exist_ok=True)
    for old in pictures.glob("*.jpg"):  # a rewritten report must not keep pictures of an older one
        old.unlink()
    groups = []
    for g, (bench, ids) in enumerate(gallery_rows(runs, per_run)):
        members = [r for r in runs if r.benchmark == bench]
        by_run = [{rec["id"]: rec for rec in run.records} for run in members]
        note = None
        try:
            samples = load_benchmark_samples(members[0].data, split=members[0].config.get("split"))
        except (DatasetError, OSError) as err:
            samples, note = {}, f"images unavailable: {err}"
            logger.warning("gallery: %s", note)
        questions = []
        for q, sid in enumerate(ids):
            first = next(recs[sid] for recs in by_run if sid in recs)
            sample = samples.get(sid)
            image = None
            if sample is not None:
                try:
                    image = sample.load_image()
                except UnreadableImageError as err:
                    logger.warning("gallery: %s", err)
            cells = []
            for k, (run, recs) in enumerate(zip(members, by_run, strict=True)):
                rec = recs.get(sid)
                cell = {"run": run.label, "record": rec is not None}
                if rec is not None:
                    src = None
                    if image is not None:
                        src = f"gallery/{g}-{q}-{k}.jpg"
                        evidence = sample.evidence_boxes if sample is not None else ()
                        boxes = [Box(*b) for b in rec["boxes"]]
                        picture = draw_crops(image, boxes, evidence, max_side=GALLERY_IMAGE_SIDE)
                        picture.save(out_dir / src, quality=85)
                    score = rec["score"]
                    cell.update(
                        verdict="unscored" if math.isnan(score) else "right" if score >= RIGHT_AT else "wrong",
                        score="-" if math.isnan(score) else f"{score:.2f}",
                        metric=rec.get("metric", ""),
                        rtr=f"{rec['rtr']:.3f}",
                        cached=bool(rec.get("cached")),
                        image=src,
                        prediction=rec["prediction"],
                        policy_error=rec.get("policy_error"),
                    )
                cells.append(cell)
            questions.append({"id": sid, "question": first["question"], "answers": first["answers"], "cells": cells})
        groups.append({"benchmark": benchmark_label(bench), "note": note, "questions": questions})
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    path = out_dir / "gallery.html"
    path.write_text(env.from_string(_GALLERY_TEMPLATE).render(groups=groups, per_run=per_run), encoding="utf-8")
    return path


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path, per_run: int = 8) -> dict[str, Path]:
    """Load the runs and write ``report.md``, ``accuracy_vs_rtr.png`` and ``gallery.html`` into ``out_dir``.

    Args:
        run_dirs: run directories (``zoomvlm eval --out``), in the order rows and columns should follow.
        per_run: gallery questions per run.

    Returns:
        ``{"table": ..., "plot": ..., "gallery": ...}`` paths.

    Raises:
        ValueError: no run directories, one given twice, or one is not a run directory.
    """
    if not run_dirs:
        raise ValueError("give at least one run directory")
    paths = [Path(p) for p in run_dirs]
    if len({p.resolve() for p in paths}) != len(paths):
        raise ValueError("a run directory is given twice")
    runs = [load_run(p, label) for p, label in zip(paths, _unique_labels(paths), strict=True)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_accuracy_vs_rtr(runs, out_dir / "accuracy_vs_rtr.png")
    gallery = write_gallery(runs, out_dir, per_run)
    table = out_dir / "report.md"
    table.write_text(
        "# zoomvlm report\n\n"
        + markdown_table(runs)
        + "\n\nLatencies are wall-clock ms per question; answers served from the response cache keep the time of "
        "the call that computed them.\n\n"
        f"![accuracy vs RTR]({plot.name})\n\n[gallery of sampled questions]({gallery.name})\n",
        encoding="utf-8",
    )
    return {"table": table, "plot": plot, "gallery": gallery}
