"""Answer metrics and the policy's localisation metric.

Every answer metric has the signature ``fn(prediction: str, answers: Sequence[str]) -> float`` with a
score in ``[0, 1]``, best over the accepted answers unless the definition says otherwise.

>>> contains("TOTAL RM 39.80\\nCASH 50.00", ["39.80"])
1.0
>>> anls("lightroom galery", ["LIGHTROOM GALLERY"])
0.9411764705882353
>>> relaxed_accuracy("12.3%", ["12"])
1.0
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from rapidfuzz import fuzz
from rapidfuzz.distance import Levenshtein

from zoomvlm.geometry import Box

__all__ = [
    "METRICS",
    "anls",
    "contains",
    "evidence_hit",
    "exact",
    "normalize_vqa",
    "relaxed_accuracy",
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
    """
    pred = _squash(prediction)
    for ans in answers:
        a = _squash(ans)
        if a and fuzz.partial_ratio(a, pred) >= threshold * 100:
            return 1.0
    return 0.0


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity for one question (DocVQA; Biten et al. 2019).

    ``max_a (1 - NL(pred, a))`` where NL is the Levenshtein distance divided by the longer length, after
    lower-casing and stripping; a similarity below ``threshold`` (NL >= 0.5) scores 0.
    """
    pred = " ".join(prediction.strip().lower().split())
    best = 0.0
    for ans in answers:
        a = " ".join(ans.strip().lower().split())
        sim = 1.0 - Levenshtein.normalized_distance(pred, a)
        best = max(best, sim if sim >= threshold else 0.0)
    return best


def exact(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the prediction equals an answer after lower-casing and collapsing whitespace."""
    pred = " ".join(prediction.strip().lower().split())
    return float(any(pred == " ".join(a.strip().lower().split()) for a in answers))


_NUMBER_RE = re.compile(r"^[-+]?[$€£]?\s*[-+]?(\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)\s*%?$")


def _to_float(text: str) -> float | None:
    s = text.strip().rstrip(".")
    if not _NUMBER_RE.match(s):
        return None
    neg = s.startswith("-")
    value = float(re.sub(r"[^\d.]", "", s))
    return -value if neg else value


def relaxed_accuracy(prediction: str, answers: Sequence[str], tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy (Masry et al. 2022): numbers within ``tolerance`` relative error, else exact.

    Percent signs, currency symbols and thousands separators are ignored, so "12.3%" matches "12". A
    target of 0 needs an exact 0. Non-numeric answers need a case-insensitive exact match.
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

    Follows the official VQA evaluation (``processPunctuation`` + ``processDigitArticle``): a
    punctuation mark is deleted when it touches a space or the text has a digit-comma-digit pattern,
    else replaced by a space; periods not between digits are removed.
    """
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


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "contains": contains,
    "anls": anls,
    "exact": exact,
    "relaxed_accuracy": relaxed_accuracy,
    "vqa_accuracy": vqa_accuracy,
}
"""Answer metrics by name, as ``--metric`` accepts them."""


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
