"""Perception: the reader's pass on a cheap view -> candidate regions (real receipt crops, real PP-OCR weights)."""

import numpy as np
import pytest

from zoomvlm.core.geometry import Box, Budget, crop_image, resize_to_budget
from zoomvlm.policies.perception import (
    N_REGION_FEATURES,
    Perceiver,
    Region,
    candidate_regions,
    char_ngrams,
    ink_outline,
    region_features,
)
from zoomvlm.targets.base import TargetRequest


@pytest.fixture(scope="module")
def receipt_half(demo_samples):
    """The lower half of sroie_017 (its total 39.80 is printed there) and the total's sample."""
    total = next(s for s in demo_samples if s.id == "sroie_017_total")
    image = total.load_image()
    return crop_image(image, Box(0.0, 0.5, 1.0, 1.0)), total


def test_candidates_on_a_real_receipt_crop_hold_the_total_line(receipt_half):
    crop, total = receipt_half
    p = Perceiver(Budget(max_side=512)).perceive(crop)
    assert len(p.lines) >= 5 and all(r.kind == "line" for r in p.lines)
    assert {r.kind for r in p.regions} >= {"line", "pair"}
    # the human box of the total, in the crop's frame (evaluation of the test only)
    ev = total.evidence_boxes[0]
    ev_crop = Box(ev.x0, (ev.y0 - 0.5) * 2, ev.x1, (ev.y1 - 0.5) * 2)
    best = max(p.lines, key=lambda r: r.box.iou(ev_crop))
    assert best.box.iou(ev_crop) > 0.2, [(r.text, r.box) for r in p.lines]
    # every region is inside the image and made of the lines it names
    for r in p.regions:
        assert r.members and all(0 <= m < len(p.lines) for m in r.members)
        for m in r.members:
            assert r.box.coverage(p.lines[m].box) > 0.99
    assert p.ink.coverage(best.box) > 0.99


def test_candidate_regions_merge_rows_pairs_and_blocks():
    def line(i, y, x0=0.1, x1=0.4, text="a"):
        return Region(Box(x0, y, x1, y + 0.02), text, 0.9, "line", 1, (i,))

    lines = [line(0, 0.10, text="TOTAL"), line(1, 0.10, 0.5, 0.8, "9.00"), line(2, 0.13), line(3, 0.50)]
    regions = candidate_regions(lines, max_block=3)
    kinds = [r.kind for r in regions]
    assert kinds[:4] == ["line"] * 4
    row = next(r for r in regions if r.kind == "row")
    assert row.text == "TOTAL 9.00" and row.members == (0, 1)
    pair = next(r for r in regions if r.kind == "pair")
    assert set(pair.members) == {0, 1, 2}  # the row + the line right below; the far line 3 joins nothing
    assert all(3 not in r.members for r in regions if r.kind != "line")


def test_shared_first_pass_is_read_once_and_charged_to_the_target(receipt_half):
    from zoomvlm.targets.ocr import OCRTarget

    crop, _ = receipt_half
    target = OCRTarget(384)
    perceiver = Perceiver(384)
    assert perceiver.bind(target)
    p = perceiver.perceive(crop)
    assert p.shared_seconds > 0
    calls = []
    original = target._read_uncached
    target._read_uncached = lambda view: calls.append(view.size) or original(view)
    (gen,) = target.generate([TargetRequest([crop], "q")])
    assert calls == []  # the target reused the policy's pass of its own global view
    assert gen.usage.seconds >= p.shared_seconds  # ... and paid for it
    # the target's transcript is the same as from a fresh reader
    (fresh,) = OCRTarget(384).generate([TargetRequest([crop], "q")])
    assert gen.text == fresh.text
    # a target at another budget shares nothing
    assert not Perceiver(384).bind(OCRTarget(512))
    # the perceiver's memo outlives the target's LRU: a second question about the image re-reads the view for
    # the target, and those seconds are shared (the pipeline takes them off the policy; the target pays them)
    target._reads.clear()
    again = perceiver.perceive(crop)
    assert again.shared_seconds > 0 and again.seconds == again.shared_seconds
    (gen,) = target.generate([TargetRequest([crop], "q")])
    assert gen.usage.seconds >= again.shared_seconds


def test_features_are_deterministic_and_fixed_size(receipt_half):
    crop, _ = receipt_half
    view = resize_to_budget(crop, Budget(max_side=384))
    assert view.size[1] == 384
    p = Perceiver(384).perceive(crop)
    f = np.stack([region_features(r, p) for r in p.regions])
    assert f.shape == (len(p.regions), N_REGION_FEATURES) and np.isfinite(f).all()
    assert np.array_equal(char_ngrams("TOTAL 12.50"), char_ngrams("TOTAL 99.10"))  # digits folded
    assert not np.array_equal(char_ngrams("TOTAL"), char_ngrams("DATE"))


def test_ink_outline_finds_the_dark_part_of_a_page():
    from PIL import Image

    page = Image.new("L", (400, 800), 255)
    page.paste(0, (100, 200, 300, 600))
    ink = ink_outline(page)
    assert abs(ink.x0 - 0.25) < 0.02 and abs(ink.y1 - 0.75) < 0.02
    assert ink_outline(Image.new("L", (50, 50), 128)) == Box.full()


def _quad(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float32)


def test_two_pass_lines_take_text_from_the_text_pass_and_recognise_only_illegible_pages():
    from zoomvlm.policies.perception import perception_from_passes

    # text pass at 100x100 px: one merged row read as "TOTAL 9.00"; detection at 400x400 px splits it in two
    text = [(_quad(10, 10, 90, 14), "TOTAL 9.00", 0.9)]
    quads = [_quad(40, 40, 160, 56), _quad(200, 40, 360, 56), _quad(40, 300, 200, 316)]
    asked = []

    def recognise(idx):
        asked.append(list(idx))
        return [(f"hi{i}", 0.8) for i in idx]

    p = perception_from_passes(text, (100, 100), quads, (400, 400), recognise, legible=0.5)
    assert [r.text for r in p.lines] == ["TOTAL 9.00", "TOTAL 9.00", ""]  # both halves of the row, not the far line
    assert p.view_size == (400, 400) and p.lines[0].box == Box(0.1, 0.1, 0.4, 0.14)
    assert p.legibility == pytest.approx(2 / 3) and p.recognised == 0 and asked == []  # legible: nothing recognised
    # an illegible page (the text pass read nothing confidently): the unread lines are recognised, capped
    weak = [(_quad(10, 10, 90, 14), "T0TA", 0.2)]
    p = perception_from_passes(weak, (100, 100), quads, (400, 400), recognise, legible=0.5, max_recognise=2)
    assert asked == [[0, 1]] and p.recognised == 2
    assert [r.text for r in p.lines] == ["hi0", "hi1", ""] and p.legibility == 0.0


def test_two_pass_perceiver_boxes_come_from_the_detector_at_its_budget(receipt_half):
    from zoomvlm.targets.ocr import OCRTarget

    crop, total = receipt_half
    target = OCRTarget(384)
    perceiver = Perceiver(384, detect_budget=1024)
    assert perceiver.bind(target)
    p = perceiver.perceive(crop)
    assert p.view_size == resize_to_budget(crop, Budget(max_side=1024)).size
    assert p.shared_seconds > 0 and p.seconds > p.shared_seconds  # the detector is the policy's own cost
    ev = total.evidence_boxes[0]
    ev_crop = Box(ev.x0, (ev.y0 - 0.5) * 2, ev.x1, (ev.y1 - 0.5) * 2)
    best = max(p.lines, key=lambda r: r.box.iou(ev_crop))
    assert best.box.iou(ev_crop) > 0.3, [(r.text, r.box) for r in p.lines]
    assert sum(bool(r.text) for r in p.lines) >= len(p.lines) // 2  # most lines carry the text pass's reading
    # the target still finds its own first pass memoised: one read, charged to it
    calls = []
    original = target._read_uncached
    target._read_uncached = lambda view: calls.append(view.size) or original(view)
    target.generate([TargetRequest([crop], "q")])
    assert calls == []


def test_part_windows_cover_a_wide_line_and_v2_features_say_how_legible_a_crop_is():
    from zoomvlm.policies.perception import Perception, n_region_features, part_regions

    # a 1400 px line on a 2000 px wide page, and a 300 px one
    wide = Region(Box(0.05, 0.5, 0.75, 0.51), "Advertising expense was 714.3 million in 2015", 0.9, "line", 1, (0,))
    short = Region(Box(0.1, 0.6, 0.25, 0.61), "Total", 0.9, "line", 1, (1,))
    parts = part_regions([wide, short], (2000, 2000), part_px=512)
    assert parts and all(p.kind == "part" and p.members == (0,) for p in parts)
    assert all(abs(p.box.width * 2000 - 512) < 1e-6 for p in parts)
    assert parts[0].box.x0 == pytest.approx(wide.box.x0) and parts[-1].box.x1 == pytest.approx(wide.box.x1)
    # consecutive windows overlap by half: any span up to 256 px lies whole in one of them
    assert all(b.box.x0 - a.box.x0 <= 256 / 2000 + 1e-9 for a, b in zip(parts, parts[1:], strict=False))
    assert parts[-1].text.endswith("2015") and parts[0].text.startswith("Advertising")
    with pytest.raises(ValueError, match="part_px"):
        part_regions([wide], (2000, 2000), part_px=4)
    p = Perception((wide, short), (wide, short, *parts), Box.full(), (1024, 1024), image_size=(2000, 2000))
    f_wide, f_part = region_features(wide, p, 2), region_features(parts[0], p, 2)
    assert len(f_wide) == n_region_features(2) == n_region_features(1) + 3
    # the whole line is shrunk ~3.6x at a 384 px target, its 512 px window only 1.3x: the window reads larger
    assert f_wide[-2] < f_part[-2] and f_wide[-1] < f_part[-1]
    assert f_part[16 + 4] == 1.0  # the "part" one-hot
    assert np.array_equal(region_features(wide, p, 3), f_wide)  # version 3 changes only the question matching
    with pytest.raises(ValueError, match="version"):
        region_features(wide, p, 4)


def test_seed_box_is_narrowed_to_the_answer_inside_a_wide_line_only(tmp_path):
    import json

    from zoomvlm.cropvlm.proposal_data import refine_seed_boxes
    from zoomvlm.data.samples import Sample

    rows = [
        {"id": "a", "seed_box": [0.1, 0.5, 0.8, 0.52], "found": True, "raw": "Advertising expense was 714.3 million"},
        {"id": "b", "seed_box": [0.1, 0.6, 0.2, 0.62], "found": True, "raw": "TOTAL 9.00"},
        {"id": "c", "seed_box": [0.0, 0.0, 1.0, 1.0], "found": False, "raw": None},
    ]
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = [Sample(id=i, image="x.png", width=2000, height=2000, question="q", answers=(a,))
               for i, a in [("a", "714.3"), ("b", "9.00"), ("c", "x")]]  # fmt: skip
    boxes = refine_seed_boxes(tmp_path, samples, part_px=512)
    a = boxes["a"]
    # "714.3" sits at characters 24..29 of 37: x in [0.1 + 0.7 * 22/37, 0.1 + 0.7 * 31/37]
    assert a.y0 == 0.5 and a.y1 == 0.52 and 0.1 < a.x0 < a.x1 < 0.8
    assert a.x0 == pytest.approx(0.1 + 0.7 * 22 / 37, abs=0.02)
    assert a.x1 == pytest.approx(0.1 + 0.7 * 31 / 37, abs=0.02)
    assert boxes["b"] == Box(0.1, 0.6, 0.2, 0.62)  # 200 px wide: kept whole
    assert boxes["c"] is None


def test_preloaded_reads_are_served_without_reading_and_outlive_the_lru(receipt_half):
    from zoomvlm.targets.ocr import OCRTarget

    crop, _ = receipt_half
    view = resize_to_budget(crop, Budget(max_side=384))
    fresh = OCRTarget(384).read_all(view)
    target = OCRTarget(384, cache_size=1)
    target.preload(view, fresh)
    calls = []
    target._read_uncached = lambda v: calls.append(v.size) or []
    other = resize_to_budget(crop.rotate(90, expand=True), Budget(max_side=384))
    target.read_all(other)  # a different view fills the one-read LRU
    assert [ln.text for ln in target.read_all(view)] == [ln.text for ln in fresh]
    assert calls == [other.size]  # only the new view was read; the preloaded one stayed
