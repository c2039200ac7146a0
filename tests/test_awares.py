"""AwaRes: crop-set geometry and cost, views/RTR, rewards, crop-set policies, curation, crop-set GRPO."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from tests.fakes import EchoTarget
from zoomvlm.awares.protocol import (
    CROP_SET,
    ToolCallError,
    crop_set_area,
    crop_set_proposal,
    crop_set_sent_area,
    crops_for_box,
    high_res_crops,
    low_res_budget,
    low_res_view,
    parse_crop_action,
    trajectory_messages,
)
from zoomvlm.awares.rewards import AwaResReward, ToolCost, crop_set_format_reward
from zoomvlm.core.geometry import Box, Budget, same_scale_budget
from zoomvlm.core.pipeline import run_batch
from zoomvlm.policies import load_policy

HIGH = Budget(max_side=768)


# --- geometry ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "keys, area",
    [(["0"], 0.25), (["5"], 0.5), (["0", "1"], 0.5), (["0", "5"], 0.5), (["4"], 0.25), (["0", "4"], 0.4375),
     (["7", "8"], 1.0), (["all"], 1.0), ([], 0.0)],
)  # fmt: skip
def test_crop_set_area_is_the_union(keys, area):
    assert crop_set_area(keys) == pytest.approx(area)


def test_crop_set_area_rejects_unknown_keys():
    with pytest.raises(ToolCallError, match="unknown crop"):
        crop_set_area(["9"])


@pytest.mark.parametrize(
    "box, threshold, keys",
    [
        (Box(0.6, 0.6, 0.9, 0.9), 0.2, ["3"]),  # inside one quadrant
        (Box(0.55, 0.6, 0.95, 0.9), 0.2, ["3", "6", "8"]),  # IoU 0.48 with '3', 0.24 with the halves
        (Box(0.1, 0.2, 0.9, 0.23), 0.2, ["5"]),  # thin full-width line: no IoU passes -> smallest container
        (Box(0.4, 0.45, 0.6, 0.55), 0.2, ["4"]),  # around the centre: the center crop holds it
        (Box(0.3, 0.1, 0.7, 0.9), 0.9, ["4"]),  # in no crop: highest IoU
        (Box(0.0, 0.0, 1.0, 1.0), 0.2, ["all"]),
    ],
)
def test_crops_for_box(box, threshold, keys):
    assert crops_for_box(box, threshold) == keys


def test_crops_for_box_threshold_checked():
    with pytest.raises(ValueError, match="iou_threshold"):
        crops_for_box(Box(0.1, 0.1, 0.2, 0.2), 0.0)


# --- views and RTR ------------------------------------------------------------------------------
def test_low_view_is_a_quarter_and_crops_keep_the_high_scale():
    image = Image.new("RGB", (1000, 2000))
    assert low_res_view(image, HIGH).size == (192, 384)  # 768-px view (384x768) with sides halved
    sizes = [c.size for c in high_res_crops(image, ["0", "5", "all"], HIGH)]
    assert sizes == [(192, 384), (384, 384), (384, 768)]  # same 0.384 px per original pixel as the high view
    assert same_scale_budget(CROP_SET["0"], 1000, 2000, Budget()) == Budget()  # native stays native


def test_rtr_against_the_high_view_adds_up():
    """AwaRes sec. 4: no tool call = 0.25 of the high view; one quadrant adds 0.25 (pixels here)."""
    image = Image.new("RGB", (800, 1600))
    sample = replace(_sample(image), width=800, height=1600)

    class Policy:
        name = "fixed"

        def __init__(self, keys):
            self.keys = keys

        def propose(self, images, questions, evidence=None):
            return [crop_set_proposal(im, self.keys, HIGH) for im in images]

    target = EchoTarget(budget=HIGH)
    rtr = {}
    for keys in ([], ["3"], ["0", "1"], ["all"]):
        (rec,) = run_batch([sample], Policy(keys), target, images=[image], rtr_reference=HIGH)
        rtr[tuple(keys)] = rec.rtr
    assert rtr[()] == pytest.approx(0.25, abs=0.01)
    assert rtr[("3",)] == pytest.approx(0.50, abs=0.01)
    assert rtr[("0", "1")] == pytest.approx(0.75, abs=0.01)
    assert rtr[("all",)] == pytest.approx(1.25, abs=0.01)
    (native,) = run_batch([sample], Policy(["3"]), target, images=[image])  # default: against native
    assert native.rtr == pytest.approx(0.5 * (384 * 768) / (800 * 1600), rel=0.02)


def _sample(image):
    from zoomvlm.data.samples import Sample

    return Sample("s", "x.png", "What is the total?", ("12.50",), image.width, image.height)


def test_trajectory_messages_layout():
    direct = trajectory_messages("Q?", "A", [])
    assert [m["role"] for m in direct] == ["system", "user", "assistant"]
    tool = trajectory_messages("Q?", "A", ["0", "5"])
    assert [m["role"] for m in tool] == ["system", "user", "assistant", "user", "assistant"]
    assert tool[2]["content"][0]["text"] == "GET_CROPS: ['0', '5']"
    assert sum(c["type"] == "image" for c in tool[3]["content"]) == 2  # the crops come back as a user turn


# --- rewards --------------------------------------------------------------------------------------
def test_tool_cost_is_asymmetric():
    cost = ToolCost(alpha_miss=0.5, alpha_use=0.1, lam=0.4)
    assert cost([], needs_hr=True) == 0.5  # missed a needed crop
    assert cost([], needs_hr=False) == 0.0
    assert cost(["3"], needs_hr=True) == pytest.approx(0.1 + 0.4 * 0.25)
    assert cost(["0", "5"], needs_hr=False) == pytest.approx(0.1 + 0.4 * 0.75)  # both crops are sent whole


@pytest.mark.parametrize("keys", [["3"], ["0", "5"], ["4", "all"], ["h4", "s3l", "s4l"], ["h4r", "s3l", "s4l"]])
def test_the_tool_cost_charges_the_pixels_the_target_is_sent(keys):
    """0.25 (the low view) + the area C_tool charges == the RTR of the views the pipeline builds, overlaps too."""
    from PIL import Image

    from zoomvlm.awares.protocol import crop_set_proposal
    from zoomvlm.core.pipeline import build_request

    image, high = Image.new("RGB", (1024, 1536), "white"), Budget.parse("side:768")
    views = build_request(image, "q", crop_set_proposal(image, keys, high)).views(high)
    w, h = high.fit(*image.size)
    rtr = sum(v.width * v.height for v in views) / (w * h)
    charged = (ToolCost(lam=1.0)(keys, needs_hr=True) - 0.1) / 1.0
    assert 0.25 + charged == pytest.approx(rtr, abs=0.01)
    assert charged == pytest.approx(crop_set_sent_area(keys)) and crop_set_sent_area(keys) >= crop_set_area(keys)


def test_covering_crops_picks_the_request_that_sends_least_among_equal_covers():
    from zoomvlm.awares.protocol import covering_crops

    box = Box(0.169, 0.494, 0.521, 0.636)  # two overlapping fine bands cover it as well as a band and a half band
    keys = covering_crops(box, "fine")
    assert crop_set_sent_area(keys) == pytest.approx(crop_set_area(keys))  # nothing sent twice
    assert crop_set_sent_area(keys) <= crop_set_sent_area(["h4r", "s3l", "s4l"])
    with pytest.raises(ValueError, match="alpha_miss > alpha_use"):
        ToolCost(alpha_miss=0.1, alpha_use=0.2)


@pytest.mark.parametrize(
    "text, keys, ok",
    [("NO_CROPS", [], True), ("no_crops.", [], True), ("GET_CROPS: ['3']", ["3"], True),
     ("GET_CROPS: [top-left, '5']", ["0", "5"], True), ("GET_CROPS: []", None, False),
     ("GET_CROPS: ['banana']", None, False), ("[10, 20, 30, 40].", None, False), ("", None, False)],
)  # fmt: skip
def test_parse_crop_action(text, keys, ok):
    got, error = parse_crop_action(text)
    assert got == keys and (error is None) == ok
    assert crop_set_format_reward(completions=[text]) == [1.0 if ok else 0.0]


@pytest.mark.parametrize(
    "text, result",
    [("The budget crops line reads $5", (None, None)), ("Target crops: wheat", (None, None)),
     ("GET_CROPS: ['3',,'4']", None), ("GET_CROPS: ['3', '4',]", (["3", "4"], None)),
     ("get crops ['3']", (["3"], None))],
)  # fmt: skip
def test_the_tool_call_parser_reads_whole_words_and_refuses_an_empty_entry(text, result):
    from zoomvlm.awares.protocol import parse_tool_call

    got = parse_tool_call(text)
    if result is None:
        assert got[0] is None and "empty entry" in got[1]
    else:
        assert got == result


def test_crop_set_reward_answers_from_the_requested_views(demo_samples):
    """R = contains(answer) - C_tool; identical actions answered once; invalid = low view only."""
    s = demo_samples[0]

    class ViewAwareTarget(EchoTarget):
        """Reads the answer only when it gets a crop (more than one view)."""

        def generate(self, requests):
            gens = super().generate(requests)
            return [
                replace(g, text=s.answers[0] if len(r.images) > 1 else "?")
                for g, r in zip(gens, requests, strict=True)
            ]

    target = ViewAwareTarget(budget=HIGH)
    reward = AwaResReward("contains", ToolCost(0.5, 0.1, 0.4), target=target, high=HIGH)
    completions = ["GET_CROPS: ['3']", "GET_CROPS: ['3']", "NO_CROPS", "garbage"]
    n = len(completions)
    got = reward(completions=completions, image_path=[str(s.image)] * n, question=[s.question] * n,
                 answers=[list(s.answers)] * n, label=["HR"] * n)  # fmt: skip
    assert got == pytest.approx([1 - 0.2, 1 - 0.2, 0 - 0.5, 0 - 0.5])
    assert target.calls == 2  # one request for ['3'], one for the low view (NO_CROPS and garbage share it)
    assert all(len(r.images) in (1, 2) for r in target.requests)


# --- policies ----------------------------------------------------------------------------------
def test_fixed_and_oracle_crop_set_policies(demo_samples):
    s = demo_samples[0]
    image = s.load_image()
    (p,) = load_policy("crop-set-fixed:all@side:512").propose([image], [s.question])
    assert p.boxes == (Box.full(),) and p.global_budget == Budget(max_side=max(Budget(512).fit(*image.size)) // 2)
    oracle = load_policy("crop-set-oracle:0.2")
    (p,) = oracle.propose([image], [s.question], evidence=[s.evidence_boxes])
    expected = crops_for_box(s.evidence_boxes[0], 0.2)
    assert p.boxes == tuple(CROP_SET[k] for k in expected)
    with pytest.raises(ValueError, match="evidence"):
        oracle.propose([image], [s.question])
    with pytest.raises(ValueError, match="bad policy"):
        load_policy("crop-set-fixed:9")


def test_learned_crop_set_policy_counts_invalid_actions(tmp_path, demo_samples, monkeypatch):
    """Invalid actions are counted and answered from the low view, never the full image; valid ones are kept."""
    from tiny_models import build_tiny_smolvlm, save_tiny

    import zoomvlm.targets.hf as hf
    from zoomvlm.awares.policies import CropSetPolicy

    model, processor = build_tiny_smolvlm(tile_size=64, longest_edge=64, image_splitting=False)
    path = save_tiny(model, processor, tmp_path / "policy")
    (tmp_path / "policy" / "zoomvlm_recipe.json").write_text(json.dumps({"data": {"high": "side:512"}}))
    policy = CropSetPolicy(path, max_new_tokens=6)
    assert policy.high == Budget(max_side=512)  # read back from the training recipe
    images = [s.load_image() for s in demo_samples[:3]]
    questions = [s.question for s in demo_samples[:3]]

    # The random model's own text goes through the real generation path...
    proposals = policy.propose(images[:2], questions[:2])
    assert policy.n_total == 2 and policy.n_invalid == sum(p.error is not None for p in proposals)
    for p in proposals:
        assert p.global_budget.max_side <= 256  # the low view of side:512

    # ...and scripted actions pin the counting: garbage (counted, low view only), a crop, no crop.
    scripted = ["I think the total is 9", "GET_CROPS: ['3']", "NO_CROPS"]
    monkeypatch.setattr(hf, "generate_texts", lambda *a, **k: (scripted, {}, [5, 5, 5]))
    before = policy.n_invalid
    proposals = policy.propose(images, questions)
    assert policy.n_total == 5 and policy.n_invalid == before + 1
    assert proposals[0].error is not None and proposals[0].boxes == ()
    assert proposals[1].error is None and proposals[1].boxes == (CROP_SET["3"],)
    assert proposals[2].error is None and proposals[2].boxes == ()


# --- curation -----------------------------------------------------------------------------------
def test_curate_awares_on_three_receipts(demo_samples, tmp_path):
    from zoomvlm.awares.curation import MetricJudge, curate_awares
    from zoomvlm.cropvlm.curation import OCRGrounder
    from zoomvlm.targets.ocr import OCRTarget

    samples = demo_samples[:3]
    target = OCRTarget(768)
    info = curate_awares(samples, target, HIGH, MetricJudge("contains"), OCRGrounder(), tmp_path / "a",
                         progress=False)  # fmt: skip
    assert info["n"] == 3 and info["n_lr"] + info["n_hr"] == 3
    rows = [json.loads(line) for line in (tmp_path / "a" / "raw.jsonl").read_text().splitlines()]
    for r in rows:  # the judge rule: LR iff low correct or low >= high
        assert r["label"] == ("LR" if r["low_score"] >= 0.5 or r["low_score"] >= r["high_score"] else "HR")
        assert bool(r["crops"]) == (r["label"] == "HR")
        assert all(k in CROP_SET for k in r["crops"])
    # the reader at the low view misses the small company name and total of sroie_017 that the high view reads
    # (a swap of the two views' texts labels all three LR: the rule above still holds for the swapped scores)
    assert [(r["id"], r["label"]) for r in rows] == [
        ("sroie_017_company", "HR"), ("sroie_017_date", "LR"), ("sroie_017_total", "HR")
    ]  # fmt: skip
    assert all(r["high_score"] == 1.0 for r in rows)
    actions = [json.loads(line) for line in (tmp_path / "a" / "actions.jsonl").read_text().splitlines()]
    for a, r in zip(actions, rows, strict=True):
        text = a["completion"][0]["content"][0]["text"]
        assert parse_crop_action(text) == (r["crops"], None)
    trajectories = (tmp_path / "a" / "trajectories.jsonl").read_text()
    assert "evidence" not in trajectories and "evidence" not in (tmp_path / "a" / "raw.jsonl").read_text()

    # no human box reaches curation: moving the evidence boxes changes nothing
    moved = [replace(s, evidence_boxes=(Box(0.0, 0.0, 0.1, 0.1),)) for s in samples]
    curate_awares(moved, target, HIGH, MetricJudge("contains"), OCRGrounder(), tmp_path / "b", progress=False)
    for name in ("raw.jsonl", "trajectories.jsonl", "actions.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()

    # a resume with another crop threshold would mix two labelings in one curation: refused before any target call
    with pytest.raises(ValueError, match="iou_threshold: 0.2 -> 0.01"):
        curate_awares(demo_samples[:4], target, HIGH, MetricJudge("contains"), OCRGrounder(), tmp_path / "a",
                      iou_threshold=0.01, progress=False)  # fmt: skip


# --- crop-set GRPO --------------------------------------------------------------------------------
def test_crop_set_grpo_two_steps_change_the_policy(tmp_path, demo_samples, tiny_smolvlm_init):
    import torch

    from zoomvlm.train.grpo import build_grpo_trainer
    from zoomvlm.train.recipe import load_recipe

    data = tmp_path / "traj.jsonl"
    with data.open("w") as f:
        for s in demo_samples[:4]:
            f.write(json.dumps({"id": s.id, "image": str(s.image), "question": s.question, "answers": list(s.answers),
                                "label": "HR", "width": s.width, "height": s.height}) + "\n")  # fmt: skip
    recipe = load_recipe("tiny_cpu_crop_set_grpo", [
        f"model.init={tiny_smolvlm_init}",
        f"data.file={data}", "data.high=side:128", "trainer.max_steps=2", "trainer.per_device_train_batch_size=4",
        "trainer.num_generations=2", "trainer.max_completion_length=6", 'trainer.save_strategy="no"',
        "trainer.learning_rate=1e-2"])  # fmt: skip

    def length_reward(prompts=None, completions=(), **_):
        return [float(len(str(c))) for c in completions]

    target = EchoTarget(budget=Budget(max_side=128))
    reward = AwaResReward("contains", recipe.awares.cost, target=target, high=recipe.data.high)
    trainer, _ = build_grpo_trainer(recipe, tmp_path / "grpo", reward_funcs=[crop_set_format_reward, reward,
                                    length_reward], reward_weights=[1.0, 1.0, 0.1])  # fmt: skip
    assert trainer.train_dataset[0]["image"].size[1] <= 64  # the low view of side:128
    assert "NO_CROPS" in trainer.train_dataset[0]["prompt"][0]["content"]
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 2
    assert sum(not torch.equal(before[k], v.detach()) for k, v in trainer.model.named_parameters()) > 10
    assert target.calls >= 1  # the AwaRes reward asked the target
    from zoomvlm.train.common import save_final

    final = save_final(trainer, trainer.processing_class, tmp_path / "grpo", recipe)
    saved = json.loads((final / "zoomvlm_recipe.json").read_text())
    assert saved["awares"]["lam"] == recipe.awares.lam and saved["data"]["high"] == "side:128"


def test_shipped_crop_set_policy_answers_with_the_ocr_target(tmp_path, demo_samples):
    """`--policy crop-set` loads the policy shipped in the package: valid actions, RTR against its 768 px view."""
    from zoomvlm.cli.main import main
    from zoomvlm.policies import default_crop_set_path

    policy = load_policy("crop-set")
    assert policy.name == "crop-set" and policy.high == HIGH  # read from the bundled zoomvlm_recipe.json
    recipe = json.loads((Path(default_crop_set_path()) / "zoomvlm_recipe.json").read_text())
    assert recipe["kind"] == "grpo" and recipe["data"]["policy"] == "crop_set"
    images = [s.load_image() for s in demo_samples]
    proposals = policy.propose(images, [s.question for s in demo_samples])
    assert policy.n_invalid == 0 and all(p.error is None for p in proposals)  # a trained policy: parseable actions
    for p, img in zip(proposals, images, strict=True):
        assert set(p.boxes) <= set(CROP_SET.values())
        assert p.global_budget == low_res_budget(img, HIGH)

    s = demo_samples[0]
    out = tmp_path / "ask.json"
    with open(out, "w") as f, contextlib.redirect_stdout(f):
        assert main(["ask", str(s.image), s.question, "--policy", "crop-set", "--json"]) == 0
    record = json.loads(out.read_text())
    keys = [k for k, b in CROP_SET.items() if [b.x0, b.y0, b.x1, b.y1] in record["boxes"]]
    assert record["rtr"] == pytest.approx(0.25 + crop_set_sent_area(keys), abs=0.02)  # low view + crops, vs 768 px


@pytest.mark.parametrize("spec", ["crop-set-oracle:2", "crop-set-oracle:0", "crop-set-oracle:-1"])
def test_a_crop_set_oracle_threshold_outside_0_1_is_refused_when_the_policy_loads(spec):
    with pytest.raises(ValueError, match="threshold must be in"):
        load_policy(spec)


@pytest.mark.parametrize(
    "verdict, scores, unreadable",
    [('{"A": false, "B": true}', (0.0, 1.0), 0), ('{"A": "false", "B": "true"}', (0.0, 1.0), 0),
     ('{"A": "no", "B": true}', None, 1), ("I think A is wrong", None, 1)],
)  # fmt: skip
def test_the_llm_judge_reads_quoted_booleans_as_they_say(verdict, scores, unreadable):
    from zoomvlm.awares.curation import LLMJudge, MetricJudge

    class Scripted:  # the endpoint's reply, without an endpoint
        def chat(self, prompts, max_tokens=32):
            return [verdict]

    judge = LLMJudge.__new__(LLMJudge)
    judge.client, judge.fallback, judge.n_unreadable, judge.name = Scripted(), MetricJudge("contains"), 0, "llm:x"
    out = judge.judge(["q?"], [["12"]], ["low says 7"], ["high says 12"])
    assert judge.n_unreadable == unreadable
    assert out == [scores if scores is not None else (0.0, 1.0)]  # the fallback: contains on each answer


def test_crop_set_edge_cases_a_review_found():
    """A degenerate box maps to the crop holding it (it mapped to the top-left crop wherever it lay); a repeated
    fixed key is one crop (it was sent, and counted in RTR, twice); the prompt's own 'whole image' parses."""
    from PIL import Image

    from zoomvlm.awares.protocol import covering_crops, crops_for_box, parse_get_crops
    from zoomvlm.core.geometry import Box
    from zoomvlm.policies import load_policy

    point = Box(0.9, 0.9, 0.9, 0.95)
    assert crops_for_box(point, 0.2) == covering_crops(point) == ["3"]
    (proposal,) = load_policy("crop-set-fixed:3,3").propose([Image.new("RGB", (100, 100))], ["q"])
    assert len(proposal.boxes) == 1
    assert parse_get_crops("GET_CROPS: ['whole image']") == ["all"]


def test_a_bad_iou_threshold_is_refused_before_curation_writes_anything(tmp_path, capsys):
    from zoomvlm.awares.curation import curate_awares
    from zoomvlm.cli.main import main

    with pytest.raises(ValueError, match=r"iou_threshold must be in \(0, 1\], got 1.5"):
        curate_awares([], None, "side:768", None, None, tmp_path / "out", iou_threshold=1.5)
    assert not (tmp_path / "out").exists()
    for flag, value in (("--iou-threshold", "1.5"), ("--limit", "0"), ("--limit", "-1")):
        with pytest.raises(SystemExit):
            main(["curate", "awares", "--data", "d.jsonl", "--out", str(tmp_path / "o"), flag, value])
        assert "expected" in capsys.readouterr().err


def test_judge_specs_are_checked_with_a_clear_error():
    from zoomvlm.awares.curation import load_judge

    assert load_judge("metric").metric == "contains" and load_judge("metric:anls").metric == "anls"
    for bad, says in (("metric:bogus", "unknown metric 'bogus'"), ("gpt", "unknown judge"), ("llm:", "unknown judge")):
        with pytest.raises(ValueError, match=says):  # ValueError: the CLI prints it as one line
            load_judge(bad)
