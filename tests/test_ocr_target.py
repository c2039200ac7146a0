"""The real reader (RapidOCR weights from the wheel) on real receipt crops from the bundled demo data."""

import numpy as np
import pytest

from zoomvlm.core.geometry import Budget, crop_image
from zoomvlm.targets.base import TargetRequest
from zoomvlm.targets.ocr import PROB_FLOOR, ctc_substring_logprob


@pytest.fixture(scope="module")
def receipt(demo_samples):
    """sroie_017: total 39.80, company LIGHTROOM GALLERY SDN BHD (printed in small type)."""
    total = next(s for s in demo_samples if s.id == "sroie_017_total")
    image = total.load_image()
    pad = lambda b: b.pad(0.03, 0.01)  # noqa: E731
    return image, crop_image(image, pad(total.evidence_boxes[0]))


def test_reads_a_known_line_from_a_crop(ocr_target, receipt):
    _, crop = receipt
    (gen,) = ocr_target.generate([TargetRequest([crop], "What is the total?")])
    assert "39.80" in gen.text


def test_budget_respected_and_counted(ocr_target, receipt):
    image, crop = receipt
    (gen,) = ocr_target.generate([TargetRequest([image, crop], "q")])
    assert len(gen.usage.view_pixels) == 2
    for pixels, img in zip(gen.usage.view_pixels, [image, crop], strict=True):
        w, h = Budget(max_side=384).fit(*img.size)
        assert pixels == w * h and max(w, h) <= 384
    # and the reader does not upscale behind our back: the detector works on the view's own size
    assert ocr_target.engine.cfg.Det.limit_type == "max"
    assert ocr_target.engine.cfg.Global.max_side_len >= 100_000


def test_low_resolution_misses_what_the_crop_reveals(ocr_target, receipt):
    image, crop = receipt
    low, zoomed = ocr_target.generate([TargetRequest([image], "q"), TargetRequest([image, crop], "q")])
    assert "39.80" not in low.text.replace(" ", "")
    assert "39.80" in zoomed.text


def test_loglikelihood_true_text_far_above_one_char_change(ocr_target, receipt):
    image, crop = receipt
    reqs = [TargetRequest([crop], "q", answer=a) for a in ["39.80", "39.60", "9.8", "39. 80"]]
    true, changed, substring, spaced = ocr_target.loglikelihood(reqs)
    assert true > -0.5  # near certain
    assert changed < true - 5  # a one-digit change costs many nats
    assert substring > -0.5  # any part of a line may be the answer
    assert spaced == pytest.approx(true, abs=1e-6)  # spaces do not count, as in the contains metric
    # the crop is what makes the answer likely: the global view alone scores far lower
    (low,) = ocr_target.loglikelihood([TargetRequest([image], "q", answer="39.80")])
    assert low < true - 5


def test_loglikelihood_requires_answer(ocr_target, receipt):
    with pytest.raises(ValueError, match="no answer"):
        ocr_target.loglikelihood([TargetRequest([receipt[1]], "q")])


def _onehot_frames(seq, n_classes=6):
    """Per-frame log-probs that put probability ~1 on the given class ids (0 = blank)."""
    lp = np.full((len(seq), n_classes), np.log(PROB_FLOOR))
    for t, c in enumerate(seq):
        lp[t, c] = 0.0
    return lp


def test_ctc_substring_on_synthetic_frames():
    # classes: 0 blank, 1 'a', 2 'b', 3 'c', 4 'd', 5 space (last class is blank-like)
    frames = _onehot_frames([3, 0, 1, 1, 0, 2, 5, 4])  # reads "c a b d" -> "cab d"
    assert ctc_substring_logprob(frames, [[1], [2]]) == pytest.approx(0.0, abs=1e-6)  # "ab" inside
    assert ctc_substring_logprob(frames, [[1], [2], [4]]) == pytest.approx(0.0, abs=1e-6)  # space skipped
    assert ctc_substring_logprob(frames, [[2], [1]]) < -15  # "ba" is not there
    assert ctc_substring_logprob(frames, [[1], [1]]) < -15  # "aa" needs a blank between the a's
    assert ctc_substring_logprob(frames, [[3], [4]]) < -15  # "cd" are not adjacent
    with pytest.raises(ValueError):
        ctc_substring_logprob(frames, [])


def test_a_view_too_thin_for_rapidocrs_upscale_is_padded_not_blown_up(monkeypatch):
    """RapidOCR upscales a view whose short side is under 30 px; a 383 x 1 view became ~11490 x 30 (47 s, 4.8 GB).
    Such a view is padded to 30 px instead; an ordinary thin line crop is still upscaled as every README run was."""
    from PIL import Image

    from zoomvlm.core.geometry import Budget
    from zoomvlm.targets.ocr import OCRTarget

    target = OCRTarget(budget=Budget.parse("384"))
    engine = target.engine
    seen = []
    original = engine.preprocess_img

    def recording(img):
        out = original(img)
        seen.append((img.shape[1], img.shape[0], out[0].shape[1], out[0].shape[0]))
        return out

    monkeypatch.setattr(engine, "preprocess_img", recording)
    target.detect(Image.new("RGB", (383, 1), "white"))
    target.detect(Image.new("RGB", (384, 20), "white"))
    (w0, h0, dw0, dh0), (_, _, dw1, dh1) = seen
    assert (w0, h0) == (383, 30) and max(dw0, dh0) <= 4096  # padded, not ~11490 px wide
    assert dw1 == 576 and dh1 >= 30  # 384 x 20 upscaled by 1.5 (30 px short side), as before


def test_line_quads_of_a_wide_view_are_in_the_views_own_pixels(ocr_target):
    """RapidOCR pads views wider than 8:1 (and at most 30 px high) before detection: the quads ``detect`` returns
    must be mapped back to the view, or every line of a wide page lands lower than it is (or off the view)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=90)
    page = Image.new("RGB", (3000, 300), "white")
    draw = ImageDraw.Draw(page)
    lines = {"TOTAL 39.80": (100, 20), "DATE 12/03/2019": (1700, 180)}
    for text, xy in lines.items():
        draw.text(xy, text, fill="black", font=font)
    view = page.resize((1024, 102))  # 10:1, as a 1024 px budget leaves it
    scale = 1024 / 3000
    read = {ln.text.replace(" ", ""): ln.box for ln in ocr_target.read_all(view)}
    assert len(read) == 2
    for text, xy in lines.items():
        x0, y0, x1, y1 = (v * scale for v in draw.textbbox(xy, text, font=font))
        quad = read[text.replace(" ", "")]
        assert quad[:, 1].max() <= view.height  # inside the view
        cy, cx = quad[:, 1].mean(), quad[:, 0].mean()
        assert y0 - 3 <= cy <= y1 + 3 and x0 <= cx <= x1, (text, quad, (x0, y0, x1, y1))
