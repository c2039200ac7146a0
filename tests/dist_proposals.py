"""Test support: the proposal-policy GRPO loop (``train_grpo``) in every process of a ``torchrun`` launch, on the toy
problem of ``tests/test_proposals.py`` (a known best candidate per question, a reward that needs no OCR).

    torchrun --nproc_per_node 2 tests/dist_proposals.py RECORD_DIR OUT_DIR STEPS

Writes into RECORD_DIR: ``params-rank{R}.txt`` (``sha256`` of that rank's parameters after training),
``final-writes.txt`` (one line per process that wrote ``final/``) and ``reward-rank{R}.json`` (expected reward of
the seed and of the trained scorer). Only this script patches anything (who calls ``save_scorer``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from test_proposals import toy_items

from zoomvlm.cropvlm import proposal_grpo
from zoomvlm.cropvlm.proposals import RegionScorer


def main() -> int:
    record, out, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    record.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    real_save = proposal_grpo.save_scorer

    def save_scorer(model, path, *args, **kwargs):
        with (record / "final-writes.txt").open("a") as f:
            f.write(f"{rank}\n")
        return real_save(model, path, *args, **kwargs)

    proposal_grpo.save_scorer = save_scorer
    items, rewards = toy_items()
    torch.manual_seed(0)
    seed = RegionScorer().eval()

    def reward_fn(item_idx, actions):
        return [float(rewards[i][a]) for i, a in zip(item_idx, actions, strict=True)]

    cfg = proposal_grpo.GRPOConfig(steps=steps, prompts_per_step=8, group=6, beta=0.01, lr=1e-2, save_every=5)
    trained = proposal_grpo.train_grpo(seed, items, reward_fn, cfg, out, progress=False)
    digest = hashlib.sha256()
    for name, p in sorted(trained.named_parameters()):
        digest.update(name.encode())
        digest.update(p.detach().float().contiguous().numpy().tobytes())
    (record / f"params-rank{rank}.txt").write_text(digest.hexdigest() + "\n")
    before = proposal_grpo.expected_reward(seed, items, rewards)
    after = proposal_grpo.expected_reward(trained, items, rewards)
    (record / f"reward-rank{rank}.json").write_text(json.dumps({"before": before, "after": after}))
    assert np.isfinite(after)
    return 0


if __name__ == "__main__":
    sys.exit(main())
