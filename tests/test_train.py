"""SFT and GRPO on tiny from-scratch SmolVLM croppers (TRL trainers, CPU), recipes, and the train CLI."""

from __future__ import annotations

import json

import pytest
import torch

from zoomvlm.cli.main import demo_data_path, main
from zoomvlm.core.geometry import Box, Budget
from zoomvlm.core.prompts import completion_text
from zoomvlm.cropvlm.curation import sft_record
from zoomvlm.cropvlm.rewards import format_reward
from zoomvlm.train.recipe import RecipeError, bundled_recipes, load_recipe


@pytest.fixture
def TINY(tiny_smolvlm_init):  # noqa: N802 - the recipe overrides that make every tiny recipe a 64 px model
    return [f"model.init={tiny_smolvlm_init}", "data.cropper_budget=64"]


@pytest.fixture
def sft_file(demo_samples, tmp_path):
    path = tmp_path / "sft.jsonl"
    boxes = [Box(0.1, 0.1, 0.9, 0.3), Box(0.2, 0.4, 0.8, 0.5), Box(0.5, 0.6, 0.9, 0.7)]
    with path.open("w") as f:
        for i, s in enumerate(demo_samples[:6]):
            f.write(json.dumps(sft_record(s.id, str(s.image), s.question, boxes[i % 3])) + "\n")
    return path


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _changed(before, model):
    return sum(not torch.equal(before[k], v.detach()) for k, v in model.named_parameters() if k in before)


def test_bundled_recipes_parse():
    names = set(bundled_recipes())
    assert {"tiny_cpu_sft", "tiny_cpu_grpo", "tiny_cpu_grpo_accuracy", "smolvlm256m_lora_sft",
            "smolvlm256m_lora_grpo"} <= names  # fmt: skip
    for name in names:
        if name.endswith("_vllm"):  # vLLM needs CUDA: refused on this CPU machine (test_gpu_example_configs)
            with pytest.raises(RecipeError, match="use_vllm needs CUDA"):
                load_recipe(name)
            continue
        r = load_recipe(name)
        assert r.kind in {"sft", "grpo", "awares_sft", "awares_grpo"} and r.trainer.output_dir
    grpo = load_recipe("smolvlm256m_lora_grpo")
    assert grpo.trainer.num_generations == 6 and grpo.trainer.temperature == 0.8
    assert grpo.trainer.beta == 0.01 and grpo.trainer.scale_rewards == "none"
    assert grpo.model.lora["r"] == 128 and grpo.model.lora["lora_alpha"] == 256


def test_recipe_errors_are_clear(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe("no_such_recipe")
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: sft\nmodel: {init: x}\ndata: {}\ntrainer: {}\nsurprise: 1\n")
    with pytest.raises(RecipeError, match="unknown section"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="expected 'grpo'"):
        load_recipe("tiny_cpu_sft", kind="grpo")
    with pytest.raises(RecipeError, match="section.key=value"):
        load_recipe("tiny_cpu_sft", ["oops"])
    r = load_recipe("tiny_cpu_sft", ["trainer.max_steps=3", "trainer.learning_rate=1e-4", "model.lora=null"])
    assert r.trainer.max_steps == 3 and r.trainer.learning_rate == 1e-4 and r.model.lora is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.cropper_budjet=1", r"data\.cropper_budjet \(did you mean data\.cropper_budget\?\)"),
        ("trainer.num_generationz=4", r"trainer\.num_generationz"),
        ("target.metrc=anls", r"target\.metrc"),
        ("awares.answer=contains", r"awares\.answer\b"),  # the old second spelling of answer_reward is gone
        ("rewards.nope=1", r"unknown reward 'nope'"),
        ("rewards.awares=1", r"reward 'awares' reads .* completions are a box"),
        ("data.policy=crop_set", r"cropper_budget is not used with data.policy: crop_set"),
        ("awares.alpha_miss=0.01", r"alpha_miss > alpha_use"),
        ("target.metric=acuracy", r"not a metric"),
        ("trainer.max_steps=ten", r"wrong type: trainer\.max_steps='ten' \(expected int\)"),
        ("trainer.learning_rate=5e-6x", r"trainer\.learning_rate='5e-6x'"),
        ("model.dtype=float17", r"not a torch dtype"),
        ("model.lora={rr: 8}", r"model\.lora: .*'rr'"),
        ("model.lora={}", r"model\.lora is empty"),
        ("trainer.reward_weights=[1.0, 5.0]", r"set them there"),
        # refused when read, not after the model loaded and the first rollout was scored (or run silently)
        ("trainer.loss_type=dr_grpoo", r"trainer\.loss_type='dr_grpoo' is not one of \[.*'dr_grpo'"),
        ("trainer.scale_rewards=group_std", r"trainer\.scale_rewards='group_std' is not one of"),
        ("trainer.learning_rate=-1", r"trainer\.learning_rate must be > 0"),
        ("trainer.temperature=0", r"trainer\.temperature must be > 0"),
        ("trainer.num_iterations=0", r"trainer\.num_iterations must be > 0"),
        ("rewards.format=.nan", r"reward weights must be finite .*rewards\.format"),
        ("rewards.format=true", r"rewards must be a mapping \{name: weight\}"),  # YAML true is not a weight
    ],
)
def test_typed_recipes_refuse_unknown_keys_and_bad_combinations(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe("tiny_cpu_grpo", [override])


def test_one_place_for_each_default():
    """Keys a recipe leaves out get the dataclass defaults (CropVLM's), also in what a checkpoint stores."""
    from zoomvlm.cropvlm.cropper import _trained_budget

    r = load_recipe("tiny_cpu_grpo", ["data.cropper_budget=null"])
    assert r.data.view_budget == Budget(max_side=512) and r.to_json()["data"]["cropper_budget"] is None
    r = load_recipe("tiny_cpu_grpo")
    assert r.trainer.max_grad_norm == 0.1 and r.trainer.temperature == 0.8 and r.trainer.bf16 is False
    assert load_recipe("tiny_cpu_crop_set_grpo").to_json()["data"]["high"] == "side:768"
    assert _trained_budget("/no/such/checkpoint") == 512


def test_a_missing_init_folder_is_named_before_the_training_images_are_read(tmp_path, monkeypatch, capsys):
    from zoomvlm.data import samples

    monkeypatch.setattr(samples, "load_jsonl", lambda *a, **k: pytest.fail("the data was read before the init check"))
    rc = main(["train", "grpo", "--config", "tiny_cpu_grpo", "--set", f"model.init={tmp_path / 'nonexistent'}",
               "--output-dir", str(tmp_path / "out")])  # fmt: skip
    assert rc == 2 and "model.init folder" in capsys.readouterr().err


def test_train_cli_names_an_unknown_key(capsys):
    rc = main(["train", "grpo", "--config", "tiny_cpu_grpo", "--set", "data.cropper_budjet=1"])
    assert rc == 2 and "data.cropper_budjet" in capsys.readouterr().err


def test_sft_two_steps_change_the_model_and_save_a_loadable_cropper(sft_file, tmp_path, TINY):
    from safetensors.torch import load_file
    from trl import SFTTrainer

    from zoomvlm.core.geometry import BoxFormatError, parse_percent_box
    from zoomvlm.cropvlm.cropper import VLMCropper
    from zoomvlm.train.common import build_cropper, save_final
    from zoomvlm.train.sft import CropperSFTConfig, sft_dataset

    recipe = load_recipe("tiny_cpu_sft", TINY + [f"data.sft_file={sft_file}"])
    model, processor, _ = build_cropper(recipe.model)
    ds = sft_dataset(sft_file, budget=Budget(max_side=64))
    before = _params(model)
    args = CropperSFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                            gradient_accumulation_steps=1, learning_rate=1e-3, save_strategy="no")  # fmt: skip
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=processor)
    # Loss on the box only: the prompt (and image) tokens are masked out of the labels.
    batch = trainer.data_collator([ds[0]])
    labelled = batch["labels"][0][batch["labels"][0] != -100]
    box_text = processor.tokenizer.decode(labelled)
    assert box_text.startswith("[10, 10, 90, 30].") or "[10, 10, 90, 30]." in box_text, box_text
    trainer.train()
    assert trainer.state.global_step == 2
    assert _changed(before, model) > 10
    final = save_final(trainer, processor, tmp_path / "out", recipe)
    # Saving: the checkpoint holds exactly the trained weights.
    saved = load_file(final / "model.safetensors")
    trained = {k: v.detach() for k, v in model.state_dict().items()}
    assert saved.keys() <= trained.keys() and len(saved) > 10
    assert all(torch.equal(saved[k], trained[k]) for k in saved)
    # unconstrained, so its raw text is comparable with plain generate_texts below
    cropper = VLMCropper(str(final), max_new_tokens=8, constrained=False)
    assert cropper.budget.max_side == 64  # read back from the saved recipe
    # Loading + parsing: the cropper's raw text is the trained model's greedy answer, and its box is that text
    # parsed (or, when it does not parse, the whole image with the parse error counted).
    (proposal,) = cropper.propose([ds[0]["image"]], ["What is the total?"])
    from zoomvlm.core.prompts import cropper_prompt
    from zoomvlm.targets.hf import chat_prompt, generate_texts

    view = [[ds[0]["image"].convert("RGB")]]
    (expected,), _, _ = generate_texts(model.eval(), processor, [chat_prompt(processor, 1, cropper_prompt(
        "What is the total?"))], view, max_new_tokens=8)  # fmt: skip
    assert proposal.raw == expected
    try:
        assert proposal.boxes == (parse_percent_box(expected),) and proposal.error is None
    except BoxFormatError:
        assert proposal.boxes == (Box.full(),) and proposal.error and cropper.n_invalid == 1


@pytest.mark.slow
def test_sft_overfit_box_round_trips_through_the_saved_cropper(demo_samples, tmp_path, TINY):
    """30 SFT steps on ONE box make the greedy answer exactly that box; the cropper loaded from ``final/`` must
    return it parsed, with no error. Fails when saving (an untrained model writes garbage -> whole image) or the
    cropper's parsing (wrong box, or a valid box counted invalid) breaks."""
    from zoomvlm.cropvlm.cropper import VLMCropper
    from zoomvlm.train.sft import run_sft

    box = Box(0.1, 0.1, 0.9, 0.3)
    path = tmp_path / "one_box.jsonl"
    path.write_text(
        "".join(json.dumps(sft_record(s.id, str(s.image), s.question, box)) + "\n" for s in demo_samples[:6])
    )
    # lr 3e-3 constant, 30 steps of 3 rows: what a from-scratch 64 px model needs to memorise one 8-token box
    recipe = load_recipe("tiny_cpu_sft", TINY + [f"data.sft_file={path}", "trainer.max_steps=30",
                         "trainer.per_device_train_batch_size=3", "trainer.learning_rate=3e-3",
                         "trainer.lr_scheduler_type=constant", "trainer.warmup_steps=0", 'trainer.save_strategy="no"',
                         "trainer.dataloader_num_workers=0"], output_dir=tmp_path / "out")  # fmt: skip
    final = run_sft(recipe)
    cropper = VLMCropper(str(final), max_new_tokens=24)
    proposals = cropper.propose([s.load_image() for s in demo_samples[:2]], [s.question for s in demo_samples[:2]])
    assert [p.raw for p in proposals] == ["[10, 10, 90, 30]."] * 2
    assert [p.boxes for p in proposals] == [(box,)] * 2 and cropper.n_invalid == 0


def test_grpo_two_steps_change_the_model(tmp_path, TINY):
    from zoomvlm.train.grpo import build_grpo_trainer

    def length_reward(prompts=None, completions=(), **_):  # varies across a random model's samples
        return [float(len(completion_text(c))) for c in completions]

    recipe = load_recipe("tiny_cpu_grpo", TINY + [f"data.file={demo_data_path()}", "data.limit=4",
                         "trainer.max_steps=2", "trainer.per_device_train_batch_size=4",
                         "trainer.num_generations=2", "trainer.max_completion_length=8",
                         'trainer.save_strategy="no"', "trainer.learning_rate=1e-2"])  # fmt: skip
    trainer, _ = build_grpo_trainer(recipe, tmp_path / "grpo", reward_funcs=[format_reward, length_reward],
                                    reward_weights=[1.0, 1.0])  # fmt: skip
    assert trainer.args.per_device_train_batch_size // trainer.args.num_generations == 2  # 2 prompts per step
    before = _params(trainer.model)
    trainer.train()
    assert trainer.state.global_step == 2
    assert _changed(before, trainer.model) > 10


@pytest.mark.slow
def test_grpo_step_with_the_real_ocr_target(tmp_path, TINY):
    """One real GRPO step whose likelihood reward is the OCR reader's CTC score on 2 receipts."""
    from zoomvlm.train.grpo import build_grpo_trainer

    recipe = load_recipe("tiny_cpu_grpo", TINY + [f"data.file={demo_data_path()}", "data.limit=6",
                         "trainer.max_steps=1", "trainer.per_device_train_batch_size=4",
                         "trainer.num_generations=2", "trainer.max_completion_length=8",
                         'trainer.save_strategy="no"'])  # fmt: skip
    trainer, _ = build_grpo_trainer(recipe, tmp_path / "grpo")
    names = [getattr(f, "__name__", "") for f in trainer.reward_funcs]
    assert names == ["format", "likelihood"]
    trainer.train()
    logged = {k: v for entry in trainer.state.log_history for k, v in entry.items()}
    assert trainer.state.global_step == 1
    assert logged["rewards/format/mean"] == 0.0  # a random model writes no valid box...
    assert -100.0 <= logged["rewards/likelihood/mean"] < 0.0  # ...scored on the whole image by the reader
    assert trainer.reward_funcs[1].n_calls >= 1


def test_train_cli_sft_then_policy(sft_file, tmp_path, capsys, TINY):
    out = tmp_path / "cli_sft"
    rc = main(["train", "sft", "--config", "tiny_cpu_sft", "--output-dir", str(out),
               *[f"--set={s}" for s in TINY], f"--set=data.sft_file={sft_file}", "--set=trainer.max_steps=1",
               "--set=trainer.per_device_train_batch_size=2", "--set=trainer.save_steps=1"])  # fmt: skip
    assert rc == 0
    assert (out / "final" / "config.json").is_file() and (out / "checkpoint-1").is_dir()
    assert f"vlm:{out / 'final'}" in capsys.readouterr().out
    rc = main(["train", "grpo", "--config", "tiny_cpu_sft"])
    assert rc == 2 and "expected 'grpo'" in capsys.readouterr().err
    _check_publishable(out / "final", capsys, tmp_path)


def _check_publishable(final, capsys, tmp_path):
    """final/ is a publishable folder: model card + recipe + run metrics; `zoomvlm train push` uploads it as is
    (only huggingface_hub's two network calls are replaced)."""
    from unittest import mock

    import huggingface_hub

    card = (final / "README.md").read_text()
    run = json.loads((final / "zoomvlm_run.json").read_text())
    assert run["global_step"] == 1 and run["num_processes"] == 1 and run["train_loss"] > 0
    assert f"base_model: {json.loads((final / 'zoomvlm_recipe.json').read_text())['model']['init']}" in card
    assert "`tiny_cpu_sft` (bundled with zoomvlm)" in card and "licence: SROIE" in card  # its rows' images: receipts
    assert f"| train_loss | {run['train_loss']:.4g} |" in card
    with (
        mock.patch.object(huggingface_hub.HfApi, "create_repo") as create,
        mock.patch.object(huggingface_hub.HfApi, "upload_folder", return_value="https://hub/commit/1") as upload,
    ):
        assert main(["train", "push", str(final.parent), "me/tiny-cropper", "--private"]) == 0
    create.assert_called_once_with("me/tiny-cropper", private=True, exist_ok=True)
    kwargs = upload.call_args.kwargs
    assert kwargs["folder_path"] == str(final) and kwargs["repo_id"] == "me/tiny-cropper"
    assert "tiny_cpu_sft" in kwargs["commit_message"] and "https://hub/commit/1" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["train", "push", str(tmp_path / "empty"), "me/x"]) == 2
    assert "missing config.json, zoomvlm_recipe.json, README.md" in capsys.readouterr().err


def test_model_card_names_the_data_licence():
    from zoomvlm.train.model_card import data_licence, model_card

    assert "CC BY-NC 4.0" in data_licence("../shared/data/documents/train.jsonl")[1]
    assert "SROIE" in data_licence("../shared/data/receipts/train.jsonl")[1]
    r = load_recipe("tiny_cpu_crop_set_grpo")
    card = model_card(r, {"global_step": 3, "last_logged": {"rewards/awares/mean": 0.25}})
    assert "`awares` = R_ans - C_tool: R_ans `contains`, alpha_miss 0.5, alpha_use 0.1, lam 0.3" in card
    assert "| last logged rewards/awares/mean | 0.25 |" in card and "crop-set:PATH" in card


def test_model_card_keeps_the_licence_of_curated_data_and_of_the_base_model(tmp_path):
    """A curation of documents kept under runs/ is CC BY-NC by its images; GRPO on receipts from a checkpoint
    trained on documents inherits that licence; the target line appears only when a reward reads the target."""
    from pathlib import Path

    from zoomvlm.core.geometry import Box
    from zoomvlm.cropvlm.curation import sft_record
    from zoomvlm.train.model_card import data_licence, model_card

    docs = Path("/work/shared/data/documents/images/a.jpg")  # the folder name is what counts, not the file
    sft = tmp_path / "runs" / "curate" / "sft.jsonl"
    sft.parent.mkdir(parents=True)
    sft.write_text(json.dumps(sft_record("a", str(docs), "q?", Box(0.1, 0.1, 0.5, 0.5))) + "\n")
    assert "CC BY-NC 4.0" in data_licence(str(sft))[1]
    mixed = tmp_path / "mixed.jsonl"  # documents and an image of unknown origin: both named
    mixed.write_text(sft.read_text() + json.dumps({"image": "elsewhere/b.png"}) + "\n")
    assert "CC BY-NC 4.0" in data_licence(str(mixed))[1] and "UNKNOWN" in data_licence(str(mixed))[1]
    assert data_licence(str(tmp_path / "none.jsonl"))[1].startswith("UNKNOWN")
    init = tmp_path / "sft_docs" / "final"
    init.mkdir(parents=True)
    sft_recipe = load_recipe("tiny_cpu_sft", [f"data.sft_file={sft}"])
    (init / "README.md").write_text(model_card(sft_recipe, {}))
    grpo = load_recipe("tiny_cpu_grpo", [f"model.init={init}", "data.file=../shared/data/receipts/train.jsonl"])
    card = model_card(grpo, {})
    assert "- licence: SROIE" in card and "- inherited licence: CC BY-NC 4.0" in card
    assert "reward target `ocr`" in card  # tiny_cpu_grpo's likelihood reward reads the target
    user_reward = 'rewards={format: 1.0, "dist_train:length_reward": 1.0}'
    no_target = load_recipe("tiny_cpu_grpo", [f"model.init={init}", user_reward])
    assert "reward target" not in model_card(no_target, {})


def test_gpu_example_configs():
    """The documented GPU path: accelerate configs that accelerate itself reads, and a vLLM GRPO recipe whose batch
    arithmetic gives CropVLM's 16 prompts per update on those 4 processes (parsed here with use_vllm off: no CUDA)."""
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    root = Path(__file__).resolve().parent.parent / "configs" / "accelerate"
    ddp, zero2 = (
        load_config_from_file(str(root / "multi_gpu.yaml")),
        load_config_from_file(str(root / "deepspeed_zero2.yaml")),
    )
    assert ddp.distributed_type == "MULTI_GPU" and zero2.deepspeed_config["zero_stage"] == 2
    assert ddp.num_processes == zero2.num_processes == 4
    r = load_recipe("smolvlm256m_lora_grpo_vllm", ["trainer.use_vllm=false"])
    import yaml

    shipped = yaml.safe_load(bundled_recipes()["smolvlm256m_lora_grpo_vllm"].read_text())
    assert shipped["trainer"]["use_vllm"] is True and r.trainer.vllm_mode == "server"
    assert r.target.spec.startswith("openai:") and set(r.rewards) == {"format", "accuracy"}
    completions = r.trainer.per_device_train_batch_size * ddp.num_processes * r.trainer.gradient_accumulation_steps
    assert completions % r.trainer.num_generations == 0 and completions // r.trainer.num_generations == 16


def test_vllm_on_cpu_fails_early_saying_what_to_use():
    with pytest.raises(RecipeError, match="use_vllm needs CUDA GPUs .* drop trainer.use_vllm"):
        load_recipe("tiny_cpu_grpo", ["trainer.use_vllm=true"])


def test_box_preserving_crop_keeps_the_boxed_pixels_and_maps_the_box():
    import random

    from PIL import Image, ImageDraw

    from zoomvlm.core.geometry import Box
    from zoomvlm.train.sft import box_preserving_crop

    image = Image.new("RGB", (300, 200), "white")
    ImageDraw.Draw(image).rectangle([120, 80, 179, 109], fill="black")  # the object: 60 x 30 px
    box = Box(120 / 300, 80 / 200, 180 / 300, 110 / 200)
    rng = random.Random(0)
    sizes = set()
    for _ in range(20):
        crop, moved = box_preserving_crop(image, box, rng)
        sizes.add(crop.size)
        x0, y0, x1, y1 = moved.to_pixels(*crop.size)
        assert (x1 - x0, y1 - y0) == (60, 30)  # the object keeps its pixels...
        inside = crop.crop((x0, y0, x1, y1)).convert("L")
        assert inside.getextrema() == (0, 0)  # ...exactly under the mapped box
        assert crop.convert("L").histogram()[0] == 60 * 30  # and nothing of it is cut away
    assert len(sizes) > 10  # the crops differ
    crop, moved = box_preserving_crop(image, Box.full(), rng)
    assert crop.size == image.size and moved == Box.full()


def test_sft_dataset_augment_rewrites_the_box_in_the_crop_frame(sft_file):
    from zoomvlm.core.geometry import Budget, parse_percent_box
    from zoomvlm.train.sft import sft_dataset

    plain = sft_dataset(sft_file, budget=Budget(max_side=64))
    with pytest.raises(ValueError, match="augment"):
        sft_dataset(sft_file, budget=Budget(max_side=64), augment=1.5)
    augmented = sft_dataset(sft_file, budget=Budget(max_side=64), augment=1.0)
    row, aug = plain[0], augmented[0]
    assert aug["prompt"] == row["prompt"]
    old = parse_percent_box(row["completion"][-1]["content"])
    new = parse_percent_box(aug["completion"][-1]["content"])
    # the boxed region keeps its pixel size (to the 1 % rounding of the text format)
    assert abs((new.x1 - new.x0) * aug["image"].width - (old.x1 - old.x0) * row["image"].width) <= 2
    assert abs((new.y1 - new.y0) * aug["image"].height - (old.y1 - old.y0) * row["image"].height) <= 2
    assert aug["image"].size != row["image"].size or new != old
    # a row's crop is a function of (seed, epoch, row): the same again, new in the next epoch
    transform = augmented.format["format_kwargs"]["transform"]
    first = [augmented[i]["image"].size for i in range(4)]
    assert [augmented[i]["image"].size for i in range(4)] == first
    transform.epoch = 1
    assert [augmented[i]["image"].size for i in range(4)] != first
    assert "row" not in augmented[0]  # consumed by the transform


def test_a_bf16_recipe_on_cpu_loads_float32_weights_as_the_trainer_trains(tiny_smolvlm_init):
    import torch

    from zoomvlm.train.common import build_cropper
    from zoomvlm.train.recipe import ModelArgs

    if torch.cuda.is_available():
        pytest.skip("on a GPU the recipe's bf16 is used as asked")
    model, _, _ = build_cropper(ModelArgs(init=str(tiny_smolvlm_init), dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_a_torn_sft_line_is_named_and_stray_checkpoint_folders_are_not_resumed(sft_file, tmp_path):
    from zoomvlm.train.common import resume_checkpoint
    from zoomvlm.train.sft import sft_dataset

    lines = sft_file.read_text().splitlines()
    sft_file.write_text("\n".join([*lines[:2], lines[2][:40], *lines[3:]]) + "\n")  # a line cut by a crash
    with pytest.raises(ValueError, match=f"{sft_file}:3: not valid JSON"):
        sft_dataset(sft_file, budget=Budget(max_side=64))
    for name in ("checkpoint-5", "checkpoint-20", "checkpoint-20-backup", "checkpoint-30"):
        (tmp_path / "run" / name).mkdir(parents=True)
        if name != "checkpoint-30":  # killed while saving: the Trainer writes trainer_state.json last
            (tmp_path / "run" / name / "trainer_state.json").write_text("{}")
    (tmp_path / "run" / "checkpoint-99").write_text("not a folder")
    assert resume_checkpoint(tmp_path / "run") == str(tmp_path / "run" / "checkpoint-20")
    (tmp_path / "run" / "checkpoint-40").mkdir()  # killed WHILE writing trainer_state.json (written in place)
    (tmp_path / "run" / "checkpoint-40" / "trainer_state.json").write_text('{"best_metric": null, "log_hist')
    assert resume_checkpoint(tmp_path / "run") == str(tmp_path / "run" / "checkpoint-20")
    assert resume_checkpoint(tmp_path / "no-run-yet") is None


def test_a_trl_run_refuses_to_resume_its_checkpoints_under_another_recipe(tmp_path, TINY, sft_file):
    """The optimiser state and data order of checkpoint-N belong to the recipe they were trained with: a rerun with
    another reward or learning rate is refused (before the model loads); a longer run or other save / log settings
    continue."""
    from zoomvlm.train.common import RUN_RECIPE, check_resume
    from zoomvlm.train.sft import run_sft

    out = tmp_path / "run"
    base = TINY + [f"data.sft_file={sft_file}", "trainer.max_steps=2"]
    check_resume(out, load_recipe("tiny_cpu_sft", base))  # a fresh run: the recipe is written
    assert json.loads((out / RUN_RECIPE).read_text())["trainer"]["max_steps"] == 2
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
    check_resume(out, load_recipe("tiny_cpu_sft", [*base, "trainer.max_steps=4", "trainer.save_steps=1",
                                                   "trainer.gradient_checkpointing=false"]))  # fmt: skip
    check_resume(
        out, load_recipe("tiny_cpu_sft", [*base, "trainer.max_steps=4", "trainer.activation_checkpointing=true"])
    )
    check_resume(  # a nested memory-only setting (compared key by key) may change too
        out, load_recipe("tiny_cpu_sft", [*base, "trainer.max_steps=4",
                                          "trainer.gradient_checkpointing_kwargs={use_reentrant: false}"])
    )  # fmt: skip
    assert json.loads((out / RUN_RECIPE).read_text())["trainer"]["max_steps"] == 4
    changed = load_recipe("tiny_cpu_sft", [*base, "trainer.max_steps=4", "trainer.learning_rate=0.5"])
    with pytest.raises(RecipeError, match=r"trainer\.learning_rate: .* -> 0\.5"):
        run_sft(changed, out)
    assert json.loads((out / RUN_RECIPE).read_text())["trainer"]["max_steps"] == 4  # the saved recipe is kept
    with pytest.raises(RecipeError, match=r"data\.limit"):
        check_resume(out, load_recipe("tiny_cpu_sft", [*base, "data.limit=1"]))


def test_a_recipe_file_writing_1e_4_gets_the_number(tmp_path):
    import yaml

    tree = yaml.safe_load(bundled_recipes()["tiny_cpu_grpo"].read_text())
    text = yaml.safe_dump(tree).replace(f"learning_rate: {tree['trainer']['learning_rate']}", "learning_rate: 1e-4")
    (tmp_path / "r.yaml").write_text(text)
    assert yaml.safe_load(text)["trainer"]["learning_rate"] == "1e-4"  # YAML 1.1: a string
    assert load_recipe(str(tmp_path / "r.yaml")).trainer.learning_rate == 1e-4


def test_a_run_resumed_with_more_steps_follows_the_new_schedule_from_its_first_step(tmp_path, TINY):
    from transformers import TrainerCallback

    from zoomvlm.train.common import resume_checkpoint
    from zoomvlm.train.grpo import build_grpo_trainer

    def lrs(out, steps):
        recipe = load_recipe("tiny_cpu_grpo", TINY + [f"data.file={demo_data_path()}", "data.limit=4",
                             f"trainer.max_steps={steps}", "trainer.per_device_train_batch_size=4",
                             "trainer.num_generations=2", "trainer.max_completion_length=4", "trainer.save_steps=2",
                             "trainer.lr_scheduler_type=cosine", "trainer.warmup_steps=0",
                             "trainer.learning_rate=1e-4"])  # fmt: skip

        def length_reward(prompts=None, completions=(), **_):  # varies across samples: the steps do learn
            return [float(len(completion_text(c))) for c in completions]

        used = {}

        class RecordLr(TrainerCallback):  # the rate the optimiser steps with, not only what the log says
            def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
                used[state.global_step + 1] = optimizer.param_groups[0]["lr"]

        trainer, _ = build_grpo_trainer(recipe, out, reward_funcs=[length_reward], reward_weights=[1.0])
        trainer.add_callback(RecordLr())
        trainer.train(resume_from_checkpoint=resume_checkpoint(out))
        logged = {e["step"]: e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e}
        return logged, used

    straight, straight_used = lrs(tmp_path / "straight", 4)
    first, _ = lrs(tmp_path / "resumed", 2)  # a finished 2-step cosine: its optimiser state ends at lr 0
    resumed, resumed_used = lrs(tmp_path / "resumed", 4)
    assert first[1] == pytest.approx(straight[1])
    assert resumed[3] == pytest.approx(straight[3]) and resumed[3] > 0  # was 0.0: a step without learning
    assert resumed[4] == pytest.approx(straight[4])
    assert resumed_used == pytest.approx({3: straight_used[3], 4: straight_used[4]}) and resumed_used[3] > 0


def test_an_augmented_sft_run_resumed_from_a_checkpoint_ends_where_the_straight_run_does(tmp_path, TINY, sft_file):
    """The augmentation draws from torch's generator, which checkpoints save and restore: a private stream restarted
    on resume gave the rows after it the first rows' crops (weights 0.0155 apart after 4 steps)."""
    import shutil

    from safetensors.torch import load_file

    from zoomvlm.train.sft import run_sft

    # 4 rows in batches of 2: 2 steps per epoch, 6 steps = 3 epochs; resumed in the middle of the second
    sets = TINY + [f"data.sft_file={sft_file}", "data.limit=4", "data.augment=1.0", "trainer.max_steps=6",
                   "trainer.per_device_train_batch_size=2", "trainer.gradient_accumulation_steps=1",
                   "trainer.save_steps=1", "trainer.learning_rate=1e-2", "trainer.lr_scheduler_type=constant",
                   "trainer.warmup_steps=0", "trainer.save_total_limit=null", "trainer.dataloader_num_workers=0",
                   "trainer.logging_steps=1"]  # fmt: skip
    straight = run_sft(load_recipe("tiny_cpu_sft", sets), tmp_path / "straight")
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    for name in ("checkpoint-4", "checkpoint-5", "checkpoint-6", "final"):  # killed in step 4: resumes from 3
        shutil.rmtree(tmp_path / "resumed" / name)
    resumed = run_sft(load_recipe("tiny_cpu_sft", sets), tmp_path / "resumed")
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) == 0.0


def test_a_grpo_run_resumed_after_its_first_epoch_sees_the_prompts_the_straight_run_saw(tmp_path, TINY):
    """TRL's sampler draws every epoch's order from one generator seeded once; a resumed run built a fresh one and
    replayed epoch 1's order in epoch 3. The order now depends on (seed, epoch) only."""
    import shutil

    from zoomvlm.train.common import resume_checkpoint
    from zoomvlm.train.grpo import build_grpo_trainer

    seen: list[list[str]] = []

    def recording_reward(prompts=None, completions=(), question=None, image_path=None, **_):
        seen.append([f"{i}|{q}" for i, q in zip(image_path, question, strict=True)])
        return [float(len(completion_text(c))) for c in completions]

    def run(out, resume=False):
        recipe = load_recipe("tiny_cpu_grpo", TINY + [f"data.file={demo_data_path()}", "data.limit=4",
                             "trainer.max_steps=6", "trainer.per_device_train_batch_size=4",
                             "trainer.num_generations=2", "trainer.max_completion_length=4", "trainer.save_steps=1",
                             "trainer.save_total_limit=null", "trainer.learning_rate=1e-2"])  # fmt: skip
        trainer, _ = build_grpo_trainer(recipe, out, reward_funcs=[recording_reward], reward_weights=[1.0])
        seen.clear()
        trainer.train(resume_from_checkpoint=resume_checkpoint(out) if resume else None)
        return [list(q) for q in seen]

    straight = run(tmp_path / "straight")  # 4 prompts, 2 per step: 3 epochs of 2 steps
    assert len(straight) == 6 and straight[4:] != straight[:2]  # epoch 3's order is not epoch 1's
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    for step in (5, 6):  # killed after step 4, i.e. in the third epoch
        shutil.rmtree(tmp_path / "resumed" / f"checkpoint-{step}")
    resumed = run(tmp_path / "resumed", resume=True)
    assert resumed == straight[4:]


def test_an_awares_recipe_without_data_high_records_that_each_trajectory_kept_its_own(tmp_path):
    """It recorded the 768 px default while the trajectories' own high views (e.g. 1024 px) trained."""
    from zoomvlm.awares.policies import DEFAULT_HIGH, trained_high
    from zoomvlm.train.recipe import recipe_from_dict

    tree = {"kind": "awares_sft", "model": {"init": "m"}, "data": {"file": "t.jsonl"},
            "trainer": {"output_dir": str(tmp_path / "o")}}  # fmt: skip
    assert recipe_from_dict(tree).to_json()["data"]["high"] == "per record"
    tree["data"]["high"] = 1024
    assert recipe_from_dict(tree).to_json()["data"]["high"] == "side:1024"
    (tmp_path / "ckpt").mkdir()
    for high, expected in (("per record", DEFAULT_HIGH), ("side:1024", "side:1024")):
        recipe = {"kind": "awares_sft", "data": {"high": high}}
        (tmp_path / "ckpt" / "zoomvlm_recipe.json").write_text(json.dumps(recipe))
        assert str(trained_high(str(tmp_path / "ckpt"))) == str(expected)


def test_the_crop_set_policy_trains_on_the_view_it_sees_at_inference(tmp_path):
    """An image under the high view (640 x 480 under side:768) has a 320 x 240 low view at inference; training used
    a fixed 384 px view of it."""
    from PIL import Image

    from zoomvlm.awares.protocol import low_res_view
    from zoomvlm.data.samples import Sample
    from zoomvlm.train.grpo import grpo_dataset
    from zoomvlm.train.recipe import DataArgs

    data = DataArgs(policy="crop_set", high="side:768")
    for size in ((640, 480), (2000, 1500)):
        path = tmp_path / f"{size[0]}.png"
        Image.new("RGB", size, "white").save(path)
        sample = Sample("s", path, "Total?", ("1",), *size)
        (row,) = grpo_dataset([sample], data.view_budget, "crop_set", high=data.policy_high)
        assert row["image"].size == low_res_view(Image.open(path), data.policy_high).size
    assert row["image"].size == (384, 288) and DataArgs().policy_high is None


def test_rerunning_a_finished_run_keeps_its_metrics_and_an_extended_run_reports_the_whole_runs_loss(
    tmp_path, TINY, sft_file
):
    """The README's "rerun the same command": a finished run trains no step, and its final/ metrics and card stay
    the run's (they became zeros); extended from 2 to 4 steps, train_loss is the mean over all 4 logged steps."""
    from zoomvlm.train.sft import run_sft

    out = tmp_path / "run"
    base = TINY + [f"data.sft_file={sft_file}", "trainer.save_steps=1", "trainer.logging_steps=1",
                   "trainer.per_device_train_batch_size=2"]  # fmt: skip
    run_sft(load_recipe("tiny_cpu_sft", [*base, "trainer.max_steps=2"]), out)
    first = (out / "final" / "zoomvlm_run.json").read_text()
    card = (out / "final" / "README.md").read_text()
    assert json.loads(first)["train_loss"] > 0 and json.loads(first)["resumed_from_step"] == 0
    run_sft(load_recipe("tiny_cpu_sft", [*base, "trainer.max_steps=2"]), out)  # the same command again
    assert (out / "final" / "zoomvlm_run.json").read_text() == first
    assert (out / "final" / "README.md").read_text() == card
    run_sft(load_recipe("tiny_cpu_sft", [*base, "trainer.max_steps=4"]), out)  # extended
    run = json.loads((out / "final" / "zoomvlm_run.json").read_text())
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert run["global_step"] == 4 and run["resumed_from_step"] == 2 and len(losses) == 4
    assert run["train_loss"] == pytest.approx(sum(losses) / 4)
    assert "| resumed_from_step | 2 |" in (out / "final" / "README.md").read_text()
    # killed after its last checkpoint, before final/: the rerun rebuilds final/ from checkpoint-4, no step 5
    import shutil

    from safetensors.torch import load_file

    shutil.rmtree(out / "final")
    run_sft(load_recipe("tiny_cpu_sft", [*base, "trainer.max_steps=4"]), out)
    assert json.loads((out / "final" / "zoomvlm_run.json").read_text())["global_step"] == 4
    assert not (out / "checkpoint-5").exists()
    final, ckpt = load_file(out / "final" / "model.safetensors"), load_file(out / "checkpoint-4" / "model.safetensors")
    assert final.keys() == ckpt.keys() and all(torch.equal(final[k], ckpt[k]) for k in final)


def test_rerunning_a_finished_run_of_fractional_epochs_trains_nothing(tmp_path, TINY, sft_file):
    """max_steps unset, 1.5 epochs of 3 steps: transformers plans ceil(4.5) = 5 steps; the same command rerun
    resumed at step 5 took a step 6 (it counts 5 // 3 = 1 epoch and 2 steps done)."""
    from zoomvlm.train.sft import run_sft

    out = tmp_path / "run"
    recipe = load_recipe("tiny_cpu_sft", TINY + [f"data.sft_file={sft_file}", "trainer.save_steps=1",
                         "trainer.max_steps=-1", "trainer.num_train_epochs=1.5",
                         "trainer.per_device_train_batch_size=2"])  # fmt: skip
    run_sft(recipe, out)
    assert json.loads((out / "final" / "zoomvlm_run.json").read_text())["global_step"] == 5
    run_sft(recipe, out)
    assert json.loads((out / "final" / "zoomvlm_run.json").read_text())["global_step"] == 5
    assert not (out / "checkpoint-6").exists()
