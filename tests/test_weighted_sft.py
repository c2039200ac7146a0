"""AwaRes cold-start SFT with the tool-call turn up-weighted (ToolWeightedSFTTrainer, tiny VLMs on CPU)."""

from __future__ import annotations

import json

import pytest
import tiny_models as tiny
import torch
from PIL import Image

from zoomvlm.awares.protocol import AWARES_SYSTEM_PROMPT, format_get_crops, tool_output_text, trajectory_messages
from zoomvlm.awares.weighted_sft import (
    ToolWeightedSFTTrainer,
    WeightedSFTConfig,
    _runs,
    run_weighted_sft,
    tool_call_loss_weights,
    training_chat_template,
    trajectory_dataset,
)
from zoomvlm.train.recipe import recipe_from_dict

HIGH = "side:224"  # low view <= 112 px, crops <= 112 px: a few dozen image tokens per image keeps a step < 1 s
TOOL_WEIGHT = 5.0


@pytest.fixture(scope="module")
def trajectories(demo_samples, tmp_path_factory):
    """Three trajectories on real receipts: a direct answer (LR), a one-crop and a two-crop tool call (HR)."""
    crops = [[], ["3"], ["0", "5"]]
    path = tmp_path_factory.mktemp("awares") / "trajectories.jsonl"
    with path.open("w") as f:
        for s, c in zip(demo_samples[:3], crops, strict=True):
            record = {"id": s.id, "image": str(s.image), "question": s.question, "answers": list(s.answers),
                      "answer": s.answers[0], "label": "HR" if c else "LR", "crops": c, "high": HIGH}  # fmt: skip
            f.write(json.dumps(record) + "\n")
    return path


def _build(arch: str):
    if arch == "qwen2_5_vl":
        return tiny.build_tiny_qwen25vl()
    # 64 px tiles, no splitting: 1 view = 1 tile (the CPU recipe's settings, shrunk further for speed)
    return tiny.build_tiny_smolvlm(tile_size=64, longest_edge=64, image_splitting=False)


def _trainer(model, processor, dataset, tmp_path, tool_call_weight=TOOL_WEIGHT, **overrides):
    args = WeightedSFTConfig(output_dir=str(tmp_path / "out"), bf16=False, report_to=[], save_strategy="no",
                             per_device_train_batch_size=3, max_length=None, tool_call_weight=tool_call_weight,
                             **overrides)  # fmt: skip
    return ToolWeightedSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)


def test_trajectory_dataset_decodes_images_only_on_access(trajectories, tmp_path):
    ds = trajectory_dataset(trajectories)
    assert ds.column_names == ["messages", "image_path", "crops", "high"]  # paths stored, no pixels
    assert len(ds) == 3
    rows = [ds[i] for i in range(3)]
    assert [set(r) for r in rows] == [{"messages", "images"}] * 3
    assert [len(r["images"]) for r in rows] == [1, 2, 3]  # low view + one image per crop
    assert all(isinstance(im, Image.Image) and im.mode == "RGB" for r in rows for im in r["images"])
    assert max(rows[0]["images"][0].size) == 112  # the low view: side:224 with each side halved
    assert rows[1]["messages"][2]["content"][0]["text"] == "GET_CROPS: ['3']"
    assert [m["role"] for m in rows[2]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert max(trajectory_dataset(trajectories, high="side:112")[0]["images"][0].size) == 56  # override wins
    assert len(trajectory_dataset(trajectories, limit=2)) == 2

    bad = tmp_path / "bad.jsonl"
    good = json.loads(trajectories.read_text().splitlines()[1])
    cases = [({**good, "label": "LR"}, "label 'LR' but crops"), ({**good, "high": None}, "no `high`"),
             ({**good, "image": "/no/such.jpg"}, "image not found"), ({**good, "crops": ["9"]}, "unknown crop"),
             ({k: v for k, v in good.items() if k != "answer"}, "missing")]  # fmt: skip
    for record, match in cases:
        bad.write_text(json.dumps(record) + "\n")
        with pytest.raises(ValueError, match=match) as err:
            trajectory_dataset(bad)
        assert str(err.value).startswith(f"{bad}:1: ")


def test_tool_call_loss_weights_follow_the_assistant_turns():
    tool = trajectory_messages("q?", "42", ["3"])
    direct = trajectory_messages("q?", "42")
    labels = torch.full((2, 12), -100)
    labels[0, 2:4] = 7  # tool-call turn
    labels[0, 8:11] = 7  # final answer
    labels[1, 3:6] = 7  # direct answer
    w = tool_call_loss_weights(labels, [tool, direct], 2.5)
    assert w.dtype == torch.float32
    assert w[0].tolist() == [0, 0, 2.5, 2.5, 0, 0, 0, 0, 1, 1, 1, 0]
    assert w[1].tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    # max_length truncation dropped the final answer: the remaining run is still the tool call
    assert tool_call_loss_weights(labels[:1, :6], [tool], 5.0)[0].tolist() == [0, 0, 5, 5, 0, 0]
    # a malformed call is still an action and is up-weighted
    malformed = trajectory_messages("q?", None, ["3"])
    malformed[2]["content"][0]["text"] = "GET_CROPS: []"
    assert tool_call_loss_weights(labels[:1, :6], [malformed], 5.0)[0, 2].item() == 5.0
    with pytest.raises(ValueError, match="3 supervised spans but 1 assistant turns"):
        tool_call_loss_weights(torch.tensor([[1, -100, 1, -100, 1]]), [direct], 5.0)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "smolvlm"])
def test_training_template_renders_like_the_stock_one(arch):
    _, processor = _build(arch)
    stock = processor.chat_template
    training = training_chat_template(processor)
    assert "{% generation %}" in training.replace("{%- generation -%}", "{% generation %}")
    for messages in (trajectory_messages("q?", "42"), trajectory_messages("q?", "42", ["0", "5"])):
        for turns, prompt in ((messages, False), (messages[:-1], True)):
            expected = processor.apply_chat_template(turns, add_generation_prompt=prompt, chat_template=stock)
            got = processor.apply_chat_template(turns, add_generation_prompt=prompt, chat_template=training)
            assert got == expected


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "smolvlm"])
def test_batch_masks_observations_and_up_weights_the_tool_call(arch, trajectories, demo_samples, tmp_path):
    model, processor = _build(arch)
    ds = trajectory_dataset(trajectories)
    trainer = _trainer(model, processor, ds, tmp_path)
    batch = trainer.data_collator([ds[i] for i in range(3)])
    tok = processor.tokenizer
    ids, labels, weights = batch["input_ids"], batch["labels"], batch["loss_weights"]
    assert weights.shape == labels.shape and weights.dtype == torch.float32
    assert torch.equal(weights == 0, labels == -100)
    assert (labels[batch["attention_mask"] == 0] == -100).all()  # padding

    image_token = processor.image_token_id
    assert image_token == model.config.image_token_id
    n_image_tokens = (ids == image_token).sum(dim=1)
    assert (n_image_tokens > 0).all() and n_image_tokens[0] < n_image_tokens[1] < n_image_tokens[2]
    assert (labels[ids == image_token] == -100).all() and (weights[ids == image_token] == 0).all()

    def turn(text):  # the supervised tokens of an assistant turn: its text, end-of-turn token, newline
        return tiny.assistant_suffix(processor, text) + "\n"

    answers = [s.answers[0] for s in demo_samples[:3]]
    expected = [[(turn(answers[0]), 1.0)],
                [(turn("GET_CROPS: ['3']"), TOOL_WEIGHT), (turn(answers[1]), 1.0)],
                [(turn(format_get_crops(["0", "5"])), TOOL_WEIGHT), (turn(answers[2]), 1.0)]]  # fmt: skip
    for b, crops in enumerate([[], ["3"], ["0", "5"]]):
        runs = _runs(labels[b] != -100)
        got = [(tok.decode(ids[b, s:e]), set(weights[b, s:e].tolist())) for s, e in runs]
        assert got == [(text, {w}) for text, w in expected[b]], (arch, b)
        # everything before the first assistant turn: system prompt, low view, question; all unsupervised
        prompt = tok.decode(ids[b, : runs[0][0]])
        assert AWARES_SYSTEM_PROMPT in prompt and demo_samples[b].question in prompt
        if crops:  # the tool-output turn (crops + tool text) lies between the two assistant turns
            between = slice(runs[0][1], runs[1][0])
            observation = tok.decode(ids[b, between])
            assert tool_output_text(crops) in observation
            assert (ids[b, between] == image_token).any()
            assert (labels[b, between] == -100).all() and (weights[b, between] == 0).all()


def test_weighted_loss_is_the_hand_computed_weighted_nll(trajectories, tmp_path):
    from trl import SFTConfig, SFTTrainer

    ds = trajectory_dataset(trajectories)
    model, processor = tiny.build_tiny_qwen25vl()
    trainer = _trainer(model, processor, ds, tmp_path)
    batch = trainer.data_collator([ds[i] for i in range(3)])
    model.eval()
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "loss_weights")}
    with torch.no_grad():
        logits = model(**inputs).logits.float()  # the plain forward: full logits
        loss = trainer.compute_loss(model, dict(batch))  # evaluation path: normalised within the batch
        w_total = batch["loss_weights"][:, 1:].sum()
        train_loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=w_total)

    labels, w = batch["labels"][:, 1:], batch["loss_weights"][:, 1:]
    nll = -logits[:, :-1].log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = (w * nll).sum() / w.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert train_loss.item() == pytest.approx(expected.item(), rel=1e-4)
    unweighted = nll[labels != -100].mean()
    assert abs(unweighted.item() - expected.item()) > 1e-3  # the weights matter on this batch

    # Gradient accumulation: the denominator is the weight of the whole accumulated batch.
    samples, n_items = trainer.get_batch_samples(iter([batch, batch]), 2, torch.device("cpu"))
    assert len(samples) == 2 and n_items.item() == pytest.approx(2 * w_total.item())
    with torch.no_grad():
        halves = [trainer.compute_loss(model, dict(b), num_items_in_batch=n_items) for b in samples]
    assert sum(h.item() for h in halves) == pytest.approx(expected.item(), rel=1e-4)

    # tool_call_weight=1 is exactly TRL's assistant-only SFT loss
    model1, processor1 = tiny.build_tiny_qwen25vl()
    ours = _trainer(model1, processor1, ds, tmp_path, tool_call_weight=1.0)
    model2, processor2 = tiny.build_tiny_qwen25vl()
    args = SFTConfig(output_dir=str(tmp_path / "plain"), bf16=False, report_to=[], assistant_only_loss=True,
                     remove_unused_columns=False, max_length=None)  # fmt: skip
    plain = SFTTrainer(model=model2, args=args, train_dataset=ds, processing_class=processor2)
    batch1 = ours.data_collator([ds[i] for i in range(3)])
    batch2 = plain.data_collator([ds[i] for i in range(3)])
    assert torch.equal(batch1["labels"], batch2["labels"])
    model1.eval(), model2.eval()
    with torch.no_grad():
        assert ours.compute_loss(model1, dict(batch1)).item() == pytest.approx(
            plain.compute_loss(model2, dict(batch2)).item(), rel=1e-5
        )


def test_two_steps_change_the_model_and_save_checkpoint_and_final(trajectories, tmp_path):
    from safetensors.torch import load_file

    init = tmp_path / "init"
    tiny.save_tiny(*tiny.build_tiny_qwen25vl(), init)
    out = tmp_path / "run"
    recipe = recipe_from_dict({
        "kind": "awares_sft", "model": {"init": str(init), "lora": None},
        "data": {"file": str(trajectories), "high": HIGH},
        "trainer": {"output_dir": str(tmp_path / "unused"), "max_steps": 2, "per_device_train_batch_size": 2,
                    "gradient_accumulation_steps": 1, "learning_rate": 1e-3, "save_steps": 2, "logging_steps": 1,
                    "tool_call_weight": 5.0,
                    # True: the Trainer would drop the stored columns the image transform reads
                    # (image_path, crops, high) unless the trainer declares them signature columns
                    "remove_unused_columns": True}})  # fmt: skip
    final = run_weighted_sft(recipe, out)
    assert final == out / "final" and (final / "config.json").is_file() and (out / "checkpoint-2").is_dir()
    assert json.loads((final / "zoomvlm_recipe.json").read_text())["kind"] == "awares_sft"
    before, after = load_file(init / "model.safetensors"), load_file(final / "model.safetensors")
    assert before.keys() == after.keys()
    changed = sum(not torch.equal(before[k], after[k]) for k in before)
    assert changed > 10, changed
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)


def test_trajectory_records_resolve_images_and_name_the_bad_line(tmp_path):
    from zoomvlm.train.common import trajectory_records

    Image.new("RGB", (40, 20), "white").save(tmp_path / "a.png")
    good = {"image": "a.png", "question": "q?", "answer": "x", "high": 768}
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "high": None}) + "\n")

    records = trajectory_records(path, None, required=("question", "answer"))
    where, row, high, image = next(records)
    assert (where, high, image) == (f"{path}:1", "side:768", tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"t.jsonl:3: no `high` budget"):
        next(records)
    # the run-wide budget overrides the records' (and fills a missing one)
    assert [h for _, _, h, _ in trajectory_records(path, "side:512", required=())] == ["side:512"] * 2

    path.write_text(json.dumps({**good, "image": "missing.png"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"t.jsonl:1: image not found: .*missing.png"):
        list(trajectory_records(path, None, required=()))
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"t.jsonl:1: not valid JSON"):
        list(trajectory_records(path, None, required=()))
    path.write_text(json.dumps({"image": "a.png", "high": 768}) + "\n")
    with pytest.raises(ValueError, match=r"t.jsonl:1: .*missing \['answer'\]"):
        list(trajectory_records(path, None, required=("answer",)))
