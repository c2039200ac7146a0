"""AwaRes self-zoom (zoomvlm.awares.self_zoom) on tiny random-weight VLMs: KV reuse equals recompute, RTR accounting,
tool errors are recorded (never replaced by the full image), the direct-answer path."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from zoomvlm.awares import self_zoom
from zoomvlm.awares.protocol import high_res_crops, low_res_view
from zoomvlm.awares.self_zoom import (
    SelfZoomPolicy,
    continue_with_crops,
    count_outcomes,
    finish_self_zoom,
    self_zoom_generate,
    start_self_zoom,
)
from zoomvlm.core.geometry import Budget, resize_to_budget
from zoomvlm.targets.hf import HFTarget

# 600x400 under side:336 -> high view 336x224 (12x8 merged Qwen tokens = 96, under the tiny processor's
# 128-token cap), low view and a quadrant 168x112 (6x4 = 24 tokens): RTR 0.25 per view, exactly AwaRes's numbers.
HIGH = Budget(max_side=336)
QUESTION = "What is the total?"
N_NEW = 6  # turn-2 tokens compared step by step; enough to follow the greedy path past its first token


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(np.random.default_rng(1).integers(0, 256, (400, 600, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def qwen(tiny_vlms):
    model, processor = tiny_vlms["qwen2_5_vl"]
    return HFTarget("tiny-qwen2.5-vl", model=model, processor=processor)


def _qwen_cost(processor, images) -> tuple[int, int]:
    """(merged visual tokens, processed pixels) of ``images``, straight from the Qwen image processor."""
    thw = processor.image_processor(images=images, return_tensors="pt")["image_grid_thw"]
    patches = int(thw.prod(-1).sum())
    return patches // processor.image_processor.merge_size**2, patches * 14 * 14


def _reuse_and_recompute(target, image, turn1_text, keys):
    """The same turn 2 twice: with the turn-1 KV cache and recomputed from scratch."""
    results = []
    for reuse in (True, False):
        state = start_self_zoom(target, image, QUESTION, HIGH, forced_text=turn1_text, max_new_tokens=N_NEW)
        n_cached = state.cache.get_seq_length()
        result = continue_with_crops(state, keys, reuse_kv=reuse, output_logits=True, max_new_tokens=N_NEW)
        results.append((state, n_cached, result))
    return results


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "smolvlm", "llava"])
def test_kv_reuse_equals_recompute(tiny_vlms, image, arch):
    model, processor = tiny_vlms[arch]
    target = HFTarget(arch, model=model, processor=processor)
    (state, n_cached, reused), (_, _, full) = _reuse_and_recompute(target, image, "GET_CROPS: ['3']", ["3"])

    # The canonical tool call re-tokenizes as forced: the whole cached prefix is reused, only the rest is fed.
    assert n_cached == state.prompt_ids.shape[0] + state.generated_ids.shape[0] - 1
    assert reused.reused_tokens == n_cached
    assert full.reused_tokens == 0
    assert reused.usage[1].prompt_tokens == full.usage[1].prompt_tokens - n_cached

    # Same greedy answer, and every step's logits agree (float32).
    assert reused.text == full.text
    assert reused.turn2_logits.shape == full.turn2_logits.shape == (N_NEW, reused.turn2_logits.shape[-1])
    torch.testing.assert_close(reused.turn2_logits[0], full.turn2_logits[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(reused.turn2_logits, full.turn2_logits, atol=1e-4, rtol=0)
    assert torch.equal(reused.turn2_logits.argmax(-1), full.turn2_logits.argmax(-1))


def test_kv_reuse_after_generated_turn1(qwen, image):
    """A real greedy turn 1 (random text) followed by crops: the rendered assistant turn need not re-tokenize as
    generated, so only the common prefix is reused, and turn 2 still equals the recompute."""
    results = []
    for reuse in (True, False):
        state = start_self_zoom(qwen, image, QUESTION, HIGH, max_new_tokens=8)
        n_cached = state.cache.get_seq_length()
        results.append(continue_with_crops(state, ["0", "4"], reuse_kv=reuse, output_logits=True, max_new_tokens=4))
    reused, full = results
    assert state.prompt_ids.shape[0] <= reused.reused_tokens <= n_cached
    assert reused.turn1_text == full.turn1_text
    assert reused.text == full.text
    torch.testing.assert_close(reused.turn2_logits, full.turn2_logits, atol=1e-4, rtol=0)


def test_mrope_positions_matter(qwen, image, monkeypatch):
    """Without the full conversation's M-RoPE positions (treating Qwen2.5-VL as 1-D), reuse no longer matches:
    the equality test above can fail."""
    monkeypatch.setitem(self_zoom.KV_REUSE_ARCHITECTURES, "qwen2_5_vl", "1d")
    (_, _, reused), (_, _, full) = _reuse_and_recompute(qwen, image, "GET_CROPS: ['3']", ["3"])
    assert (reused.turn2_logits[0] - full.turn2_logits[0]).abs().max() > 1e-3


def test_rtr_counts_each_turn(qwen, image):
    processor = qwen.processor
    state = start_self_zoom(qwen, image, QUESTION, HIGH, forced_text="GET_CROPS: ['3', '0']", max_new_tokens=2)
    result = finish_self_zoom(state, max_new_tokens=2)
    assert result.crops == ["3", "0"] and result.tool_error is None

    low_tokens, low_pixels = _qwen_cost(processor, [low_res_view(image, HIGH)])
    crop_costs = [_qwen_cost(processor, [c]) for c in high_res_crops(image, ["3", "0"], HIGH)]
    full_tokens, full_pixels = _qwen_cost(processor, [resize_to_budget(image, HIGH)])
    assert (low_tokens, full_tokens) == (24, 96)  # the geometry HIGH was chosen for

    turn1, turn2 = result.usage
    assert turn1.visual_tokens == low_tokens and turn1.view_pixels == (low_pixels,)
    assert turn2.visual_tokens == sum(t for t, _ in crop_costs)  # KV reuse: the low view is not fed again
    assert turn2.view_pixels == tuple(p for _, p in crop_costs)
    assert result.visual_tokens == low_tokens + sum(t for t, _ in crop_costs)
    assert result.full_visual_tokens == full_tokens
    assert result.rtr == pytest.approx(0.25 + 0.25 + 0.25)
    assert result.rtr_pixels == pytest.approx((low_pixels + sum(p for _, p in crop_costs)) / full_pixels)

    # Recompute feeds the low view again (usage), but RTR counts each image once, as AwaRes does.
    state = start_self_zoom(qwen, image, QUESTION, HIGH, forced_text="GET_CROPS: ['3', '0']", max_new_tokens=2)
    recomputed = finish_self_zoom(state, max_new_tokens=2, reuse_kv=False)
    assert recomputed.usage[1].visual_tokens == low_tokens + turn2.visual_tokens
    assert recomputed.rtr == result.rtr


def test_unparseable_tool_call_is_recorded_not_replaced(qwen, image, monkeypatch, caplog):
    forced = "GET_CROPS: [banana]"
    original = self_zoom.start_self_zoom
    monkeypatch.setattr(self_zoom, "start_self_zoom", lambda *a, **k: original(*a, **k, forced_text=forced))
    with caplog.at_level(logging.WARNING, logger="zoomvlm.awares.self_zoom"):
        (result,) = self_zoom_generate(qwen.model, qwen.processor, [image], [QUESTION], HIGH, max_new_tokens=4)

    assert result.tool_error is not None and "banana" in result.tool_error
    assert result.text == result.turn1_text == forced
    assert result.crops == []
    assert len(result.usage) == 1  # no second turn: neither crops nor the full image were fed
    assert result.visual_tokens == result.usage[0].visual_tokens == 24
    assert result.rtr == pytest.approx(0.25)
    assert count_outcomes([result]) == {"direct": 0, "crops": 0, "tool_error": 1}
    assert "1 of 1 self-zoom tool calls could not be parsed" in caplog.text


def test_direct_answer_costs_the_low_view_only(qwen, image):
    state = start_self_zoom(qwen, image, QUESTION, HIGH, forced_text="42")
    result = finish_self_zoom(state)
    assert (result.text, result.crops, result.tool_error) == ("42", [], None)
    assert len(result.usage) == 1 and result.reused_tokens == 0
    assert result.visual_tokens == 24 and result.full_visual_tokens == 96
    assert result.rtr == pytest.approx(0.25) and result.rtr_pixels == pytest.approx(0.25)
    assert count_outcomes([result]) == {"direct": 1, "crops": 0, "tool_error": 0}


def test_generate_and_policy_agree(qwen, image):
    """The batch entry points run turn 1 greedily (random weights: almost surely no tool call) per sample."""
    small = image.resize((300, 200))
    results = self_zoom_generate(qwen.model, qwen.processor, [image, small], [QUESTION, "Which?"], HIGH)
    policy = SelfZoomPolicy("zoomvlm", high="side:336")
    again = policy.answer_with(qwen, [image, small], [QUESTION, "Which?"])
    assert len(results) == 2
    assert [r.text for r in results] == [g.text for _, g in again]
    assert [r.visual_tokens for r in results] == [g.usage.visual_tokens for _, g in again]
    for r in results:
        assert r.rtr is not None and r.rtr > 0 and r.seconds > 0
        assert r.usage[0].completion_tokens > 0
    with pytest.raises(ValueError, match="2 images for 1 questions"):
        self_zoom_generate(qwen.model, qwen.processor, [image, small], [QUESTION], HIGH)


def test_consumed_cache_and_unsupported_architecture(qwen, image, monkeypatch):
    state = start_self_zoom(qwen, image, QUESTION, HIGH, forced_text="GET_CROPS: ['1']", max_new_tokens=2)
    continue_with_crops(state, ["1"], max_new_tokens=2)
    with pytest.raises(ValueError, match="already consumed"):
        continue_with_crops(state, ["1"], max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one crop"):
        continue_with_crops(state, [], reuse_kv=False)

    monkeypatch.delitem(self_zoom.KV_REUSE_ARCHITECTURES, "qwen2_5_vl")
    with pytest.raises(NotImplementedError, match="reuse_kv=False"):
        self_zoom_generate(qwen.model, qwen.processor, [image], [QUESTION], HIGH)
    (result,) = self_zoom_generate(qwen.model, qwen.processor, [image], [QUESTION], HIGH, reuse_kv=False)
    assert result.reused_tokens == 0


def test_the_released_protocol_cuts_views_as_the_authors_adapter_does():
    """Their lmms-eval adapter halves the ORIGINAL image and crops the original, capping each view at max_pixels on
    its own; ours halves the capped high view. Above 1.6 MP the released model saw 2-4x fewer pixels than there."""
    from zoomvlm.awares.protocol import PROTOCOLS, high_res_crops, low_res_view

    high = PROTOCOLS["awares"].high  # pixels:1605632
    assert PROTOCOLS["awares"].views == "released" and PROTOCOLS["zoomvlm"].views == "same_scale"
    big = Image.new("RGB", (2246, 1582), "white")
    assert low_res_view(big, high, "released").size == (1123, 791)  # the original halved: under the cap
    assert high_res_crops(big, ["3"], high, "released")[0].size == (1123, 791)  # a native quadrant
    same = low_res_view(big, high)
    assert same.width * same.height < 0.5 * 1123 * 791  # the capped high view halved
    huge = high_res_crops(Image.new("RGB", (7680, 4320)), ["all"], high, "released")[0]
    assert huge.width * huge.height <= 1605632  # still capped, view by view
    small = Image.new("RGB", (1200, 900), "white")  # within the cap: both protocols cut the same views
    assert low_res_view(small, high, "released").size == low_res_view(small, high).size == (600, 450)
    assert high_res_crops(small, ["0"], high, "released")[0].size == high_res_crops(small, ["0"], high)[0].size


def test_an_eval_of_the_released_protocol_says_its_views_in_run_json(tiny_smolvlm_init, tmp_path, capsys):
    """The released protocol cut same-scale views before this stop under the same policy name: a run of it records
    its views, so an older run folder is not resumed with the other views."""
    import json

    from zoomvlm.cli.main import demo_data_path, main

    base = ["eval", "--data", str(demo_data_path()), "--target", f"hf:{tiny_smolvlm_init}", "--limit", "1",
            "--no-progress"]  # fmt: skip
    assert main([*base, "--policy", "self-zoom", "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "run.json").read_text())["self_zoom_views"] == "released"
    assert main([*base, "--policy", "self-zoom:zoomvlm", "--out", str(tmp_path / "b")]) == 0
    assert "self_zoom_views" not in json.loads((tmp_path / "b" / "run.json").read_text())
