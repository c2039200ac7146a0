"""Constrained decoding of the box grammar, multi-box answers, and the cropper options that use them."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zoomvlm.targets.hf as hf_module
from zoomvlm.core.geometry import Box, BoxFormatError, crop_image, format_percent_boxes, parse_percent_boxes
from zoomvlm.core.pipeline import run_batch
from zoomvlm.cropvlm.constrained import BoxGrammar, BoxLogitsProcessor, BoxVocabulary
from zoomvlm.data.samples import Sample
from zoomvlm.policies import load_policy

REAL_SMOLVLM = "/work/shared/models/smolvlm-256m-instruct"


@pytest.fixture(scope="module")
def tokenizers(tiny_vlms):
    """The tiny models' 1427-token BPE (digits, '].', ' [' merged) and the REAL SmolVLM-256M tokenizer
    (49280 tokens, merged runs of spaces and punctuation such as '],', ' [[', '...')."""
    from transformers import AutoTokenizer

    _, processor = tiny_vlms["smolvlm"]
    real = AutoTokenizer.from_pretrained(REAL_SMOLVLM)
    return {"tiny": (processor.tokenizer, 11), "real": (real, 49279)}


@pytest.fixture(scope="module")
def vocabularies(tokenizers):
    return {
        (name, k): BoxVocabulary(tok, eos, max_boxes=k) for name, (tok, eos) in tokenizers.items() for k in (1, 2, 3)
    }


# ---- the grammar ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, final",
    [
        ("[10, 20, 60, 80].", True),
        (" [0, 0, 100, 100].", True),
        ("[10, 20, 60, 80], [0, 0, 1, 1].", True),
        ("[10, 20, 60, 80]", False),  # no period yet: a prefix, not final
    ],
)
def test_grammar_accepts_valid_box_texts(text, final):
    grammar = BoxGrammar(max_boxes=2)
    state = grammar.feed(grammar.start, text)
    assert state is not None and grammar.is_final(state) is final


@pytest.mark.parametrize(
    "text",
    [
        "[60, 20, 50",  # x2 <= x1 rejected at its first digit that cannot reach > 60
        "[10, 80, 60, 80]",  # y2 == y1
        "[10, 20, 101",  # > 100
        "[100,",  # x1 = 100 leaves no x2 > x1
        "[05,",  # leading zero
        "[10,20",  # canonical ", " spacing
        "[10, 20, 60, 80], [",  # a second box when K = 1
        "[10, 20, 60, 80].x",
        "[1.5,",
    ],
)
def test_grammar_rejects_invalid_prefixes(text):
    grammar = BoxGrammar(max_boxes=1)
    assert grammar.feed(grammar.start, text) is None


def test_grammar_bounds_follow_the_first_corner():
    grammar = BoxGrammar()
    state = grammar.feed(grammar.start, "[40, 30, ")
    assert grammar.feed(state, "4") is not None  # 41..49 still possible
    assert grammar.feed(state, "40,") is None and grammar.feed(state, "41,") is not None
    assert grammar.feed(state, "3") is None  # 3, 30..39 are all <= 40


# ---- the logits processor on two real vocabularies --------------------------------------------------------------
def _decode_with_random_logits(vocabulary, tokenizer, seed: int, temperature: float, max_steps: int = 80):
    """Generate token by token from random logits through the processor (greedy when temperature is 0)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 49k-element ops: two threads on the shared 2 cores spend 4x longer in contention
    try:
        return _decode(vocabulary, tokenizer, seed, temperature, max_steps)
    finally:
        torch.set_num_threads(threads)


def _decode(vocabulary, tokenizer, seed: int, temperature: float, max_steps: int):
    gen = torch.Generator().manual_seed(seed)
    processor = BoxLogitsProcessor(vocabulary)
    prompt = torch.tensor([[5, 6, 7]])
    ids = prompt
    vocab_size = len(tokenizer) + 3  # models often pad their embedding beyond the tokenizer
    for _ in range(max_steps):
        # heavy-tailed logits, so some steps strongly prefer a bad token
        logits = torch.randn(1, vocab_size, generator=gen) * 5 + torch.randn(1, vocab_size, generator=gen) ** 3
        scores = processor(ids, logits)
        assert torch.isfinite(scores).any()
        if temperature == 0:
            token = scores.argmax(-1)
        else:
            token = torch.multinomial(torch.softmax(scores / temperature, -1), 1, generator=gen)[0]
        ids = torch.cat([ids, token.view(1, 1)], dim=1)
        if token.item() in vocabulary.eos:
            return ids[0, prompt.shape[1] : -1].tolist(), True
    return ids[0, prompt.shape[1] :].tolist(), False


@pytest.mark.parametrize("which", ["tiny", "real"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 3), temperature=st.sampled_from([0.0, 0.5, 1.0, 3.0]))
def test_constrained_decoding_never_emits_an_invalid_box(tokenizers, vocabularies, which, seed, k, temperature):
    tokenizer, _ = tokenizers[which]
    ids, ended = _decode_with_random_logits(vocabularies[which, k], tokenizer, seed, temperature)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    # the box text ends within CropVLM's budget of 32 tokens for one box, +20 per extra box
    assert ended and len(ids) + 1 <= 32 + 20 * (k - 1), (text, len(ids))
    boxes = parse_percent_boxes(text, max_boxes=k)  # raises on an invalid box
    assert 1 <= len(boxes) <= k
    assert format_percent_boxes(boxes) == text.strip()  # the canonical text, nothing else


def test_processor_handles_batches_and_finished_rows(tokenizers, vocabularies):
    tokenizer, eos = tokenizers["tiny"]
    processor = BoxLogitsProcessor(vocabularies["tiny", 1])

    def allowed(row):
        return {tokenizer.decode([t]) for t in row.isfinite().nonzero().flatten().tolist()}

    scores = processor(torch.tensor([[5, 6], [5, 6]]), torch.zeros(2, len(tokenizer)))
    assert allowed(scores[0]) == allowed(scores[1]) == {"[", " [", " "}
    # row 0 has written a whole box then EOS (later steps are padding); row 1 is writing y2, which must be > 50
    done = tokenizer("[1, 2, 3, 4].", add_special_tokens=False).input_ids + [eos]
    busy = tokenizer("[10, 50, 30, 60", add_special_tokens=False).input_ids[: len(done)]
    assert tokenizer.decode(busy) == "[10, 50, 30, "
    scores = processor(torch.tensor([[5, 6, *done], [5, 6, *busy]]), torch.zeros(2, len(tokenizer)))
    assert scores[0].isfinite().nonzero().flatten().tolist() == [eos]
    assert allowed(scores[1]) == set("156789")  # 51..99 or 100


def test_vocabulary_refuses_a_tokenizer_that_cannot_spell_boxes(tokenizers):
    class NoDigits:
        eos_token_id = 0

        def __len__(self):
            return 3

        def decode(self, ids, **_):
            return ["<eos>", "[", "]"][ids[0]]

    with pytest.raises(ValueError, match="no single-character token"):
        BoxVocabulary(NoDigits(), 0)


# ---- multi-box parsing ---------------------------------------------------------------------------------------
def test_parse_percent_boxes_golden_and_errors():
    assert parse_percent_boxes("[10, 20, 60, 80], [0, 0, 50, 50].") == [Box(0.1, 0.2, 0.6, 0.8), Box(0, 0, 0.5, 0.5)]
    assert parse_percent_boxes("[10, 20, 60, 80].") == [Box(0.1, 0.2, 0.6, 0.8)]
    with pytest.raises(BoxFormatError, match="at most 1 box"):
        parse_percent_boxes("[10, 20, 60, 80], [0, 0, 50, 50].", max_boxes=1)
    with pytest.raises(BoxFormatError, match=r"box 2: x2 \(0\) must be > x1 \(50\)"):
        parse_percent_boxes("[10, 20, 60, 80], [50, 0, 0, 50].")
    with pytest.raises(ValueError, match="max_boxes"):
        parse_percent_boxes("[1, 2, 3, 4].", max_boxes=0)
    assert format_percent_boxes([Box(0.1, 0.2, 0.6, 0.8), Box(0, 0, 0.5, 0.5)]) == "[10, 20, 60, 80], [0, 0, 50, 50]."


# ---- the cropper -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_vlms):
    import tiny_models as tiny

    model, processor = tiny_vlms["smolvlm"]
    return tiny.save_tiny(model, processor, tmp_path_factory.mktemp("cropper"))


@pytest.mark.parametrize("opts", ["", "@boxes=2", "@t=1.0", "@boxes=3,t=2.0"])
def test_random_weight_cropper_writes_only_valid_boxes_when_constrained(checkpoint, noise_images, opts):
    torch.manual_seed(0)
    policy = load_policy(f"vlm:{checkpoint}{opts}")
    proposals = policy.propose(noise_images * 2, ["What is the total?", "Who issued it?"] * 2)
    assert policy.n_invalid == 0 and policy.n_total == 4
    for p in proposals:
        assert p.error is None and 1 <= len(p.boxes) <= policy.max_boxes
        assert list(p.boxes) == parse_percent_boxes(p.raw)
    # the shortest box text, '[0, 0, 1, 1].', is 12 tiny-tokenizer tokens + end of turn
    assert policy.n_boxes == sum(len(p.boxes) for p in proposals) and policy.n_tokens >= 13 * 4


def test_cropper_options_from_the_spec(checkpoint):
    policy = load_policy(f"vlm:{checkpoint}@free,boxes=2,t=0.8")
    assert (policy.constrained, policy.max_boxes, policy.temperature) == (False, 2, 0.8)
    assert policy.name == f"vlm:{checkpoint}@free,boxes=2,t=0.8" and policy.max_new_tokens == 52
    policy = load_policy(f"vlm:{checkpoint}@boxes=3@t=0.5")  # '@' separates too (lmms-eval's model_args)
    assert (policy.constrained, policy.max_boxes, policy.temperature) == (True, 3, 0.5)
    with pytest.raises(ValueError, match="unknown cropper option 'fast'"):
        load_policy(f"vlm:{checkpoint}@fast")
    for bad, says in (("t=nan", "finite number >= 0"), ("t=inf", "finite number >= 0"), ("t=-1", ">= 0"),
                      ("t=hot", "t= needs a number"), ("side=-5", "side= needs a whole number"),
                      ("boxes=0", "boxes= needs a whole number")):  # fmt: skip
        with pytest.raises(ValueError, match=says):  # nan decoded greedily and was recorded as sampled
            load_policy(f"vlm:{checkpoint}@{bad}")


def test_image_side_splits_the_view_into_more_image_tokens(checkpoint, noise_images):
    from zoomvlm.targets.hf import chat_prompt, encode_inputs

    counts = {}
    for side in (None, 512):
        policy = load_policy(f"vlm:{checkpoint}" + (f"@side={side}" if side else ""))
        policy.processor.image_processor.do_image_splitting = side is not None  # the fixture's default is on
        prompt = chat_prompt(policy.processor, 1, "q")
        inputs = encode_inputs(policy.processor, [prompt], [[noise_images[1].resize((300, 600))]], "cpu")
        counts[side] = int((inputs["input_ids"] == policy.model.config.image_token_id).sum())
    assert counts[None] == 16 and counts[512] == 16 * 3  # 600x300 at 512 px: 2x1 tiles + the global tile
    with pytest.raises(ValueError, match="multiple of the 256 px tile"):
        load_policy(f"vlm:{checkpoint}@side=300")


def test_two_box_request_reaches_the_target_as_two_crops(checkpoint, noise_images, monkeypatch, tmp_path):
    import fakes

    policy = load_policy(f"vlm:{checkpoint}@boxes=2")
    two = "[10, 20, 60, 80], [50, 50, 90, 90]."
    monkeypatch.setattr(hf_module, "generate_texts", lambda *a, **k: ([two], {}, [29]))
    image = noise_images[0]
    image.save(tmp_path / "img.png")
    sample = Sample("s0", tmp_path / "img.png", "What is the total?", ("9.00",), image.width, image.height)
    target = fakes.EchoTarget()
    record = run_batch([sample], policy, target, images=[image])[0]
    (request,) = target.requests
    boxes = [Box(0.1, 0.2, 0.6, 0.8), Box(0.5, 0.5, 0.9, 0.9)]
    assert len(request.images) == 3  # global view + 2 crops, cut from the original image
    for crop, box in zip(request.images[1:], boxes, strict=True):
        assert crop.tobytes() == crop_image(image, box).tobytes()
    assert record.boxes == [b.as_list() for b in boxes] and len(record.view_pixels) == 3
    assert policy.n_boxes == 2 and policy.n_tokens == 29
