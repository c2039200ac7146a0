"""Golden tests: a changed template silently changes rewards and benchmark numbers."""

import pytest

from zoomvlm.core.prompts import cropper_prompt, grounding_prompt, target_prompt


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


def test_crop_set_policy_prompt_golden():
    from zoomvlm.awares.protocol import crop_set_policy_prompt

    assert crop_set_policy_prompt("What is the total?") == (
        "What is the total?\nCan this be answered from this low-resolution view? If yes, reply NO_CROPS. "
        "If not, reply GET_CROPS: [...] with the high-resolution crops to fetch: '0' top-left, '1' top-right, "
        "'2' bottom-left, '3' bottom-right, '4' center, '5' top, '6' bottom, '7' left, '8' right, "
        "'all' whole image."
    )


def test_awares_system_prompt_names_every_crop_and_the_exact_syntax():
    from zoomvlm.awares.protocol import AWARES_SYSTEM_PROMPT, CROP_SET, parse_get_crops

    assert all(f"'{k}'" in AWARES_SYSTEM_PROMPT for k in CROP_SET)
    assert parse_get_crops(AWARES_SYSTEM_PROMPT.split("e.g. ")[1]) == ["3"]  # the example parses
