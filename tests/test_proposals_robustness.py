"""The ``proposals`` cropper and its GRPO loop under bad input, crashes and resumes: clear errors, nothing lost."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from test_proposals import _quad, _SawPerception, _ZeroEncoder, toy_items

from zoomvlm.core.geometry import Box
from zoomvlm.cropvlm.proposal_grpo import GRPOConfig, export_checkpoint, train_grpo
from zoomvlm.cropvlm.proposals import (
    ProposalCropper,
    RegionScorer,
    ScorerConfig,
    load_scorer,
    save_scorer,
    select_boxes,
    train_seed,
)
from zoomvlm.policies.base import Proposal
from zoomvlm.policies.perception import Perception, QuestionEncoder, Region


def _reward_of(rewards):
    def fn(item_idx, actions):
        return [float(rewards[i][a]) for i, a in zip(item_idx, actions, strict=True)]

    return fn


def _lines(n=4):
    return [Region(Box(0.1, 0.1 * i, 0.9, 0.1 * i + 0.05), f"l{i}", 0.9, "line", 1, (i,)) for i in range(1, n + 1)]


# -- k and the scorer config ------------------------------------------------------------------------------------


def test_select_boxes_with_no_places_left_chooses_nothing():
    assert select_boxes(_lines(), np.arange(4.0), ScorerConfig(k=2), k=0) == []
    assert select_boxes(_lines(), np.arange(4.0), ScorerConfig(k=2), k=-1) == []
    assert select_boxes(_lines(), np.arange(4.0), ScorerConfig(k=2)) == [3, 2]


@pytest.mark.parametrize(
    "bad",
    [
        {"k": 0},
        {"k": 1.5},
        {"window_fit": "middle"},
        {"window_tiles": 0},
        {"suppress": 0.0},
        {"features": 7},
        {"window_max_area": 0.0},
        {"window_line_px": -3.0},
        {"part_px": 8},
        {"margin_x": -0.2},
        {"line_pad": float("nan")},
        {"legible": 1.5},
        {"window_below": float("nan")},
        {"max_recognise": -1},
        {"window_side": 0},
        {"view_budget": "huge"},
        {"detect_budget": "-5"},
    ],  # fmt: skip
)
def test_scorer_config_refuses_settings_the_policy_cannot_honour(bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        ScorerConfig(**bad)


class _OneBoxPrior:
    def propose(self, images, questions, evidence=None):
        return [Proposal((Box(0.0, 0.0, 0.5, 0.5),)) for _ in images]


def test_proposals_plus_prior_with_one_box_emits_the_priors_box_only():
    from zoomvlm.policies.perception import perception_from_lines

    lines = [(_quad(100, 100 + 120 * i, 500, 130 + 120 * i), f"line {i}", 0.9) for i in range(6)]
    p = replace(perception_from_lines(lines, (1000, 1000), image_size=(1000, 1000)), image_size=(1000, 1000))
    model = RegionScorer(ScorerConfig(k=1)).eval()
    cropper = ProposalCropper(model=model, perceiver=_SawPerception(p), encoder=_ZeroEncoder(), prior=_OneBoxPrior())
    (proposal,) = cropper.propose([Image.new("RGB", (1000, 1000), "white")], ["q?"])
    assert proposal.boxes == (Box(0.0, 0.0, 0.5, 0.5),)
    cropper = ProposalCropper(model=model, perceiver=_SawPerception(p), encoder=_ZeroEncoder(), prior=_OneBoxPrior(),
                              k=3)  # fmt: skip
    (proposal,) = cropper.propose([Image.new("RGB", (1000, 1000), "white")], ["q?"])
    assert len(proposal.boxes) == 3 and proposal.boxes[0] == Box(0.0, 0.0, 0.5, 0.5)


# -- broken checkpoint folders --------------------------------------------------------------------------------------


@pytest.fixture
def scorer_dir(tmp_path):
    torch.manual_seed(0)
    return save_scorer(RegionScorer(ScorerConfig(k=2)), tmp_path / "ck")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.write_text('{"k": 2, "hidden"'), "not valid JSON"),
        (lambda c: c.write_text(json.dumps({**json.loads(c.read_text()), "window_gate": 1})), "unknown settings"),
        (lambda c: c.write_text(json.dumps({**json.loads(c.read_text()), "k": 0})), "k must be"),
        (lambda c: c.write_text(json.dumps({**json.loads(c.read_text()), "window_fit": "middle"})), "window_fit"),
        (lambda c: c.write_text(json.dumps({**json.loads(c.read_text()), "hidden": 16})), "weights do not match"),
        (lambda c: c.write_text("[1, 2]"), "JSON object"),
    ],
)
def test_a_broken_checkpoint_is_refused_with_a_message_naming_its_file(scorer_dir, edit, message):
    edit(scorer_dir / "config.json")
    with pytest.raises(ValueError, match=message) as err:
        load_scorer(scorer_dir)
    assert str(scorer_dir) in str(err.value)


def test_truncated_weights_are_refused_with_a_message_naming_the_file(scorer_dir):
    (scorer_dir / "scorer.pt").write_bytes((scorer_dir / "scorer.pt").read_bytes()[:100])
    with pytest.raises(ValueError, match="scorer.pt"):
        load_scorer(scorer_dir)


# -- nothing to train on -------------------------------------------------------------------------------------------


def test_seed_training_without_any_candidate_refuses_instead_of_saving_a_random_scorer():
    empty = np.zeros((0, RegionScorer().region[0].in_features), np.float32)
    with pytest.raises(ValueError, match="no seed label"):
        train_seed([(np.zeros(384, np.float32), empty, np.zeros(0, np.float32))], epochs=1)
    with pytest.raises(ValueError, match="no seed label"):
        train_seed([], epochs=1)


def test_grpo_without_any_candidate_refuses_before_writing_a_run(tmp_path):
    items, _ = toy_items(4)
    items = [replace(it, x=it.x[:0]) for it in items]
    with pytest.raises(ValueError, match="no text line"):
        train_grpo(RegionScorer(), items, lambda i, a: [0.0] * len(a), GRPOConfig(steps=2), tmp_path / "g",
                   progress=False)  # fmt: skip
    assert not (tmp_path / "g" / "final").exists()


@pytest.mark.parametrize(
    "bad", [{"save_every": 0}, {"temperature": 0.0}, {"lr": 0.0}, {"beta": -0.1}, {"max_grad_norm": 0.0}]
)
def test_grpo_config_refuses_bad_settings_before_any_step(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        GRPOConfig(**bad)


# -- crash, resume, export -----------------------------------------------------------------------------------------


class _Crash(RuntimeError):
    pass


def test_a_crashed_grpo_run_resumes_to_the_uninterrupted_result_and_logs_each_step_once(tmp_path):
    items, rewards = toy_items(12)
    torch.manual_seed(0)
    seed = RegionScorer().eval()
    cfg = GRPOConfig(steps=10, prompts_per_step=4, group=4, lr=1e-2, save_every=5)
    straight = train_grpo(seed, items, _reward_of(rewards), cfg, tmp_path / "a", progress=False)

    calls = {"n": 0}

    def crashing(item_idx, actions):
        calls["n"] += 1
        if calls["n"] == 8:  # during step 8: steps 6 and 7 were logged after the step-5 checkpoint
            raise _Crash
        return _reward_of(rewards)(item_idx, actions)

    with pytest.raises(_Crash):
        train_grpo(seed, items, crashing, cfg, tmp_path / "b", progress=False)
    resumed = train_grpo(seed, items, _reward_of(rewards), cfg, tmp_path / "b", progress=False)
    for a, b in zip(resumed.state_dict().values(), straight.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))
    # extending a finished run by more steps is allowed (steps are not a setting the resume checks)
    train_grpo(seed, items, _reward_of(rewards), replace(cfg, steps=12), tmp_path / "b", progress=False)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


def test_resuming_grpo_with_other_settings_is_refused_and_the_recipe_kept(tmp_path):
    items, rewards = toy_items(8)
    seed = RegionScorer().eval()
    cfg = GRPOConfig(steps=2, prompts_per_step=4, group=4, lr=1e-2, save_every=1)
    recipe = {"target": "ocr", "budget": "384", "reward": "accuracy"}
    train_grpo(seed, items, _reward_of(rewards), cfg, tmp_path / "g", recipe=recipe, progress=False)
    before = (tmp_path / "g" / "recipe.json").read_text()
    with pytest.raises(ValueError, match=r"grpo\.lr: 0\.01 -> 5\.0"):
        train_grpo(seed, items, _reward_of(rewards), replace(cfg, steps=4, lr=5.0), tmp_path / "g", recipe=recipe,
                   progress=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"recipe\.budget: '384' -> '768'"):
        train_grpo(seed, items, _reward_of(rewards), replace(cfg, steps=4), tmp_path / "g",
                   recipe={**recipe, "budget": "768"}, progress=False)  # fmt: skip
    staged = {**recipe, "seed_data": ["seed.jsonl"], "seed_curation": None}  # as train proposals grpo writes it
    train_grpo(seed, items, _reward_of(rewards), cfg, tmp_path / "g2", recipe={**staged, "data": ["a.jsonl"]},
               progress=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"recipe\.data: \['a.jsonl'\] -> \['b.jsonl'\]"):
        train_grpo(seed, items, _reward_of(rewards), replace(cfg, steps=4), tmp_path / "g2",
                   recipe={**staged, "data": ["b.jsonl"]}, progress=False)  # fmt: skip
    # a checkpoint from before seed_* were kept recorded the SEED's data as "data": the same command resumes
    old = tmp_path / "g3"
    train_grpo(seed, items, _reward_of(rewards), cfg, old, recipe={**recipe, "data": ["seed.jsonl"]}, progress=False)
    train_grpo(seed, items, _reward_of(rewards), replace(cfg, steps=3), old,
               recipe={**staged, "data": ["a.jsonl"]}, progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="is at step 2, past --steps 1"):  # final/ would say 1 step, hold 2
        train_grpo(seed, items, _reward_of(rewards), replace(cfg, steps=1), tmp_path / "g", recipe=recipe,
                   progress=False)  # fmt: skip
    assert (tmp_path / "g" / "recipe.json").read_text() == before


def test_export_keeps_the_runs_own_k_and_windows_not_the_seeds(tmp_path):
    items, rewards = toy_items(8)
    seed_dir = save_scorer(RegionScorer(ScorerConfig(k=2)), tmp_path / "seed")
    model = load_scorer(seed_dir)
    model.config = replace(model.config, k=3, window_line_px=17.0, window_fit="centre")
    cfg = GRPOConfig(steps=2, prompts_per_step=4, group=4, save_every=1)
    train_grpo(model, items, _reward_of(rewards), cfg, tmp_path / "g", recipe={"init": str(seed_dir)},
               progress=False)  # fmt: skip
    shutil.rmtree(tmp_path / "g" / "final")  # as while the run is still going: only checkpoint.pt to go by
    exported = load_scorer(export_checkpoint(tmp_path / "g"))
    assert (exported.config.k, exported.config.window_line_px) == (3, 17.0)
    with pytest.raises(FileNotFoundError, match="checkpoint.pt"):
        export_checkpoint(tmp_path / "seed")


# -- question embeddings ----------------------------------------------------------------------------------------


class _ConstantModel:
    def encode(self, texts, **kw):
        return np.ones((len(texts), QuestionEncoder.dim), np.float32) / np.sqrt(QuestionEncoder.dim)


def test_encoding_more_distinct_questions_than_the_memo_holds_returns_every_embedding():
    enc = QuestionEncoder(cache_size=4)
    enc._model = _ConstantModel()
    texts = [f"question {i}?" for i in range(10)] + ["", "question 3?"]
    emb = enc.encode(texts)
    assert emb.shape == (12, QuestionEncoder.dim)
    assert (np.abs(emb[:10]).sum(1) > 0).all() and (emb[10] == 0).all() and (emb[11] == emb[3]).all()
    assert len(enc._cache) == 4


# -- training data --------------------------------------------------------------------------------------------------


def test_training_data_errors_name_the_users_file_and_line_and_bad_human_boxes_are_not_read(tmp_path):
    from zoomvlm.cropvlm.proposal_data import load_training_samples
    from zoomvlm.data import DatasetError

    Image.new("RGB", (40, 30), "white").save(tmp_path / "a.png")
    row = {"id": "a", "image": "a.png", "question": "q?", "answers": ["x"], "width": 40, "height": 30}
    good = tmp_path / "train.jsonl"
    good.write_text(json.dumps({**row, "evidence_boxes": [[5, -9, 1, 2]]}) + "\n")  # a malformed human box
    (sample,) = load_training_samples(good)
    assert sample.evidence_boxes == () and sample.image.is_absolute()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(row) + "\n" + json.dumps({k: v for k, v in row.items() if k != "question"}) + "\n")
    with pytest.raises(DatasetError, match=f"{bad}:2: missing field 'question'"):
        load_training_samples(bad)
    bad.write_text(json.dumps(row) + "\n{not json\n")
    with pytest.raises(DatasetError, match=f"{bad}:2: not valid JSON"):
        load_training_samples(bad)


def test_train_proposals_refuses_k_zero_when_the_command_line_is_parsed(capsys):
    from zoomvlm.cli.main import build_parser

    parser = build_parser()
    for argv in (["train", "proposals", "seed", "--data", "d", "--curation", "c", "--out", "o", "--k", "0"],
                 ["train", "proposals", "grpo", "--data", "d", "--curation", "c", "--out", "o", "--init", "i",
                  "--save-every", "0"],
                 ["train", "proposals", "grpo", "--data", "d", "--curation", "c", "--out", "o", "--init", "i",
                  "--temperature", "nan"]):  # fmt: skip
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        assert "expected" in capsys.readouterr().err
    # the GRPO settings of both reader-perception trainers, refused before any perception pass or write
    grpo = ["train", "proposals", "grpo", "--data", "d", "--curation", "c", "--out", "o", "--init", "i"]
    reader = ["train", "crop-set-reader", "--data", "d", "--out", "o"]
    for argv, says in (([*grpo, "--group", "1"], "a GRPO group of >= 2"), ([*grpo, "--beta", "-1"], ">= 0"),
                       ([*grpo, "--steps", "0"], ">= 1"), ([*reader, "--group", "1"], "a GRPO group of >= 2"),
                       ([*reader, "--prompts", "0"], ">= 1"), ([*reader, "--limit", "-3"], ">= 1"),
                       ([*reader, "--lr", "0"], "> 0"), ([*reader, "--lam", "-0.1"], ">= 0")):  # fmt: skip
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        assert says in capsys.readouterr().err, argv


def test_a_perception_with_no_lines_gives_no_zoom_and_says_why():
    empty = Perception((), (), Box(0.0, 0.0, 1.0, 1.0), (100, 100))
    cropper = ProposalCropper(model=RegionScorer().eval(), perceiver=_SawPerception(empty), encoder=_ZeroEncoder())
    (proposal,) = cropper.propose([Image.new("RGB", (100, 100), "white")], ["q?"])
    assert proposal.boxes == () and "no text" in proposal.error


# -- the on-disk caches of rewards and reads --------------------------------------------------------------------


def test_a_reward_cache_cuts_a_torn_line_and_never_reuses_rewards_of_other_settings(tmp_path):
    from zoomvlm.cropvlm.proposal_grpo import RewardCache

    path = tmp_path / "rewards_accuracy.jsonl"
    at_384 = {"reward": "accuracy", "target": "ocr@side:384"}
    cache = RewardCache(path, at_384)
    cache.add(("q1", "[1, 2, 3, 4]"), 1.0)
    with path.open("a") as f:
        f.write('{"id": "q2", "box": "[5, 6')  # killed mid-write
    cache = RewardCache(path, at_384)
    cache.add(("q3", "[1, 2, 3, 4]"), 0.0)  # used to be glued onto the torn line, and lost on the next load
    assert RewardCache(path, at_384).values == {("q1", "[1, 2, 3, 4]"): 1.0, ("q3", "[1, 2, 3, 4]"): 0.0}
    with pytest.raises(ValueError, match=r"other settings \(target: 'ocr@side:384' -> 'ocr@side:768'\)"):
        RewardCache(path, {**at_384, "target": "ocr@side:768"})
    legacy = tmp_path / "old.jsonl"  # written before settings were kept: adopted, and its settings written
    legacy.write_text('{"id": "q1", "box": "b", "reward": 0.5}\n')
    assert RewardCache(legacy, at_384).values == {("q1", "b"): 0.5}
    with pytest.raises(ValueError, match="other settings"):
        RewardCache(legacy, {**at_384, "reward": "likelihood"})


def test_the_reads_cache_cuts_a_torn_line_so_the_next_read_is_kept(tmp_path):
    from types import SimpleNamespace

    from zoomvlm.cropvlm.proposal_data import cached_rows

    images = []
    for i in range(3):
        Image.new("RGB", (64, 64), "white").save(tmp_path / f"{i}.png")
        images.append(
            SimpleNamespace(image=tmp_path / f"{i}.png", load_image=lambda i=i: Image.open(tmp_path / f"{i}.png"))
        )

    class Reader:
        calls = 0

        def read_all(self, view):
            Reader.calls += 1
            return []

    path = tmp_path / "reads.jsonl"
    cached_rows(images[:1], "64", path, reader=Reader(), progress=False)
    with path.open("a") as f:
        f.write('{"image": "torn')
    cached_rows(images[:2], "64", path, reader=Reader(), progress=False)
    cached_rows(images, "64", path, reader=Reader(), progress=False)
    assert Reader.calls == 3  # each image read once: the read after the torn line was not lost
    assert len(cached_rows(images, "64", path, reader=Reader(), progress=False)) == 3


def test_seed_settings_are_checked_before_any_reader_pass(monkeypatch):
    """A typo in a scorer setting is reported at once, not after minutes of reader passes over the train set."""
    import argparse

    from zoomvlm.cropvlm import proposal_train

    parser = argparse.ArgumentParser()
    proposal_train.add_parser(parser.add_subparsers(dest="cmd"))
    base = ["proposals", "seed", "--data", "d.jsonl", "--curation", "c", "--out", "o"]
    monkeypatch.setattr(proposal_train, "_load", lambda args: ([], {}, {"d.jsonl": []}))
    monkeypatch.setattr(proposal_train, "_items", lambda *a: pytest.fail("the reader ran before the settings"))
    for extra, says in ((["--window-line-px", "17", "--window-max-area", "2"], "window_max_area"),
                        (["--repeat", "1", "--repeat", "2"], "--repeat")):  # fmt: skip
        with pytest.raises(ValueError, match=says):
            proposal_train.cmd_seed(parser.parse_args([*base, *extra]))


def test_seed_boxes_survive_a_reader_text_holding_u2028(tmp_path):
    """``curate boxes`` writes the reader's text unescaped (ensure_ascii=False); U+2028 inside it split the row
    in two under str.splitlines and its seed box was silently lost. A corrupt row is now an error naming it."""
    from zoomvlm.cropvlm.proposal_data import load_seed_boxes

    rows = [
        {"id": "q1", "seed_box": [0.1, 0.2, 0.5, 0.3], "found": True, "raw": "TOTAL\u2028 39.80", "error": None},
        {"id": "q2", "seed_box": [0.0, 0.0, 1.0, 1.0], "found": False, "raw": "", "error": "not found"},
    ]
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert load_seed_boxes(tmp_path) == {"q1": Box(0.1, 0.2, 0.5, 0.3), "q2": None}
    raw.write_text(raw.read_text(encoding="utf-8").rstrip("\n"), encoding="utf-8")  # a whole last row, no newline
    assert load_seed_boxes(tmp_path) == {"q1": Box(0.1, 0.2, 0.5, 0.3), "q2": None}
    raw.write_text(raw.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    raw.write_text(raw.read_text(encoding="utf-8") + '{"id": "q3", "seed_box": [0.1\n' + json.dumps(rows[1]) + "\n")
    with pytest.raises(ValueError, match=f"{raw}:3"):
        load_seed_boxes(tmp_path)


def test_a_scorer_names_the_licences_of_its_own_training_data():
    from zoomvlm.cropvlm.proposal_train import _data_licences

    receipts, documents = "../shared/data/receipts/train.jsonl", "../shared/data/documents/train.jsonl"
    assert "SROIE" in _data_licences([receipts]) and "CC BY-NC" not in _data_licences([receipts])
    both = _data_licences([receipts, documents, receipts])
    assert "SROIE" in both and "CC BY-NC 4.0" in both and both.count("SROIE") == 1
