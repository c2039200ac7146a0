"""AwaRes multi-turn GRPO (self-zoom) on a tiny random Qwen2.5-VL on CPU: the tool-output turn is masked out of the
loss, the loss and KL-reference log-probs see every image of a rollout, R = R_ans - C_tool, and steps train."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from zoomvlm.awares.grpo import awares_grpo_dataset, build_awares_grpo_trainer, run_awares_grpo
from zoomvlm.awares.protocol import high_res_crops, low_res_view, trajectory_messages
from zoomvlm.awares.rewards import AwaResReward, ToolCost
from zoomvlm.core.geometry import Budget
from zoomvlm.data.samples import load_image
from zoomvlm.train.recipe import Recipe, load_recipe, recipe_from_dict

HIGH = "side:224"  # a quadrant crop is then ~10 image tokens: every forward pass stays well under a second on CPU
TOOL_CALL = "GET_CROPS: ['3']"


@pytest.fixture(scope="module")
def records(demo_samples, tmp_path_factory):
    """Two curated trajectory records (one HR, one LR) on demo receipts."""
    path = tmp_path_factory.mktemp("awares") / "trajectories.jsonl"
    with path.open("w") as f:
        for sample, label in zip(demo_samples[:2], ("HR", "LR"), strict=True):
            row = {"image": str(sample.image), "question": sample.question, "answers": list(sample.answers)}
            f.write(json.dumps({**row, "label": label}) + "\n")
    return path


def _recipe(records, init, output_dir, **trainer) -> Recipe:
    return recipe_from_dict({
        "kind": "awares_grpo",
        "model": {"init": init},
        "data": {"file": str(records), "high": HIGH},
        "awares": {"answer_reward": "contains"},  # deterministic R_ans; the semantic route is tested with a stub below
        "trainer": {
            "output_dir": str(output_dir),
            "num_generations": 4,  # G = 4 (AwaRes: 8): four rollouts of distinct shapes fit in one batch
            "per_device_train_batch_size": 4,  # one prompt x G per step
            "gradient_accumulation_steps": 1,
            "max_completion_length": 6,  # per turn; scripted turns may be longer, random text need not be
            "save_strategy": "no",
            "seed": 0,
            **trainer,
        },
    })  # fmt: skip


@pytest.fixture(scope="module")
def built(records, tmp_path_factory, tiny_qwen25vl_init):
    """``(trainer, processor)`` shared by the tests that only roll out (none of them takes a step)."""
    trainer, processor = build_awares_grpo_trainer(
        _recipe(records, tiny_qwen25vl_init, tmp_path_factory.mktemp("grpo"))
    )
    trainer.current_gradient_accumulation_steps = 1  # set by train(); compute_loss outside train() reads it
    return trainer, processor


@contextlib.contextmanager
def scripted(trainer, script):
    """Within the block, ``script(turn, i) -> str | None`` REPLACES rollout i's sampled turn (its tokens + eos);
    ``None`` keeps the sample. Scripted tokens are not the policy's samples: they build rollouts of a known shape."""
    real = trainer.sample_turn

    def sample_turn(turn, rows, *args, **kwargs):
        ids, logprobs = real(turn, rows, *args, **kwargs)
        out = []
        for row, i in zip(ids, rows, strict=True):
            text = script(turn, i)
            tok = trainer.processing_class.tokenizer
            out.append(row if text is None else tok.encode(text, add_special_tokens=False) + [tok.eos_token_id])
        return out, None if out != ids else logprobs

    trainer.sample_turn = sample_turn
    try:
        yield
    finally:
        del trainer.sample_turn  # back to the class's method


def _rollout(trainer, script: dict, row: int = 0):
    """One generation batch of G rollouts of dataset row ``row``; ``script[(turn, i)]`` replaces rollout i's turn."""
    with scripted(trainer, lambda turn, i: script.get((turn, i))):
        inputs = [trainer.train_dataset[row] for _ in range(trainer.num_generations)]
        return trainer._generate_and_score_completions(inputs), inputs[0]


def _unpadded(out, i: int) -> tuple[list[int], list[int], list[int]]:
    """Rollout i's (prompt ids, completion ids, tool mask) without padding."""
    p, c = int(out["prompt_mask"][i].sum()), int(out["completion_mask"][i].sum())
    prompt = out["prompt_ids"][i][out["prompt_ids"].size(1) - p :].tolist()
    return prompt, out["completion_ids"][i][:c].tolist(), out["tool_mask"][i][:c].tolist()


def _views(row, crops=("3",)):
    image, high = load_image(row["image_path"]), Budget.parse(row["high"])
    return [low_res_view(image, high), *high_res_crops(image, list(crops), high)]


def _direct(model, processor, messages, images):
    """Full-conversation ids and ``logp[j]`` = log p(ids[j + 1] | ids[: j + 1]) from ONE standard forward pass."""
    enc = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt",
                                        processor_kwargs={"images": images})  # fmt: skip
    with torch.no_grad():
        logits = model(**enc).logits[0].float()
    ids = enc["input_ids"][0]
    return ids.tolist(), torch.log_softmax(logits[:-1], -1).gather(-1, ids[1:, None])[:, 0]


def test_tool_output_turn_is_an_observation_masked_out_of_the_loss(built):
    trainer, processor = built
    gold = "LIGHTROOM GALLERY SDN BHD"
    out, row = _rollout(trainer, {(1, 0): TOOL_CALL, (2, 0): gold, (1, 1): gold})
    tok, pad = processor.tokenizer, trainer.image_pad_token_id
    eos = tok.eos_token_id

    # Rollout 0: prompt + completion are exactly the SFT rendering of the tool-call trajectory (trailing "\n" aside).
    prompt, completion, mask = _unpadded(out, 0)
    full = processor.apply_chat_template(trajectory_messages(row["question"], gold, ["3"]), tokenize=True,
                                         processor_kwargs={"images": _views(row)})[0]  # fmt: skip
    assert prompt + completion == full[:-1]
    turn1 = tok.encode(TOOL_CALL, add_special_tokens=False) + [eos]
    turn2 = tok.encode(gold, add_special_tokens=False) + [eos]
    tool = len(completion) - len(turn1) - len(turn2)
    assert completion[: len(turn1)] == turn1 and completion[-len(turn2) :] == turn2
    assert mask == [1] * len(turn1) + [0] * tool + [1] * len(turn2)  # policy tokens 1, tool-output turn 0
    pads = [j for j, t in enumerate(completion) if t == pad]
    grid = out["image_grid_thw"][1].prod().item() // 4  # the crop's merged image tokens
    assert len(pads) == grid > 0 and all(mask[j] == 0 for j in pads)
    assert "High-resolution crops: '3' bottom-right." in tok.decode(completion[len(turn1) : len(turn1) + tool])

    # Rollouts without a tool call: every completion token is the policy's, no image in the completion.
    for i in (1, 2, 3):
        _, completion, mask = _unpadded(out, i)
        assert set(mask) == {1} and pad not in completion
    assert out["num_images"] == [2, 1, 1, 1]
    assert out["image_grid_thw"].size(0) == 5  # low views of all four + rollout 0's crop
    # TRL normalises the loss by the policy tokens only.
    assert out["num_items_in_batch"].item() == (out["completion_mask"] * out["tool_mask"]).sum().item()


@pytest.mark.parametrize("tool_call", [True, False], ids=["with-crops", "no-crops-in-batch"])
def test_loss_and_reference_logprobs_equal_a_direct_forward_with_all_images(built, monkeypatch, tool_call):
    trainer, processor = built
    answer = "TOTAL RM 45.60"
    script = {(1, 0): TOOL_CALL, (2, 0): answer} if tool_call else {(1, 0): answer}
    out, row = _rollout(trainer, script)
    seen = {}
    real = trainer._get_per_token_logps_and_entropies

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        seen["logps"] = result[0].detach()
        return result

    monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies", spy)
    trainer.compute_loss(trainer.model, out)  # the loss's own forward pass

    prompt, completion, mask = _unpadded(out, 0)
    crops = ["3"] if tool_call else []
    messages = trajectory_messages(row["question"], answer, crops)
    ids, direct = _direct(trainer.model, processor, messages, _views(row, crops))
    assert ids[: len(prompt) + len(completion)] == prompt + completion
    direct = direct[len(prompt) - 1 : len(prompt) - 1 + len(completion)]
    policy = torch.tensor(mask, dtype=torch.bool)
    torch.testing.assert_close(seen["logps"][0, : len(completion)][policy], direct[policy], atol=1e-4, rtol=0)
    # The KL reference (the starting model, still equal to the policy) saw the same images.
    torch.testing.assert_close(out["ref_per_token_logps"][0, : len(completion)][policy], direct[policy],
                               atol=1e-4, rtol=0)  # fmt: skip

    if tool_call:  # the crop's pixels matter: the same tokens with another quadrant's pixels score differently
        low, crop = _views(row)
        other = high_res_crops(load_image(row["image_path"]), ["0"], Budget.parse(row["high"]))[0].resize(crop.size)
        _, wrong = _direct(trainer.model, processor, messages, [low, other])
        wrong = wrong[len(prompt) - 1 : len(prompt) - 1 + len(completion)]
        turn2 = slice(len(completion) - len(processor.tokenizer.encode(answer)) - 1, len(completion))
        assert (wrong[turn2] - direct[turn2]).abs().max() > 1e-3


def test_reward_is_answer_score_minus_tool_cost_and_bad_calls_are_counted(built):
    trainer, _ = built
    gold = "LIGHTROOM GALLERY SDN BHD"  # record 0, label HR
    script = {
        (1, 0): TOOL_CALL, (2, 0): gold,  # crop '3' (area 0.25), right answer
        (1, 1): gold,  # direct right answer although HR was needed: alpha_miss
        (1, 2): "GET_CROPS: ['9']",  # unknown crop: counted, its text is the (wrong) final answer, no crop cost
        (1, 3): "GET_CROPS: ['3', 'right']", (2, 3): "no idea",  # '3' lies in '8': both sent, 0.75, wrong answer
    }  # fmt: skip
    calls, invalid = trainer.tool_calls, trainer.invalid_tool_calls
    out, _ = _rollout(trainer, script)
    rewards = list(trainer._logs["rewards"]["awares"])[-4:]
    c = ToolCost()
    assert rewards == pytest.approx([1 - (c.alpha_use + c.lam * 0.25), 1 - c.alpha_miss, 0 - c.alpha_miss,
                                     0 - (c.alpha_use + c.lam * 0.75)])  # fmt: skip
    assert trainer.invalid_tool_calls == invalid + 1 and trainer.tool_calls == calls + 2
    assert trainer._metrics["train"]["tools/failure_frequency"][-1] == pytest.approx(1 / 3)
    assert out["num_images"] == [2, 1, 1, 3]  # the unparseable call got no image, not the full image
    assert set(_unpadded(out, 2)[2]) == {1}


def test_awares_reward_scores_the_final_answer_semantic_by_default():
    seen = []

    def semantic(predictions, answers):  # SemanticSimilarity's call, without loading a sentence encoder
        seen.extend(predictions)
        return [0.8] * len(predictions)

    reward = AwaResReward(semantic=semantic)
    assert reward.answer_reward == "semantic"

    def turns(*texts):
        return [{"role": "assistant" if k % 2 == 0 else "user", "content": t} for k, t in enumerate(texts)]

    completions = [turns("a"), turns("b"), turns("GET_CROPS: ['4']", "crops", "c"), turns("GET_CROPS: 4")]
    logged = {}
    out = reward(completions=completions, answers=[["x"]] * 4, label=["LR", "HR", "HR", "LR"],
                 log_metric=logged.__setitem__)  # fmt: skip
    c = ToolCost()
    assert out == pytest.approx([0.8, 0.8 - c.alpha_miss, 0.8 - c.alpha_use - c.lam * 0.25, 0.8])
    assert seen == ["a", "b", "c", "GET_CROPS: 4"]  # turn 2 after a valid call, else turn 1's text
    assert logged["awares/r_ans"] == pytest.approx(0.8)
    with pytest.raises(KeyError, match="unknown answer reward"):
        AwaResReward("no_such_metric")


def test_dataset_rows_and_errors(records, tmp_path):
    ds = awares_grpo_dataset(records, high=HIGH)
    row = ds[0]
    assert [m["role"] for m in row["prompt"]] == ["system", "user"] and row["label"] == "HR"
    assert max(row["image"].size) == 112  # the low view: the 224-side high view with each side halved
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**json.loads(records.read_text().splitlines()[0]), "label": "maybe"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: label"):
        awares_grpo_dataset(bad, high=HIGH)


RECIPE = """\
kind: awares_grpo
model: {{init: {init}}}
data: {{file: {file}, high: "side:224"}}
awares: {{answer_reward: contains, alpha_miss: 0.5, alpha_use: 0.1, lam: 0.3}}
trainer:
  output_dir: {out}
  num_generations: 4
  per_device_train_batch_size: 4
  gradient_accumulation_steps: 1
  max_completion_length: 6
  beta: 0.04
  epsilon: 0.2
  learning_rate: 1.0e-2   # a random tiny model, 2 steps
  max_steps: 2
  save_strategy: "no"
  seed: 0
"""


def test_two_grpo_steps_change_the_parameters(records, tmp_path, tiny_qwen25vl_init):
    (tmp_path / "recipe.yaml").write_text(RECIPE.format(file=records, init=tiny_qwen25vl_init, out=tmp_path / "grpo"))
    trainer, _ = build_awares_grpo_trainer(load_recipe(tmp_path / "recipe.yaml"))
    assert trainer.beta == 0.04 and trainer.ref_model is not None  # KL to the starting model
    # Even rollouts call the tool and answer right, odd ones are sampled: rewards differ within each group.
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    with scripted(trainer, lambda turn, i: (TOOL_CALL if turn == 1 else "LIGHTROOM GALLERY SDN BHD") if i % 2 == 0
                  else None):  # fmt: skip
        trainer.train()
    assert trainer.state.global_step == 2 and trainer.tool_calls >= 4
    changed = sum(not torch.equal(before[k], v.detach()) for k, v in trainer.model.named_parameters())
    assert changed > 0.9 * len(before)
    logged = trainer.state.log_history[-2]  # step 2's metrics
    assert logged["tools/call_frequency"] >= 0.5 and logged["reward_std"] > 0


def test_run_awares_grpo_saves_the_final_model(records, tmp_path, tiny_qwen25vl_init):
    (tmp_path / "recipe.yaml").write_text(RECIPE.format(file=records, init=tiny_qwen25vl_init, out=tmp_path / "x"))
    recipe = load_recipe(tmp_path / "recipe.yaml", ["trainer.max_steps=1"])
    final = run_awares_grpo(recipe, tmp_path / "run")
    assert final == tmp_path / "run" / "final" and (final / "config.json").is_file()
    assert json.loads((final / "zoomvlm_recipe.json").read_text())["kind"] == "awares_grpo"
