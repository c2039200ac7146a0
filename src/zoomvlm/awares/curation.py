"""AwaRes curation: label each sample LR (low resolution suffices) or HR, and box the evidence of HR samples.

AwaRes sec. 3.2 (METHODS.md): the target answers from the LOW-resolution view and from the HIGH-resolution
view; a judge compares both with the ground truth; the sample is **LR** when the low-resolution answer is
judged correct or ties the high-resolution one, else **HR**. For HR samples an oracle grounding model (here
the cropper work's grounders, :mod:`zoomvlm.cropvlm.curation`) boxes the evidence and the box is mapped to the
crop subset whose IoU with it passes a threshold (:func:`~zoomvlm.awares.protocol.crops_for_box`). No human box is
used: ``Sample.evidence_boxes`` are dropped before anything runs.

Judges:

- :class:`MetricJudge` (``metric``): a rule on the dataset's metric, ``score(low) >= correct_at`` (correct)
  or ``score(low) >= score(high)`` (tie) -> LR.
- :class:`LLMJudge` (``llm:MODEL``): any OpenAI-compatible endpoint (AwaRes used LLaMA-3.3-70B), prompt
  :data:`JUDGE_PROMPT`; its JSON verdicts give the same rule.

Files written into ``out_dir``:

- ``raw.jsonl``: per sample ``{"id", "low_text", "high_text", "low_score", "high_score", "label", "judge",
  "seed_box", "found", "crops"}``, appended as samples are done (an interrupted run resumes).
- ``trajectories.jsonl``: the records :mod:`zoomvlm.awares.protocol` describes (direct-answer for LR, tool call then
  answer for HR), for self-zoom SFT/GRPO.
- ``actions.jsonl``: SFT examples for the EXTERNAL crop-set policy in TRL's conversational
  prompt-completion format: ``[image, crop_set_policy_prompt(question)]`` -> ``NO_CROPS`` or
  ``GET_CROPS: [...]`` (``image`` = the original's absolute path; the trainer shrinks it to the low view).
- ``curation.json``: counts (LR/HR, grounder failures), crop histogram, the high budget and threshold.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from zoomvlm.awares.protocol import (
    NO_CROPS,
    crop_set_policy_prompt,
    crop_set_proposal,
    crops_for_box,
    format_get_crops,
)
from zoomvlm.core.geometry import Box, Budget
from zoomvlm.core.metrics import METRICS
from zoomvlm.core.pipeline import build_request
from zoomvlm.cropvlm.curation import grounder_settings, start_curation
from zoomvlm.data.samples import iter_jsonl
from zoomvlm.policies.base import Proposal

__all__ = [
    "JUDGE_PROMPT",
    "LLMJudge",
    "MetricJudge",
    "SeedReplayGrounder",
    "action_record",
    "curate_awares",
    "load_judge",
]

JUDGE_PROMPT = (
    "You grade two answers to a question about an image against the ground truth.\n"
    "Question: {question}\nGround truth: {truth}\nAnswer A: {low}\nAnswer B: {high}\n"
    "An answer is correct if it states the ground truth (exact wording, case and extra text do not matter; "
    'a different value is wrong). Reply with JSON only: {{"A": true or false, "B": true or false}}'
)
"""AwaRes's LLM-as-a-judge step (the paper does not publish its prompt; this one is ours). A = the
low-resolution answer, B = the high-resolution answer."""


class MetricJudge:
    """LR/HR by a rule on the dataset's metric (AwaRes's judge rule with a metric in place of the LLM).

    Args:
        metric: a name in :data:`~zoomvlm.core.metrics.METRICS` (``contains`` for the OCR reader's transcripts).
        correct_at: a score at or above this counts as correct (0.5: ANLS's own cut-off).

    Raises:
        ValueError: an unknown metric (named, with the known ones).
    """

    def __init__(self, metric: str = "contains", correct_at: float = 0.5):
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose from {sorted(METRICS)}")
        self.metric, self.correct_at = metric, correct_at
        self.name = f"metric:{metric}"

    def judge(self, questions, answers, low_texts, high_texts) -> list[tuple[float, float]]:
        """``(low_score, high_score)`` per sample; LR iff ``low >= correct_at or low >= high``."""
        fn = METRICS[self.metric]
        return [(float(fn(lo, list(a))), float(fn(hi, list(a)))) for a, lo, hi in
                zip(answers, low_texts, high_texts, strict=True)]  # fmt: skip


class LLMJudge:
    """LR/HR by an LLM judge behind an OpenAI-compatible endpoint (``llm:MODEL``; ``$OPENAI_BASE_URL``).

    Scores are 1.0/0.0 from the judge's JSON ``{"A": bool, "B": bool}``; an unreadable verdict falls back to
    the ``contains`` rule for that sample and is counted in ``n_unreadable``.
    """

    def __init__(self, model: str, **openai_kwargs):
        from zoomvlm.targets.openai import OpenAITarget

        self.client = OpenAITarget(model, **openai_kwargs)
        self.name = f"llm:{model}"
        self.fallback = MetricJudge("contains")
        self.n_unreadable = 0

    def judge(self, questions, answers, low_texts, high_texts) -> list[tuple[float, float]]:
        """``(low_score, high_score)`` per sample, each 1.0 or 0.0 from the judge's verdict on the low-view and
        high-view answers against the gold ``answers``; an unreadable verdict falls back to the ``contains`` rule
        (counted in ``n_unreadable``). Raises what the endpoint client raises (connection, auth errors)."""
        prompts = [JUDGE_PROMPT.format(question=q, truth=" / ".join(a), low=lo, high=hi)
                   for q, a, lo, hi in zip(questions, answers, low_texts, high_texts, strict=True)]  # fmt: skip
        out = []
        for i, verdict in enumerate(self.client.chat(prompts, max_tokens=32)):
            match = re.search(r"\{.*\}", verdict, flags=re.DOTALL)
            try:
                parsed = json.loads(match.group(0)) if match else None
                out.append((_verdict(parsed["A"]), _verdict(parsed["B"])))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                self.n_unreadable += 1
                out += self.fallback.judge([questions[i]], [answers[i]], [low_texts[i]], [high_texts[i]])
        return out


def _verdict(value) -> float:
    """1.0 / 0.0 from a judge's JSON verdict: a boolean, or the strings "true" / "false" ("false" is a non-empty
    string, so bool() would read it as true). Anything else raises ValueError (the sample falls back)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return float(value.strip().lower() == "true")
    raise ValueError(f"not a verdict: {value!r}")


def load_judge(spec: str):
    """``metric[:NAME]`` (default contains) or ``llm:MODEL``. Raises ValueError on anything else."""
    kind, _, arg = spec.partition(":")
    if kind == "metric":
        return MetricJudge(arg or "contains")
    if kind == "llm" and arg:
        return LLMJudge(arg)
    raise ValueError(f"unknown judge {spec!r}; use metric[:NAME] or llm:MODEL")


def action_record(sample_id: str, image: str, question: str, crops: Sequence[str]) -> dict:
    """One external crop-set policy SFT example (TRL conversational prompt-completion).

    >>> action_record("a", "a.jpg", "What is the total?", ["3"])["completion"][0]["content"][0]["text"]
    "GET_CROPS: ['3']"
    """
    action = format_get_crops(list(crops)) if crops else NO_CROPS
    return {
        "id": sample_id,
        "image": image,
        "question": question,
        "prompt": [{"role": "user", "content": [{"type": "image"},
                                                {"type": "text", "text": crop_set_policy_prompt(question)}]}],
        "completion": [{"role": "assistant", "content": [{"type": "text", "text": action}]}],
    }  # fmt: skip


def curate_awares(
    samples,
    target,
    high: Budget,
    judge,
    grounder,
    out_dir: str | Path,
    iou_threshold: float = 0.2,
    batch_size: int = 4,
    progress: bool = True,
) -> dict:
    """Label, ground and write AwaRes trajectories (see the module docstring for the files).

    Args:
        samples: :class:`~zoomvlm.data.samples.Sample` list with answers; their ``evidence_boxes`` are dropped first.
        target: the model whose low- vs high-resolution answers are compared (any Target; ``ocr`` here).
        high: the high-resolution budget; the low view is it with sides halved (:mod:`zoomvlm.awares.protocol`).
        judge: :class:`MetricJudge` or :class:`LLMJudge`. ``grounder``: an object with ``name`` and
            ``ground(image, question, answers, key) -> SeedBox`` (:mod:`zoomvlm.cropvlm.curation`), run on HR
            samples only.
        iou_threshold: of the box -> crop-subset mapping (default 0.2: see ``crops_for_box``'s measurement).

    Returns:
        The ``curation.json`` dict.

    Raises:
        ValueError: ``iou_threshold`` outside ``(0, 1]`` (before anything is written); a sample without an answer,
            or ``out_dir`` holds rows made with other settings (target,
            ``high``, judge, grounder or ``iou_threshold``; ``settings.json``).
    """
    if not 0.0 < iou_threshold <= 1.0:  # before settings.json and any row are written (a later fix would be refused)
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    out_dir = Path(out_dir)
    settings = {"target": getattr(target, "name", type(target).__name__), "high": str(high), "judge": judge.name,
                **grounder_settings(grounder), "iou_threshold": iou_threshold}  # fmt: skip
    samples, raw_path, done, todo = start_curation(samples, out_dir, settings)  # drops every human box first
    bar = tqdm(total=len(samples), initial=len(samples) - len(todo), desc="AwaRes curation", unit="q",
               disable=not progress)  # fmt: skip
    with raw_path.open("a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            images = [s.load_image() for s in batch]
            pairs = list(zip(batch, images, strict=True))
            low = [build_request(im, s.question, crop_set_proposal(im, [], high)) for s, im in pairs]
            high_req = [build_request(im, s.question, Proposal(global_budget=high)) for s, im in pairs]
            texts = [g.text for g in target.generate(low + high_req)]
            low_texts, high_texts = texts[: len(batch)], texts[len(batch) :]
            scores = judge.judge([s.question for s in batch], [list(s.answers) for s in batch], low_texts, high_texts)
            for s, im, lo, hi, (ls, hs) in zip(batch, images, low_texts, high_texts, scores, strict=True):
                label = "LR" if ls >= getattr(judge, "correct_at", 0.5) or ls >= hs else "HR"
                row = {"id": s.id, "low_text": lo, "high_text": hi, "low_score": ls, "high_score": hs,
                       "label": label, "judge": judge.name, "seed_box": None, "found": None, "crops": []}  # fmt: skip
                if label == "HR":
                    seed = grounder.ground(im, s.question, s.answers, key=str(s.image))
                    row.update(seed_box=seed.box.as_list(), found=seed.found,
                               crops=crops_for_box(seed.box, iou_threshold))  # fmt: skip
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
                done[s.id] = row
            bar.update(len(batch))
    bar.close()
    rows = [done[s.id] for s in samples]
    with (out_dir / "trajectories.jsonl").open("w", encoding="utf-8") as f:
        for s, r in zip(samples, rows, strict=True):
            rec = {"id": s.id, "image": str(Path(s.image).resolve()), "question": s.question,
                   "answers": list(s.answers), "answer": s.answers[0], "label": r["label"], "crops": r["crops"],
                   "high": str(high), "field": s.field, "width": s.width, "height": s.height}  # fmt: skip
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    with (out_dir / "actions.jsonl").open("w", encoding="utf-8") as f:
        for s, r in zip(samples, rows, strict=True):
            rec = action_record(s.id, str(Path(s.image).resolve()), s.question, r["crops"])
            rec.update(answers=list(s.answers), label=r["label"])
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    hr = [r for r in rows if r["label"] == "HR"]
    info = {
        "n": len(rows),
        "n_lr": len(rows) - len(hr),
        "n_hr": len(hr),
        "low_accuracy": sum(r["low_score"] for r in rows) / len(rows) if rows else None,
        "high_accuracy": sum(r["high_score"] for r in rows) / len(rows) if rows else None,
        "grounder": grounder.name,
        "grounder_failures": sum(1 for r in hr if r["found"] is False),
        "crop_histogram": dict(Counter(k for r in hr for k in r["crops"]).most_common()),
        "mean_crops_hr": sum(len(r["crops"]) for r in hr) / len(hr) if hr else None,
        "judge": judge.name,
        "high": str(high),
        "iou_threshold": iou_threshold,
        "target": getattr(target, "name", type(target).__name__),
    }
    (out_dir / "curation.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


class SeedReplayGrounder:
    """A grounder that replays the seed boxes a ``zoomvlm curate boxes`` run already made (model-made, before
    expansion), matched by (image path, question); samples it lacks go to ``fallback`` (or count as not found).

    Saves re-running the OCR/VLM grounder when the cropper's curation already boxed the same samples.

    Args:
        curation_dir: the folder ``zoomvlm curate boxes`` wrote (``seeds.jsonl`` + ``sft.jsonl``).

    Raises:
        FileNotFoundError: either file is missing.
    """

    def __init__(self, curation_dir: str | Path, fallback=None):
        from zoomvlm.cropvlm.curation import SeedBox

        self._seed_box = SeedBox
        d = Path(curation_dir)
        seeds = {r["id"]: r for r in _jsonl(d / "seeds.jsonl")}
        self.rows = {(str(Path(r["image"]).resolve()), r["question"]): seeds[r["id"]]
                     for r in _jsonl(d / "sft.jsonl") if r["id"] in seeds}  # fmt: skip
        self.fallback = fallback
        self.name = f"replay:{seeds[next(iter(seeds))]['grounder'] if seeds else '?'}"
        self.curation_dir = str(d.resolve())

    def settings(self) -> dict:
        """The replayed curation and the fallback's settings (what a resumed ``curate awares`` must match)."""
        fallback = None if self.fallback is None else grounder_settings(self.fallback)
        return {"curation": self.curation_dir, "fallback": fallback}

    def ground(self, image, question, answers, key=""):
        """The replayed :class:`~zoomvlm.cropvlm.curation.SeedBox` of (``key`` = the image path, ``question``), box
        normalised to the image; a sample the curation lacks goes to ``fallback``, else comes back not found."""
        r = self.rows.get((str(Path(key).resolve()), question))
        if r is None:
            if self.fallback is None:
                return self._seed_box(Box.full(), found=False, error="no replayed seed box for this sample")
            return self.fallback.ground(image, question, answers, key=key)
        return self._seed_box(Box(*r["seed_box"]), found=r["found"], raw=r.get("raw") or "", error=r.get("error"))


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (write it with `zoomvlm curate boxes`)")
    return [row for _, row in iter_jsonl(path)]
