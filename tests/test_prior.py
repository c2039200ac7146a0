"""The non-reading ``prior`` control: nearest training questions' model-made boxes, placed in the ink outline."""

import numpy as np
import pytest
from PIL import Image

from zoomvlm.core.geometry import Box
from zoomvlm.policies import load_policy
from zoomvlm.policies.perception import QuestionEncoder
from zoomvlm.policies.prior import QuestionPrior, fit_prior, from_ink_frame, to_ink_frame


@pytest.fixture(scope="module")
def encoder():
    return QuestionEncoder()


def test_ink_frame_round_trip():
    ink = Box(0.2, 0.1, 0.8, 0.9)
    b = Box(0.3, 0.5, 0.6, 0.55)
    back = from_ink_frame(to_ink_frame(b, ink), ink)
    assert np.allclose(back.as_list(), b.as_list(), atol=1e-6)


def test_prior_follows_the_question_and_the_ink(tmp_path, encoder):
    ink = Box(0.0, 0.0, 1.0, 1.0)
    questions = ["What is the total amount?", "How much was paid in total?", "Which company issued this?",
                 "Who is the seller?"]  # fmt: skip
    boxes = [Box(0.5, 0.8, 0.9, 0.85), Box(0.5, 0.8, 0.9, 0.86), Box(0.1, 0.05, 0.9, 0.1), Box(0.1, 0.05, 0.9, 0.12)]
    fit_prior(questions, boxes, [ink] * 4, tmp_path / "p", encoder=encoder, k=2, lo=0.0, hi=1.0)
    prior = QuestionPrior(tmp_path / "p", encoder=encoder)
    page = Image.new("L", (400, 800), 255)
    page.paste(0, (0, 400, 400, 800))  # ink only in the lower half
    (total,), (company,) = (p.boxes for p in prior.propose([page, page], ["What was the total?", "Name of the shop?"]))
    assert total.y0 > company.y0
    assert company.y0 >= 0.49  # placed inside the page's ink outline (the lower half)
    assert abs(total.y0 - (0.5 + 0.8 * 0.5)) < 0.02
    # reproducible
    again = prior.propose([page], ["What was the total?"])[0].boxes[0]
    assert again == total


def test_load_policy_knows_prior_and_proposals(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_policy(f"prior:{tmp_path}")
    with pytest.raises(FileNotFoundError):
        load_policy(f"proposals:{tmp_path}")


def test_encoding_no_question_gives_no_rows():
    from zoomvlm.policies.perception import QuestionEncoder

    assert QuestionEncoder().encode([]).shape == (0, QuestionEncoder.dim)
