"""Training on 2 processes (CPU DDP, gloo) with ``accelerate launch``: SFT and GRPO on the tiny recipes.

Each test launches ``zoomvlm train`` twice on 2 processes (tests/dist_train.py records each rank's parameters and who
wrote ``final/``): 1 step with a checkpoint, then resumed to step 2. Checked: both ranks ran under one process group
(``num_processes`` 2, each rank saw half the data), their parameters are identical after the steps (gradients were
averaged: the ranks trained on different rows), ``final/`` was written by rank 0 only, and the second launch resumed
from ``checkpoint-1`` (its history carries step 1 exactly as the first launch logged it).

Launcher: ``accelerate launch --multi_gpu --num_processes 2`` (torch.distributed's launcher; with no GPU our trainer
configs switch to CPU DDP). ``accelerate launch --cpu --num_processes 2`` starts ONE process in accelerate 1.15
unless MPI is set up (``--mpirun_hostfile``), so it is not what the README gives.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zoomvlm.cli.main import demo_data_path

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # two 2-process launches per test (~30 s each on 2 idle cores)


def launch(record: Path, args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "tests" / "dist_train.py"), str(record), *args]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def _check(out: Path, record: Path, first_launch_writes: str, licence: str) -> None:
    assert first_launch_writes == "0\n"  # final/ written once, by the main process
    assert (record / "final-writes.txt").read_text() == "0\n0\n"
    ranks = [(record / f"params-rank{r}.txt").read_text().split() for r in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0][0] == "2", ranks  # same step, same parameters on both ranks
    run = json.loads((out / "final" / "zoomvlm_run.json").read_text())
    assert run["num_processes"] == 2 and run["global_step"] == 2
    # Resumed: step 1 of the second launch's history is the first launch's, read back from checkpoint-1.
    first = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["log_history"]
    second = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    step1 = [e for e in first if e.get("step") == 1 and "loss" in e]
    assert step1 and [e for e in second if e.get("step") == 1 and "loss" in e] == step1
    card = (out / "final" / "README.md").read_text()
    assert "base_model:" in card and licence in card and "| global_step | 2 |" in card


def _run_twice(tmp_path: Path, args: list[str]) -> tuple[Path, Path, str]:
    out, record = tmp_path / "out", tmp_path / "record"
    launch(record, [*args, "--output-dir", str(out), "--set", "trainer.max_steps=1", "--set", "trainer.save_steps=1"])
    writes = (record / "final-writes.txt").read_text()
    assert (out / "checkpoint-1").is_dir()
    launch(record, [*args, "--output-dir", str(out), "--set", "trainer.max_steps=2", "--set", "trainer.save_steps=1"])
    return out, record, writes


def test_sft_on_two_processes(tmp_path, demo_samples, tiny_smolvlm_init):
    from zoomvlm.core.geometry import Box
    from zoomvlm.cropvlm.curation import sft_record

    sft = tmp_path / "sft.jsonl"
    boxes = [Box(0.1, 0.1, 0.9, 0.3), Box(0.2, 0.4, 0.8, 0.5), Box(0.5, 0.6, 0.9, 0.7)]
    sft.write_text("".join(json.dumps(sft_record(s.id, str(s.image), s.question, boxes[i % 3])) + "\n"
                           for i, s in enumerate(demo_samples[:8])))  # fmt: skip
    out, record, writes = _run_twice(tmp_path, [
        "train", "sft", "--config", "tiny_cpu_sft", "--set", f"model.init={tiny_smolvlm_init}",
        "--set", "data.cropper_budget=64", "--set", f"data.sft_file={sft}",
        "--set", "trainer.per_device_train_batch_size=2", "--set", "trainer.dataloader_num_workers=0",
        "--set", "trainer.logging_steps=1",
    ])  # fmt: skip
    _check(out, record, writes, licence="licence: SROIE")  # a file outside the bundled data, of its receipts' images


def test_grpo_on_two_processes(tmp_path, tiny_smolvlm_init):
    out, record, writes = _run_twice(tmp_path, [
        "train", "grpo", "--config", "tiny_cpu_grpo", "--set", f"model.init={tiny_smolvlm_init}",
        "--set", "data.cropper_budget=64", "--set", f"data.file={demo_data_path()}", "--set", "data.limit=4",
        # a user reward by dotted path that varies across samples (the OCR reward would take minutes here)
        "--set", 'rewards={format: 1.0, "dist_train:length_reward": 1.0}',
        # 2 prompts x G=2 per step over 2 processes; TRL gathers all ranks' rewards before the group advantages
        "--set", "trainer.per_device_train_batch_size=2", "--set", "trainer.num_generations=2",
        "--set", "trainer.max_completion_length=8", "--set", "trainer.learning_rate=1e-2",
    ])  # fmt: skip
    _check(out, record, writes, licence="SROIE 2019")  # the bundled receipts
    run = json.loads((out / "final" / "zoomvlm_run.json").read_text())
    assert run["last_logged"]["reward_std"] > 0 and "rewards/length_reward/mean" in run["last_logged"]


def test_grpo_resumed_mid_epoch_two_on_two_processes_trains_on_the_same_prompts(tmp_path, tiny_smolvlm_init):
    """4 prompts, 2 per step over 2 processes: 2 steps per epoch. A run resumed from checkpoint-3 (in epoch 2) must
    train step 4 on the prompts the uninterrupted run did; accelerate's shard / skip wrappers did not forward
    ``set_epoch``, so the resumed epoch followed epoch 1's order (a prompt twice, another never)."""
    args = ["train", "grpo", "--config", "tiny_cpu_grpo", "--set", f"model.init={tiny_smolvlm_init}",
            "--set", "data.cropper_budget=64", "--set", f"data.file={demo_data_path()}", "--set", "data.limit=4",
            "--set", 'rewards={format: 1.0, "dist_train:prompt_reward": 1.0}',
            "--set", "trainer.per_device_train_batch_size=2", "--set", "trainer.num_generations=2",
            "--set", "trainer.max_completion_length=4", "--set", "trainer.save_steps=1",
            "--set", "trainer.save_total_limit=null", "--set", "trainer.max_steps=4"]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch(tmp_path / "rec_straight", [*args, "--output-dir", str(straight)])
    resumed.mkdir()
    for name in ("checkpoint-1", "checkpoint-2", "checkpoint-3", "zoomvlm_recipe.json"):
        src = straight / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, resumed / name)
    launch(tmp_path / "rec_resumed", [*args, "--output-dir", str(resumed)])

    def calls(record: str, rank: int) -> list[list[str]]:  # the prompts of each reward call (one per step)
        return [json.loads(x) for x in (tmp_path / record / f"prompts-rank{rank}.jsonl").read_text().splitlines()]

    for rank in (0, 1):
        seen, again = calls("rec_straight", rank), calls("rec_resumed", rank)
        assert len(seen) == 4 and len(again) == 1  # the resumed launch ran step 4 only
        assert again[0] == seen[3], (rank, seen, again)
    epoch_two = {q for rank in (0, 1) for step in calls("rec_straight", rank)[2:] for q in step}
    assert len(epoch_two) == 4  # epoch 2 (steps 3-4) saw each of the 4 prompts once (G = 2 copies each)


@pytest.mark.parametrize("stage", ["awares-sft", "awares-grpo"])
def test_awares_trainers_on_two_processes(stage, tmp_path, demo_samples, tiny_qwen25vl_init):
    """The AwaRes subclasses (weighted SFT loss; multi-turn GRPO rollout with its own gathers) on 2 processes: one
    launch of 2 steps, same checks except resuming (that is the Trainer's, tested above)."""
    data = tmp_path / "trajectories.jsonl"
    crops = [[], ["3"], ["0", "5"], []]
    data.write_text("".join(json.dumps({"id": s.id, "image": str(s.image), "question": s.question,
                                        "answers": list(s.answers), "answer": s.answers[0],
                                        "label": "HR" if c else "LR", "crops": c, "high": "side:224"}) + "\n"
                            for s, c in zip(demo_samples[:4], crops, strict=True)))  # fmt: skip
    config = "qwen25vl7b_awares_sft" if stage == "awares-sft" else "qwen25vl7b_awares_grpo"
    args = ["train", stage, "--config", config, "--output-dir", str(tmp_path / "out"),
            "--set", f"model.init={tiny_qwen25vl_init}", "--set", "model.dtype=float32", "--set", "model.lora=null",
            "--set", f"data.file={data}", "--set", "trainer.per_device_train_batch_size=2",
            "--set", "trainer.gradient_accumulation_steps=1", "--set", "trainer.max_steps=2",
            "--set", "trainer.gradient_checkpointing=false", "--set", 'trainer.save_strategy="no"']  # fmt: skip
    if stage == "awares-grpo":
        args += ["--set", "awares.answer_reward=contains", "--set", "trainer.num_generations=2",
                 "--set", "trainer.max_completion_length=6"]  # fmt: skip
    record = tmp_path / "record"
    launch(record, args)
    assert (record / "final-writes.txt").read_text() == "0\n"
    ranks = [(record / f"params-rank{r}.txt").read_text().split() for r in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0][0] == "2", ranks
    assert json.loads((tmp_path / "out" / "final" / "zoomvlm_run.json").read_text())["num_processes"] == 2


def test_proposal_grpo_on_two_processes(tmp_path):
    """The proposal-policy GRPO loop (a torch loop, not TRL) on 2 processes (``torchrun``, CPU DDP over gloo), on the
    toy problem of tests/test_proposals.py: 10 steps, then resumed to 20 from the step-10 checkpoint."""
    out, record = tmp_path / "out", tmp_path / "record"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip

    def torchrun(steps: int) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "tests" / "dist_proposals.py"), str(record), str(out), str(steps)]  # fmt: skip
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-4000:]

    torchrun(10)
    assert (record / "final-writes.txt").read_text() == "0\n"  # final/ written once, by rank 0
    first = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in first] == list(range(1, 11))  # one log line per step, not one per rank
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 10
    torchrun(20)
    assert (record / "final-writes.txt").read_text() == "0\n0\n"
    ranks = [(record / f"params-rank{r}.txt").read_text() for r in (0, 1)]
    assert ranks[0] == ranks[1], ranks  # DDP averaged the gradients: identical parameters on both ranks
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 21)) and log[:10] == first  # resumed at step 11
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 20
    reward = json.loads((record / "reward-rank0.json").read_text())
    assert reward["after"] > reward["before"] + 0.3, reward  # towards the known optimum (expected reward 1.0)
    assert (out / "final" / "scorer.pt").exists()
