"""Seed-box curation: OCR grounder on real receipts, the percentile expansion, and the no-human-box guard."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from zoomvlm.core.geometry import Box
from zoomvlm.cropvlm.curation import OCRGrounder, SeedBox, VLMGrounder, curate_boxes, expand_seed_boxes, sft_record


class SpyGrounder:
    """Records what it is given; returns a box derived from the question only (no image reading)."""

    name = "spy"

    def __init__(self):
        self.seen = []

    def ground(self, image, question, answers, key=""):
        self.seen.append((image.size, question, tuple(answers), key))
        k = (len(question) % 7) / 10
        return SeedBox(Box(k, k, k + 0.05 + 0.01 * len(answers[0]) % 0.3, k + 0.02), True, raw=answers[0])


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_curation_on_three_receipts_with_the_ocr_reader(demo_samples, tmp_path):
    samples = demo_samples[:9]  # 3 receipts x 3 questions
    assert len({s.image for s in samples}) == 3
    info = curate_boxes(samples, OCRGrounder(budget="side:1024"), tmp_path, progress=False)
    seeds = _rows(tmp_path / "seeds.jsonl")
    assert info["n"] == len(seeds) == 9
    assert info["n_failed"] <= 3  # a few noisy answers may not be found; most are
    for row in seeds:
        for key in ("seed_box", "box"):
            x0, y0, x1, y1 = row[key]
            assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0
        if not row["found"]:
            assert row["seed_box"] == [0.0, 0.0, 1.0, 1.0]
    # Judged (in this test only) against the human boxes the grounder never saw: the model-made seed box
    # covers the annotated line for nearly every question.
    evidence = {s.id: s.evidence_boxes for s in samples}
    hits = [max(Box(*r["seed_box"]).coverage(e) for e in evidence[r["id"]]) >= 0.9 for r in seeds if r["found"]]
    assert sum(hits) >= 7, hits
    # The SFT file: one conversation per sample, box text parsable, no evidence anywhere.
    sft = _rows(tmp_path / "sft.jsonl")
    assert [r["id"] for r in sft] == [s.id for s in samples]
    for r in sft:
        assert set(r) == {"id", "image", "question", "prompt", "completion"}
        text = r["completion"][0]["content"][0]["text"]
        assert text.startswith("[") and text.endswith("].")


def test_expansion_matches_the_documented_percentiles():
    # 10 boxes with areas 0.006 k (k = 1..10): nearest-rank p20..p80 = sorted[floor(q*n)] = areas of k = 3, 5, 7, 9.
    seeds = [Box(0.45, 0.3, 0.55, 0.3 + 0.06 * k) for k in range(1, 11)]
    boxes, thresholds = expand_seed_boxes(seeds)
    assert [round(t, 6) for t in thresholds] == [0.018, 0.03, 0.042, 0.054]
    expected_multiplier = [45, 45, 10, 10, 4, 4, 2, 2, 1, 1]
    for seed, box, m in zip(seeds, boxes, expected_multiplier, strict=True):
        cx, cy = seed.center
        grown = min(1.0, seed.width * math.sqrt(m)) * min(1.0, seed.height * math.sqrt(m))
        assert box.area == pytest.approx(grown, rel=1e-6), m
        if m == 1:
            assert box == seed
        assert 0.0 <= box.x0 < box.x1 <= 1.0 and 0.0 <= box.y0 < box.y1 <= 1.0


def test_human_boxes_never_reach_the_grounder_or_the_files(demo_samples, tmp_path):
    samples = demo_samples[:6]
    assert all(s.evidence_boxes for s in samples)
    spy_a, spy_b = SpyGrounder(), SpyGrounder()
    curate_boxes(samples, spy_a, tmp_path / "a", progress=False)
    # Same samples with DIFFERENT human boxes: every output byte must be identical.
    moved = [replace(s, evidence_boxes=(Box(0.0, 0.9, 0.1, 1.0),)) for s in samples]
    curate_boxes(moved, spy_b, tmp_path / "b", progress=False)
    for name in ("seeds.jsonl", "sft.jsonl", "curation.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert spy_a.seen == spy_b.seen and len(spy_a.seen) == 6
    text = (tmp_path / "a" / "sft.jsonl").read_text() + (tmp_path / "a" / "seeds.jsonl").read_text()
    assert "evidence" not in text
    for s in samples:  # no human box survives in any coordinate written out
        for ev in s.evidence_boxes:
            assert json.dumps(ev.as_list())[1:-1] not in text


def test_curation_resumes_without_regrounding(demo_samples, tmp_path):
    spy = SpyGrounder()
    curate_boxes(demo_samples[:4], spy, tmp_path, progress=False)
    raw = (tmp_path / "raw.jsonl").read_text().splitlines()
    (tmp_path / "raw.jsonl").write_text("\n".join(raw[:2]) + "\n" + raw[2][:10])  # killed mid-write
    spy2 = SpyGrounder()
    curate_boxes(demo_samples[:4], spy2, tmp_path, progress=False)
    assert [q for _, q, _, _ in spy2.seen] == [s.question for s in demo_samples[2:4]]
    assert len(_rows(tmp_path / "seeds.jsonl")) == 4


def test_curation_refuses_to_resume_with_another_grounder(demo_samples, tmp_path):
    curate_boxes(demo_samples[:2], SpyGrounder(), tmp_path, progress=False)
    other = SpyGrounder()
    other.name = "ocr@side:2048"
    with pytest.raises(ValueError, match="grounder: 'spy' -> 'ocr@side:2048'"):
        curate_boxes(demo_samples[:3], other, tmp_path, progress=False)
    assert other.seen == [] and len(_rows(tmp_path / "raw.jsonl")) == 2  # nothing grounded, nothing mixed
    curate_boxes(demo_samples[:3], SpyGrounder(), tmp_path, progress=False)  # the same settings resume
    assert len(_rows(tmp_path / "raw.jsonl")) == 3


def test_curation_refuses_to_resume_with_another_reading_budget_or_threshold(demo_samples, tmp_path):
    from zoomvlm.cropvlm.curation import OCRGrounder, grounder_settings

    class Fixed(OCRGrounder):  # the OCR grounder's settings, without reading
        def ground(self, image, question, answers, key=""):
            return SeedBox(Box(0.1, 0.1, 0.5, 0.2), True)

    curate_boxes(demo_samples[:1], Fixed(budget="side:2048", threshold=90), tmp_path, progress=False)
    assert grounder_settings(Fixed()) == {"grounder": "ocr", "budget": "side:2048", "threshold": 90.0, "match": "v2"}
    with pytest.raises(ValueError, match="budget: 'side:2048' -> 'side:1024'"):
        curate_boxes(demo_samples[:2], Fixed(budget="side:1024", threshold=90), tmp_path, progress=False)
    with pytest.raises(ValueError, match="threshold: 90"):
        curate_boxes(demo_samples[:2], Fixed(budget="side:2048", threshold=50), tmp_path, progress=False)
    # a curation started under the earlier matching rule (no "match" in its settings) is not continued
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({k: v for k, v in json.loads(settings.read_text()).items() if k != "match"}))
    with pytest.raises(ValueError, match="match"):
        curate_boxes(demo_samples[:2], Fixed(budget="side:2048", threshold=90), tmp_path, progress=False)


def test_curation_rejects_samples_without_answers(demo_samples, tmp_path):
    with pytest.raises(ValueError, match="no answer"):
        curate_boxes([replace(demo_samples[0], answers=())], SpyGrounder(), tmp_path, progress=False)


def test_vlm_grounder_maps_bbox_2d_from_the_resized_frame(tiny_vlms, noise_images, monkeypatch):
    import torch

    from zoomvlm.targets import hf

    model, processor = tiny_vlms["qwen2_5_vl"]
    grounder = VLMGrounder(model=model, processor=processor, max_new_tokens=4)
    image = noise_images[0]  # 300 x 200
    # The tiny model writes noise: the whole image, counted as a failure.
    seed = grounder.ground(image, "Where is the total?", ["1"])
    assert not seed.found and seed.box == Box.full() and seed.error

    # A model that saw a 280 x 196 resize answers in THAT frame; the box comes back normalised.
    def fake_generate(model, processor, prompts, images, max_new_tokens, **kw):
        inputs = {"image_grid_thw": torch.tensor([[1, 14, 20]])}  # 14 x 20 patches of 14 px = 196 x 280
        return ['{"bbox_2d": [28, 49, 140, 98]}'], inputs, [8]

    monkeypatch.setattr(hf, "generate_texts", fake_generate)
    seed = grounder.ground(image, "Where is the total?", ["1"])
    assert seed.found
    assert seed.box.as_list() == pytest.approx([0.1, 0.25, 0.5, 0.5])


def test_sft_record_is_trl_prompt_completion():
    r = sft_record("x", "img.jpg", "What is the date?", Box(0.0, 0.0, 1.0, 1.0))
    assert r["prompt"][0]["role"] == "user" and r["completion"][0]["role"] == "assistant"
    assert r["prompt"][0]["content"][1]["text"].startswith("What is the date?\nOutline the region")
    assert r["completion"][0]["content"][0]["text"] == "[0, 0, 100, 100]."


class _Rows:
    """A reader stand-in: the given rows of ``(text, (x0, y0, x1, y1))`` lines, in pixels of a 1000 x 1000 view."""

    def __init__(self, rows):
        self.rows = rows

    def read(self, view):
        from types import SimpleNamespace

        def quad(x0, y0, x1, y1):
            return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]

        return [[SimpleNamespace(text=t, box=quad(*b)) for t, b in row] for row in self.rows]


_RECEIPT = [
    [("ITEM A", (0, 100, 300, 120)), ("5.00", (800, 100, 900, 120))],
    [("TOTAL :", (0, 500, 300, 520)), ("RM", (600, 500, 650, 520)), ("39.80", (800, 500, 900, 520))],
]


@pytest.mark.parametrize(
    "answer, rows, box, raw",
    [
        # an amount matches a whole number of equal value: not inside 19.00 / 41.00, and 39.8 = 39.80
        ("9.00", [[("SUBTOTAL 19.00", (0, 100, 1000, 120))], [("TOTAL 9.00", (0, 500, 1000, 520))]],
         [0.0, 0.5, 1.0, 0.52], "TOTAL 9.00"),
        ("1.00", [[("Total Qty: 1.00", (0, 100, 1000, 120))], [("Change 41.00", (0, 300, 1000, 320))]],
         [0.0, 0.1, 1.0, 0.12], "Total Qty: 1.00"),
        ("39.80", [[("TOTAL 39.8", (0, 100, 1000, 120))]], [0.0, 0.1, 1.0, 0.12], "TOTAL 39.8"),
        ("RM 39.80", _RECEIPT, [0.8, 0.5, 0.9, 0.52], "39.80"),
        # a text answer the reader split over one row: that row's matching lines, not the row above too
        ("TOTAL : RM", _RECEIPT, [0.0, 0.5, 0.65, 0.52], "TOTAL : RM 39.80"),
    ],
)  # fmt: skip
def test_the_ocr_grounder_boxes_the_answer_and_only_it(answer, rows, box, raw):
    from PIL import Image

    from zoomvlm.cropvlm.curation import OCRGrounder

    seed = OCRGrounder(reader=_Rows(rows)).ground(Image.new("RGB", (1000, 1000)), "q", [answer], key=answer)
    assert seed.found and seed.box.as_list(3) == box and seed.raw == raw


@pytest.mark.parametrize(
    "answer, rows",
    [
        ("0012", [[("Total 12.00", (0, 100, 300, 120))], [("Cash 12.00", (0, 300, 300, 320))]]),  # digits, not 12
        ("12.50", [[("1", (0, 100, 50, 120)), ("2.50", (800, 100, 900, 120))]]),  # two lines do not fuse
        ("139.80", [[("ITEM 1", (0, 100, 300, 120))], [("39.80", (800, 300, 900, 320))]]),  # nor two rows
        ("1.00", [[("COUNTER 1", (0, 100, 300, 120))]]),  # an amount is not an integer token
    ],
)  # fmt: skip
def test_the_ocr_grounder_does_not_find_a_number_that_is_not_there(answer, rows):
    from PIL import Image

    from zoomvlm.cropvlm.curation import OCRGrounder

    assert not OCRGrounder(reader=_Rows(rows)).ground(Image.new("RGB", (1000, 1000)), "q", [answer], key=answer).found


def test_the_ocr_grounder_finds_numbers_beside_other_numbers_and_ids_with_zeros():
    from PIL import Image

    from zoomvlm.cropvlm.curation import OCRGrounder

    def ground(answer, rows):
        return OCRGrounder(reader=_Rows(rows)).ground(Image.new("RGB", (1000, 1000)), "q", [answer], key=answer)

    assert ground("39.80", [[("2 19.90 39.80", (0, 100, 1000, 120))]]).found  # numbers of one line stay apart
    assert ground("2018", [[("25/01/2018 1:22:56PM", (0, 100, 1000, 120))]]).found
    ids = [[("Table 7", (0, 100, 300, 120))], [("Invoice No: 007", (0, 500, 500, 520))]]
    assert ground("007", ids).raw == "Invoice No: 007"  # leading zeros count
