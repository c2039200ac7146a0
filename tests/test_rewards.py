"""Reward functions: one finite value per completion, format penalty, batched and deduplicated target calls."""

from __future__ import annotations

import math

import pytest

from zoomvlm.core.geometry import Box, format_percent_box
from zoomvlm.cropvlm.rewards import (
    AccuracyReward,
    AnswerProbabilityReward,
    LikelihoodReward,
    completion_text,
    format_reward,
)
from zoomvlm.train.recipe import AwaResArgs
from zoomvlm.train.rewards import RewardContext, build_rewards


def _ctx(target=None, policy="cropper"):
    return RewardContext(policy=policy, metric="anls", crop_budget=None, high="side:768", awares=AwaResArgs(),
                         target_factory=None if target is None else (lambda: target))  # fmt: skip


class CountingTarget:
    """Likelihood = -(crop area in pixels of the second view) / 1e4; answers 'yes' if the crop is small."""

    name = "counting"

    def __init__(self):
        self.batches = []

    def generate(self, requests):
        from zoomvlm.targets.base import Generation, Usage

        self.batches.append(len(requests))
        return [Generation("yes" if r.images[1].width * r.images[1].height < 20_000 else "no", Usage((1,)))
                for r in requests]  # fmt: skip

    def loglikelihood(self, requests):
        self.batches.append(len(requests))
        assert all(r.answer == "yes" for r in requests)
        return [-(r.images[1].width * r.images[1].height) / 1e4 for r in requests]


def _chat(text):
    return [{"role": "assistant", "content": text}]


@pytest.fixture
def group(demo_samples):
    s = demo_samples[0]
    completions = [_chat("[10, 10, 20, 20]."), _chat("[10, 10, 20, 20]."), _chat("[0, 0, 100, 100]."),
                   _chat("garbage"), _chat("[50, 50, 40, 60]."), "[30, 30, 35, 32]."]  # fmt: skip
    n = len(completions)
    return {"completions": completions, "image_path": [str(s.image)] * n, "question": [s.question] * n,
            "answers": [["yes"]] * n}  # fmt: skip


def test_completion_text_reads_every_trl_shape():
    assert completion_text("[1, 2, 3, 4].") == "[1, 2, 3, 4]."
    assert completion_text(_chat("[1, 2, 3, 4].")) == "[1, 2, 3, 4]."
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "[1, 2, 3, 4]."}]}]) == (
        "[1, 2, 3, 4]."
    )


def test_format_reward_penalises_invalid_boxes(group):
    assert format_reward(prompts=None, **group) == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]


def test_likelihood_reward_one_finite_value_per_completion_and_dedupe(group):
    target = CountingTarget()
    reward = LikelihoodReward(target)
    values = reward(prompts=None, **group)
    assert len(values) == 6 and all(math.isfinite(v) for v in values)
    # One call for the whole group; identical crops (two equal boxes; the full box, garbage and the
    # inverted box all fall back to the whole image) are scored once: 3 unique requests.
    assert target.batches == [3]
    assert values[0] == values[1] and values[2] == values[3] == values[4]
    assert values[0] > values[2]  # the small crop beats the whole image under this target
    assert values[5] > values[0]


def test_accuracy_reward_scores_with_the_metric(group):
    target = CountingTarget()
    values = AccuracyReward(target, metric="exact")(prompts=None, **group)
    assert values == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert target.batches == [3]


def test_likelihood_floor_keeps_rewards_finite(group):
    class Broken(CountingTarget):
        def loglikelihood(self, requests):
            return [-math.inf] * len(requests)

    values = LikelihoodReward(Broken(), floor=-50.0)(prompts=None, **group)
    assert values == [-50.0] * 6


def test_answer_probability_is_the_per_character_geometric_mean_probability(group):
    """exp(loglik / len(answer)) of the same scores, in (0, 1]; the -inf floor maps to a tiny positive value."""
    logliks = LikelihoodReward(CountingTarget())(prompts=None, **group)
    probs = AnswerProbabilityReward(CountingTarget())(prompts=None, **group)
    assert probs == pytest.approx([math.exp(ll / len("yes")) for ll in logliks])
    assert all(0.0 < p <= 1.0 for p in probs) and probs[5] > probs[0] > probs[2]
    long = dict(group, answers=[["yes sir"]] * 6)  # 7 characters: the same loglik costs less per character

    class AnyAnswer(CountingTarget):
        def loglikelihood(self, requests):
            return [-3.0] * len(requests)

    assert AnswerProbabilityReward(AnyAnswer())(prompts=None, **long)[0] == pytest.approx(math.exp(-3.0 / 7))
    funcs, _ = build_rewards({"answer_probability": 1.0}, _ctx(CountingTarget()))
    assert funcs[0].__name__ == "answer_probability"


def test_build_rewards_by_name_and_errors():
    funcs, weights = build_rewards({"format": 1.0, "likelihood": 0.5}, _ctx(CountingTarget()))
    assert [f.__name__ for f in funcs] == ["format", "likelihood"] and weights == [1.0, 0.5]
    with pytest.raises(KeyError, match="unknown reward"):
        build_rewards({"nope": 1.0}, _ctx(CountingTarget()))
    with pytest.raises(ValueError, match="needs a reward target"):
        build_rewards({"accuracy": 1.0}, _ctx(None))
    with pytest.raises(ValueError, match="completions are a box"):
        build_rewards({"crop_set_format": 1.0}, _ctx(None))


def test_registry_dotted_path_and_one_awares_reward_for_both_variants():
    """A user's reward by ``pkg.module:callable`` (TRL's escape hatch) is used as is; ``awares`` is one class whose
    self-zoom form scores the rollout and whose crop-set form asks the target; rewards pickle."""
    import pickle

    from zoomvlm.awares.rewards import AwaResReward, crop_set_format_reward

    funcs, _ = build_rewards({"zoomvlm.awares.rewards:crop_set_format_reward": 1.0, "format": 1.0}, _ctx())
    assert funcs[0] is crop_set_format_reward and funcs[0].__name__ == "crop_set_format"
    trl_style, _ = build_rewards({"zoomvlm.awares.rewards.crop_set_format_reward": 1.0}, _ctx())
    assert trl_style[0] is crop_set_format_reward
    with pytest.raises(KeyError, match="cannot import"):
        build_rewards({"zoomvlm.awares.rewards:no_such_reward": 1.0}, _ctx())
    (self_zoom,), _ = build_rewards({"awares": 1.0}, _ctx(policy="self_zoom"))
    (crop_set,), _ = build_rewards({"awares": 1.0}, _ctx(CountingTarget(), policy="crop_set"))
    assert type(self_zoom) is type(crop_set) is AwaResReward and self_zoom.__name__ == crop_set.__name__ == "awares"
    assert self_zoom.target is None and crop_set.target is not None and crop_set.high is not None
    for f in (funcs[1], self_zoom):
        assert pickle.loads(pickle.dumps(f)).__name__ == f.__name__


def test_ocr_likelihood_prefers_the_evidence_crop(demo_samples, ocr_target):
    """With the real reader: a box around the answer's line scores higher than a box on empty margin."""
    s = next(x for x in demo_samples if x.field == "total")
    ev = s.evidence_boxes[0].pad(0.03, 0.01)
    completions = [format_percent_box(ev), format_percent_box(Box(0.0, 0.0, 0.1, 0.05))]
    reward = LikelihoodReward(ocr_target)
    good, bad = reward(completions=completions, image_path=[str(s.image)] * 2, question=[s.question] * 2,
                       answers=[list(s.answers)] * 2)  # fmt: skip
    assert math.isfinite(good) and math.isfinite(bad)
    assert good > bad + 1.0, (good, bad)


@pytest.mark.parametrize("text", ["[10, 20, 60, 40], [0, 0, 100, 100].", "[10, 20, 60, 40]. Total: [5]"])
def test_text_the_cropper_rejects_at_inference_earns_no_format_reward_and_no_crop(text):
    from zoomvlm.core.geometry import BoxFormatError, parse_percent_boxes
    from zoomvlm.cropvlm.rewards import _parse

    with pytest.raises(BoxFormatError):
        parse_percent_boxes(text, max_boxes=1)  # what VLMCropper.propose reads: invalid -> the whole image
    assert format_reward(completions=[text]) == [0.0] and _parse(text) is None
    assert format_reward(completions=["[10, 20, 60, 40]."]) == [1.0]


def test_semantic_similarity_with_the_real_minilm_scores_each_prediction_against_its_own_answers():
    """AwaRes's R_ans with the real all-MiniLM-L6-v2 (offline wheel): each prediction against ITS gold answers
    (the best of several), clipped to [0, 1]."""
    from zoomvlm.awares.rewards import SemanticSimilarity

    sim = SemanticSimilarity()
    same, company, unrelated = sim(
        ["nine dollars", "LIGHTROOM GALLERY", "the weather is cold"],
        [["9.00", "nine dollars"], ["lightroom gallery sdn bhd"], ["lightroom gallery sdn bhd"]],
    )
    assert same == pytest.approx(1.0, abs=1e-4)  # an exact match among several gold answers wins
    assert company > 0.5 > unrelated >= 0.0  # scored against its own answers, not the first row's
    assert sim(["x"], ["9.00"]) == sim(["x"], [["9.00"]])  # a bare string is one gold answer
    assert sim(["", "  "], [["12.50"], ["12.50"]]) == [0.0, 0.0]  # no answer is worth nothing (was ~0.16)
