"""Cost of constrained decoding for the VLM cropper: ms and generated tokens per box, free vs constrained.

Both croppers (the same checkpoint; ``vlm@free`` and ``vlm``) answer the same questions in the same batches,
alternating batch by batch for ``--repeats`` rounds, so machine load hits both alike; the script prints the
median ms per box over rounds for each, their ratio, and tokens per box (end-of-turn included). Greedy by
default; ``--temperature 0.8`` samples as GRPO's rollouts do (seeded the same for both).

    python benchmarks/cropper_decoding_speed.py --n 32 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from zoomvlm.data.samples import load_jsonl
from zoomvlm.policies import load_policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/receipts/val.jsonl")
    parser.add_argument("--checkpoint", default="", help="cropper folder (default: the shipped `vlm`)")
    parser.add_argument("--n", type=int, default=32, help="questions (the first N of --data)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared 2-core "
                        "machine two threads per process measured ~20x slower from contention)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    samples = load_jsonl(args.data)[: args.n]
    images = [s.load_image() for s in samples]
    base = f"vlm:{args.checkpoint}" if args.checkpoint else "vlm"
    temp = f"t={args.temperature}" if args.temperature > 0 else ""
    specs = {"free": f"{base}@free" + (f",{temp}" if temp else ""), "constrained": base + (f"@{temp}" if temp else "")}
    policies = {k: load_policy(v) for k, v in specs.items()}
    for p in policies.values():  # warm-up: first-call allocations and the constrained vocabulary's mask cache
        p.propose(images[:1], [samples[0].question])
    ms_per_box: dict[str, list[float]] = {k: [] for k in policies}
    tokens: dict[str, tuple[int, int]] = {}
    failures: dict[str, int] = {}
    for _ in range(args.repeats):
        seconds = dict.fromkeys(policies, 0.0)
        start_counts = {k: (p.n_tokens, p.n_boxes, p.n_invalid) for k, p in policies.items()}
        for i in range(0, len(samples), args.batch_size):
            batch = slice(i, i + args.batch_size)
            for k, p in policies.items():
                torch.manual_seed(i)
                t = time.perf_counter()
                p.propose(images[batch], [s.question for s in samples[batch]])
                seconds[k] += time.perf_counter() - t
        for k, p in policies.items():
            now = (p.n_tokens, p.n_boxes, p.n_invalid)
            n_tok, n_box, n_bad = (a - b for a, b in zip(now, start_counts[k], strict=True))
            ms_per_box[k].append(1000 * seconds[k] / n_box)
            tokens[k], failures[k] = (n_tok, n_box), n_bad
    print(f"\n{len(samples)} receipts val questions, batch {args.batch_size}, {args.repeats} alternating rounds, "
          f"{'greedy' if not temp else temp}, torch threads {torch.get_num_threads()}\n")  # fmt: skip
    print("| decoding | policy | ms/box (median) | tokens/box | format failures (last round) |")
    print("|---|---|---:|---:|---:|")
    for k in policies:
        n_tok, n_box = tokens[k]
        print(f"| {k} | `{specs[k]}` | {statistics.median(ms_per_box[k]):.0f} | {n_tok / n_box:.1f} | "
              f"{failures[k]} of {len(samples)} |")  # fmt: skip
    ratio = statistics.median(ms_per_box["constrained"]) / statistics.median(ms_per_box["free"])
    print(f"\nconstrained / free ms per box: {ratio:.2f}")


if __name__ == "__main__":
    main()
