"""What the learned policies that are a small VLM writing its action as text have in common.

CropVLM's cropper (:class:`~zoomvlm.cropvlm.cropper.VLMCropper`: a box) and AwaRes's external crop-set policy
(:class:`~zoomvlm.awares.policies.CropSetPolicy`: ``NO_CROPS`` / ``GET_CROPS: [...]``) both load a VLM checkpoint,
read the settings their training recipe stored beside it, write one action per question from one view, and count
how many actions were invalid. Only the view, the prompt and the parser differ; those stay with the method.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

logger = logging.getLogger(__name__)

__all__ = ["SmallVLMPolicy", "trained_setting"]


def trained_setting(checkpoint: str, section: str, key: str):
    """The value of ``section.key`` in the recipe a zoomvlm training run saved with ``checkpoint``
    (``zoomvlm_recipe.json``), or ``None`` (no such file, e.g. a hub id, or no such key)."""
    recipe = Path(checkpoint).expanduser() / "zoomvlm_recipe.json"
    if not recipe.is_file():
        return None
    return (json.loads(recipe.read_text()).get(section) or {}).get(key)


class SmallVLMPolicy:
    """Base of the policies whose action is the text a small VLM writes.

    Args:
        checkpoint: hub id or local ``save_pretrained`` folder.
        max_new_tokens: the action's length limit.
        device: where to load it (default CUDA if available).
        model, processor: an already loaded pair (then ``checkpoint`` only names it).
        name: the policy's name in results.

    Counters, for reports and tests: :attr:`n_total` actions written, :attr:`n_invalid` of them unparseable (the
    subclass decides what an invalid action falls back to and says so), :attr:`n_tokens` tokens generated.
    """

    def __init__(self, checkpoint: str, *, max_new_tokens: int, device=None, model=None, processor=None, name: str):
        if model is None or processor is None:
            from zoomvlm.targets.hf import load_vlm

            model, processor = load_vlm(checkpoint, device=device)
        self.model, self.processor = model, processor
        self.checkpoints = (str(checkpoint),)  # fingerprinted by run_eval (a hub id is not local: skipped)
        self.max_new_tokens = max_new_tokens
        self.name = name
        self.n_invalid = 0
        self.n_total = 0
        self.n_tokens = 0

    def write_actions(self, views: Sequence[Image.Image], texts: Sequence[str], **gen_kwargs) -> list[str]:
        """One action text per ``(view, user text)``: one chat turn with one image, batched ``generate``.

        ``gen_kwargs`` go to ``model.generate`` (sampling, logits processors). Counts ``n_total`` and ``n_tokens``.
        """
        from zoomvlm.targets import hf

        prompts = [hf.chat_prompt(self.processor, 1, t) for t in texts]
        out, _, n_generated = hf.generate_texts(self.model, self.processor, prompts, [[v] for v in views],
                                                max_new_tokens=self.max_new_tokens, **gen_kwargs)  # fmt: skip
        self.n_total += len(out)
        self.n_tokens += sum(n_generated)
        return out

    def count_invalid(self, text: str, error: str, fallback: str) -> None:
        """Count one invalid action (``error`` says why) and log what the policy did instead."""
        self.n_invalid += 1
        logger.debug("%s: action %r is invalid (%s); %s", self.name, text, error, fallback)
