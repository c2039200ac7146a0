import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from zoomvlm.awares.protocol import CROP_SET, ToolCallError, format_get_crops, parse_get_crops
from zoomvlm.core.geometry import (
    Box,
    BoxFormatError,
    Budget,
    crop_image,
    expand_small_box,
    format_bbox_2d,
    format_percent_box,
    parse_bbox_2d,
    parse_percent_box,
    percentile_thresholds,
    resize_to_budget,
)


# ---- percent text -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("[10, 20, 60, 80].", (0.1, 0.2, 0.6, 0.8)),
        ("[10,20,60,80]", (0.1, 0.2, 0.6, 0.8)),  # no spaces, no period
        ("  [ 0 , 0 , 100 , 100 ] . ", (0.0, 0.0, 1.0, 1.0)),
        ("[12.5, 20, 60.5, 80].", (0.125, 0.2, 0.605, 0.8)),
        ("The region is [5, 5, 50, 50].", (0.05, 0.05, 0.5, 0.5)),
    ],
)
def test_parse_percent_box_golden(text, expected):
    box = parse_percent_box(text)
    assert box.as_list(6) == pytest.approx(list(expected))


@pytest.mark.parametrize(
    "text, reason",
    [
        ("[10, 20, 60].", "expected 4 numbers, got 3"),
        ("[10, 20, 60, 80, 90].", "expected 4 numbers, got 5"),
        ("[10, 20, 160, 80].", "x2 = 160 is outside [0, 100]"),
        ("[-1, 20, 60, 80].", "x1 = -1 is outside [0, 100]"),
        ("[60, 20, 10, 80].", "x2 (10) must be > x1 (60)"),
        ("[10, 80, 60, 80].", "y2 (80) must be > y1 (80)"),
        ("[a, 20, 60, 80].", "'a' is not a number"),
        ("10, 20, 60, 80", "no [x1, y1, x2, y2] list found"),
        ("[]", "expected 4 numbers, got 0"),
    ],
)
def test_parse_percent_box_says_why(text, reason):
    with pytest.raises(BoxFormatError, match=re.escape(reason)):
        parse_percent_box(text)


def test_format_percent_box_golden():
    assert format_percent_box(Box(0.1, 0.2, 0.6, 0.8)) == "[10, 20, 60, 80]."
    # rounds outward so the text box contains the box and is never empty
    assert format_percent_box(Box(0.105, 0.2, 0.106, 0.2)) == "[10, 20, 11, 21]."


boxes = st.tuples(*[st.floats(0, 1, allow_nan=False)] * 4).map(
    lambda t: Box(min(t[0], t[2]), min(t[1], t[3]), max(t[0], t[2]), max(t[1], t[3]))
)


@given(boxes)
def test_percent_round_trip_contains_box(box):
    parsed = parse_percent_box(format_percent_box(box))
    assert parsed.coverage(box) == pytest.approx(1.0) or box.area == 0
    assert parsed.width <= box.width + 0.02 + 1e-9 or parsed.width <= 0.01 + 1e-9
    assert format_percent_box(parsed) == format_percent_box(box)  # idempotent once on the integer grid


@given(st.lists(st.integers(0, 100), min_size=4, max_size=4))
def test_integer_percent_text_round_trips_exactly(values):
    x1, y1, x2, y2 = values
    text = f"[{x1}, {y1}, {x2}, {y2}]."
    if x2 > x1 and y2 > y1:
        assert format_percent_box(parse_percent_box(text)) == text
    else:
        with pytest.raises(BoxFormatError):
            parse_percent_box(text)


# ---- Box ---------------------------------------------------------------------------------------
def test_box_validation():
    with pytest.raises(BoxFormatError, match="inverted"):
        Box(0.5, 0, 0.4, 1)
    with pytest.raises(BoxFormatError, match=r"\[0, 1\]"):
        Box(0, 0, 1.5, 1)
    with pytest.raises(BoxFormatError, match="finite"):
        Box(0, 0, math.nan, 1)


def test_iou_and_coverage():
    a, b = Box(0, 0, 0.5, 0.5), Box(0.25, 0.25, 0.75, 0.75)
    assert a.iou(a) == 1.0
    assert a.iou(b) == pytest.approx(0.0625 / (0.25 + 0.25 - 0.0625))
    assert a.iou(Box(0.6, 0.6, 1, 1)) == 0.0
    assert Box.full().coverage(b) == 1.0
    assert a.coverage(b) == pytest.approx(0.25)


@given(boxes, boxes)
def test_iou_symmetric_and_bounded(a, b):
    assert a.iou(b) == pytest.approx(b.iou(a))
    assert 0.0 <= a.iou(b) <= 1.0 + 1e-9


def test_pixels_round_trip():
    box = Box.from_pixels([155, 293, 667, 361], 835, 2333)
    assert box.to_pixels(835, 2333) == (155, 293, 667, 361)
    assert Box.from_pixels([-10, -10, 2000, 3000], 835, 2333) == Box.full()  # clipped
    with pytest.raises(BoxFormatError, match="outside"):
        Box.from_pixels([900, 0, 1000, 10], 835, 2333)
    with pytest.raises(BoxFormatError, match="4 numbers"):
        Box.from_pixels([1, 2, 3], 835, 2333)
    import numpy as np

    assert Box.from_pixels(np.array([155, 293, 667, 361], np.float32), 835, 2333) == box  # numpy numbers are numbers
    for bad in (["10", "20", "300", "400"], "1234", [True, 0, 300, 400], [float("-inf"), 0, float("inf"), 100],
                [0, 0, float("nan"), 10]):  # fmt: skip
        with pytest.raises(BoxFormatError, match="4 (finite )?numbers"):
            Box.from_pixels(bad, 835, 2333)
    with pytest.raises(BoxFormatError, match="looks normalised"):  # a normalised box where pixels are expected
        Box.from_pixels([0.589, 0.628, 0.715, 0.642], 835, 2333)


@given(boxes, st.integers(1, 4000), st.integers(1, 4000))
def test_to_pixels_contains_box_and_is_nonempty(box, w, h):
    x0, y0, x1, y1 = box.to_pixels(w, h)
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    assert x0 <= box.x0 * w + 1e-6 and x1 >= min(w, box.x1 * w - 1e-6)


# ---- bbox_2d (Qwen2.5-VL) --------------------------------------------------------------------------
def test_bbox_2d_maps_from_the_resized_frame():
    # Qwen2.5-VL saw the 835x2333 receipt resized to 392x1092 and answered in THAT frame.
    text = '```json\n[\n  {"bbox_2d": [196, 546, 294, 819], "label": "total"}\n]\n```'
    box = parse_bbox_2d(text, seen_size=(392, 1092))
    assert box.as_list() == [0.5, 0.5, 0.75, 0.75]
    # the same box in the original frame: what the official code gets wrong by dividing by the original size
    assert box.to_pixels(835, 2333) == (417, 1166, 627, 1750)


def test_bbox_2d_round_trip_and_errors():
    box = Box(0.1, 0.2, 0.5, 0.9)
    assert parse_bbox_2d(format_bbox_2d(box, (1000, 500)), (1000, 500)).iou(box) == pytest.approx(1.0)
    for bad in ["no box here", '{"bbox_2d": [1, 2, 3]}', '{"bbox_2d": [50, 50, 10, 10]}']:
        with pytest.raises(BoxFormatError):
            parse_bbox_2d(bad, (100, 100))


# ---- percentile expansion ------------------------------------------------------------------------
def test_percentile_thresholds_nearest_rank():
    ratios = [i / 100 for i in range(1, 11)]  # 0.01 .. 0.10
    assert percentile_thresholds(ratios) == (0.03, 0.05, 0.07, 0.09)
    with pytest.raises(ValueError):
        percentile_thresholds([])


@pytest.mark.parametrize("area, multiplier", [(0.01, 45), (0.03, 10), (0.05, 4), (0.07, 2), (0.09, 1)])
def test_expand_small_box_multipliers(area, multiplier):
    thresholds = (0.02, 0.04, 0.06, 0.08)
    side = math.sqrt(area)
    box = Box(0.5 - side / 2, 0.5 - side / 2, 0.5 + side / 2, 0.5 + side / 2)
    grown = expand_small_box(box, thresholds)
    assert grown.area == pytest.approx(min(1.0, area * multiplier))
    assert grown.center == pytest.approx(box.center)


def test_expand_shifts_back_inside():
    box = Box(0.0, 0.0, 0.1, 0.1)  # corner box, area 0.01 -> x45 -> side 0.67
    grown = expand_small_box(box, (0.02, 0.04, 0.06, 0.08))
    assert (grown.x0, grown.y0) == (0.0, 0.0)
    assert grown.width == pytest.approx(0.1 * math.sqrt(45))
    assert grown.coverage(box) == 1.0


# ---- AwaRes crop set ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, keys",
    [
        ("GET_CROPS: ['3']", ["3"]),
        ("GET_CROPS: ['0', '5']", ["0", "5"]),
        ('GET_CROPS: ["0","5"]', ["0", "5"]),
        ("get_crops:[ 1 , 2 ]", ["1", "2"]),
        ("GET_CROPS ['all']", ["all"]),
        ("I need more detail. GET_CROPS: ['top-left', 'center']", ["0", "4"]),
        ("GET_CROPS: ['3', '3']", ["3"]),
        ("The total is 9.00", None),
        # the call after prose that names it, and in markdown (the first mention with a list is the call)
        ("I will use GET_CROPS to read the total. GET_CROPS: ['3']", ["3"]),
        ("**GET_CROPS**: ['3']", ["3"]),
        ("GET_CROPS: `['3']`", ["3"]),
        # near-miss spellings of the token are the call, not a direct answer
        ("GET_CROP: ['3']", ["3"]),
        ("GET-CROPS: ['3']", ["3"]),
        # the plain words in an answer are not a call
        ("They get crops from the field.", None),
        ("NO_CROPS (the low view is enough, no need to get crops)", None),
    ],
)
def test_parse_get_crops_golden(text, keys):
    assert parse_get_crops(text) == keys


@pytest.mark.parametrize(
    "text, reason",
    [("GET_CROPS: ['9']", "unknown crop '9'"), ("GET_CROPS: []", "empty"), ("GET_CROPS please", "without a"),
     ("GET_CROPS: [banana]", "unknown crop 'banana'"), ("I would call GET_CROP here", "without a"),
     ("GET CROPS: '3'", "without a"), ("get crops: 0, 5", "without a")],
)  # fmt: skip
def test_parse_get_crops_garbage_raises(text, reason):
    with pytest.raises(ToolCallError, match=reason):
        parse_get_crops(text)


@given(st.lists(st.sampled_from(list(CROP_SET)), min_size=1, max_size=5, unique=True))
def test_get_crops_round_trip(keys):
    assert parse_get_crops(format_get_crops(keys)) == keys


def test_crop_set_geometry():
    assert len(CROP_SET) == 10
    assert CROP_SET["3"] == Box(0.5, 0.5, 1, 1)
    assert CROP_SET["4"].area == pytest.approx(0.25)
    assert sum(CROP_SET[k].area for k in "0123") == pytest.approx(1.0)


# ---- images ----------------------------------------------------------------------------------------
def test_budget_parse_and_fit():
    assert Budget.parse("384").fit(835, 2333) == (137, 384)
    assert Budget.parse("pixels:10000").fit(200, 100)[0] * Budget.parse("pixels:10000").fit(200, 100)[1] <= 10000
    assert Budget.parse("pixels:10000").fit(200, 100) == (141, 70)  # each side x sqrt(10000 / 20000): the most
    assert Budget.parse("pixels:1605632").fit(4492, 3164) == (1509, 1063)  # pixels that fit (AwaRes's high view)
    assert Budget.parse("native").fit(835, 2333) == (835, 2333)
    assert Budget(max_side=4000).fit(835, 2333) == (835, 2333)  # never upscales
    with pytest.raises(ValueError, match="cannot read budget"):
        Budget.parse("big")


def test_crop_from_original_and_resize():
    img = Image.new("RGB", (1000, 500))
    crop = crop_image(img, Box(0.5, 0.5, 1.0, 1.0))
    assert crop.size == (500, 250)
    assert resize_to_budget(crop, Budget(max_side=100)).size == (100, 50)
    assert resize_to_budget(crop, Budget()) is crop


def test_budget_parse_takes_every_form_including_a_budget():
    b = Budget(max_side=384)
    assert Budget.parse(b) is b
    assert Budget.parse(384) == Budget.parse("384") == Budget.parse("side:384") == b
    assert Budget.parse(None) == Budget.parse("native") == Budget()
    with pytest.raises(ValueError, match="cannot read budget"):
        Budget.parse("huge")


def test_budget_strings_are_unique_and_parse_back_and_a_bool_is_not_a_budget():
    both = Budget(max_side=384, max_pixels=1_000_000)
    assert str(both) == "side:384,pixels:1000000" and Budget.parse(str(both)) == both
    assert str(both) != str(Budget(max_pixels=1_000_000))  # the response cache keys on it
    for spec in ("384", "side:384", "pixels:200000", "native"):
        assert Budget.parse(str(Budget.parse(spec))) == Budget.parse(spec)
    for bad in (True, "side:384,side:512"):
        with pytest.raises(ValueError):
            Budget.parse(bad)
    with pytest.raises(ValueError):
        Budget(max_side=True)


def test_a_box_takes_numpy_scalars_but_not_bools():
    import numpy as np

    assert Box(*np.array([0.1, 0.2, 0.5, 0.6], np.float32)).x1 == 0.5
    with pytest.raises(BoxFormatError):
        Box(True, 0.0, 1.0, 1.0)
