"""Training throughput on 1 vs 2 processes (CPU DDP, gloo), side by side in one invocation.

    python benchmarks/train_scaling.py --out runs/train_scaling [--steps 20]

Runs the tiny SFT recipe and the tiny GRPO recipe (a from-scratch 64 px SmolVLM-architecture model, the demo
receipts; GRPO with the format reward and a length reward, so no reward target adds its own cost) for ``--steps``
optimizer steps, once as one process (``python -m zoomvlm.cli train ...``) and once as two
(``accelerate launch --multi_gpu --num_processes 2 -m zoomvlm.cli train ...``; without GPUs zoomvlm's trainer
configs run CPU DDP). The per-device batch is the same, so 2 processes train on twice the samples per step. Three
runs per recipe on the same cores: 1 process with torch threads = all cores, 1 process with 1 thread, and 2
processes with 1 thread each (accelerate's default); on a machine shared with other jobs the multi-threaded
single process can be far slower than its 1-thread run (threads wait for each other), so both baselines are shown.
Prints, per recipe: optimizer steps/s and samples/s of the training loop (TRL's ``train_steps_per_second``,
from ``final/zoomvlm_run.json``), wall seconds including start-up, and the 2-vs-1 ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _prepare(out: Path) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models as tiny

    from zoomvlm.cli.main import demo_data_path
    from zoomvlm.core.geometry import Box
    from zoomvlm.cropvlm.curation import sft_record
    from zoomvlm.data.samples import load_jsonl

    init = out / "init"
    if not (init / "config.json").is_file():
        tiny.save_tiny(*tiny.build_tiny_smolvlm(tile_size=64, longest_edge=64, image_splitting=False), init)
    samples = load_jsonl(demo_data_path())
    boxes = [Box(0.1, 0.1, 0.9, 0.3), Box(0.2, 0.4, 0.8, 0.5), Box(0.5, 0.6, 0.9, 0.7)]
    sft = out / "sft.jsonl"
    sft.write_text("".join(json.dumps(sft_record(s.id, str(s.image), s.question, boxes[i % 3])) + "\n"
                           for i, s in enumerate(samples)))  # fmt: skip
    return init, sft


def _run(processes: int, threads: int, args: list[str], out_dir: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}  # fmt: skip
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                     "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    cmd = [*launcher, "-m", "zoomvlm.cli", *args, "--output-dir", str(out_dir)]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    run = json.loads((out_dir / "final" / "zoomvlm_run.json").read_text())
    return {"steps_per_s": run["train_steps_per_second"], "wall_s": wall, "processes": run["num_processes"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="working folder (tiny init, data, runs)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run. Default: %(default)s")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    init, sft = _prepare(out)
    from zoomvlm.cli.main import demo_data_path

    common = ["--set", f"model.init={init}", "--set", "data.cropper_budget=64",
              "--set", f"trainer.max_steps={args.steps}", "--set", 'trainer.save_strategy="no"',
              "--set", "trainer.logging_steps=1000"]  # fmt: skip
    recipes = {
        # per-device batch 4 rows, no accumulation: one optimizer step = 4 rows per process
        "sft": (4, ["train", "sft", "--config", "tiny_cpu_sft", "--set", f"data.sft_file={sft}",
                    "--set", "trainer.per_device_train_batch_size=4", "--set", "trainer.dataloader_num_workers=0"]),
        # per-device batch 4 completions = 2 prompts x G=2, 8 new tokens each
        "grpo": (4, ["train", "grpo", "--config", "tiny_cpu_grpo", "--set", f"data.file={demo_data_path()}",
                     "--set", 'rewards={format: 1.0, "dist_train:length_reward": 1.0}',
                     "--set", "trainer.per_device_train_batch_size=4", "--set", "trainer.num_generations=2",
                     "--set", "trainer.max_completion_length=8"]),
    }  # fmt: skip
    print(f"{args.steps} optimizer steps per run, {os.cpu_count()} CPU cores for every run, per-device batch fixed")
    print("| recipe | processes x threads | steps/s | samples/s | wall s (incl. start-up) |")
    print("|---|---|---:|---:|---:|")
    cores = os.cpu_count() or 1
    runs = [(1, cores), (1, 1), (2, max(1, cores // 2))]
    ratios = []
    for name, (batch, recipe_args) in recipes.items():
        res = {(n, t): _run(n, t, recipe_args + common, out / f"{name}_{n}x{t}") for n, t in runs}
        for (n, t), r in res.items():
            assert r["processes"] == n, r
            samples = r["steps_per_s"] * batch * n
            print(f"| {name} | {n} x {t} | {r['steps_per_s']:.3f} | {samples:.2f} | {r['wall_s']:.1f} |")
        two = res[runs[2]]["steps_per_s"]
        ratios += [(name, f"1 x {t}", two / res[(1, t)]["steps_per_s"]) for _, t in runs[:2]]
    for name, base, ratio in ratios:
        print(f"{name}: 2 processes vs {base}: steps/s x{ratio:.2f}, samples/s x{2 * ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
