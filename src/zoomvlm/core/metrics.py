"""Answer metrics and the policy's localisation metric.

Every answer metric has the signature ``fn(prediction: str, answers: Sequence[str]) -> float`` with a
score in ``[0, 1]``, best over the accepted answers unless the definition says otherwise; the
``multiple_choice`` scorer also takes the question's ``options`` (use :func:`score_answer`, which passes a
sample's ``meta``). Benchmark-level numbers that are not means of per-sample scores (POPE precision, recall,
F1 and yes-ratio; the OCRBench score out of 1000) come from :func:`aggregate` over a run's records.
Where each scorer follows its benchmark's published definition and where it differs from lmms-eval:
``docs/scorers.md``.

>>> contains("TOTAL RM 39.80\\nCASH 50.00", ["39.80"])
1.0
>>> anls("lightroom galery", ["LIGHTROOM GALLERY"])
0.9411764705882353
>>> relaxed_accuracy("12.3%", ["0.12"])
1.0
>>> extract_choice("The answer is (C).", {"A": "red", "B": "blue", "C": "green"})
'C'
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable, Mapping, Sequence

from rapidfuzz import fuzz
from rapidfuzz.distance import Levenshtein

from zoomvlm.core.geometry import Box

__all__ = [
    "GENERIC_METRICS",
    "METRICS",
    "aggregate",
    "anls",
    "contains",
    "evidence_hit",
    "exact",
    "extract_choice",
    "multiple_choice",
    "normalize_vqa",
    "ocrbench",
    "ocrbench_hme",
    "pope",
    "pope_aggregate",
    "pope_label",
    "relaxed_accuracy",
    "score_answer",
    "vqa_accuracy",
]


def _squash(text: str) -> str:
    """Case-fold and drop all whitespace: OCR transcripts split and join words unpredictably."""
    return re.sub(r"\s+", "", text.casefold())


def contains(prediction: str, answers: Sequence[str], threshold: float = 0.9) -> float:
    """1.0 if some accepted answer appears, fuzzily, as a substring of the prediction, else 0.0.

    For readers that return a whole transcript (the ``ocr`` target). Both sides are case-folded with all
    whitespace removed, then rapidfuzz's ``partial_ratio`` (best-aligned substring, normalised Indel
    similarity) must reach ``threshold``. At 0.9 a 5-character total must match exactly
    ("39.60" vs "39.80" scores 0.8) while a 25-character company name tolerates two misread letters.
    A prediction SHORTER than the answer cannot contain it: it is compared whole (``fuzz.ratio``), since
    ``partial_ratio`` would slide it inside the answer and give "15" full marks for "15.15".

    >>> contains("TOTAL 15.15", ["15.15"]), contains("15", ["15.15"])
    (1.0, 0.0)
    >>> contains("lightroom galery", ["Lightroom Gallery"])
    1.0
    """
    pred = _squash(prediction)
    for ans in answers:
        a = _squash(ans)
        if not a:
            continue
        similarity = fuzz.ratio(a, pred) if len(pred) < len(a) else fuzz.partial_ratio(a, pred)
        if similarity >= threshold * 100:
            return 1.0
    return 0.0


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity for one question (DocVQA; Biten et al. 2019, eq. 1).

    ``max_a s(a)`` with ``s = 1 - NL``, set to 0 when ``s < 1 - threshold`` (0 BELOW 0.5, as lmms-eval and the
    DocVQA evaluation script score it, and METHODS.md asks: ``NL`` exactly 0.5 keeps 0.5; the paper's eq. 1
    writes ``NL < tau``), where NL is the Levenshtein distance divided by the longer of the two strings, both
    lower-cased with whitespace collapsed (lmms-eval divides by the unnormalised lengths).
    """
    pred = " ".join(prediction.strip().lower().split())
    best = 0.0
    for ans in answers:
        a = " ".join(ans.strip().lower().split())
        nl = Levenshtein.normalized_distance(pred, a)
        best = max(best, 1.0 - nl if nl <= threshold else 0.0)
    return best


def exact(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the prediction equals an answer after lower-casing and collapsing whitespace."""
    pred = " ".join(prediction.strip().lower().split())
    return float(any(pred == " ".join(a.strip().lower().split()) for a in answers))


_NUMBER_RE = re.compile(r"^[-+]?[$€£]?\s*[-+]?(\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)\s*%?$")


def _to_float(text: str) -> float | None:
    """A number as ChartQA's evaluation reads it: ``"45%"`` is 0.45; ``$``, ``1,050`` and a final ``.`` are
    also accepted (the reference code's ``float()`` would reject them and fall back to string equality)."""
    s = text.strip().rstrip(".").strip()
    if not _NUMBER_RE.match(s):
        return None
    value = float(re.sub(r"[^\d.]", "", s))
    value = -value if s.lstrip("$€£+ ").startswith("-") else value
    return value / 100.0 if s.endswith("%") else value


def relaxed_accuracy(prediction: str, answers: Sequence[str], tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy (Masry et al. 2022, sec. 5.1): numbers within ``tolerance`` relative error.

    Follows the reference ``relaxed_correctness`` (pix2struct; lmms-eval's ``chartqa/utils.py``): a number
    with a percent sign is divided by 100, so ``"45%"`` matches ``0.45`` but NOT ``45``, as there.
    Non-numeric answers need a case-insensitive exact match (after stripping). Differences: a gold of 0
    needs a numeric 0 (``"0.0"`` counts; the reference compares strings), and thousands separators,
    currency signs and a final period are read as numbers. Best over ``answers``.
    """
    pred_num = _to_float(prediction)
    for ans in answers:
        ans_num = _to_float(ans)
        if pred_num is not None and ans_num is not None:
            if ans_num == 0:
                if pred_num == 0:
                    return 1.0
            elif abs(pred_num - ans_num) / abs(ans_num) <= tolerance:
                return 1.0
        elif prediction.strip().lower() == ans.strip().lower():
            return 1.0
    return 0.0


# ---- VQA accuracy with the EvalAI answer normalisation (Antol et al. 2015; VQA eval code) ------------
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "shant": "shan't",
    "shed": "she'd", "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "somebodys": "somebody's", "someones": "someone's", "somethings": "something's", "thats": "that's",
    "thered": "there'd", "therere": "there're", "theres": "there's", "theyd": "they'd", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "wasnt": "wasn't", "wed": "we'd", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all",
    "youd": "you'd", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# The official regex, as is: its "(?!<=\d)" is a no-op lookahead, kept so scores match EvalAI exactly.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_vqa(text: str) -> str:
    """EvalAI's VQA answer normalisation: punctuation, number words -> digits, articles, contractions.

    Follows ``EvalAIAnswerProcessor`` (the TextVQA evaluator of pythia/mmf, copied by lmms-eval): lower-case,
    drop ``,`` and ``?``, split ``'s``; then the official VQA ``processPunctuation`` (a mark is deleted when
    it touches a space, else replaced by a space; periods not before a digit are removed) and
    ``processDigitArticle`` (number words -> digits, articles dropped, contractions restored).

    >>> normalize_vqa("The Two dogs.")
    '2 dogs'
    >>> normalize_vqa("1,000")
    '1000'
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or re.search(_COMMA_STRIP, text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out)
    words = []
    for word in out.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy (TextVQA/VQAv2): mean over leave-one-out subsets of ``min(1, #matches / 3)``.

    With the usual 10 human answers, each of the 10 subsets of 9 answers scores ``min(1, matches/3)``
    and the mean is reported; answers and prediction are normalised by :func:`normalize_vqa` first.
    With a single reference answer this reduces to normalised exact match.
    """
    if not answers:
        return 0.0
    pred = normalize_vqa(prediction)
    gts = [normalize_vqa(a) for a in answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    scores = []
    for i in range(len(gts)):
        matches = sum(1 for j, g in enumerate(gts) if j != i and g == pred)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


# ---- OCRBench (Liu et al. 2024; official scripts/ and lmms-eval ocrbench/utils.py) ----------------------
def _fold_fullwidth(text: str) -> str:
    """Fullwidth ASCII (U+FF01..FF5E) and the ideographic space -> ASCII, as lmms-eval's OCRBench scorer."""
    return "".join(chr(ord(c) - 0xFEE0) if 0xFF01 <= ord(c) <= 0xFF5E else (" " if c == "\u3000" else c) for c in text)


def ocrbench(prediction: str, answers: Sequence[str]) -> float:
    """OCRBench: 1.0 if some ground truth, lower-cased and stripped, is a substring of the prediction.

    Both sides are lower-cased, stripped, newlines -> spaces, fullwidth ASCII folded (the official OCRBench
    evaluation; the fold is lmms-eval's). An empty ground truth never matches (it would be a substring of
    anything).
    """
    pred = _fold_fullwidth(prediction).lower().strip().replace("\n", " ")
    for ans in answers:
        a = _fold_fullwidth(ans).lower().strip().replace("\n", " ")
        if a and a in pred:
            return 1.0
    return 0.0


def ocrbench_hme(prediction: str, answers: Sequence[str]) -> float:
    """OCRBench's handwritten-maths rule (HME100k rows): substring match with ALL spaces and newlines
    removed and case kept (LaTeX is case-sensitive), as the official evaluation does."""
    pred = re.sub(r"\s+", "", prediction)
    return float(any((a := re.sub(r"\s+", "", ans)) and a in pred for ans in answers))


# ---- POPE (Li et al. 2023) -------------------------------------------------------------------------------
_NEGATIONS = {"no", "not", "none", "nope", "neither", "nor", "cannot", "can't", "isn't", "aren't", "doesn't",
              "don't", "there's no"}  # fmt: skip


def pope_label(prediction: str) -> str | None:
    """Read a yes/no answer: ``"yes"``, ``"no"`` or ``None`` when the text says neither.

    Rules in order: the first word (case and punctuation ignored: ``"Yes."``, ``"yes, there is"``,
    ``"NO!"``); else the only one of the words yes/no that occurs; else a negation in the first sentence
    (``"There is not a dog"`` -> no, as POPE's reference evaluation). Text with none of these (``"a dog"``)
    is None: it counts as wrong, and as neither yes nor no in the yes-ratio. (POPE's reference script reads
    every answer without a negation as yes; lmms-eval needs the exact text ``yes``/``no``, so ``"Yes."``
    counts as neither there.)

    >>> pope_label("Yes, there is a dog.")
    'yes'
    >>> pope_label("There is no dog in the image.")
    'no'
    """
    words = re.findall(r"[a-z']+", prediction.lower())
    if not words:
        return None
    if words[0] in ("yes", "no"):
        return words[0]
    said = {w for w in words if w in ("yes", "no")}
    if len(said) == 1:
        return said.pop()
    first_sentence = re.split(r"[.!?\n]", prediction.lower().strip(), maxsplit=1)[0]
    if set(re.findall(r"[a-z']+", first_sentence)) & _NEGATIONS or "n't" in first_sentence:
        return "no"
    return None


def pope(prediction: str, answers: Sequence[str]) -> float:
    """POPE per-question accuracy: 1.0 if :func:`pope_label` of the prediction equals the answer (yes/no)."""
    label = pope_label(prediction)
    return float(label is not None and any(label == a.strip().lower() for a in answers))


def pope_aggregate(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """POPE's run-level numbers, "yes" being the positive class (Li et al. 2023, sec. 4; reference script).

    Returns:
        ``pope_accuracy``, ``pope_precision`` (TP / predicted yes), ``pope_recall`` (TP / gold yes),
        ``pope_f1``, ``pope_yes_ratio`` (share of PREDICTIONS read as yes; lmms-eval computes it from the
        gold answers, which is always ~0.5), ``pope_unparsed`` (share of predictions read as neither; they
        count as wrong). Precision/recall/F1 are 0.0 when undefined.

    Raises:
        ValueError: lengths differ, or a gold answer is not yes/no.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answer lists")
    tp = fp = fn = correct = yes = unparsed = 0
    for pred, gold in zip(predictions, answers, strict=True):
        g = gold[0].strip().lower() if gold else ""
        if g not in ("yes", "no"):
            raise ValueError(f"POPE answers must be yes or no, got {list(gold)!r}")
        label = pope_label(pred)
        yes += label == "yes"
        unparsed += label is None
        correct += label == g
        tp += label == "yes" and g == "yes"
        fp += label == "yes" and g == "no"
        fn += label != "yes" and g == "yes"
    n = len(predictions)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "pope_accuracy": correct / n if n else 0.0,
        "pope_precision": precision,
        "pope_recall": recall,
        "pope_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "pope_yes_ratio": yes / n if n else 0.0,
        "pope_unparsed": unparsed / n if n else 0.0,
    }


# ---- multiple choice (V* Bench, HR-Bench, RealWorldQA) -----------------------------------------------------
# Written here rather than taken from lmms-eval: its V* extractor reads "Answer: B" as "A" (the A of
# "Answer"), and its shared extractor takes any capital letter; no maintained library does option matching.
_PHRASE = re.compile(
    r"\b(?:answer|option|choice)\b(?:\s+is)?(?:\s*[:\-]\s*|\s+)(?:option\s+|choice\s+)?"
    r"(\(?)([A-Za-z])(\)?)(?=$|[^A-Za-z0-9])",
    re.IGNORECASE,
)
_START = re.compile(r"^(\(?)([A-Za-z])(\)?)(?=$|[^A-Za-z0-9'])")
_PAREN = re.compile(r"\(([A-Za-z])\)")
_TOKEN = re.compile(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])")


def _is_article(text: str, match: re.Match, letter_group: int) -> bool:
    """A bare ``A``/``a``/``I`` followed by a lower-case word is the article or pronoun, not an option."""
    letter = match.group(letter_group)
    if letter not in "AaI" or match.group(letter_group - 1) or match.group(letter_group + 1):
        return False  # parenthesised: "(A) cat" is an option
    return re.match(r"\s+[a-z]", text[match.end(letter_group) :]) is not None


def _norm_option(text: str) -> str:
    """Lower-case words without punctuation or articles: "The red car." == "a red car"."""
    return " ".join(w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in _ARTICLES)


def extract_choice(prediction: str, options: Mapping[str, str] | Sequence[str]) -> str | None:
    """The option letter a free-form answer picks, or None.

    Args:
        prediction: the model's text, e.g. ``"Answer: B"``, ``"(C)"``, ``"The answer is D."``, ``"b. cat"``,
            ``"the red car"``.
        options: ``{"A": "red car", ...}``, or just the valid letters when the texts are unknown.

    Rules, first that applies: (1) an answer phrase ``answer|option|choice [is] [:] X`` (last one wins);
    (2) the response starts with the letter (``"B"``, ``"B."``, ``"(b)"``, ``"C: cat"``); (3) a
    parenthesised letter, the last one; (4) the text of exactly one option (normalised words; when several
    options match, the longest wins if it contains the others, else no answer); (5) one distinct capital
    letter standing alone. Lower-case letters count only in rules 1-3. A bare ``A``/``a``/``I`` followed
    by a lower-case word (``"A cat is ..."``) is read as the article, not option A.
    """
    letters = {k.upper() for k in options}
    texts = {k.upper(): v for k, v in options.items()} if isinstance(options, Mapping) else {}
    text = prediction.replace("**", "").replace("__", "").strip().strip("\"'`")
    found = [m for m in _PHRASE.finditer(text) if m.group(2).upper() in letters and not _is_article(text, m, 2)]
    if found:
        return found[-1].group(2).upper()
    m = _START.match(text)
    if m and m.group(2).upper() in letters and not _is_article(text, m, 2):
        # A lower-case opening letter must stand alone or be marked ("b", "b.", "(b)"), not start a word.
        if m.group(2).isupper() or re.match(r"\s*(?:$|[.):\]])", text[m.end(2) :]) or m.group(1):
            return m.group(2).upper()
    parens = [p.upper() for p in _PAREN.findall(text) if p.upper() in letters]
    if parens:
        return parens[-1]
    if texts:
        pred = f" {_norm_option(text)} "
        hits = {k: _norm_option(v) for k, v in texts.items() if _norm_option(v) and f" {_norm_option(v)} " in pred}
        if len(hits) == 1:
            return next(iter(hits))
        if hits:
            longest = max(hits, key=lambda k: len(hits[k]))
            if all(f" {v} " in f" {hits[longest]} " for v in hits.values()):
                return longest
            return None
    singles = {
        m.group(1)
        for m in _TOKEN.finditer(text)
        if m.group(1) in letters and not (m.group(1) in "AI" and re.match(r"\s+[a-z]", text[m.end() :]))
    }
    return singles.pop() if len(singles) == 1 else None


def multiple_choice(prediction: str, answers: Sequence[str], options: Mapping[str, str] | None = None) -> float:
    """Multiple-choice accuracy: 1.0 if :func:`extract_choice` picks the gold letter.

    ``answers`` holds the gold letter (``["B"]``). A gold answer that is not an option letter (RealWorldQA
    has a few free-form questions, e.g. ``"0"``, ``"Downhill"``) is compared as VQA-normalised text
    (:func:`normalize_vqa`: case, final period, number words), as lmms-eval compares them (lower-case,
    final period stripped). Without ``options``, the letters A-D are valid and option texts unknown.
    """
    opts: Mapping[str, str] | Sequence[str] = options if options else ("A", "B", "C", "D")
    letters = {k.upper() for k in opts}
    golds = [a.strip() for a in answers]
    letter_golds = {g.strip("()").upper() for g in golds if g.strip("()").upper() in letters}
    if letter_golds:
        return float(extract_choice(prediction, opts) in letter_golds)
    pred = normalize_vqa(prediction)
    return float(any(pred == normalize_vqa(g) for g in golds))


METRICS: dict[str, Callable[..., float]] = {
    "contains": contains,
    "anls": anls,
    "exact": exact,
    "relaxed_accuracy": relaxed_accuracy,
    "vqa_accuracy": vqa_accuracy,
    "ocrbench": ocrbench,
    "ocrbench_hme": ocrbench_hme,
    "pope": pope,
    "multiple_choice": multiple_choice,
}
"""Answer metrics by name, as ``--metric`` accepts them (benchmark loaders set each sample's own)."""

GENERIC_METRICS = ("contains", "anls", "exact", "relaxed_accuracy", "vqa_accuracy")
"""Metrics that apply to any free-form answer; every record carries all of them for comparison."""


def check_answers(metric: str, answers: Sequence[str]) -> None:
    """Refuse, before anything is answered, a sample that ``metric`` cannot score.

    Raises:
        KeyError: unknown metric name (the message lists the known ones).
        ValueError: ``pope`` with a gold answer other than yes / no (:func:`pope_aggregate` would fail only
            after the whole run had been answered).
    """
    if metric not in METRICS:
        raise KeyError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    if metric == "pope" and (not answers or answers[0].strip().lower() not in ("yes", "no")):
        raise ValueError(f"POPE answers must be yes or no, got {list(answers)!r}")


def score_answer(metric: str, prediction: str, answers: Sequence[str], meta: Mapping | None = None) -> float:
    """Score one prediction with the named metric, passing ``meta["options"]`` to ``multiple_choice``.

    Raises:
        KeyError: unknown metric name (the message lists the known ones).
    """
    if metric not in METRICS:
        raise KeyError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    if metric == "multiple_choice":
        return multiple_choice(prediction, answers, (meta or {}).get("options"))
    return METRICS[metric](prediction, answers)


def aggregate(records: Sequence[Mapping]) -> dict[str, float]:
    """Benchmark numbers over a run's records that are not a mean of per-sample scores.

    Records are ``results.jsonl`` lines (``metric``, ``prediction``, ``answers``, ``score``). POPE records
    give :func:`pope_aggregate`'s numbers; OCRBench records give ``ocrbench_score``, the number of correct
    answers (the published "Final Score", out of 1000 on the full benchmark), recomputed from this run's
    records only (lmms-eval adds to a module-level counter, so a second aggregation in one process counts
    twice), and ``ocrbench_accuracy``.
    """
    out: dict[str, float] = {}
    pope_records = [r for r in records if r.get("metric") == "pope"]
    if pope_records:
        out.update(pope_aggregate([r["prediction"] for r in pope_records], [r["answers"] for r in pope_records]))
    ocr_scores = [r["score"] for r in records if r.get("metric") in ("ocrbench", "ocrbench_hme")]
    if ocr_scores:
        out["ocrbench_score"] = float(sum(ocr_scores))
        out["ocrbench_accuracy"] = statistics.fmean(ocr_scores)
    return out


def evidence_hit(boxes: Sequence[Box], evidence: Sequence[Box], min_coverage: float = 0.9) -> float | None:
    """Does some proposed crop cover some human evidence box? 1.0 / 0.0; None when not applicable.

    A crop covers an evidence box when it contains at least ``min_coverage`` of its area
    (:meth:`Box.coverage`): a text line cut by 10 % is usually still readable, one cut in half is not.
    Several evidence boxes are alternatives (the total printed twice), so covering any one counts.

    Returns:
        None when the policy proposed no crop or the sample has no evidence box.
    """
    if not boxes or not evidence:
        return None
    return float(any(b.coverage(e) >= min_coverage for b in boxes for e in evidence))
