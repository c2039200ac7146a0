"""Golden tests: a changed template silently changes rewards and benchmark numbers."""

import pytest

from zoomvlm.prompts import cropper_prompt, grounding_prompt, target_prompt


def test_cropper_prompt_golden():
    assert cropper_prompt("What is the TOTAL amount?") == (
        "What is the TOTAL amount?\nOutline the region in the image that would help answer this question."
    )  # the question is kept verbatim (the official code's str.capitalize() lower-cases "TOTAL")


def test_target_prompt_golden():
    assert target_prompt("Who issued this receipt?") == "Who issued this receipt?\nGive a very brief answer."


def test_grounding_prompt_golden():
    assert grounding_prompt("What is the date?") == (
        "Outline the region in the image that would help answer the following question: What is the date?\n"
        "Output the coordinates in JSON format with a 'bbox_2d' field containing [x1, y1, x2, y2]."
    )


@pytest.mark.parametrize("bad", ["", "   ", None])
def test_empty_question_rejected(bad):
    with pytest.raises(ValueError, match="non-empty"):
        target_prompt(bad)
