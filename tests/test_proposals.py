"""The ``proposals`` cropper: scorer, multi-box proposals through the pipeline, and its GRPO loop."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from zoomvlm.core.geometry import Box, Budget
from zoomvlm.core.pipeline import run_batch
from zoomvlm.cropvlm.proposal_grpo import GRPOConfig, expected_reward, grpo_step, train_grpo
from zoomvlm.cropvlm.proposals import (
    N_SIM,
    ProposalCropper,
    RegionScorer,
    ScorerConfig,
    pad_batch,
    seed_targets,
    select_boxes,
    train_seed,
)
from zoomvlm.policies.perception import N_NGRAM, N_REGION_FEATURES, Perceiver, Perception, Region
from zoomvlm.targets.base import Generation, Usage

F = N_REGION_FEATURES + N_NGRAM + N_SIM


@dataclass
class Item:
    q: np.ndarray
    x: np.ndarray


def toy_items(n=24, n_cand=6, seed=0):
    """Questions whose good candidate is the one with feature 0 == 1 (the known optimum); every third question
    has fewer candidates, so batches are padded as real ones are."""
    rng = np.random.default_rng(seed)
    items, rewards = [], []
    for i in range(n):
        n_i = n_cand if i % 3 else n_cand - 2
        x = rng.normal(size=(n_i, F)).astype(np.float32) * 0.1
        good = rng.integers(n_i)
        x[:, 0] = 0.0
        x[good, 0] = 1.0
        r = np.zeros(n_i)
        r[good] = 1.0
        items.append(Item(rng.normal(size=384).astype(np.float32), x))
        rewards.append(r)
    return items, rewards


def test_grpo_step_statistics_are_the_formulas_it_documents():
    """The returned KL is the exact KL(pi || ref) over the candidates (not KL(ref || pi)); with
    ``scale_rewards="group"`` the advantage is divided by the group's reward std (GRPO), without it not (Dr-GRPO);
    with mu > 1 the PPO clip bounds each later update's ratio to [1 - eps, 1 + eps] where the advantage pushes."""
    from zoomvlm.cropvlm.proposal_grpo import _log_probs

    items, rewards = toy_items(6)
    torch.manual_seed(0)
    ref = RegionScorer().eval()
    model = RegionScorer()
    model.load_state_dict(ref.state_dict())
    with torch.no_grad():  # move the policy away from its reference
        for prm in model.parameters():
            prm.add_(0.3 * torch.randn_like(prm))
        lp, mask = _log_probs(model, items, 1.0)
        rp, _ = _log_probs(ref, items, 1.0)
        forward = (lp.exp() * (lp - rp).masked_fill(~mask, 0.0)).sum(-1).mean().item()
        backward = (rp.exp() * (rp - lp).masked_fill(~mask, 0.0)).sum(-1).mean().item()
    assert abs(forward - backward) > 0.05  # the two directions differ here, so the check below can tell them apart

    def reward_fn(item_idx, actions):
        return [float(rewards[i][a]) for i, a in zip(item_idx, actions, strict=True)]

    def step(config, seed=0):
        m = RegionScorer()
        m.load_state_dict(model.state_dict())
        opt = torch.optim.SGD(m.parameters(), lr=0.0)  # lr 0: the statistics of the step as it starts
        return grpo_step(m, ref, items, reward_fn, list(range(len(items))), opt, config, np.random.default_rng(seed))

    stats = step(GRPOConfig(group=4, temperature=1.0))
    assert stats["kl"] == pytest.approx(forward, rel=1e-5)
    # the same draws (same rng seed), at a temperature that spreads them: Dr-GRPO's |A| and GRPO's
    # |A| / (std + 1e-4), computed by hand
    with torch.no_grad():
        hot, _ = _log_probs(model, items, 8.0)
    rng = np.random.default_rng(0)
    probs = hot.exp().numpy()
    acts = np.stack([rng.choice(probs.shape[1], size=8, p=p / p.sum()) for p in probs])
    r = np.array([[rewards[i][a] for a in row] for i, row in enumerate(acts)])
    a = r - r.mean(1, keepdims=True)
    assert (r.std(1) > 0).sum() >= 2  # groups with a spread: the advantage is not 0 everywhere
    assert step(GRPOConfig(group=8, temperature=8.0))["advantage_abs"] == pytest.approx(np.abs(a).mean())
    scaled = np.abs(a / (r.std(1, keepdims=True) + 1e-4)).mean()
    assert step(GRPOConfig(group=8, temperature=8.0, scale_rewards="group"))["advantage_abs"] == pytest.approx(scaled)
    # PPO clip: with a large lr and mu = 4, the clipped term of each later update is ratio.clamp(1 +- eps) * A
    clip_model = RegionScorer()
    clip_model.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(clip_model.parameters(), lr=50.0)
    seen = []
    original = torch.minimum

    def spy(x, y):
        seen.append((x.detach().clone(), y.detach().clone()))
        return original(x, y)

    torch.minimum = spy
    try:
        clip_config, rng0 = GRPOConfig(group=8, temperature=8.0, mu=4, epsilon=0.2, beta=0.0), np.random.default_rng(0)
        grpo_step(clip_model, ref, items, reward_fn, list(range(len(items))), opt, clip_config, rng0)
    finally:
        torch.minimum = original
    assert len(seen) == 4  # one surrogate per inner update
    adv = torch.as_tensor(a, dtype=torch.float32)
    moved = False
    for unclipped, clipped in seen[1:]:
        ratio = torch.where(adv != 0, unclipped / adv, torch.ones_like(unclipped))
        assert torch.allclose(clipped, ratio.clamp(0.8, 1.2) * adv, atol=1e-5)
        moved |= bool(((ratio - 1).abs() > 0.2)[adv != 0].any())
    assert moved  # some ratio left the band, so the clip was exercised


def test_scorer_is_deterministic_and_masks_padding():
    items, _ = toy_items(4)
    items[1] = Item(items[1].q, items[1].x[:3])
    torch.manual_seed(0)
    model = RegionScorer().eval()
    q, x, mask = pad_batch([(it.q, it.x) for it in items])
    a, b = model(q, x, mask), model(q, x, mask)
    assert torch.equal(a, b)
    assert torch.isinf(a[1, 3:]).all() and torch.isfinite(a[1, :3]).all()
    # seed training is reproducible for a seed, and learns the soft label
    targets = [np.eye(it.x.shape[0], dtype=np.float32)[int(np.argmax(it.x[:, 0]))] for it in items]
    data = [(it.q, it.x, t) for it, t in zip(items, targets, strict=True)]
    m1, m2 = train_seed(data, epochs=30, seed=1), train_seed(data, epochs=30, seed=1)
    for p1, p2 in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(p1, p2)
    with torch.no_grad():
        picks = m1(q, x, mask).argmax(-1).tolist()
    assert picks == [int(np.argmax(it.x[:, 0])) for it in items]


def test_grpo_step_changes_parameters_and_raises_the_reward_on_a_toy_problem(tmp_path):
    items, rewards = toy_items()
    torch.manual_seed(0)
    seed = RegionScorer().eval()
    before = expected_reward(seed, items, rewards)

    def reward_fn(item_idx, actions):
        return [float(rewards[i][a]) for i, a in zip(item_idx, actions, strict=True)]

    # one step changes the parameters
    model = RegionScorer()
    model.load_state_dict(seed.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cfg = GRPOConfig(group=6, beta=0.01, lr=1e-2)
    stats = grpo_step(model, seed, items, reward_fn, list(range(len(items))), opt, cfg, np.random.default_rng(0))
    assert stats["advantage_abs"] > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())  # padded candidates must not give NaN
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), seed.state_dict().values(),
                                                      strict=True))  # fmt: skip
    # a short run climbs towards the optimum (expected reward 1.0), and resumes from its checkpoint
    cfg = GRPOConfig(steps=40, prompts_per_step=8, group=6, beta=0.01, lr=1e-2, save_every=10)
    trained = train_grpo(seed, items, reward_fn, cfg, tmp_path / "g", progress=False)
    after = expected_reward(trained, items, rewards)
    assert after > before + 0.3, (before, after)
    assert (tmp_path / "g" / "final" / "scorer.pt").exists() and (tmp_path / "g" / "checkpoint.pt").exists()
    resumed = train_grpo(seed, items, reward_fn, cfg, tmp_path / "g", progress=False)  # nothing left to do
    for a, b in zip(resumed.state_dict().values(), trained.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_grpo_config_refuses_a_group_of_one():
    with pytest.raises(ValueError, match="group"):
        GRPOConfig(group=1)


def test_seed_targets_and_selection():
    lines = [Region(Box(0.1, 0.1 * i, 0.9, 0.1 * i + 0.05), f"l{i}", 0.9, "line", 1, (i,)) for i in range(1, 5)]
    p = Perception(tuple(lines), tuple(lines), Box(0.1, 0.1, 0.9, 0.45), (100, 100))
    t = seed_targets(p, Box(0.1, 0.3, 0.9, 0.35))
    assert t is not None and int(np.argmax(t)) == 2 and abs(t.sum() - 1) < 1e-6
    assert seed_targets(p, Box(0.0, 0.9, 0.1, 1.0)) is None  # the low-resolution pass missed it
    overlapping = [*lines, Region(Box(0.1, 0.3, 0.9, 0.36), "dup", 0.9, "row", 1, (2,))]
    logits = np.array([0.0, 1.0, 3.0, 0.5, 2.9])
    assert select_boxes(overlapping, logits, ScorerConfig(k=2)) == [2, 1]  # the duplicate of 2 is skipped


class RecordingTarget:
    name = "recording"
    budget = None

    def __init__(self):
        self.requests = []

    def generate(self, requests):
        self.requests.extend(requests)
        return [Generation("x", Usage(view_pixels=tuple(i.width * i.height for i in r.images))) for r in requests]

    def loglikelihood(self, requests):
        raise NotImplementedError


def test_multi_box_proposals_reach_the_target_as_several_crops(demo_samples, ocr_target):
    from zoomvlm.policies.perception import QuestionEncoder

    torch.manual_seed(0)
    sample = next(s for s in demo_samples if s.id == "sroie_017_total")
    policy = ProposalCropper(model=RegionScorer(ScorerConfig(k=3)), perceiver=Perceiver(384, reader=ocr_target),
                             encoder=QuestionEncoder())  # fmt: skip
    target = RecordingTarget()
    (record,) = run_batch([sample], policy, target)
    (request,) = target.requests
    assert len(record.boxes) == 3 and len(request.images) == 4  # global view + 3 crops
    image = sample.load_image()
    assert request.images[0].size == image.size  # crops and global view come from the ORIGINAL image
    for crop, box in zip(request.images[1:], record.boxes, strict=True):
        x0, y0, x1, y1 = Box(*box).to_pixels(*image.size)
        assert crop.size == (x1 - x0, y1 - y0)
    # deterministic: the same question gives the same boxes
    (again,) = run_batch([sample], policy, RecordingTarget())
    assert again.boxes == record.boxes


def test_shipped_scorer_shares_the_384_pass_and_detects_at_1024():
    import json
    from pathlib import Path

    from zoomvlm.cropvlm.proposals import default_proposals_path, load_scorer
    from zoomvlm.targets.ocr import OCRTarget

    path = default_proposals_path()
    model = load_scorer(path)
    c = model.config
    assert (c.view_budget, c.detect_budget, c.features, c.part_px, c.k) == ("384", "1024", 2, 512, 3)
    recipe = json.loads((Path(path) / "zoomvlm_recipe.json").read_text())
    assert recipe["detect_budget"] == "1024" and "no human box" in recipe["labels"]
    assert "non-commercial" in recipe["licence"]  # trained on documents/ too
    policy = ProposalCropper(model=model)
    assert str(policy.perceiver.budget) == str(Budget.parse("384"))
    assert str(policy.perceiver.detect_budget) == str(Budget.parse("1024")) and policy.perceiver.part_px == 512
    # the ocr target's own global view at 384 px is the text pass: shared; another budget is not
    assert policy.bind_target(OCRTarget(384))
    assert not policy.bind_target(OCRTarget(512))


def test_v2_features_see_a_values_label_in_its_row_and_above_it():
    from zoomvlm.cropvlm.proposals import N_SIM_V2, featurize, n_sim
    from zoomvlm.policies.perception import n_region_features, perception_from_lines

    def quad(x0, y0, x1, y1):
        return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float32)

    # "Advertising expense" and its value 714.3 on one printed row; a table header "Operating leases" above 34.7
    lines = [(quad(10, 100, 300, 120), "Advertising expense", 0.9), (quad(600, 100, 700, 120), "714.3", 0.9),
             (quad(600, 200, 800, 220), "Operating leases", 0.9), (quad(620, 230, 700, 250), "34.7", 0.9)]  # fmt: skip
    p = perception_from_lines(lines, (1000, 1000), part_px=512, image_size=(1000, 1000))

    class Enc:
        def encode(self, texts):
            return np.zeros((len(texts), 384), np.float32)

    q, x = featurize(p, "What is the advertising expense in FY 2015?", Enc(), version=2)
    assert x.shape == (len(p.regions), n_region_features(2) + N_NGRAM + n_sim(2)) and n_sim(2) == N_SIM_V2
    value, leases_value = p.regions[1], p.regions[3]
    assert value.text == "714.3" and leases_value.text == "34.7"
    assert x[1, -2] == pytest.approx(2 / 3)  # its row-mate holds 2 of the 3 content words (advertising, expense, 2015)
    assert x[1, -4] == 0.0  # the value itself shares no word with the question
    assert x[3, -2] == 0.0 and x[3, -1] == 0.0  # 34.7 sits under "Operating leases": nothing of this question
    q2, x2 = featurize(p, "What were the operating leases?", Enc(), version=2)
    assert x2[3, -1] == pytest.approx(1.0)  # ... but it answers the question about its header
    assert featurize(p, "What were the operating leases?", Enc(), version=1)[1].shape[1] == F


def test_lexical_path_adds_the_question_overlaps_to_the_score():
    from zoomvlm.cropvlm.proposals import n_sim
    from zoomvlm.policies.perception import n_region_features

    torch.manual_seed(0)
    model = RegionScorer(ScorerConfig(features=2, lexical=True)).eval()
    with torch.no_grad():  # silence the learned path so the direct one shows alone
        for p in model.region.parameters():
            p.zero_()
    f = n_region_features(2) + N_NGRAM + n_sim(2)
    x = torch.zeros(1, 2, f)
    x[0, 1, -n_sim(2)] = 1.0  # candidate 1 holds every content word of the question
    with torch.no_grad():
        logits = model(torch.zeros(1, 384), x, torch.ones(1, 2, dtype=torch.bool))[0]
    assert float(logits[1] - logits[0]) == pytest.approx(2.0)
    assert not hasattr(RegionScorer(ScorerConfig(features=2)), "lexical")  # off by default (old checkpoints load)


def test_v3_features_match_question_words_through_typos_and_inflections_but_numbers_exactly():
    from zoomvlm.cropvlm.proposals import _words, featurize, word_matcher
    from zoomvlm.policies.perception import perception_from_lines

    question = "what is advertsing expense of Neflix in FY 2015?"  # as typed in MMLongBench-Doc
    overlap = word_matcher(_words(question), ["Netflix advertising expenses 2016", "most cost 2015"])
    assert overlap("Netflix advertising expenses 2016") == pytest.approx(3 / 4)  # not 2016 for 2015
    assert overlap("most cost 2015") == pytest.approx(1 / 4)  # 2015 only
    assert overlap("an expense outside the vocabulary") == pytest.approx(1 / 4)  # exact matches still count

    def quad(x0, y0, x1, y1):
        return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float32)

    lines = [(quad(10, 100, 400, 120), "Advertising expenses were $714.3 million", 0.9),
             (quad(10, 300, 400, 320), "Technology and development", 0.9)]  # fmt: skip
    p = perception_from_lines(lines, (1000, 1000), part_px=512, image_size=(1000, 1000))

    class Enc:
        def encode(self, texts):
            return np.zeros((len(texts), 384), np.float32)

    _, x2 = featurize(p, question, Enc(), version=2)
    _, x3 = featurize(p, question, Enc(), version=3)
    assert x2.shape == x3.shape
    assert x2[0, -6] == 0.0  # exact matching sees nothing of the typed question in the answer's line
    assert x3[0, -6] == pytest.approx(2 / 4) and x3[1, -6] == 0.0
    assert np.array_equal(x2[:, :-6], x3[:, :-6])  # only the question-region overlaps change


def test_legibility_window_keeps_the_text_at_the_target_line_height_and_stays_in_the_page():
    from dataclasses import replace

    from zoomvlm.cropvlm.proposals import crop_box, legible_window

    config = ScorerConfig(window_line_px=16.0, window_side=384)
    line = Region(Box(0.40, 0.50, 0.60, 0.52), "Advertising expenses were $714.3 million", 0.9, "line", 1, (0,))
    size = (1500, 2000)  # a page: the line is 40 px high, so the window's side is 384 * 40 / 16 = 960 px
    w = legible_window(line, config, size)
    assert w.width * size[0] == pytest.approx(960, abs=1) and w.height * size[1] == pytest.approx(960, abs=1)
    assert w.coverage(crop_box(line, config)) == pytest.approx(1.0)  # it contains the region's own crop
    assert w.center == pytest.approx(line.box.center, abs=1e-6)
    corner = Region(Box(0.0, 0.97, 0.1, 0.99), "page 3", 0.9, "line", 1, (1,))
    wc = legible_window(corner, config, size)  # shifted inside the page, same size
    assert wc.x0 == 0.0 and wc.y1 == pytest.approx(1.0) and wc.height * size[1] == pytest.approx(960, abs=1)
    capped = legible_window(line, replace(config, window_max_area=0.1), size)
    assert capped.area == pytest.approx(0.1, rel=1e-3)
    assert legible_window(line, ScorerConfig(), size) == crop_box(line, ScorerConfig())  # off by default


def test_a_clipped_window_is_cut_at_the_page_edge_and_stays_centred_on_the_region():
    from dataclasses import replace

    from zoomvlm.cropvlm.proposals import crop_box, legible_window

    config = ScorerConfig(window_line_px=16.0, window_side=384, window_fit="clip")
    size = (1500, 2000)  # 40 px lines: a 960 px window
    top = Region(Box(0.30, 0.02, 0.70, 0.04), "CAFE ROMA SDN BHD", 0.9, "line", 1, (0,))
    w = legible_window(top, config, size)
    assert w.y0 == 0.0 and w.y1 * size[1] == pytest.approx(0.03 * size[1] + 480, abs=1)  # cut, not slid down
    assert w.coverage(crop_box(top, config)) == pytest.approx(1.0)
    shifted = legible_window(top, replace(config, window_fit="shift"), size)
    assert shifted.height * size[1] == pytest.approx(960, abs=1) and shifted.center[1] > w.center[1]
    # two names at the top: the clipped boxes' centres keep their order and their distance halves, no more
    lower = Region(Box(0.30, 0.06, 0.70, 0.08), "CAFE ROMA SDN BHD", 0.9, "line", 1, (1,))
    gap = legible_window(lower, config, size).center[1] - w.center[1]
    assert gap == pytest.approx(0.04 / 2, abs=1e-6)
    assert legible_window(lower, replace(config, window_fit="shift"), size).center == pytest.approx(
        shifted.center
    )  # shifting loses it
    middle = Region(Box(0.40, 0.50, 0.60, 0.52), "Total 12.00", 0.9, "line", 1, (2,))
    assert legible_window(middle, config, size) == legible_window(middle, replace(config, window_fit="shift"), size)
    with pytest.raises(ValueError, match="window_fit"):
        legible_window(middle, replace(config, window_fit="slide"), size)


def test_a_centred_window_is_cut_evenly_so_its_centre_is_the_regions_centre():
    from dataclasses import replace

    from zoomvlm.cropvlm.proposals import crop_box, legible_window

    config = ScorerConfig(window_line_px=16.0, window_side=384, window_fit="centre")
    size = (1500, 2000)  # 40 px lines: a 960 px window
    top = Region(Box(0.30, 0.02, 0.70, 0.04), "CAFE ROMA SDN BHD", 0.9, "line", 1, (0,))
    w = legible_window(top, config, size)
    assert w.center == pytest.approx(top.box.center, abs=1e-9)  # clipped at y = 0, so cut as much at the bottom
    assert w.y0 == 0.0 and w.y1 == pytest.approx(0.06)
    assert w.width * size[0] == pytest.approx(960, abs=1)  # the page is wide enough: no cut across
    assert w.coverage(crop_box(top, config)) == pytest.approx(1.0)  # never smaller than the region's crop
    clipped = legible_window(top, replace(config, window_fit="clip"), size)
    assert clipped.y1 > w.y1 and clipped.center[1] > w.center[1]
    right = Region(Box(0.90, 0.50, 0.98, 0.52), "12.00", 0.9, "line", 1, (1,))
    wr = legible_window(right, config, size)
    assert wr.center == pytest.approx(crop_box(right, config).center, abs=1e-9)  # the margin is cut at the edge
    assert wr.x1 == pytest.approx(1.0) and wr.width == pytest.approx(2 * (1.0 - wr.center[0]))
    middle = Region(Box(0.40, 0.50, 0.60, 0.52), "Total 12.00", 0.9, "line", 1, (2,))
    assert legible_window(middle, config, size) == legible_window(middle, replace(config, window_fit="clip"), size)


def test_windows_only_when_the_scorer_is_unsure_and_suppression_spreads_them():
    from dataclasses import replace

    from zoomvlm.cropvlm.proposals import legible_window, wants_windows

    config = ScorerConfig(k=2, window_line_px=16.0, window_below=0.5)
    assert wants_windows(np.array([9.0, 0.0, 0.0, 0.0]), config) is False  # sure: tight crops
    assert wants_windows(np.array([0.0] * 8), config) is True  # top-2 mass 0.25: unsure, widen
    assert wants_windows(np.array([0.0] * 8), replace(config, window_line_px=None)) is False
    assert wants_windows(np.array([9.0, 0.0]), replace(config, window_below=None)) is True
    # three neighbouring lines: their windows frame one place, so the second box goes elsewhere
    lines = [Region(Box(0.4, y, 0.6, y + 0.02), f"line {i}", 0.9, "line", 1, (i,))
             for i, y in enumerate((0.30, 0.33, 0.36, 0.80))]  # fmt: skip
    size = (1500, 2000)
    crops = [legible_window(r, config, size) for r in lines]
    logits = np.array([3.0, 2.0, 1.0, 0.0])
    assert select_boxes(lines, logits, config) == [0, 1]  # the lines themselves do not overlap
    assert select_boxes(lines, logits, config, crops=crops) == [0, 3]  # their windows do


def test_seed_command_line_writes_the_window_settings_into_the_scorer_config():
    import argparse

    from zoomvlm.cropvlm.proposal_train import _config, add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="cmd"))
    base = ["proposals", "seed", "--data", "d.jsonl", "--curation", "c", "--out", "o", "--features", "3"]
    args = parser.parse_args([*base, "--window-line-px", "17", "--window-below", "0.3", "--window-fit", "shift"])
    config = _config(args, k=3)
    assert (config.window_line_px, config.window_below, config.window_max_area, config.features) == (17.0, 0.3, 1.0, 3)
    assert config.window_fit == "shift"
    assert _config(parser.parse_args(base), k=3).window_fit == "centre"  # the command line default
    assert _config(parser.parse_args(base), k=3).window_tiles == 1  # off unless asked
    assert _config(parser.parse_args([*base, "--window-tiles", "3"]), k=3).window_tiles == 3
    assert _config(parser.parse_args(base), k=3).window_line_px is None  # off unless asked


def _quad(x0, y0, x1, y1):
    """A text line's quadrilateral as the PP-OCR detector returns it, in view pixels."""
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float32)


class _SawPerception:
    """A perceiver that saw ``perception`` (whatever the image) and shares nothing with a target."""

    def __init__(self, perception):
        self.perception = perception

    def perceive(self, image):
        return self.perception

    def bind(self, target):
        return False


class _ZeroEncoder:
    """A question encoder that maps every question to zeros: the scorer sees no question."""

    def encode(self, texts):
        return np.zeros((len(texts), 384), np.float32)


def test_propose_widens_into_windows_only_when_unsure():
    from dataclasses import replace

    from PIL import Image

    from zoomvlm.cropvlm.proposals import crop_box, legible_window
    from zoomvlm.policies.perception import perception_from_lines

    lines = [(_quad(100, 100 + 120 * i, 500, 130 + 120 * i), f"line {i}", 0.9) for i in range(8)]
    p = replace(perception_from_lines(lines, (1000, 1000), image_size=(1000, 1000)), image_size=(1000, 1000))

    config = ScorerConfig(k=2, window_line_px=48.0, window_below=0.5)  # 30 px lines: 240 px windows
    image = Image.new("RGB", (1000, 1000), "white")
    flat = RegionScorer(config).eval()
    with torch.no_grad():  # every candidate scores the same: the scorer is unsure
        for prm in flat.parameters():
            prm.zero_()
    cropper = ProposalCropper(model=flat, perceiver=_SawPerception(p), encoder=_ZeroEncoder())
    (unsure,) = cropper.propose([image], ["q?"])
    windows = {legible_window(r, config, (1000, 1000)) for r in p.regions}
    assert len(unsure.boxes) == 2 and set(unsure.boxes) <= windows
    assert all(b.height * 1000 == pytest.approx(240, abs=1) for b in unsure.boxes)
    logits = np.full(len(p.regions), -50.0)
    logits[0] = 50.0  # candidate 0 only: the scorer is sure
    cropper = ProposalCropper(model=flat, perceiver=_SawPerception(p), encoder=_ZeroEncoder())
    cropper.logits = lambda perception, question: logits
    (sure,) = cropper.propose([image], ["q?"])
    assert sure.boxes[0] == crop_box(p.regions[0], config)  # a tight crop, no window


def test_tight_crops_are_suppressed_on_the_padded_boxes_that_are_cut():
    """Without windows, two neighbouring lines whose PADDED crops frame one place give one box, not two."""
    from dataclasses import replace

    from PIL import Image

    from zoomvlm.cropvlm.proposals import crop_box
    from zoomvlm.policies.perception import perception_from_lines

    # three lines 10 px apart, then one far away; line_pad 0.5 grows each crop by half a line up and down
    lines = [(_quad(100, y, 500, y + 20), f"line {i}", 0.9) for i, y in enumerate((300, 330, 360, 800))]
    p = replace(perception_from_lines(lines, (1000, 1000), image_size=(1000, 1000)), image_size=(1000, 1000))
    config = ScorerConfig(k=2, line_pad=2.0)
    crops = [crop_box(r, config) for r in p.regions]
    first, second = (i for i, r in enumerate(p.regions) if r.kind == "line" and r.text in ("line 0", "line 1"))
    far = next(i for i, r in enumerate(p.regions) if r.text == "line 3")
    tight = p.regions[first].box.coverage(p.regions[second].box)
    assert crops[first].coverage(crops[second]) >= config.suppress > tight
    logits = np.full(len(p.regions), -np.inf)
    logits[[first, second, far]] = [3.0, 2.0, 1.0]
    cropper = ProposalCropper(model=RegionScorer(config).eval(), perceiver=_SawPerception(p), encoder=_ZeroEncoder())
    cropper.logits = lambda perception, question: logits
    (proposal,) = cropper.propose([Image.new("RGB", (1000, 1000), "white")], ["q?"])
    assert proposal.boxes == (crops[first], crops[far])


def test_a_window_wider_than_the_target_can_read_is_cut_into_legible_tiles_that_reach_the_target():
    from dataclasses import replace

    from PIL import Image

    from zoomvlm.cropvlm.proposals import legible_tiles, legible_window
    from zoomvlm.policies.perception import perception_from_lines

    size = (2000, 2000)
    config = ScorerConfig(k=1, window_line_px=16.0, window_side=384, window_fit="centre", window_tiles=4)
    # a table row of 1,800 px with 20 px text: legible up to 384 * 20 / 16 = 480 px wide, so 4 tiles of ~470 px
    row = Region(Box(0.04, 0.50, 0.94, 0.51), "Risk Management Plan N/A changed since last year", 0.9, "line", 1, (0,))
    window = legible_window(row, config, size)
    tiles = legible_tiles(row, config, size)
    assert len(tiles) == 4
    assert tiles[0].x0 == pytest.approx(window.x0) and tiles[-1].x1 == pytest.approx(window.x1)
    assert sum(t.area for t in tiles) == pytest.approx(window.area)  # more crops, not more area
    assert all(t.width * size[0] <= 1.05 * 480 for t in tiles) and all(t.y0 == window.y0 for t in tiles)
    assert len(legible_tiles(row, replace(config, window_tiles=2), size)) == 2  # capped
    assert legible_tiles(row, replace(config, window_tiles=1), size) == [window]  # off
    short = Region(Box(0.40, 0.30, 0.55, 0.31), "Total 12.00", 0.9, "line", 1, (1,))
    assert legible_tiles(short, config, size) == [legible_window(short, config, size)]  # readable whole

    p = perception_from_lines([(_quad(80, 1000, 1880, 1020), row.text, 0.9)], size, image_size=size)
    p = replace(p, image_size=size)
    cropper = ProposalCropper(model=RegionScorer(config).eval(), perceiver=_SawPerception(p), encoder=_ZeroEncoder())
    cropper.logits = lambda perception, question: np.where(
        [r.kind == "line" for r in perception.regions], 1.0, -np.inf
    )
    (proposal,) = cropper.propose([Image.new("RGB", size, "white")], ["Describe the changes of the plan?"])
    line = next(r for r in p.regions if r.kind == "line")
    assert proposal.boxes == tuple(legible_tiles(line, config, size)) and len(proposal.boxes) == 4
    cropper.config = replace(config, window_tiles=1)
    (whole,) = cropper.propose([Image.new("RGB", size, "white")], ["Describe the changes of the plan?"])
    assert whole.boxes == (legible_window(line, config, size),)


def test_grpo_step_keeps_reward_indices_aligned_when_a_question_has_no_candidates():
    items, rewards = toy_items(n=4)
    empty = Item(np.zeros(384, np.float32), np.zeros((0, F), np.float32))
    batch = [items[0], empty, items[1], items[2]]
    indices = [0, 7, 1, 2]  # 7: the empty question's own index in the caller's list
    seen = []

    def reward_fn(item_idx, actions):
        seen.extend(item_idx)
        return [float(rewards[i][a]) for i, a in zip(item_idx, actions, strict=True)]  # IndexError if misaligned

    torch.manual_seed(0)
    model, ref = RegionScorer(), RegionScorer()
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    grpo_step(model, ref, batch, reward_fn, indices, opt, GRPOConfig(group=3), np.random.default_rng(0))
    assert sorted(set(seen)) == [0, 1, 2]  # the empty question is skipped, the others keep their own indices
    with pytest.raises(ValueError, match="indices"):
        grpo_step(model, ref, batch, reward_fn, indices[:3], opt, GRPOConfig(group=3), np.random.default_rng(0))


def test_the_grpo_reward_reads_the_windows_inference_cuts_when_the_config_always_widens():
    from dataclasses import replace
    from types import SimpleNamespace

    from zoomvlm.core.geometry import format_percent_box
    from zoomvlm.cropvlm.proposal_grpo import make_target_reward
    from zoomvlm.cropvlm.proposals import crop_box, legible_window

    line = Region(Box(0.40, 0.50, 0.60, 0.52), "Total 12.00", 0.9, "line", 1, (0,))
    sample = SimpleNamespace(id="q1", image="page.png", question="total?", answers=("12.00",), width=1500,
                             height=2000)  # fmt: skip
    items = [SimpleNamespace(sample=sample, perception=SimpleNamespace(regions=[line]))]
    seen = []

    def reward(prompts, completions, image_path, question, answers):
        seen.extend(completions)
        return [1.0] * len(completions)

    windows = ScorerConfig(window_line_px=16.0, window_fit="clip", window_max_area=0.25)
    assert make_target_reward(items, reward, windows)([0], [0]) == [1.0]
    assert seen == [format_percent_box(legible_window(line, windows, (1500, 2000)))]
    assert seen[0] != format_percent_box(crop_box(line, windows))  # the window, not the tight crop
    gated = replace(windows, window_below=0.6)  # widens only when unsure: rewarded on the tight crop
    make_target_reward(items, reward, gated)([0], [0])
    assert seen[1] == format_percent_box(crop_box(line, gated))


def test_grpo_command_line_puts_windows_in_the_loop():
    import argparse

    from zoomvlm.cropvlm.proposal_train import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="cmd"))
    base = ["proposals", "grpo", "--data", "d.jsonl", "--curation", "c", "--out", "o", "--init", "s"]
    args = parser.parse_args([*base, "--window-line-px", "17", "--window-max-area", "0.25", "--k", "3"])
    assert (args.window_line_px, args.window_max_area, args.window_fit, args.k) == (17.0, 0.25, "centre", 3)
    assert args.window_tiles == 1 and parser.parse_args([*base, "--window-tiles", "2"]).window_tiles == 2
    assert parser.parse_args(base).window_line_px is None and parser.parse_args(base).k is None  # the seed's


def test_reward_mix_parses_names_and_weights_and_rejects_bad_specs():
    from zoomvlm.cropvlm.proposal_grpo import parse_reward_mix

    assert parse_reward_mix("accuracy") == {"accuracy": 1.0}
    assert parse_reward_mix("accuracy=1, answer_probability=0.5") == {"accuracy": 1.0, "answer_probability": 0.5}
    for bad, says in (("bleu", "unknown reward"), ("accuracy,accuracy", "twice"), ("accuracy=-1", "> 0"),
                      ("accuracy=nan", "> 0"), ("accuracy=x", "not a number"), ("", "empty")):  # fmt: skip
        with pytest.raises(ValueError, match=says):
            parse_reward_mix(bad)


def test_grpo_command_line_checks_the_reward_spec_when_parsed(capsys):
    import argparse

    from zoomvlm.cropvlm.proposal_train import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="cmd"))
    base = ["proposals", "grpo", "--data", "d.jsonl", "--curation", "c", "--out", "o", "--init", "s"]
    assert parser.parse_args([*base, "--reward", "accuracy=1,answer_probability=0.5"]).reward.startswith("accuracy")
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--reward", "accuracy=1,bleu=2"])
    assert "unknown reward 'bleu'" in capsys.readouterr().err


def test_a_probability_term_gives_advantage_where_accuracy_ties_and_moves_the_policy_to_the_answer():
    """Every crop reads the answer (accuracy 1 for all, as when the global view already answers): accuracy alone
    gives every group zero advantage and GRPO leaves the policy where it is; the weighted mix with the answer's
    probability (1 on the good candidate, 0.2 elsewhere) has advantage and raises the good candidate's mass."""
    from zoomvlm.cropvlm.proposal_grpo import weighted_reward

    items, good = toy_items()
    torch.manual_seed(0)
    seed = RegionScorer().eval()
    prob = [np.where(r > 0, 1.0, 0.2) for r in good]

    def accuracy(item_idx, actions):
        return [1.0] * len(actions)

    def answer_probability(item_idx, actions):
        return [float(prob[i][a]) for i, a in zip(item_idx, actions, strict=True)]

    def run(reward_fn):
        model = RegionScorer()
        model.load_state_dict(seed.state_dict())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)  # as train_grpo's
        stats = [grpo_step(model, seed, items, reward_fn, list(range(len(items))), opt, GRPOConfig(group=6),
                           np.random.default_rng(s)) for s in range(15)]  # fmt: skip
        return model, stats

    tied, stats = run(accuracy)
    assert all(s["advantage_abs"] == 0 for s in stats)
    # only the KL term's round-off moves it (Adam scales even a 1e-9 gradient up): the policy stays put
    assert abs(expected_reward(tied, items, good) - expected_reward(seed, items, good)) < 0.02
    mixed, stats = run(weighted_reward([(answer_probability, 0.5), (accuracy, 1.0)]))
    assert stats[0]["advantage_abs"] > 0
    assert 1.0 <= stats[0]["reward"] <= 1.5  # 1 + 0.5 * probability
    assert expected_reward(mixed, items, good) > expected_reward(seed, items, good) + 0.1


def test_a_gated_mix_ranks_only_the_crops_the_gate_rewards():
    from zoomvlm.cropvlm.proposal_grpo import weighted_reward
    from zoomvlm.cropvlm.proposal_train import add_parser, cmd_grpo

    acc = {0: [1.0, 0.0, 1.0], 1: [0.0, 0.0, 0.0]}
    prob = {0: [0.9, 0.8, 0.2], 1: [0.9, 0.1, 0.5]}

    def accuracy(item_idx, actions):
        return [acc[i][a] for i, a in zip(item_idx, actions, strict=True)]

    def answer_probability(item_idx, actions):
        return [prob[i][a] for i, a in zip(item_idx, actions, strict=True)]

    parts = [(answer_probability, 0.5), (accuracy, 1.0)]
    q, a = [0, 0, 0, 1, 1, 1], [0, 1, 2, 0, 1, 2]
    assert np.allclose(weighted_reward(parts)(q, a), [1.45, 0.4, 1.1, 0.45, 0.05, 0.25])
    # gated: question 1 (no crop right) keeps zero advantage; question 0's wrong crop gets nothing
    assert np.allclose(weighted_reward(parts, gate=accuracy)(q, a), [1.45, 0.0, 1.1, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="one of"):
        weighted_reward([(answer_probability, 1.0)], gate=accuracy)
    import argparse

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["proposals", "grpo", "--data", "d.jsonl", "--curation", "c", "--out", "o", "--init",
                              "s", "--reward", "answer_probability", "--gate-by-accuracy"])  # fmt: skip
    with pytest.raises(ValueError, match="needs accuracy"):  # refused before anything is loaded
        cmd_grpo(args)


def test_grpo_from_a_grpo_checkpoint_keeps_the_earlier_stage_in_the_recipe():
    from zoomvlm.cropvlm.proposal_train import _earlier_grpo

    first = {"stage": "grpo", "init": "seed", "reward": "accuracy", "grpo": {"steps": 48, "seed": 0}, "k": 3}
    second = {**first, "earlier_grpo": _earlier_grpo(first), "init": "run1/final", "grpo": {"steps": 24, "seed": 1}}
    assert second["earlier_grpo"] == [{"init": "seed", "reward": "accuracy", "grpo": {"steps": 48, "seed": 0}}]
    third = _earlier_grpo(second)
    assert [s["init"] for s in third] == ["seed", "run1/final"] and third[1]["grpo"]["steps"] == 24
