"""Resumable, shardable evaluation runs: ``results*.jsonl`` (append-only, one line per sample) + ``summary.json``.

A run directory holds:

- ``run.json``: what was run (data, target, policy, budgets, metric), and the ``provenance`` of each invocation
  (code version, digest of the policy's checkpoint files). Resuming with a different configuration, or with
  policy files that changed under the same name, is refused, so one file never mixes two runs.
- ``results.jsonl``: one :class:`~zoomvlm.core.pipeline.Record` per line, written and flushed as each batch
  finishes. A rerun skips ids already there; a line torn by ``kill -9`` is cut off and that sample is
  redone, so every sample ends up exactly once.
- or, for a run split with ``--shard i/n``, one such file per shard,
  ``results-00000-of-00002.jsonl`` ... (see :class:`Shard`): shards run in any order, on any machine or
  process, each appending only to its own file; :func:`read_run` merges the files present.
- ``summary.json``: aggregates over all records of all shards present (see :func:`summarize`).

Order is deterministic: samples run in dataset order, shard ``i/n`` takes samples ``i, i+n, i+2n, ...``
of that order (so shards stay the same when ``--limit`` grows), and merged records come back in
dataset order.
"""

from __future__ import annotations

import json
import logging
import os
import re
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from zoomvlm.core.geometry import Budget
from zoomvlm.core.metrics import check_answers
from zoomvlm.core.pipeline import run_batch
from zoomvlm.core.resume import code_version, files_digest
from zoomvlm.data.samples import Sample, read_appended_jsonl
from zoomvlm.policies.base import ZoomPolicy
from zoomvlm.targets.base import Target

logger = logging.getLogger(__name__)

__all__ = [
    "RunMismatchError",
    "Shard",
    "check_shards",
    "read_results",
    "read_run",
    "results_files",
    "run_eval",
    "summarize",
]


class RunMismatchError(RuntimeError):
    """The output directory holds a run with a different configuration."""


def read_results(path: Path, repair: bool = False) -> list[dict]:
    """Records of a ``results.jsonl``: :func:`zoomvlm.data.samples.read_appended_jsonl` (a torn last line from a
    crash is not a record; ``repair=True`` cuts it off so appending continues on a clean line)."""
    return read_appended_jsonl(path, repair)


def _check_run_config(out_dir: Path, config: dict, provenance: dict) -> None:
    """Refuse a resume with another ``config`` or other policy files; record the code version of each invocation.

    ``run.json`` = ``config`` + ``provenance``: a list with one ``{"code", "policy_files"}`` entry per invocation
    that changed them (older runs have none: their first resume adds one). ``policy_files`` differing from the
    last recorded digest (both known) is a different policy under the same name, refused like a config change;
    another ``code`` version is allowed (a fix landed mid-run) and recorded, with a warning.
    """
    path = out_dir / "run.json"
    if not path.exists():
        _write_atomic(path, json.dumps({**config, "provenance": [provenance]}, indent=2) + "\n")
        return
    previous = json.loads(path.read_text())
    # both ways: a setting the earlier run had and this one leaves out (e.g. an RTR reference) differs too
    keys = [*config, *(k for k in previous if k not in config and k != "provenance")]
    diff = {k: (previous.get(k), config.get(k)) for k in keys if previous.get(k) != config.get(k)}
    if diff:
        details = "; ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise RunMismatchError(f"{out_dir} holds a different run ({details}); use another --out")
    history = previous.get("provenance") or []
    last = history[-1] if history else {}
    was, now = last.get("policy_files"), provenance["policy_files"]
    if was is not None and now is not None and was != now:
        raise RunMismatchError(
            f"{out_dir} holds a run of {config.get('policy', 'the policy')!r} whose checkpoint files changed since "
            f"(digest {was} -> {now}: retrained or replaced under the same path); its rows would mix two policies. "
            "Use another --out, or delete the folder to start again"
        )
    if last != provenance:
        if last.get("code") not in (None, provenance["code"]):
            logger.warning(
                "%s was started with zoomvlm %s, resumed with %s", out_dir, last["code"], provenance["code"]
            )
        _write_atomic(path, json.dumps({**previous, "provenance": [*history, provenance]}, indent=2) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    # Shards of one run finish and start concurrently: a reader must never see half a run.json/summary.json.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Shard:
    """Part ``index`` of ``count`` of a benchmark (0-based: ``0/2`` and ``1/2`` are the two halves).

    Shard ``i/n`` takes samples ``i, i+n, i+2n, ...`` of the dataset order, so the shards partition the
    samples (each exactly once), differ in size by at most one, and keep their samples when a
    ``--limit`` prefix grows. Each writes its own :attr:`filename`.

    >>> Shard.parse("1/4"), Shard.parse("1/4").filename
    (Shard(index=1, count=4), 'results-00001-of-00004.jsonl')
    >>> Shard().filename
    'results.jsonl'

    Raises:
        ValueError: ``count < 1`` or ``index`` outside ``0 .. count-1``.
    """

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"shard count must be at least 1, got {self.count}")
        if not 0 <= self.index < self.count:
            raise ValueError(
                f"shard index {self.index} is out of range for {self.count} shards: use 0/{self.count} .. "
                f"{self.count - 1}/{self.count} (0-based)"
            )

    @classmethod
    def parse(cls, spec: str) -> Shard:
        """``"i/n"`` -> ``Shard(i, n)``. Raises ValueError for any other form or an index out of range."""
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
        if not m:
            raise ValueError(f"cannot read shard {spec!r}: use i/n with 0 <= i < n, e.g. 0/2")
        return cls(int(m.group(1)), int(m.group(2)))

    @property
    def filename(self) -> str:
        """``results.jsonl`` for an unsplit run, else ``results-IIIII-of-NNNNN.jsonl``."""
        return "results.jsonl" if self.count == 1 else f"results-{self.index:05d}-of-{self.count:05d}.jsonl"

    def select(self, samples: Sequence[Sample]) -> list[Sample]:
        """This shard's samples, in dataset order."""
        return list(samples[self.index :: self.count])

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


_SHARD_FILE = re.compile(r"results-(\d{5})-of-(\d{5})\.jsonl")


def results_files(out_dir: str | Path) -> dict[Shard, Path]:
    """The results files in a run directory, by shard (``{}`` when there are none yet).

    Raises:
        RunMismatchError: the files disagree on the number of shards, or an unsplit ``results.jsonl``
            sits beside shard files (one run directory holds one way of splitting).
    """
    out_dir = Path(out_dir)
    found: dict[Shard, Path] = {}
    plain = out_dir / "results.jsonl"
    if plain.exists():
        found[Shard()] = plain
    for path in sorted(out_dir.glob("results-*-of-*.jsonl")):
        m = _SHARD_FILE.fullmatch(path.name)
        if m is None:
            continue
        try:
            found[Shard(int(m.group(1)), int(m.group(2)))] = path
        except ValueError as err:
            raise RunMismatchError(f"{path} is not a valid shard file name ({err})") from err
    counts = sorted({s.count for s in found})
    if len(counts) > 1:
        names = ", ".join(p.name for p in found.values())
        raise RunMismatchError(f"{out_dir} mixes results split in different numbers of shards ({names})")
    return dict(sorted(found.items(), key=lambda kv: kv[0].index))


def check_shards(out_dir: str | Path, shard: Shard) -> None:
    """Refuse to run ``shard`` into ``out_dir`` when its results files are split another way.

    Raises:
        RunMismatchError: naming how the directory is split and the ``--shard`` form that fits it.
    """
    out_dir = Path(out_dir)
    counts = {s.count for s in results_files(out_dir)}
    if counts and counts != {shard.count}:
        (have,) = counts
        how = "an unsplit run" if have == 1 else f"a run split into {have} shards"
        asked = "the whole run" if shard.count == 1 else f"shard {shard}"
        want = f"--shard i/{have}" if have > 1 else "no --shard"
        raise RunMismatchError(
            f"{out_dir} holds {how}, but {asked} was asked for; rerun with {want}, or use another --out"
        )


def read_run(out_dir: str | Path) -> list[dict]:
    """All records of a run directory, merging the results files of all shards present.

    Records come in shard order, then file order (dataset order within a shard). A torn last line of a
    file (a shard killed mid-write, or one still writing) is skipped, not repaired.

    Raises:
        RunMismatchError: see :func:`results_files`.
        ValueError: a sample id appears twice (in one file or in two shards), or a line is corrupt.
    """
    records: list[dict] = []
    where: dict[str, str] = {}
    for path in results_files(out_dir).values():
        for r in read_results(path):
            if r["id"] in where:
                raise ValueError(f"sample {r['id']!r} appears twice: in {where[r['id']]} and {path.name}")
            where[r["id"]] = path.name
            records.append(r)
    return records


def run_eval(
    samples: Sequence[Sample],
    policy: ZoomPolicy,
    target: Target,
    out_dir: str | Path,
    metric: str = "contains",
    crop_budget: Budget | None = None,
    batch_size: int = 4,
    config: dict | None = None,
    progress: bool = True,
    shard: Shard | None = None,
    rtr_reference: Budget | None = None,
) -> dict:
    """Evaluate ``policy`` + ``target`` on ``samples``, resuming whatever ``out_dir`` already holds.

    Args:
        samples: the whole benchmark, in its order (all shards pass the same list).
        target: any target, e.g. a :class:`~zoomvlm.targets.cache.CachedTarget` so reruns cost nothing.
        config: what identifies the run (data, target, policy, budgets...); stored in ``run.json`` and
            compared on resume. Defaults to the target's and policy's names, the metric and crop budget.
        shard: run only this part of ``samples`` (see :class:`Shard`), writing its own results file.
            ``None`` = the whole benchmark into ``results.jsonl``.
        rtr_reference: the view RTR is counted against (``None`` = native; see
            :func:`~zoomvlm.core.pipeline.run_batch`).

    Returns:
        The summary dict also written to ``summary.json``: over the records of ``samples`` in ALL shards
        present (so the last shard to finish writes the whole run's summary), plus the ``config``,
        ``shards`` (n) and ``n_expected`` (``len(samples)``; ``n < n_expected`` while shards are missing).

    Raises:
        RunMismatchError: ``out_dir`` holds a run with another configuration, split differently, or of a policy
            whose checkpoint files (``policy.checkpoints``) have changed since.
        UnreadableImageError: an image cannot be read; records written so far are kept, so fixing the
            file and rerunning the same command continues where it stopped.
        ValueError: ``batch_size < 1``; a sample id that appears twice; a sample its metric cannot score (an
            unknown metric, POPE with an answer other than yes / no: :func:`~zoomvlm.core.metrics.check_answers`);
            or the policy reads human boxes (``needs_evidence``, the oracles) and some samples have none (named,
            before anything runs).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    counts = Counter(s.id for s in samples)  # results are keyed by id: a repeat would be answered, then refused
    repeated = [i for i, n in counts.items() if n > 1]
    if repeated:
        more = f" and {len(repeated) - 5} more" if len(repeated) > 5 else ""
        raise ValueError(f"sample ids must be unique; repeated: {', '.join(map(repr, repeated[:5]))}{more}")
    if getattr(policy, "needs_evidence", False):
        missing = [s.id for s in samples if not s.evidence_boxes]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ValueError(
                f"{policy.name} reads the human evidence boxes (evaluation only), but {len(missing)} sample(s) have "
                f"none: {', '.join(missing[:5])}{more}"
            )
    for s in samples:  # a metric that cannot score a sample fails now, not after the run has been answered
        try:
            check_answers(s.metric or metric, s.answers)
        except (KeyError, ValueError) as err:
            raise ValueError(f"sample {s.id!r}: {err.args[0]}") from err
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = config or {
        "target": target.name,
        "policy": policy.name,
        "metric": metric,
        "crop_budget": str(crop_budget),
    }
    shard = shard or Shard()
    check_shards(out_dir, shard)
    _check_run_config(
        out_dir, config, {"code": code_version(), "policy_files": files_digest(getattr(policy, "checkpoints", ()))}
    )
    mine = shard.select(samples)
    results_path = out_dir / shard.filename
    done = {r["id"] for r in read_results(results_path, repair=True)}
    todo = [s for s in mine if s.id not in done]
    if done:
        logger.info("resuming %s shard %s: %d done, %d to go", out_dir, shard, len(mine) - len(todo), len(todo))
    desc = f"{policy.name} -> {target.name}" + (f" [shard {shard}]" if shard.count > 1 else "")
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=desc, unit="q", disable=not progress)
    with results_path.open("a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            records = run_batch(
                batch, policy, target, metric=metric, crop_budget=crop_budget, rtr_reference=rtr_reference
            )
            f.write("".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
    bar.close()
    position = {s.id: i for i, s in enumerate(samples)}
    records = sorted((r for r in read_run(out_dir) if r["id"] in position), key=lambda r: position[r["id"]])
    summary = summarize(records)
    summary.update(config)
    summary.update(shards=shard.count, n_expected=len(samples))
    _write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def summarize(records: Sequence[dict]) -> dict:
    """Aggregate records.

    Returns:
        ``n``; ``accuracy`` (mean ``score``); ``evidence_hit_rate`` over records where it applies (a crop
        was proposed and evidence exists) and ``n_evidence``; ``rtr`` (mean Retain Token Ratio);
        ``policy_s``, ``target_s``, ``total_s`` (mean seconds per question); ``format_failures`` (count of
        invalid policy outputs) and ``format_failure_rate``; ``visual_tokens`` (mean image tokens per question
        over records that count them, else None) and ``rtr_unit`` (``tokens``, ``pixels``, or both joined by
        ``/``); ``by_field`` accuracy per ``field``; plus the benchmark numbers that are not per-sample means
        (``pope_f1``, ``ocrbench_score``...) when such records
        are present (:func:`zoomvlm.core.metrics.aggregate`).
    """
    from zoomvlm.core.metrics import aggregate

    hits = [r["evidence_hit"] for r in records if r.get("evidence_hit") is not None]
    fields: dict[str, list[float]] = {}
    for r in records:
        if r.get("field"):
            fields.setdefault(r["field"], []).append(r["score"])
    failures = sum(1 for r in records if r.get("policy_error"))
    n = len(records)
    return {
        "n": n,
        "accuracy": _mean([r["score"] for r in records]),
        "evidence_hit_rate": _mean(hits),
        "n_evidence": len(hits),
        "rtr": _mean([r["rtr"] for r in records]),
        "policy_s": _mean([r["policy_seconds"] for r in records]),
        "target_s": _mean([r["target_seconds"] for r in records]),
        "total_s": _mean([r["policy_seconds"] + r["target_seconds"] for r in records]),
        "visual_tokens": _mean([r["visual_tokens"] for r in records if r.get("visual_tokens") is not None]),
        "rtr_unit": "/".join(sorted({r.get("rtr_unit", "pixels") for r in records})) or None,
        "format_failures": failures,
        "format_failure_rate": failures / n if n else None,
        "by_field": {k: _mean(v) for k, v in sorted(fields.items())},
        **aggregate(records),
    }


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool = False, text_columns: int = 1):
    """``rows`` of already formatted cells under ``header``, as GitHub markdown or as aligned plain text.

    The first ``text_columns`` columns are left-aligned, the rest (numbers) right-aligned. The one table writer
    of ``eval``, ``demo`` and ``report`` (tabulate does the layout; ``|`` inside a markdown cell is escaped).
    """
    from tabulate import tabulate

    align = ["left" if i < text_columns else "right" for i in range(len(header))]
    if markdown:
        rows = [[c.replace("|", "\\|") for c in r] for r in rows]
    return tabulate(rows, headers=list(header), tablefmt="pipe" if markdown else "simple", colalign=align,
                    disable_numparse=True)  # fmt: skip


def format_table(rows: Sequence[tuple[str, dict]], markdown: bool = False) -> str:
    """A table of summaries, one row per (label, summary), as ``zoomvlm eval``/``demo`` print it.

    Accuracy and evidence hit are percentages; seconds are per question; ``markdown=True`` gives a
    GitHub table for the README.
    """
    header = ["run", "n", "accuracy %", "evidence hit %", "RTR", "policy s/q", "target s/q", "total s/q", "fmt fail"]

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    body = [
        [label, str(s["n"]), pct(s["accuracy"]), pct(s["evidence_hit_rate"]), num(s["rtr"], ".3f"),
         num(s["policy_s"], ".3f"), num(s["target_s"], ".3f"), num(s["total_s"], ".3f"), str(s["format_failures"])]
        for label, s in rows
    ]  # fmt: skip
    return render_table(header, body, markdown)
