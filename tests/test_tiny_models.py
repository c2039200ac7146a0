"""Tiny VLMs of the real architectures (tiny_models) build, process 2 images, generate, save and reload."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tiny_models as tiny  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from zoomvlm.targets.hf_compat import load_processor  # noqa: E402

BUILDERS = {
    "smolvlm": tiny.build_tiny_smolvlm,
    "qwen2_5_vl": tiny.build_tiny_qwen25vl,
    "llava": tiny.build_tiny_llava,
}
QUESTION = "What is the TOTAL on the receipt?"


@pytest.fixture(scope="module", params=list(BUILDERS))
def built(request):
    model, processor = BUILDERS[request.param]()
    return request.param, model, processor


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)),  # 300 wide x 200 high
        Image.fromarray(rng.integers(0, 256, (240, 120, 3), dtype=np.uint8)),  # 120 wide x 240 high
    ]


def _messages(images=None):
    if images is None:
        image_parts = [{"type": "image"}, {"type": "image"}]
    else:
        image_parts = [{"type": "image", "image": im} for im in images]
    return [{"role": "user", "content": [*image_parts, {"type": "text", "text": QUESTION}]}]


def _inputs(processor, images):
    return processor.apply_chat_template(
        _messages(images), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def _expected_image_tokens(arch, model, processor, inputs) -> int:
    """Number of image placeholder tokens implied by the processor's pixel outputs."""
    if arch == "smolvlm":
        real_tiles = int(inputs["pixel_attention_mask"].flatten(2).any(-1).sum())
        assert real_tiles >= 2 + 2  # 300x200 -> 2x2 tiles + global; 120x240 -> 1x2 tiles + global
        return real_tiles * processor.image_seq_len
    if arch == "qwen2_5_vl":
        thw = inputs["image_grid_thw"]
        assert inputs["pixel_values"].shape[0] == int(thw.prod(-1).sum())
        return int(thw.prod(-1).sum()) // processor.image_processor.merge_size**2
    if arch == "llava":
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        assert inputs["pixel_values"].shape[0] == 2
        return 2 * side * side
    raise AssertionError(arch)


def test_process_and_generate(built, images):
    arch, model, processor = built
    inputs = _inputs(processor, images)
    n_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_image_tokens > 0
    assert n_image_tokens == _expected_image_tokens(arch, model, processor, inputs)

    assert processor.image_token_id == model.config.image_token_id
    if arch == "qwen2_5_vl":
        assert "mm_token_type_ids" in inputs  # needed for M-RoPE positions; never drop it

    # Same tensors via images in processor_kwargs, and via text-then-processor.
    via_kwargs = processor.apply_chat_template(
        _messages(),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"images": images},
    )
    text = processor.apply_chat_template(_messages(), add_generation_prompt=True)
    via_text = processor(text=[text], images=[images], return_tensors="pt")
    for other in (via_kwargs, via_text):
        assert set(other) == set(inputs)
        assert all(torch.equal(other[k], inputs[k]) for k in inputs)

    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


def test_teacher_forcing_prefix(built, images):
    """prompt + assistant_suffix tokenizes with the prompt's ids as an exact prefix (answer scoring)."""
    arch, model, processor = built
    prompt = processor.apply_chat_template(_messages(), add_generation_prompt=True)
    full = prompt + tiny.assistant_suffix(processor, "TOTAL: RM 12.50")
    enc_prompt = processor(text=[prompt], images=[images], return_tensors="pt")
    enc_full = processor(text=[full], images=[images], return_tensors="pt")
    n_prompt = enc_prompt["input_ids"].shape[1]
    assert torch.equal(enc_full["input_ids"][0, :n_prompt], enc_prompt["input_ids"][0])
    answer_ids = enc_full["input_ids"][0, n_prompt:]
    assert int(answer_ids[-1]) in set(np.atleast_1d(model.generation_config.eos_token_id).tolist())
    # The template with the assistant turn renders the same answer text.
    rendered = processor.apply_chat_template(
        _messages() + [{"role": "assistant", "content": [{"type": "text", "text": "TOTAL: RM 12.50"}]}]
    )
    assert rendered.startswith(prompt) and "TOTAL: RM 12.50" in rendered[len(prompt) :]
    with torch.no_grad():
        logits = model(**enc_full).logits[0, n_prompt - 1 : -1]
    logp = logits.log_softmax(-1).gather(-1, answer_ids[:, None]).sum()
    assert torch.isfinite(logp) and logp < 0


def test_save_and_reload(built, images, tmp_path_factory):
    from transformers import AutoModelForImageTextToText

    arch, model, processor = built
    path = tiny.save_tiny(model, processor, tmp_path_factory.mktemp(arch))
    processor2 = load_processor(path)
    model2 = AutoModelForImageTextToText.from_pretrained(path).eval()
    assert type(processor2) is type(processor) and type(model2) is type(model)

    a, b = _inputs(processor, images), _inputs(processor2, images)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(model(**a).logits, model2(**b).logits)


def test_deterministic_given_seed():
    m1, _ = tiny.build_tiny_llava(seed=3)
    m2, _ = tiny.build_tiny_llava(seed=3)
    m3, _ = tiny.build_tiny_llava(seed=4)
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)


def test_tokenizer_special_tokens():
    tok = tiny.build_tokenizer()
    assert 1000 <= len(tok) <= 2048
    for t in tiny.SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(t) == tiny.SPECIAL_TOKENS.index(t)
        assert tok(t, add_special_tokens=False)["input_ids"] == [tiny.SPECIAL_TOKENS.index(t)]
    text = "TOTAL RM 12.50 on 25/12/2018: [12, 34, 56, 78]. GET_CROPS: ['0', '5']"
    assert tok.decode(tok(text)["input_ids"]) == text
