import json

import pytest
from PIL import Image

from zoomvlm.data.samples import DatasetError, UnreadableImageError, load_image, load_jsonl


def _write(tmp_path, rows, image=True):
    if image:
        Image.new("RGB", (100, 200), "white").save(tmp_path / "a.png")
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


GOOD = {"id": "a_total", "image": "a.png", "width": 100, "height": 200, "question": "Total?", "answers": ["9.00"],
        "field": "total", "evidence_boxes": [[10, 20, 50, 40]]}  # fmt: skip


def test_loads_receipts_format(tmp_path):
    (sample,) = load_jsonl(_write(tmp_path, [GOOD]))
    assert sample.image == tmp_path / "a.png"  # relative to the JSONL's folder
    assert sample.evidence_boxes[0].as_list() == [0.1, 0.1, 0.5, 0.2]
    assert sample.load_image().size == (100, 200)


def test_bundled_demo_is_valid(demo_samples):
    assert len(demo_samples) == 12
    assert all(s.evidence_boxes for s in demo_samples)


@pytest.mark.parametrize(
    "row, message",
    [
        ("{not json", "d.jsonl:1: not valid JSON"),
        ({k: v for k, v in GOOD.items() if k != "answers"}, "d.jsonl:1: missing field 'answers'"),
        (GOOD | {"answers": []}, "non-empty list of strings"),
        (GOOD | {"width": "100"}, "field 'width' must be int"),
        (GOOD | {"evidence_boxes": [[10, 20, 5, 40]]}, "evidence_boxes[0]"),
        (GOOD | {"image": "missing.png"}, "image not found"),
        (GOOD | {"evidence_boxes": 5}, "d.jsonl:1: 'evidence_boxes' must be a list"),
        (GOOD | {"metric": "accuracy"}, "d.jsonl:1: unknown metric 'accuracy'"),
        (GOOD | {"field": 3}, "d.jsonl:1: field 'field' must be a string"),
        (GOOD | {"question": "  "}, "d.jsonl:1: 'question' is empty"),
    ],
)
def test_bad_lines_name_the_line(tmp_path, row, message):
    with pytest.raises(DatasetError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_jsonl(_write(tmp_path, [row]))


def test_duplicate_ids_rejected(tmp_path):
    with pytest.raises(DatasetError, match="d.jsonl:2: id 'a_total' already used on line 1"):
        load_jsonl(_write(tmp_path, [GOOD, GOOD]))


def test_unreadable_image(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(UnreadableImageError, match="cannot read image"):
        load_image(tmp_path / "bad.jpg")
    with pytest.raises(UnreadableImageError, match="not found"):
        load_image(tmp_path / "nope.jpg")


def test_a_photo_stored_sideways_loads_upright_as_the_server_decodes_it(tmp_path):
    import base64

    from PIL import Image

    from zoomvlm.data.samples import load_image
    from zoomvlm.serve.media import MediaLimits, decode_data_url

    raw = Image.new("RGB", (400, 300), "white")
    raw.paste((255, 0, 0), (0, 0, 100, 300))  # red on the stored left: the top once turned upright
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    raw.save(tmp_path / "photo.jpg", exif=exif.tobytes())
    image = load_image(tmp_path / "photo.jpg")
    assert image.size == (300, 400) and image.getpixel((150, 5))[0] > 200 and image.getpixel((150, 5))[1] < 80
    url = "data:image/jpeg;base64," + base64.b64encode((tmp_path / "photo.jpg").read_bytes()).decode()
    served = decode_data_url(url, MediaLimits(10_000_000, 10_000_000), "p").image
    assert served.size == image.size and served.tobytes() == image.tobytes()  # ask/eval and serve see one frame


def test_run_eval_refuses_repeated_ids_before_anything_is_answered(tmp_path):
    from dataclasses import replace

    from fakes import EchoTarget

    from zoomvlm.evaluation.run import run_eval
    from zoomvlm.policies import load_policy

    (sample,) = load_jsonl(_write(tmp_path, [GOOD]))
    target = EchoTarget()
    with pytest.raises(ValueError, match="repeated: 'a_total'"):
        run_eval([sample, replace(sample, question="again?")], load_policy("none"), target, tmp_path / "run",
                 progress=False)  # fmt: skip
    assert target.calls == 0 and not (tmp_path / "run").exists()


def test_a_metric_that_cannot_score_a_sample_fails_before_anything_is_answered(tmp_path):
    from fakes import EchoTarget

    from zoomvlm.evaluation.run import run_eval
    from zoomvlm.policies import load_policy

    samples = load_jsonl(_write(tmp_path, [GOOD]))
    target = EchoTarget()
    with pytest.raises(ValueError, match="sample 'a_total': POPE answers must be yes or no"):
        run_eval(samples, load_policy("none"), target, tmp_path / "run", metric="pope", progress=False)
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        run_eval(samples, load_policy("none"), target, tmp_path / "run", metric="f1", progress=False)
    assert target.calls == 0 and not (tmp_path / "run").exists()


def test_16_bit_gray_and_transparent_images_load_as_a_viewer_shows_them(tmp_path):
    """convert("RGB") alone clips a 16-bit scan to almost white and turns ink on a transparent page solid black."""
    import numpy as np

    ramp = np.tile(np.arange(0, 256, 16, dtype=np.uint16), (8, 1))  # 8-bit values 0..240
    Image.fromarray(ramp * 257).save(tmp_path / "gray16.png")  # the same picture at 16 bits
    with Image.open(tmp_path / "gray16.png") as raw:
        assert raw.mode.startswith("I")
    assert np.array_equal(np.asarray(load_image(tmp_path / "gray16.png"))[..., 0], ramp)
    ink = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    ink.putpixel((2, 2), (0, 0, 0, 255))
    ink.save(tmp_path / "ink.png")
    page = load_image(tmp_path / "ink.png")
    assert page.getpixel((0, 0)) == (255, 255, 255) and page.getpixel((2, 2)) == (0, 0, 0)
    Image.new("L", (4, 4), 128).save(tmp_path / "gray8.png")  # 8-bit gray, RGB, CMYK: as before
    assert load_image(tmp_path / "gray8.png").getpixel((0, 0)) == (128, 128, 128)


def test_an_image_over_pils_bomb_limit_is_a_clear_unreadable_image_error(tmp_path, monkeypatch):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 100 x 100 is over twice the limit: PIL refuses it
    with pytest.raises(UnreadableImageError, match="big.png.*decompression bombs: downscale the image"):
        load_image(tmp_path / "big.png")


def test_jsonl_bytes_a_person_may_save_are_read_or_named(tmp_path):
    """A byte-order mark (Windows editors) is read; a non-UTF-8 byte is an error naming file:line; a question
    holding U+2028 (a JSON string may) stays one record."""
    path = _write(tmp_path, [GOOD])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert load_jsonl(path)[0].id == "a_total"
    other = {**GOOD, "id": "b", "question": "Total\u2028(incl. tax)?"}
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(other, ensure_ascii=False) + "\n", encoding="utf-8")
    assert [s.question for s in load_jsonl(path)][1] == "Total\u2028(incl. tax)?"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + json.dumps({**GOOD, "id": "c"}).encode()[:-2] + b'\xff"}\n')
    with pytest.raises(DatasetError, match=f"{path}:2: not UTF-8"):
        load_jsonl(path)
