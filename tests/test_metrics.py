import pytest

from zoomvlm.core.geometry import Box
from zoomvlm.core.metrics import (
    aggregate,
    anls,
    contains,
    evidence_hit,
    exact,
    extract_choice,
    multiple_choice,
    normalize_vqa,
    ocrbench,
    ocrbench_hme,
    pope,
    pope_aggregate,
    pope_label,
    relaxed_accuracy,
    score_answer,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    "prediction, answer, expected",
    [
        ("TOTAL RM 39.80\nCASH 50.00", "39.80", 1.0),
        ("TOTAL RM 39.60", "39.80", 0.0),  # one wrong digit in a number is wrong
        ("MR.D.I.Y.(M)SDN BHD\nNo 1", "MR. D.I.Y. (M) SDN BHD", 1.0),  # spacing ignored
        ("lightroom gallery sdn bhd", "LIGHTROOM GALLERY SDN BHD", 1.0),  # case ignored
        ("LIGHTROOM GALLERY SDN BHO", "LIGHTROOM GALLERY SDN BHD", 1.0),  # one misread letter in 25 tolerated
        ("LIGHTROOW GALLERY SUN BID", "LIGHTROOM GALLERY SDN BHD", 0.0),  # four are not
        ("", "9.00", 0.0),
        ("15", "15.15", 0.0),  # a prediction shorter than the answer cannot contain it
        ("3", "39.80", 0.0),
        ("LIGHTROOM GALERY", "LIGHTROOM GALLERY", 1.0),  # one letter short: compared whole, still a match
    ],
)
def test_contains(prediction, answer, expected):
    assert contains(prediction, [answer]) == expected


def test_anls():
    assert anls("Lightroom Gallery", ["LIGHTROOM GALLERY"]) == 1.0
    assert anls("lightroom galery", ["LIGHTROOM GALLERY"]) == pytest.approx(1 - 1 / 17)
    assert anls("completely different", ["LIGHTROOM"]) == 0.0  # similarity below 0.5 scores 0
    assert anls("9.00", ["nine", "9.00"]) == 1.0  # best over answers
    assert anls("  Lightroom   Gallery ", ["lightroom gallery"]) == 1.0  # whitespace collapsed


def test_anls_keeps_a_similarity_of_exactly_one_half():
    # 0 BELOW 0.5 (lmms-eval, the DocVQA script, METHODS.md): "ab" vs "ac" has NL exactly 0.5 and keeps 0.5, as
    # does a short numeric answer one digit off ("5" vs "50"); "abc" vs "xyz" (NL 1) scores 0
    assert anls("ab", ["ac"]) == 0.5 and anls("5", ["50"]) == 0.5
    assert anls("abc", ["xyz"]) == 0.0 and anls("ab", ["acd"]) == 0.0  # NL 2/3
    assert anls("abc", ["abd"]) == pytest.approx(2 / 3)  # NL 1/3 < 0.5 keeps its similarity
    # lmms-eval divides by the UNnormalised answer length; we divide by the normalised one.
    assert anls("abcd", ["  abcx  "]) == pytest.approx(0.75)


def test_exact():
    assert exact("  Asia  Mart ", ["ASIA MART"]) == 1.0
    assert exact("Asia Mart.", ["ASIA MART"]) == 0.0


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [("12.6", ["12"], 1.0),  # 5 % of 12 is 0.6: the boundary is inside
     ("12.7", ["12"], 0.0),
     ("45%", ["0.45"], 1.0),  # ChartQA's reference: a percent sign divides by 100
     ("0.45", ["45%"], 1.0),
     ("45%", ["45"], 0.0),  # ...so "45%" is 0.45, not 45, exactly as lmms-eval/ChartQA score it
     ("12.3%", ["12"], 0.0),
     ("$1,050", ["1000"], 1.0), ("1050.", ["1000"], 1.0),  # currency, thousands, final period read as numbers
     ("0", ["0"], 1.0), ("0.0", ["0"], 1.0), ("0.01", ["0"], 0.0),  # a zero gold needs a numeric zero
     ("Yes", ["yes"], 1.0), (" Asia ", ["asia"], 1.0), ("Asia.", ["asia"], 0.0),  # text: exact, case-free
     ("-5", ["5"], 0.0), ("-5", ["-5.1"], 1.0), ("$-5", ["-5"], 1.0),
     ("about 12", ["12"], 0.0),  # not a number, not the same text
     ("7", ["nine", "7.2"], 1.0)],  # best over answers
)  # fmt: skip
def test_relaxed_accuracy(prediction, answers, expected):
    assert relaxed_accuracy(prediction, answers) == expected


def test_vqa_normalisation_and_leave_one_out():
    assert normalize_vqa("The Two dogs.") == "2 dogs"
    assert normalize_vqa("dont") == "don't"
    # EvalAI word_tokenize: commas and question marks vanish (so "1,000" == "1000" and "hello,world" is ONE
    # word), "'s" is split off; other punctuation touching a space is deleted, else becomes a space.
    assert normalize_vqa("1,000") == normalize_vqa("1000") == "1000"
    assert normalize_vqa("hello,world") == "helloworld"
    assert normalize_vqa("John's") == "john 's"
    assert normalize_vqa("coca-cola") == "coca cola"
    assert normalize_vqa("yes!") == "yes"
    assert normalize_vqa("3.5") == "3.5"  # a period before a digit stays
    assert normalize_vqa("An Apple\n") == "apple"
    assert vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_accuracy("3", ["2"] * 3 + ["3"] * 7) == pytest.approx(1.0)
    assert vqa_accuracy("cat", ["cat"] * 2 + ["dog"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert vqa_accuracy("cat", ["cat"]) == 1.0


def test_evidence_hit():
    ev = [Box(0.1, 0.1, 0.2, 0.2), Box(0.7, 0.7, 0.8, 0.8)]
    assert evidence_hit([Box(0.65, 0.65, 0.9, 0.9)], ev) == 1.0  # covers the second alternative
    assert evidence_hit([Box(0.15, 0.1, 0.3, 0.3)], ev) == 0.0  # half of the first only
    assert evidence_hit([], ev) is None  # no crop proposed: not applicable
    assert evidence_hit([Box.full()], []) is None


def test_vqa_accuracy_textvqa_style():
    answers = ["Coca-Cola"] * 2 + ["coca cola"] * 2 + ["pepsi"] * 6
    assert vqa_accuracy("coca cola", answers) == pytest.approx(1.0)  # 4 normalised matches: min(1, 3or4/3)
    assert vqa_accuracy("Pepsi.", answers) == pytest.approx(1.0)
    assert vqa_accuracy("sprite", answers) == 0.0


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [("The text reads: Hello World!", ["hello world"], 1.0),  # GT is a substring, case-insensitive
     ("hello", ["hello world"], 0.0),  # the GT must be inside the prediction, not the reverse
     ("ＳＴＯＰ sign", ["stop"], 1.0),  # fullwidth letters folded (lmms-eval)
     ("line one\nline two", ["one line"], 1.0),  # newlines become spaces
     ("anything", [""], 0.0),  # an empty GT never matches
     ("Total: 39.80", ["12.00", "39.80"], 1.0)],
)  # fmt: skip
def test_ocrbench(prediction, answers, expected):
    assert ocrbench(prediction, answers) == expected


def test_ocrbench_handwritten_maths_ignores_spaces_keeps_case():
    assert ocrbench_hme("$ \\frac { 1 } { 2 } $", ["\\frac{1}{2}"]) == 1.0
    assert ocrbench_hme("x ^ { 2 }", ["X^{2}"]) == 0.0  # LaTeX is case-sensitive
    assert ocrbench("x ^ { 2 }", ["x^{2}"]) == 0.0  # the general rule keeps spaces


@pytest.mark.parametrize(
    "prediction, label",
    [("Yes", "yes"), ("Yes.", "yes"), ("yes, there is a dog.", "yes"), ("YES!", "yes"), ("No.", "no"),
     ("no, there is not", "no"), ("There is no dog in the image.", "no"), ("I don't see a dog.", "no"),
     ("There is not a cat.", "no"), ("The answer is yes.", "yes"), ("Nope", "no"),
     ("Not sure, but yes there is.", "yes"),  # the only yes/no word wins over a hedge
     ("A dog.", None), ("", None), ("Yes and no", "yes")],
)  # fmt: skip
def test_pope_label(prediction, label):
    assert pope_label(prediction) == label


def test_pope_scores_and_aggregates():
    assert pope("Yes.", ["yes"]) == 1.0  # lmms-eval scores this 0 (exact "yes" only)
    assert pope("yes, there is", ["no"]) == 0.0
    assert pope("a dog", ["no"]) == 0.0  # unparsed is wrong
    preds = ["Yes.", "yes", "No", "yes, there is one", "no", "a dog"]
    golds = [["yes"], ["yes"], ["yes"], ["no"], ["no"], ["no"]]
    agg = pope_aggregate(preds, golds)
    # TP 2, FN 1 (gold yes, said no), FP 1, TN 1, 1 unparsed (gold no): precision 2/3, recall 2/3
    assert agg["pope_accuracy"] == pytest.approx(3 / 6)
    assert agg["pope_precision"] == pytest.approx(2 / 3)
    assert agg["pope_recall"] == pytest.approx(2 / 3)
    assert agg["pope_f1"] == pytest.approx(2 / 3)
    assert agg["pope_yes_ratio"] == pytest.approx(3 / 6)  # from predictions, not from gold answers
    assert agg["pope_unparsed"] == pytest.approx(1 / 6)
    assert pope_aggregate(["no", "no"], [["yes"], ["no"]])["pope_precision"] == 0.0  # undefined -> 0
    with pytest.raises(ValueError, match="yes or no"):
        pope_aggregate(["yes"], [["maybe"]])


OPTS = {"A": "the blue bus", "B": "the red car", "C": "a bicycle", "D": "nothing"}


@pytest.mark.parametrize(
    "prediction, letter",
    [("B", "B"), ("b", "B"), ("B.", "B"), ("(C)", "C"), ("(c)", "C"), ("C)", "C"), ("Answer: B", "B"),
     ("answer: b", "B"), ("The answer is D.", "D"), ("The correct answer is option C", "C"),
     ("**Answer:** (A)", "A"), ("B. the red car", "B"), ("b. the red car", "B"), ("the red car", "B"),
     ("It is the red car.", "B"), ("A", "A"), ("A.", "A"), ("a", "A"),
     ("A cat is sitting next to the red car.", "B"),  # the article A is not option A
     ("A bicycle.", "C"),  # "A bicycle" is the article + option C's text, not option A
     ("I think C is right", "C"), ("Between (A) and (C), I pick (C)", "C"),
     ("Answer: B, not A", "B"), ("The answer is A.", "A"),
     ("a red car", "B"), ("I don't know", None), ("the car", None), ("", None),
     ("I think Answer is unclear", None)],  # lmms-eval's shared extractor falls back to the A of "Answer"
)  # fmt: skip
def test_extract_choice(prediction, letter):
    assert extract_choice(prediction, OPTS) == letter


def test_extract_choice_prefers_the_longest_containing_option():
    opts = {"A": "red", "B": "dark red", "C": "blue"}
    assert extract_choice("It is dark red.", opts) == "B"
    assert extract_choice("red or blue", opts) is None  # two unrelated options: no answer
    assert extract_choice("E", {"A": "x", "B": "y"}) is None  # not an option letter


def test_lmms_eval_vstar_bug_is_not_reproduced():
    # lmms-eval's V* extractor upper-cases and matches ^[A-D] first: "Answer: B" -> "A".
    assert multiple_choice("Answer: B", ["B"], {"A": "red", "B": "blue"}) == 1.0
    assert multiple_choice("Answer: B", ["A"], {"A": "red", "B": "blue"}) == 0.0


def test_multiple_choice_free_form_gold():
    # RealWorldQA has a few free-form golds: compared as VQA-normalised text.
    assert multiple_choice("Downhill.", ["Downhill"], {"A": "x", "B": "y"}) == 1.0
    assert multiple_choice("zero", ["0"], {}) == 1.0
    assert multiple_choice("uphill", ["Downhill"], {}) == 0.0


def test_score_answer_passes_options_and_rejects_unknown_metrics():
    assert score_answer("multiple_choice", "the red car", ["B"], {"options": OPTS}) == 1.0
    assert score_answer("multiple_choice", "the red car", ["B"], None) == 0.0  # no option texts to match
    assert score_answer("anls", "abc", ["abc"]) == 1.0
    with pytest.raises(KeyError, match="unknown metric 'bleu'"):
        score_answer("bleu", "a", ["a"])


def test_aggregate_over_records():
    records = [
        {"metric": "pope", "prediction": "Yes.", "answers": ["yes"], "score": 1.0},
        {"metric": "pope", "prediction": "no", "answers": ["yes"], "score": 0.0},
        {"metric": "ocrbench", "prediction": "x", "answers": ["x"], "score": 1.0},
        {"metric": "ocrbench_hme", "prediction": "y", "answers": ["z"], "score": 0.0},
        {"metric": "anls", "prediction": "y", "answers": ["y"], "score": 1.0},
    ]
    agg = aggregate(records)
    assert agg["pope_recall"] == pytest.approx(0.5) and agg["pope_precision"] == 1.0
    assert agg["ocrbench_score"] == 1.0 and agg["ocrbench_accuracy"] == pytest.approx(0.5)
    assert aggregate(records) == agg  # no state carried between calls (lmms-eval's OCRBench counter does)
    assert aggregate([records[-1]]) == {}
