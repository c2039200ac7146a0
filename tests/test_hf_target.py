"""The hf target on tiny random-weight models of the real architectures (SmolVLM, Qwen2.5-VL, LLaVA)."""

import pytest
import torch

from zoomvlm.core.pipeline import run_batch
from zoomvlm.core.prompts import target_prompt
from zoomvlm.data.samples import Sample
from zoomvlm.policies import load_policy
from zoomvlm.targets.base import TargetRequest
from zoomvlm.targets.hf import HFTarget, answer_text, chat_prompt, encode_inputs

ARCHS = ["smolvlm", "qwen2_5_vl", "llava"]


@pytest.fixture(params=ARCHS)
def target(request, tiny_vlms):
    model, processor = tiny_vlms[request.param]
    return HFTarget(f"tiny-{request.param}", model=model, processor=processor, max_new_tokens=4)


def _requests(images):
    return [
        TargetRequest(images, "What is the total?", answer="39.80"),
        TargetRequest(images[:1], "Which company issued this receipt?", answer="ASIA MART"),
    ]


def test_generate_with_two_images_counts_visual_tokens(target, noise_images):
    gens = target.generate(_requests(noise_images))
    assert len(gens) == 2 and all(isinstance(g.text, str) for g in gens)
    # visual tokens = image placeholders the processor put in input_ids for exactly these views (prepared as the
    # target prepares every view: encode_inputs)
    proc = target.processor
    for gen, views in zip(gens, [noise_images, noise_images[:1]], strict=True):
        prompt = chat_prompt(proc, len(views), target_prompt("q"))
        ids = encode_inputs(proc, [prompt], [views], "cpu")["input_ids"]
        assert gen.usage.visual_tokens == int((ids == target.image_token_id).sum()) > 0
        assert len(gen.usage.view_pixels) == len(views) and all(p > 0 for p in gen.usage.view_pixels)
        assert 0 < gen.usage.completion_tokens <= target.max_new_tokens
        assert gen.usage.prompt_tokens > gen.usage.visual_tokens
    assert gens[0].usage.visual_tokens > gens[1].usage.visual_tokens  # two images cost more than one


def test_batched_equals_unbatched(target, noise_images):
    reqs = _requests(noise_images)
    batched = [g.text for g in target.generate(reqs)]
    single = [target.generate([r])[0].text for r in reqs]
    assert batched == single
    ll_batched = target.loglikelihood(reqs)
    ll_single = [target.loglikelihood([r])[0] for r in reqs]
    assert ll_batched == pytest.approx(ll_single, abs=1e-3)


def test_loglikelihood_equals_manual_teacher_forcing(target, noise_images):
    req = _requests(noise_images)[0]
    proc, model = target.processor, target.model
    prompt = chat_prompt(proc, 2, target_prompt(req.question))
    enc_prompt = encode_inputs(proc, [prompt], [noise_images], "cpu")
    enc = encode_inputs(proc, [prompt + answer_text(proc, req.answer)], [noise_images], "cpu")
    n = enc_prompt["input_ids"].shape[1]
    assert torch.equal(enc["input_ids"][0, :n], enc_prompt["input_ids"][0])
    answer_ids = enc["input_ids"][0, n:]
    with torch.no_grad():
        logits = model(**enc).logits[0, n - 1 : -1].float()
    manual = float(logits.log_softmax(-1).gather(-1, answer_ids[:, None]).sum())
    (ll,) = target.loglikelihood([req])
    assert ll == pytest.approx(manual, abs=1e-3)
    assert ll < 0 and len(answer_ids) >= 2


def test_loglikelihood_needs_answer(target, noise_images):
    with pytest.raises(ValueError, match="no answer"):
        target.loglikelihood([TargetRequest(noise_images, "q")])


def test_pipeline_with_hf_target(tmp_path, tiny_vlms, noise_images):
    model, processor = tiny_vlms["qwen2_5_vl"]
    target = HFTarget("tiny-qwen", model=model, processor=processor, max_new_tokens=3)
    noise_images[0].save(tmp_path / "a.png")
    sample = Sample("a", tmp_path / "a.png", "What is the total?", ("9.00",), 300, 200)
    (record,) = run_batch([sample], load_policy("center"), target, metric="anls")
    assert len(record.view_pixels) == 2 and record.visual_tokens > 0
    # RTR in the model's own currency: visual tokens of both views / those of the whole image at full resolution
    assert record.rtr_unit == "tokens"
    assert record.rtr == pytest.approx(record.visual_tokens / target.reference_visual_tokens(noise_images[0]))


def test_processor_shim_catches_only_the_missing_torchvision_error(monkeypatch, tmp_path):
    """An internal error of AutoProcessor is not swallowed by the fallback (only torchvision's ImportError is)."""
    import transformers

    from zoomvlm.targets import hf_compat

    def broken(*a, **k):
        raise KeyError("a bug, not a missing torchvision")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", broken)
    monkeypatch.setattr(hf_compat, "torchvision_available", lambda: False)
    with pytest.raises(KeyError, match="a bug"):
        hf_compat.load_processor(tmp_path)
