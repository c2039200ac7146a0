"""The AwaRes reader crop-set policy (``crop-set-reader``): fine crop set, action space, shared first pass, GRPO."""

import itertools
import json

import numpy as np
import pytest
import torch

from zoomvlm.awares.protocol import (
    CROP_SET,
    CROP_SETS,
    FINE_CROP_SET,
    ToolCallError,
    covering_crops,
    crop_set_area,
    crop_set_coverage,
    crop_set_sent_area,
    parse_get_crops,
)
from zoomvlm.awares.reader_policy import (
    ACTION_FEATURES,
    HAND_SET,
    N_ACTION_FEATURES,
    ActionReward,
    ReaderConfig,
    ReaderCropSetPolicy,
    ReaderItem,
    action_space,
    hand_set_head,
    load_reader,
    looks_like_answer,
    save_reader,
)
from zoomvlm.awares.rewards import ToolCost
from zoomvlm.core.geometry import Box, Budget, resize_to_budget
from zoomvlm.core.pipeline import build_request, run_batch
from zoomvlm.cropvlm.proposal_grpo import GRPOConfig, grpo_step, train_grpo
from zoomvlm.cropvlm.proposals import ScorerConfig, crop_box, pad_batch
from zoomvlm.policies.perception import Perception, Region
from zoomvlm.targets.base import Generation, Usage

G = len(ACTION_FEATURES)
HIGH = Budget(max_side=768)
LOW_384 = {"view_budget": "384"}  # the AwaRes low view of every demo receipt at high 768 px: shareable


# --- the fine crop set ------------------------------------------------------------------------
def _grid_area(keys, n=16):
    """Brute force: the share of the n x n cells (centres) inside the union; exact when every edge is on the grid."""
    boxes = [FINE_CROP_SET[k] for k in keys]
    inside = sum(
        any(b.x0 <= (i + 0.5) / n <= b.x1 and b.y0 <= (j + 0.5) / n <= b.y1 for b in boxes)
        for i in range(n)
        for j in range(n)
    )
    return inside / n / n


def test_fine_crop_set_area_is_exact_and_awares_stays_the_default():
    assert len(CROP_SETS["awares"]) == 10 and CROP_SETS["awares"] is CROP_SET
    assert set(CROP_SET) < set(FINE_CROP_SET) and len(FINE_CROP_SET) == 55
    assert all(FINE_CROP_SET[k] == CROP_SET[k] for k in CROP_SET)
    assert crop_set_area(["h0"]) == 0.125 and crop_set_area(["h3l"]) == 0.0625
    assert crop_set_area(["h2", "s2"]) == 0.1875  # overlapping bands count once
    assert crop_set_area(["h0l", "h0r", "h1"]) == 0.25 and crop_set_area(["all", "s4r"]) == 1.0
    rng = np.random.default_rng(0)
    keys = list(FINE_CROP_SET)
    for _ in range(300):
        subset = list(rng.choice(keys, size=int(rng.integers(1, 6)), replace=False))
        assert crop_set_area(subset) == _grid_area(subset), subset  # exact, not approximately
    # the cost term takes either set; the VLM's GET_CROPS grammar does not
    assert ToolCost(lam=1.0)(["h3r"], needs_hr=True) == pytest.approx(0.1 + 0.0625)
    with pytest.raises(ToolCallError):
        parse_get_crops("GET_CROPS: ['h3r']")
    with pytest.raises(ToolCallError):
        crop_set_area(["h8"])


def test_covering_crops_is_the_cover_that_sends_least():
    rng = np.random.default_rng(1)
    for crop_set in ("awares", "fine"):
        regions = CROP_SETS[crop_set]
        for _ in range(40):
            x0, y0 = rng.uniform(0, 0.8, size=2)
            box = Box(x0, y0, min(1.0, x0 + rng.uniform(0.02, 0.5)), min(1.0, y0 + rng.uniform(0.01, 0.1)))
            keys = covering_crops(box, crop_set)
            assert crop_set_coverage(keys, box) >= 0.99
            # no single region or pair that sends less (summed area: each crop is sent whole) also covers it
            for n in (1, 2):
                for other in itertools.combinations(regions, n):
                    if crop_set_coverage(list(other), box) >= 0.99:
                        assert crop_set_sent_area(list(other)) >= crop_set_sent_area(keys) - 1e-12, (box, keys, other)
    line = Box(0.55, 0.36, 0.95, 0.39)  # across the 3/8 edge, right column
    assert covering_crops(line) == ["1"]  # a quadrant, 1/4 of the image
    assert covering_crops(line, "fine") == ["s2r"]  # one shifted half band, 1/16 of the image


# --- the action space -------------------------------------------------------------------------
def _line(i, x0, y0, x1, text, conf):
    return Region(Box(x0, y0, x1, y0 + 0.02), text, conf, "line", 1, (i,))


def _perception(lines, legibility=1.0):
    ink = Box(0.0, 0.0, 1.0, 1.0)
    return Perception(tuple(lines), tuple(lines), ink, (384, 768), legibility=legibility)


def test_action_space_maps_the_top_regions_to_distinct_crop_subsets():
    lines = [
        _line(0, 0.05, 0.10, 0.40, "LIGHTROOM GALLERY", 0.95),  # top-left
        _line(1, 0.60, 0.80, 0.95, "TOTAL 39.80", 0.60),  # bottom-right
        _line(2, 0.62, 0.84, 0.90, "CASH 50.00", 0.90),  # bottom-right too: the same subset as line 1
    ]
    p, scorer_cfg = _perception(lines), ScorerConfig()
    logits = np.array([3.0, 2.0, 1.0])
    space = action_space(p, logits, "Which company issued this receipt?", ReaderConfig(m=3), scorer_cfg)
    assert space.keys == ((), ("0",), ("3",))  # NO_CROPS, then the distinct subsets in scorer order
    assert space.regions == (None, 0, 1) and space.x.shape == (3, N_ACTION_FEATURES)
    # NO_CROPS carries the best region's reading in its own block; crops carry theirs in the other block
    f = ACTION_FEATURES.index
    assert space.x[0, 0] == 1 and space.x[0, 1 + f("conf")] == pytest.approx(0.95)
    assert space.x[0, 1 + f("looks")] == 1 and not space.x[0, 1 + G :].any()
    assert space.x[2, 0] == 0 and not space.x[2, 1 : 1 + G].any()
    assert space.x[2, 1 + G + f("area")] == 0.25 and space.x[2, 1 + G + f("conf")] == pytest.approx(0.6)
    # the bottom-right subset covers lines 1 and 2: their scorer mass
    p_soft = np.exp(logits) / np.exp(logits).sum()
    assert space.x[2, 1 + G + f("mass")] == pytest.approx(p_soft[1] + p_soft[2], abs=1e-6)
    # the fine set: each padded line maps to its smallest covering band(s)
    fine = action_space(p, logits, "Which company?", ReaderConfig(crop_set="fine", m=3), scorer_cfg)
    expected = [tuple(covering_crops(crop_box(r, scorer_cfg), "fine")) for r in lines]
    assert fine.keys[1] == expected[0] and set(fine.keys[1:]) == set(dict.fromkeys(expected))
    assert all(crop_set_area(k) <= 0.125 for k in fine.keys[1:])
    # the reader found nothing: the one crop action is the whole image
    empty = action_space(_perception([]), np.zeros(0), "What is the total?", ReaderConfig(), scorer_cfg)
    assert empty.keys == ((), ("all",)) and empty.x[1, 1 + G + f("fallback")] == 1


def test_answer_shape_and_hand_set_initial_policy():
    assert looks_like_answer("On what date was this purchase made?", "DATE: 20/11/2017") == 1.0
    assert looks_like_answer("On what date was this purchase made?", "TOTAL 39.80") == 0.0
    assert looks_like_answer("What is the total amount?", "TOTAL 39.80") == 1.0
    assert looks_like_answer("Which company issued it?", "LIGHTROOM GALLERY") == 1.0
    head = hand_set_head(ReaderConfig())
    w = head.linear.weight[0]
    assert w[0] == HAND_SET["is_no"] and w[1 + ACTION_FEATURES.index("conf")] == HAND_SET["no.conf"]
    lines = [_line(0, 0.05, 0.10, 0.40, "LIGHTROOM GALLERY", 0.99), _line(1, 0.60, 0.80, 0.95, "X", 0.5)]
    confident = action_space(
        _perception(lines), np.array([3.0, 0.0]), "Which company?", ReaderConfig(), ScorerConfig()
    )
    unsure_lines = [_line(0, 0.05, 0.10, 0.40, "L1GHTR0", 0.55), lines[1]]
    unsure = action_space(_perception(unsure_lines), np.array([3.0, 0.0]), "Which company?", ReaderConfig(),
                          ScorerConfig())  # fmt: skip
    with torch.no_grad():
        picks = [int(head(*pad_batch([(np.zeros(0, np.float32), s.x)]))[0].argmax()) for s in (confident, unsure)]
    assert picks == [0, 1]  # trusts a confident reading; fetches the top region otherwise


# --- the policy in front of the ocr target ----------------------------------------------------
@pytest.fixture(scope="module")
def total_sample(demo_samples):
    return next(s for s in demo_samples if s.id == "sroie_017_total")


@pytest.fixture(scope="module")
def reader_policy():
    """The policy reading the AwaRes low view (384 px for every demo receipt at 768 px), asking for crops always."""
    head = hand_set_head(ReaderConfig(perception=LOW_384))
    with torch.no_grad():
        head.linear.weight[0, 0] = -100.0  # never NO_CROPS: this test is about the crops reaching the target
    return ReaderCropSetPolicy(head=head)


def test_policy_runs_in_front_of_the_ocr_target_and_its_crops_reach_it(reader_policy, total_sample, ocr_target):
    (record,) = run_batch([total_sample], reader_policy, ocr_target, rtr_reference=HIGH)
    image = total_sample.load_image()
    assert record.boxes and record.policy_error is None and record.policy_raw.startswith("GET_CROPS")
    keys = [k for k, b in CROP_SET.items() if b.as_list() in record.boxes]
    assert len(keys) == len(record.boxes)
    # the target read the low view plus one view per crop, each at the high view's scale
    assert len(record.view_pixels) == 1 + len(keys)
    low = resize_to_budget(image, Budget(max_side=384))
    assert record.view_pixels[0] == low.width * low.height
    assert record.rtr == pytest.approx(0.25 + crop_set_area(keys), abs=0.02)
    assert record.score == 1.0, record.prediction  # the reader found the total (39.80) in the crops it was given


def test_checkpoint_round_trip_and_registry(tmp_path):
    from zoomvlm.policies import POLICY_SPECS, load_policy

    head = hand_set_head(ReaderConfig(crop_set="fine", perception=LOW_384))
    save_reader(head, tmp_path / "ckpt", {"stage": "test"})
    loaded = load_reader(tmp_path / "ckpt")
    assert loaded.config == head.config
    for a, b in zip(loaded.state_dict().values(), head.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    policy = load_policy(f"crop-set-reader:{tmp_path / 'ckpt'}@side:1024")
    assert policy.config.crop_set == "fine" and policy.high == Budget(max_side=1024)
    assert str(policy.perceiver.budget) == "side:384"
    default = load_policy("crop-set-reader")
    assert default.config.crop_set == "awares" and default.high == HIGH and default.name == "crop-set-reader"
    # text from the AwaRes low view (shared with the target; the shipped scorer's own text view is 384 px too),
    # line boxes from the shipped scorer's detector at 1024 px
    assert default.settings["view_budget"] == "384" and default.settings["detect_budget"] == "1024"
    at_1024 = load_policy("crop-set-reader@side:1024")  # low view 512 px: the text pass moves there
    assert at_1024.settings["view_budget"] == "512" and at_1024.settings["detect_budget"] == "1024"
    scorer_own = ReaderCropSetPolicy(config=ReaderConfig(text_view="scorer"), high=Budget(max_side=1024),
                                     encoder=default.cropper.encoder)  # fmt: skip
    assert scorer_own.settings["view_budget"] == "384" and scorer_own.settings["detect_budget"] == "1024"
    assert "crop-set-reader[:CKPT][@HIGH]" in POLICY_SPECS
    with pytest.raises(FileNotFoundError, match="not a crop-set-reader checkpoint"):
        load_reader(tmp_path)
    config = tmp_path / "ckpt" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "future_option": 1}))
    with pytest.raises(ValueError, match="unknown settings.*future_option") as err:
        load_policy(f"crop-set-reader:{tmp_path / 'ckpt'}")
    assert str(config) in str(err.value)


def test_the_first_pass_is_shared_with_an_ocr_target_at_the_low_budget(reader_policy, total_sample):
    from zoomvlm.targets.ocr import OCRTarget

    image = total_sample.load_image()
    target = OCRTarget(384)
    assert reader_policy.bind_target(target)
    (proposal,) = reader_policy.propose([image], [total_sample.question])
    assert proposal.shared_seconds > 0
    calls = []
    original = target._read_uncached
    target._read_uncached = lambda view: calls.append(view.size) or original(view)
    (gen,) = target.generate([build_request(image, total_sample.question, proposal)])
    low = resize_to_budget(image, Budget(max_side=384)).size
    assert low not in calls and len(calls) == len(proposal.boxes)  # the low view was read once, by the policy
    assert gen.usage.seconds >= proposal.shared_seconds  # ... and the target paid for it
    # another question about the same receipt: no new read at all, nothing charged twice
    (again,) = reader_policy.propose([image], ["On what date was this purchase made?"])
    assert again.shared_seconds == 0.0
    # a high view whose low view is NOT the perceiver's (1024 px -> 512 px): the policy reads on its own and pays
    other = OCRTarget(384)
    far = ReaderCropSetPolicy(head=reader_policy.head, high="side:1024", encoder=reader_policy.cropper.encoder)
    assert far.bind_target(other)
    (p_far,) = far.propose([image], [total_sample.question])
    assert p_far.shared_seconds == 0.0 and not other._pending  # no read left for a target that will not use it


# --- GRPO on R_ans - C_tool -------------------------------------------------------------------
class FakeReader:
    """Answers right only with a crop or from the high view alone (views wider than the 384 px low view)."""

    name = "fake"
    budget = HIGH

    def __init__(self, answer):
        self.answer, self.requests = answer, 0

    def generate(self, requests):
        self.requests += len(requests)
        out = []
        for r in requests:
            views = r.views(self.budget)
            sharp = len(views) > 1 or max(views[0].size) > 384
            out.append(Generation(self.answer if sharp else "", Usage(view_pixels=tuple(v.size[0] for v in views))))
        return out


def _total_item(demo_samples):
    """The total question of a receipt, with NO_CROPS + 3 crop subsets; the best region reads like a confident
    answer, so the hand-set initial policy leans to NO_CROPS."""
    lines = [_line(0, 0.60, 0.80, 0.95, "TOTAL 39.80", 0.99), _line(1, 0.05, 0.10, 0.40, "A", 0.7),
             _line(2, 0.05, 0.48, 0.95, "C", 0.7)]  # fmt: skip
    p = _perception(lines)
    s = next(s for s in demo_samples if s.id == "sroie_017_total")
    space = action_space(p, np.array([1.0, 0.5, 0.0]), s.question, ReaderConfig(), ScorerConfig())
    assert space.keys == ((), ("3",), ("0",), ("all",))
    return ReaderItem(s, p, space, np.zeros(0, np.float32), space.x)


def _expected(model, items, table):
    with torch.no_grad():
        logp = torch.log_softmax(model(*pad_batch([(it.q, it.x) for it in items])), -1).numpy()
    return float(np.mean([(np.exp(logp[i, : len(r)]) * r).sum() for i, r in enumerate(table)]))


@pytest.mark.parametrize("lam, optimum", [(0.0, "crop"), (100.0, "no_crops")])
def test_grpo_learns_the_known_optimum_of_the_awares_reward(demo_samples, tmp_path, lam, optimum):
    items = [_total_item(demo_samples)]
    target = FakeReader(items[0].sample.answers[0])
    reward = ActionReward(items, target, HIGH, ToolCost(lam=lam))
    # every action's reward through the real reward path: NO_CROPS answers wrong from the low view, and the high
    # view answers right, so the on-the-fly label is HR: R = 0 - alpha_miss; a crop: R = 1 - alpha_use - lam * area
    table = [np.asarray(reward([0, 0, 0, 0], [0, 1, 2, 3]))]
    areas = [crop_set_area(k) for k in items[0].space.keys[1:]]
    assert table[0] == pytest.approx([-0.5, *[1 - 0.1 - lam * a for a in areas]])
    n = target.requests
    assert n == 5  # 4 actions + the high view for the label
    reward([0], [2])
    assert target.requests == n  # memoised

    init = hand_set_head(ReaderConfig())
    before = _expected(init, items, table)
    with torch.no_grad():
        assert int(init(*pad_batch([(items[0].q, items[0].x)]))[0].argmax()) == 0  # starts at NO_CROPS
    # one step changes the parameters
    model = hand_set_head(ReaderConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    cfg = GRPOConfig(group=8, beta=0.01, lr=0.05)
    stats = grpo_step(model, init, items, reward, [0], opt, cfg, np.random.default_rng(0))
    assert stats["advantage_abs"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), init.state_dict().values(),
                                                      strict=True))  # fmt: skip
    # a short run climbs to the optimum
    cfg = GRPOConfig(steps=40, prompts_per_step=1, group=8, beta=0.01, lr=0.05, save_every=20)
    trained = train_grpo(init, items, reward, cfg, tmp_path / "g", progress=False, save=save_reader)
    after = _expected(trained, items, table)
    assert after > before + 0.2, (before, after)
    with torch.no_grad():
        pick = int(trained(*pad_batch([(items[0].q, items[0].x)]))[0].argmax())
    assert (pick == 0) == (optimum == "no_crops"), (pick, table[0])
    assert load_reader(tmp_path / "g" / "final").config == init.config  # saved as a loadable reader checkpoint


def test_curated_labels_replace_the_on_the_fly_ones(demo_samples):
    items = [_total_item(demo_samples)]
    target = FakeReader(items[0].sample.answers[0])
    labelled = ActionReward(items, target, HIGH, ToolCost(), labels={items[0].sample.id: "LR"})
    assert labelled([0], [0]) == [0.0]  # R_ans 0, and LR: no miss cost
    assert target.requests == 1  # the high view was not read: the label was given
