"""Budgets, views, RTR, self-zoom and the attention baseline with the REAL processor files of SmolVLM-256M-Instruct,
Qwen2.5-VL-7B-Instruct and llava-1.5-7b-hf (random weights, shrunk sizes: tests/real_models.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from zoomvlm.awares import self_zoom
from zoomvlm.awares.protocol import AWARES_RELEASED_SYSTEM_PROMPT, PROTOCOLS, trajectory_messages
from zoomvlm.awares.self_zoom import SelfZoomPolicy, continue_with_crops, start_self_zoom
from zoomvlm.core.geometry import Box, Budget, resize_to_budget
from zoomvlm.core.pipeline import run_batch
from zoomvlm.data.samples import Sample
from zoomvlm.policies import attention
from zoomvlm.policies.attention import AttentionCrop, attention_heatmap, best_window, image_token_boxes
from zoomvlm.policies.base import Proposal
from zoomvlm.policies.registry import load_policy
from zoomvlm.targets.base import Generation, Usage
from zoomvlm.targets.hf import HFTarget, chat_prompt, encode_inputs

FAMILIES = ["smolvlm", "qwen2_5_vl", "llava"]


def _target(real_vlms, family, budget=None, max_new_tokens=2):
    model, processor = real_vlms[family]
    return HFTarget(f"real-{family}", budget=budget, model=model, processor=processor, max_new_tokens=max_new_tokens)


@pytest.fixture(scope="module")
def noise():
    """A 480x640 (w x h) portrait of noise, a receipt-like shape."""
    return Image.fromarray(np.random.default_rng(3).integers(0, 256, (640, 480, 3), dtype=np.uint8))


def _sample(tmp_path, image, name="a"):
    path = tmp_path / f"{name}.png"
    image.save(path)
    return Sample(name, path, "What is the total?", ("9.00",), image.width, image.height)


# ---- budgets reach the encoder --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["smolvlm", "qwen2_5_vl"])
def test_visual_tokens_grow_with_the_budget(real_vlms, family, noise):
    tokens = [
        _target(real_vlms, family, b).view_visual_tokens(resize_to_budget(noise, Budget(max_side=b)))
        for b in (384, 1024)
    ]
    full = _target(real_vlms, family).reference_visual_tokens(noise)
    assert 0 < tokens[0] < tokens[1] <= full


def test_smolvlm_budgets_in_tiles(real_vlms):
    """SmolVLM as released upscales every view to 2048 px and tiles it (a 24x64 crop: 9 tiles, 576 tokens); here a
    view within one 512 px tile costs one tile (64 tokens), 1024 px at most 4 tiles + the global one."""
    target = _target(real_vlms, "smolvlm")
    assert target.view_visual_tokens(Image.new("RGB", (24, 64))) == 64
    assert target.view_visual_tokens(Image.new("RGB", (384, 288))) == 64
    assert target.view_visual_tokens(Image.new("RGB", (1024, 768))) == 5 * 64
    assert target.view_visual_tokens(Image.new("RGB", (2048, 2048))) == 17 * 64
    # what the released processor alone does to the small crop (the bug this fixes)
    processor = target.processor
    ids = processor(text=[chat_prompt(processor, 1, "?")], images=[[Image.new("RGB", (24, 64))]])["input_ids"][0]
    assert sum(i == target.image_token_id for i in ids) == 9 * 64


def test_llava_pads_to_a_square_and_keeps_the_whole_image(real_vlms):
    """A tall image with red / green / blue bands: the view reaching LLaVA's encoder holds all three (padded to a
    square), where the released processor's centre crop keeps only the middle (green) band."""
    model, processor = real_vlms["llava"]
    bands = Image.new("RGB", (200, 600))
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        bands.paste(colour, (0, 200 * i, 200, 200 * (i + 1)))
    ip = processor.image_processor
    mean, std = torch.tensor(ip.image_mean)[:, None], torch.tensor(ip.image_std)[:, None]

    def dominant(pixel_values, rows):  # the strongest RGB channel at the centre column of each row
        column = pixel_values[0, :, :, 168] * std + mean  # [3, 336], back in [0, 1]
        return [int(column[:, r].argmax()) for r in rows]

    prompt = chat_prompt(processor, 1, "?")
    ours = encode_inputs(processor, [prompt], [[bands]], "cpu")["pixel_values"]
    assert ours.shape[-2:] == (336, 336)
    assert dominant(ours, [20, 168, 316]) == [0, 1, 2]  # red top, green middle, blue bottom
    released = processor(text=[prompt], images=[[bands]], return_tensors="pt")["pixel_values"]
    assert dominant(released, [20, 168, 316]) == [1, 1, 1]  # centre crop: the middle third only
    target = _target(real_vlms, "llava")
    assert target.view_visual_tokens(bands) == target.view_visual_tokens(Image.new("RGB", (40, 30))) == 576
    # a huge thin native view is shrunk to the encoder's input before padding (it was padded to 20000 x 20000 first)
    from zoomvlm.targets.hf import encoder_view

    thin = Image.new("RGB", (20000, 200), (255, 0, 0))
    assert encoder_view(processor, thin).size == (336, 336)
    assert encoder_view(processor, bands).size == (336, 336)  # 200 x 600: shrunk to 112 x 336, then padded
    small = Image.new("RGB", (60, 30))
    assert encoder_view(processor, small).size == (60, 60)  # within the input: padded as before
    assert target.view_visual_tokens(thin) == 576


@pytest.mark.parametrize("family", FAMILIES)
def test_full_is_rtr_one_and_none_follows_the_budget(real_vlms, family, noise, tmp_path):
    sample = _sample(tmp_path, noise)
    (full,) = run_batch([sample], load_policy("full"), _target(real_vlms, family, 384), metric="anls")
    assert full.rtr_unit == "tokens" and full.rtr == pytest.approx(1.0)
    small, large = (
        run_batch([sample], load_policy("none"), _target(real_vlms, family, b), metric="anls")[0] for b in (384, 1024)
    )
    if family == "llava":  # fixed 336x336: every view costs the same 576 tokens
        assert small.visual_tokens == large.visual_tokens == 576 and small.rtr == pytest.approx(1.0)
    else:
        assert small.visual_tokens < large.visual_tokens
        assert small.rtr < large.rtr <= 1.0 + 1e-9
        # a crop at a small budget costs fewer tokens than the global view at a large one
        crop = _target(real_vlms, family, 1024).view_visual_tokens(
            resize_to_budget(noise.crop((0, 0, 240, 320)), Budget(max_side=384))
        )
        assert crop < large.visual_tokens


# ---- RTR and evidence hit in the pipeline ---------------------------------------------------------------------


class _FakeTarget:
    name, budget = "fake", Budget(384)

    def generate(self, requests):
        return [Generation("9.00", Usage(view_pixels=(100,) * len(r.images))) for r in requests]


class _Fixed:
    def __init__(self, proposal):
        self.proposal, self.name = proposal, "fixed"

    def propose(self, images, questions, evidence=None):
        return [self.proposal for _ in images]


def test_fallback_box_is_not_an_evidence_hit(tmp_path):
    image = Image.new("RGB", (100, 100))
    sample = Sample(
        "a", _sample(tmp_path, image).image, "q", ("9.00",), 100, 100, evidence_boxes=(Box(0.1, 0.1, 0.2, 0.2),)
    )
    fallback = Proposal((Box(0, 0, 1, 1),), error="x2 (10) must be > x1 (40)")
    (failed,) = run_batch([sample], _Fixed(fallback), _FakeTarget(), images=[image])
    (whole,) = run_batch([sample], _Fixed(Proposal((Box(0, 0, 1, 1),))), _FakeTarget(), images=[image])
    assert failed.evidence_hit == 0.0 and whole.evidence_hit == 1.0
    assert failed.rtr_unit == "pixels"  # a target without token counts keeps RTR in pixels


# ---- self-zoom on the real files ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "high"), [("smolvlm", Budget(max_side=1024)), ("qwen2_5_vl", Budget(max_side=448))]
)
def test_self_zoom_reuse_equals_recompute(real_vlms, family, high, noise):
    target = _target(real_vlms, family)
    results = []
    for reuse in (True, False):
        state = start_self_zoom(
            target, noise, "What is the total?", high, forced_text="GET_CROPS: ['3']", max_new_tokens=4
        )
        results.append(continue_with_crops(state, ["3"], reuse_kv=reuse, output_logits=True, max_new_tokens=4))
    reused, recomputed = results
    assert reused.reused_tokens > 0 and recomputed.reused_tokens == 0
    assert reused.text == recomputed.text
    torch.testing.assert_close(reused.turn2_logits, recomputed.turn2_logits, atol=1e-4, rtol=1e-4)
    # both turns counted: the low view in turn 1, only the crop in turn 2 (cache reuse), each image once in RTR
    assert len(reused.usage) == 2
    low, crop = reused.usage[0].visual_tokens, reused.usage[1].visual_tokens
    assert low > 0 and crop > 0 and reused.visual_tokens == low + crop
    assert recomputed.usage[1].visual_tokens == low + crop  # recompute feeds the low view again
    assert reused.rtr == pytest.approx((low + crop) / reused.full_visual_tokens)
    assert reused.rtr < 1.0


def test_self_zoom_policy_in_eval_and_report(real_vlms, noise, tmp_path):
    from zoomvlm.evaluation.report import write_report
    from zoomvlm.evaluation.run import run_eval

    samples = [_sample(tmp_path, noise, "a"), _sample(tmp_path, noise.resize((720, 960)), "b")]
    target = _target(real_vlms, "smolvlm", 384, max_new_tokens=3)
    policy = load_policy("self-zoom:zoomvlm@side:1024")
    assert isinstance(policy, SelfZoomPolicy) and policy.high == Budget(max_side=1024)
    summary = run_eval(
        samples, policy, target, tmp_path / "sz", metric="anls", rtr_reference=policy.high, progress=False
    )
    run_eval(samples, load_policy("none"), target, tmp_path / "none", metric="anls", progress=False)
    records = [json.loads(line) for line in (tmp_path / "sz" / "results.jsonl").read_text().splitlines()]
    assert summary["n"] == 2
    for r in records:
        assert r["action"] in ("direct", "tool_error") or r["action"].startswith("crops:")
        assert len(r["turn_seconds"]) in (1, 2) and r["target_seconds"] == pytest.approx(sum(r["turn_seconds"]))
        assert r["rtr_unit"] == "tokens" and 0 < r["rtr"] < 1  # low view alone: 1 tile of a 3 or 5 tile high view
    write_report([tmp_path / "none", tmp_path / "sz"], tmp_path / "report")
    table = (tmp_path / "report" / "report.md").read_text()
    assert "self-zoom:zoomvlm@side:1024" in table and "| none" in table, table


def test_self_zoom_refuses_targets_that_cannot_decide(tmp_path):
    with pytest.raises(ValueError, match="hf: target"):
        SelfZoomPolicy().answer_with(_FakeTarget(), [Image.new("RGB", (8, 8))], ["q"])
    with pytest.raises(ValueError, match="unknown self-zoom protocol"):
        load_policy("self-zoom:nope")


def test_released_awares_protocol_golden(real_vlms):
    """The released Kimhi/AWARES-Qwen2.5-VL-7B conversation rendered by the REAL Qwen2.5-VL chat template."""
    _, processor = real_vlms["qwen2_5_vl"]
    released = PROTOCOLS["awares"]
    assert released.system == AWARES_RELEASED_SYSTEM_PROMPT and not released.crops_text
    assert released.high == Budget(max_pixels=2048 * 28 * 28)
    assert load_policy("self-zoom").protocol is released  # the default
    system = (
        "<|im_start|>system\nYou are a vision-language model that analyzes images and answers questions about them. "
        "If the image resolution is too low for accurate analysis, respond with GET_CROPS: followed by a list of crop "
        "numbers in square brackets (e.g., GET_CROPS: ['3'] or GET_CROPS: ['0', '5']), where the available crop "
        "numbers and their corresponding areas are {'0': 'top-left', '1': 'top-right', '2': 'bottom-left', "
        "'3': 'bottom-right', '4': 'center', '5': 'top', '6': 'bottom', '7': 'left', '8': 'right'}, otherwise "
        "provide your answer.<|im_end|>\n"
    )
    turn1 = (
        system + "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is the total?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    messages = trajectory_messages("What is the total?", None, (), system=released.system, crops_text=False)
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == turn1
    turn2 = self_zoom._conversation("What is the total?", "GET_CROPS: ['3', '0']", ["3", "0"], released.system, False)
    assert processor.apply_chat_template(turn2, add_generation_prompt=True) == (
        turn1 + "GET_CROPS: ['3', '0']<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


# ---- the attention baseline (ViCrop) --------------------------------------------------------------------------


def _one_hot(n, k):
    w = torch.zeros(n)
    w[k] = 1.0
    return w


@pytest.mark.parametrize(
    ("family", "size", "budget", "token", "expected"),
    [
        # Qwen2.5-VL: 448x336 -> 32x24 patches -> 16x12 merged tokens, row-major: token 9*16+13 is row 9, col 13
        ("qwen2_5_vl", (448, 336), None, 9 * 16 + 13, Box(13 / 16, 9 / 12, 14 / 16, 10 / 12)),
        # LLaVA: 24x24 over the square view: token 20*24+3 is row 20, col 3
        ("llava", (336, 336), None, 20 * 24 + 3, Box(3 / 24, 20 / 24, 4 / 24, 21 / 24)),
        # LLaVA, 168x336 padded to 336x336 (84 px each side): col 12 (x 168-182 px) is the image x 84-98 of 168
        ("llava", (168, 336), None, 0 * 24 + 12, Box(0.5, 0.0, 0.5 + 14 / 168, 1 / 24)),
        # SmolVLM at 1024 px: a 1024x512 view is 1 x 2 tiles of 8x8 tokens, then the 8x8 global view. Token 64 +
        # 6*8 + 1 is tile (0, 1), cell (6, 1); token 128 + 2*8 + 5 is the global view's cell (2, 5).
        ("smolvlm", (1024, 512), 1024, 64 + 6 * 8 + 1, Box(0.5 + 1 / 16, 6 / 8, 0.5 + 2 / 16, 7 / 8)),
        ("smolvlm", (1024, 512), 1024, 128 + 2 * 8 + 5, Box(5 / 8, 2 / 8, 6 / 8, 3 / 8)),
    ],
)
def test_attention_token_layout(real_vlms, family, size, budget, token, expected):
    target = _target(real_vlms, family, budget)
    view = Image.new("RGB", size)
    inputs = encode_inputs(target.processor, [chat_prompt(target.processor, 1, "?")], [[view]], "cpu")
    n = int((inputs["input_ids"][0] == target.image_token_id).sum())
    boxes = image_token_boxes(target.processor, view, inputs, n)
    assert boxes[token].as_list() == pytest.approx(expected.as_list())
    if family == "llava" and size[0] < size[1]:
        assert boxes[0] is None and boxes[23] is None  # the padding columns map to no image region


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_crop_follows_the_attention_you_set(real_vlms, family, monkeypatch, noise):
    """The model's answer-start attention is replaced by one that puts all weight on one image token for the
    question (uniform for the generic question): the crop lands on that token's region of the image."""
    target = _target(real_vlms, family, 1024)
    policy = AttentionCrop(0.25)
    policy.bind_target(target)
    view = resize_to_budget(noise, Budget(max_side=1024))
    inputs = encode_inputs(target.processor, [chat_prompt(target.processor, 1, "?")], [[view]], "cpu")
    n = int((inputs["input_ids"][0] == target.image_token_id).sum())
    boxes = image_token_boxes(target.processor, view, inputs, n)
    k = max((i for i, b in enumerate(boxes) if b is not None), key=lambda i: boxes[i].x0 + boxes[i].y0)  # bottom-right
    calls = []

    def fake_attention(model, inputs, image_token_id):
        calls.append(int((inputs["input_ids"][0] == image_token_id).sum()))
        return _one_hot(n, k) + 1e-6 if len(calls) % 2 == 1 else torch.ones(n)

    monkeypatch.setattr(attention, "_answer_start_attention", fake_attention)
    (proposal,) = policy.propose([noise], ["What is the total?"])
    (crop,) = proposal.boxes
    cx, cy = (boxes[k].x0 + boxes[k].x1) / 2, (boxes[k].y0 + boxes[k].y1) / 2
    assert crop.x0 <= cx <= crop.x1 and crop.y0 <= cy <= crop.y1
    assert crop.x1 - crop.x0 == pytest.approx(0.25, abs=0.03) and crop.x1 > 0.7 and crop.y1 > 0.7
    assert calls == [n, n]  # the question, then the generic question, over the same image tokens


def test_answer_start_attention_is_a_distribution(real_vlms):
    """The real model's eager attention row of the answer-start position: a probability over all keys, of which the
    image tokens hold a positive share."""
    target = _target(real_vlms, "qwen2_5_vl")
    view = Image.new("RGB", (112, 112), "white")
    inputs = encode_inputs(target.processor, [chat_prompt(target.processor, 1, "q")], [[view]], "cpu")
    before = target.model.config._attn_implementation
    with torch.no_grad():
        weights = attention._answer_start_attention(target.model, inputs, target.image_token_id)
    assert weights.shape == (16,) and (weights > 0).all() and float(weights.sum()) <= 1.0 + 1e-5
    assert target.model.config._attn_implementation == before  # eager only for this call


def test_heatmap_and_window():
    boxes = [Box(0, 0, 0.5, 0.5), Box(0.5, 0.5, 1, 1), None]
    heat = attention_heatmap(boxes, torch.tensor([1.0, 3.0, 100.0]), cells=4)
    assert float(heat.sum()) == pytest.approx(4.0)  # the padding token's weight is dropped
    assert best_window(heat, 0.5) == Box(0.5, 0.5, 1.0, 1.0)
    with pytest.raises(ValueError, match="hf: target"):
        AttentionCrop().bind_target(_FakeTarget())


def test_self_zoom_record_with_a_tool_call(real_vlms, noise, tmp_path, monkeypatch):
    """A record of a self-zoom that called GET_CROPS (turn 1 forced, as random weights never call it): the action,
    the crop as its box, both turns' seconds, each distinct image counted once in tokens and pixels, RTR against
    the high view."""
    import functools

    forced = functools.partial(self_zoom.start_self_zoom, forced_text="GET_CROPS: ['3']")
    monkeypatch.setattr(self_zoom, "start_self_zoom", forced)
    target = _target(real_vlms, "qwen2_5_vl", max_new_tokens=2)
    policy = load_policy("self-zoom:zoomvlm@side:448")  # same-scale views (the released protocol cuts its own)
    (record,) = run_batch([_sample(tmp_path, noise)], policy, target, metric="anls", rtr_reference=policy.high)
    assert record.action == "crops:3" and record.boxes == [[0.5, 0.5, 1.0, 1.0]] and record.policy_error is None
    assert len(record.turn_seconds) == 2 and record.target_seconds == pytest.approx(sum(record.turn_seconds))
    # 336x448 high view: low 168x224 = 6x8 = 48 tokens, quadrant 168x224 = 48 tokens, whole high view 12x16 = 192
    low = resize_to_budget(noise, Budget(max_side=224))
    assert record.visual_tokens == 2 * target.view_visual_tokens(low) == 96
    assert record.rtr_unit == "tokens" and record.rtr == pytest.approx(96 / 192)
    assert len(record.view_pixels) == 2 and record.view_pixels[0] == record.view_pixels[1] == 168 * 224


def test_a_trainer_calling_the_smolvlm_processor_itself_sees_the_view_inference_sees():
    """TRL calls the processor with its defaults: without align_training_processor a 384x512 cropper view was
    upscaled to 2048 px and cut into 13 tiles (832 image tokens) where inference reads one tile."""
    from real_models import real_folder

    from zoomvlm.core.prompts import cropper_prompt
    from zoomvlm.targets.hf import align_training_processor
    from zoomvlm.targets.hf_compat import load_processor

    processor = load_processor(str(real_folder("smolvlm")))
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    view = resize_to_budget(Image.new("RGB", (1200, 1600), "white"), Budget(max_side=512))
    prompt = chat_prompt(processor, 1, cropper_prompt("What is the total?"))
    inference = int((encode_inputs(processor, [prompt], [[view]], "cpu")["input_ids"] == image_id).sum())
    assert align_training_processor(processor) == {"do_resize": False}
    trainer = processor(images=[[view]], text=[prompt], padding=True, return_tensors="pt")  # as TRL calls it
    assert int((trainer["input_ids"] == image_id).sum()) == inference == 64


def test_qwen_answers_about_a_valid_crop_thinner_than_its_resize_allows(real_vlms):
    image = Image.new("RGB", (800, 2000), "white")
    request = build_request_for(image, Box(0.0, 0.0, 0.01, 1.0))  # "[0, 0, 1, 100]." -> an 8 x 2000 crop
    assert max(request.images[1].size) >= 200 * min(request.images[1].size)
    (answer,) = _target(real_vlms, "qwen2_5_vl").generate([request])
    assert isinstance(answer.text, str) and answer.usage.visual_tokens > 0


def build_request_for(image, box):
    from zoomvlm.core.pipeline import build_request

    return build_request(image, "Total?", Proposal((box,)), None)


def test_cropper_side_option_splits_the_real_smolvlm_view(real_vlms, noise, monkeypatch):
    """``vlm@side=1024`` on the real SmolVLM processor (512 px tiles): the cropper's view is shrunk to its budget
    BEFORE the processor, so the option must raise a 512 px budget or the view stays one tile (64 tokens)."""
    import copy

    from zoomvlm.cropvlm.cropper import VLMCropper
    from zoomvlm.targets import hf

    model, processor = real_vlms["smolvlm"]
    image_token = model.config.image_token_id
    seen = []
    generate_texts = hf.generate_texts

    def spy(model, processor, prompts, images, **kwargs):
        texts, inputs, n = generate_texts(model, processor, prompts, images, **kwargs)
        seen.append(int((inputs["input_ids"] == image_token).sum()))
        return texts, inputs, n

    monkeypatch.setattr(hf, "generate_texts", spy)
    for side in (None, 1024):  # a copy of the processor: the option changes its splitting settings
        policy = VLMCropper("real-smolvlm", budget=512, model=model, processor=copy.deepcopy(processor),
                            image_side=side, max_new_tokens=2)  # fmt: skip
        policy.propose([noise], ["What is the total?"])
    assert policy.budget == Budget(max_side=1024)
    assert seen[0] == 64 and seen[1] == 5 * 64  # 480x640 at 1024 px: 2x2 tiles of 512 px + the global tile


def test_generated_token_counts_skip_the_models_padding_not_the_tokenizers(real_vlms, noise):
    """Qwen2.5-VL as released pads generated rows with <|endoftext|> (generation_config.json) while its tokenizer's
    padding id is another: a row that ends after one token counts 1 generated token, not the batch's length."""
    from transformers import LogitsProcessor, LogitsProcessorList

    from zoomvlm.targets.hf import generate_texts

    model, processor = real_vlms["qwen2_5_vl"]
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    assert model.generation_config.pad_token_id not in (None, eos)  # the released ids (build_real loads them)

    class EndRowZero(LogitsProcessor):  # row 0 ends at once; row 1 writes token 100 four times, then ends
        def __call__(self, input_ids, scores):
            scores = torch.full_like(scores, -1e9)
            scores[0, eos] = 0.0
            scores[1, 100 if self.step < 4 else eos] = 0.0
            self.step += 1
            return scores

    forced = EndRowZero()
    forced.step = 0
    prompts = [chat_prompt(processor, 1, "q")] * 2
    view = resize_to_budget(noise, Budget(max_side=56))
    _, _, n = generate_texts(model, processor, prompts, [[view], [view]], max_new_tokens=8,
                             logits_processor=LogitsProcessorList([forced]))  # fmt: skip
    assert n == [1, 5]  # each row's end token counts (it is not the padding id)
    # a model saved without a padding id (generate pads with its end token, the tokenizer's padding id is another)
    pad = model.generation_config.pad_token_id
    model.generation_config.pad_token_id = None
    try:
        forced.step = 0
        _, _, n = generate_texts(model, processor, prompts, [[view], [view]], max_new_tokens=8,
                                 logits_processor=LogitsProcessorList([forced]))  # fmt: skip
    finally:
        model.generation_config.pad_token_id = pad
    assert n == [0, 4]  # padding = end token: not counted (the tokenizer's id would have counted 5 and 5)


@pytest.mark.parametrize("family", FAMILIES)
def test_built_models_end_and_pad_with_the_released_ids_and_save(real_vlms, family, tmp_path):
    """The random-weight models stop and pad as released (generation_config.json: SmolVLM ends turns with
    <end_of_utterance>, not config.json's eos), and a built model saves as a folder ``hf:`` loads."""
    import real_models
    from transformers import GenerationConfig

    model, processor = real_vlms[family]
    released = GenerationConfig.from_pretrained(str(real_models.real_folder(family)))
    for key in ("eos_token_id", "pad_token_id"):
        assert getattr(model.generation_config, key) == getattr(released, key)
    assert model.generation_config.do_sample is False
    if family == "smolvlm":
        assert model.generation_config.eos_token_id == processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    folder = real_models.save_real(model, processor, tmp_path / family)
    assert GenerationConfig.from_pretrained(folder).eos_token_id == released.eos_token_id
