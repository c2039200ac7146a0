import pytest

from zoomvlm.geometry import Box
from zoomvlm.metrics import anls, contains, evidence_hit, exact, normalize_vqa, relaxed_accuracy, vqa_accuracy


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
    ],
)
def test_contains(prediction, answer, expected):
    assert contains(prediction, [answer]) == expected


def test_anls():
    assert anls("Lightroom Gallery", ["LIGHTROOM GALLERY"]) == 1.0
    assert anls("lightroom galery", ["LIGHTROOM GALLERY"]) == pytest.approx(1 - 1 / 17)
    assert anls("completely different", ["LIGHTROOM"]) == 0.0  # similarity below 0.5 scores 0
    assert anls("9.00", ["nine", "9.00"]) == 1.0  # best over answers


def test_exact():
    assert exact("  Asia  Mart ", ["ASIA MART"]) == 1.0
    assert exact("Asia Mart.", ["ASIA MART"]) == 0.0


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [("12.3%", ["12"], 1.0), ("12.7", ["12"], 0.0), ("$1,050", ["1000"], 1.0), ("0", ["0"], 1.0),
     ("0.01", ["0"], 0.0), ("Yes", ["yes"], 1.0), ("-5", ["5"], 0.0)],
)  # fmt: skip
def test_relaxed_accuracy(prediction, answers, expected):
    assert relaxed_accuracy(prediction, answers) == expected


def test_vqa_normalisation_and_leave_one_out():
    assert normalize_vqa("The Two dogs.") == "2 dogs"
    assert normalize_vqa("dont") == "don't"
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
