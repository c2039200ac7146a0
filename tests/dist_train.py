"""Test support: run ``zoomvlm train ...`` in every process of an ``accelerate launch``, recording what the
multi-process tests check (``tests/test_distributed.py``).

    accelerate launch --cpu --num_processes 2 tests/dist_train.py RECORD_DIR train sft --config ... --set ...

Writes into RECORD_DIR: ``params-rank{R}.txt`` (``global_step sha256`` of that rank's parameters when training
ends, before ``final/`` is saved) and ``final-writes.txt`` (one line per process that wrote ``final/``'s model).
Only this script patches anything; the library runs unchanged. ``length_reward`` is a user reward for GRPO
recipes, named by dotted path (``dist_train:length_reward``) like any user's own reward; ``prompt_reward`` also
records the prompts each rank trained on (``prompts-rank{R}.jsonl``).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path


def length_reward(prompts=None, completions=(), **_) -> list[float]:
    """Completion length in characters: varies across a random model's samples, so advantages are non-zero."""
    from zoomvlm.core.prompts import completion_text

    return [float(len(completion_text(c))) for c in completions]


def prompt_reward(prompts=None, completions=(), question=(), image_path=(), **_) -> list[float]:
    """:func:`length_reward`, and each call's prompts appended as one JSON line to ``prompts-rank{R}.jsonl`` in
    the record folder (which prompts each rank trained on, step by step)."""
    import json

    rank = os.environ.get("RANK", "0")
    with (Path(os.environ["ZOOMVLM_TEST_RECORD"]) / f"prompts-rank{rank}.jsonl").open("a") as f:
        f.write(json.dumps([f"{Path(p).name}|{q}" for p, q in zip(image_path, question, strict=True)]) + "\n")
    return length_reward(prompts, completions)


def main() -> int:
    record, argv = Path(sys.argv[1]), sys.argv[2:]
    record.mkdir(parents=True, exist_ok=True)
    os.environ["ZOOMVLM_TEST_RECORD"] = str(record)
    rank = int(os.environ.get("RANK", "0"))

    import transformers

    from zoomvlm.awares import grpo as awares_grpo
    from zoomvlm.awares import weighted_sft
    from zoomvlm.train import common, grpo, sft

    real_save = transformers.PreTrainedModel.save_pretrained

    def save_pretrained(self, path, *args, **kwargs):
        if Path(path).name == common.FINAL:
            with (record / "final-writes.txt").open("a") as f:
                f.write(f"{rank}\n")
        return real_save(self, path, *args, **kwargs)

    transformers.PreTrainedModel.save_pretrained = save_pretrained
    real_final = common.save_final

    def save_final(trainer, *args, **kwargs):
        digest = hashlib.sha256()
        model = trainer.accelerator.unwrap_model(trainer.model)
        for name, p in sorted(model.named_parameters()):
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        (record / f"params-rank{rank}.txt").write_text(f"{trainer.state.global_step} {digest.hexdigest()}\n")
        return real_final(trainer, *args, **kwargs)

    for module in (sft, grpo, weighted_sft, awares_grpo):
        module.save_final = save_final
    from zoomvlm.cli.main import main as cli

    return cli(argv)


if __name__ == "__main__":
    sys.exit(main())
