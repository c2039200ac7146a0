"""Any transformers image-text-to-text model as a target (SmolVLM/Idefics3, Qwen2.5-VL, LLaVA-1.5, ...).

One request = one user turn: its views as images, then the target prompt; greedy decoding. Batches are
left-padded so every row's answer starts at the same position. The same chat-formatting helpers serve
the learned cropper (:mod:`zoomvlm.cropvlm.cropper`), so prompts are built one way everywhere.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
from PIL import Image

from zoomvlm.core.geometry import Budget
from zoomvlm.core.prompts import target_prompt
from zoomvlm.targets.base import Generation, TargetRequest, Usage, require_answers

logger = logging.getLogger(__name__)

__all__ = ["HFTarget", "answer_text", "chat_prompt", "generate_texts", "load_vlm"]


def load_vlm(model_id: str, device: str | None = None, dtype: str | torch.dtype = "auto"):
    """``(model, processor)`` for a hub id or a local ``save_pretrained`` folder, model in eval mode.

    A folder holding a peft LoRA adapter (``adapter_config.json``) is loaded onto its base model and merged.

    ``device=None`` picks CUDA when available, else CPU. On machines without torchvision the processor is
    rebuilt by :func:`zoomvlm.targets.hf_compat.load_processor`.

    Raises:
        FileNotFoundError: ``model_id`` is a local path (starts with ``/``, ``.`` or ``~``) that does not exist.
        OSError: the model cannot be found (offline and not cached, or a wrong hub id).
    """
    import json
    from pathlib import Path

    from transformers import AutoModelForImageTextToText

    from zoomvlm.targets.hf_compat import load_processor

    if model_id.startswith(("/", ".", "~")) and not Path(model_id).expanduser().exists():
        raise FileNotFoundError(f"checkpoint folder not found: {model_id}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    adapter = Path(model_id).expanduser() / "adapter_config.json"
    if adapter.is_file():  # a peft LoRA folder: load its base, apply and merge the adapter
        from peft import PeftModel

        base_id = json.loads(adapter.read_text())["base_model_name_or_path"]
        base = AutoModelForImageTextToText.from_pretrained(base_id, dtype=dtype)
        model = PeftModel.from_pretrained(base, str(adapter.parent)).merge_and_unload()
        has_processor = any(
            (adapter.parent / f).is_file() for f in ("processor_config.json", "preprocessor_config.json")
        )
        processor = load_processor(str(adapter.parent) if has_processor else base_id)
        return model.to(device).eval(), processor
    processor = load_processor(model_id)
    model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=dtype).to(device).eval()
    return model, processor


def chat_prompt(processor, n_images: int, text: str) -> str:
    """The chat-formatted prompt string for one user turn with ``n_images`` images then ``text``,
    ending with the generation prompt (the assistant's turn opener)."""
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def answer_text(processor, answer: str, end_of_turn: bool = False) -> str:
    """What follows the generation prompt when the assistant says ``answer``.

    SmolVLM/Idefics3 and LLaVA templates put a space after ``Assistant:``/``ASSISTANT:``; Qwen's ChatML
    starts the answer right after ``<|im_start|>assistant\\n``. With ``end_of_turn`` the token the model
    is trained to end its turn with is appended (``<end_of_utterance>``, ``<|im_end|>``, or the
    tokenizer's eos for LLaVA and unknown families), as SFT targets need; likelihood scoring leaves it out.
    """
    name = type(processor).__name__
    if name.startswith("Qwen"):
        return answer + ("<|im_end|>" if end_of_turn else "")
    if name in ("SmolVLMProcessor", "Idefics3Processor"):
        return f" {answer}" + ("<end_of_utterance>" if end_of_turn else "")
    return f" {answer}" + (processor.tokenizer.eos_token if end_of_turn else "")


def _image_token_id(model, processor) -> int | None:
    for owner in (processor, model.config):
        for attr in ("image_token_id", "image_token_index"):
            value = getattr(owner, attr, None)
            if isinstance(value, int):
                return value
    return None


def _encode(processor, prompts: list[str], images: list[list[Image.Image]], device) -> dict:
    tokenizer = processor.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        kwargs = {"images": images} if any(images) else {}
        inputs = processor(text=prompts, padding=True, return_tensors="pt", **kwargs)
    finally:
        tokenizer.padding_side = side
    return inputs.to(device)


@torch.inference_mode()
def generate_texts(
    model, processor, prompts: list[str], images: list[list[Image.Image]], max_new_tokens: int = 32, **gen_kwargs
) -> tuple[list[str], dict, list[int]]:
    """Generate one continuation per prompt (greedy unless ``gen_kwargs`` say otherwise).

    Args:
        prompts: chat-formatted prompt strings (see :func:`chat_prompt`), one per row.
        images: the images of each row, in the order of the image placeholders in its prompt.

    Returns:
        ``(texts, inputs, n_generated)``: the decoded continuations (special tokens removed, stripped), the
        processor outputs that were fed to the model, and the number of non-padding tokens generated per
        row (where padding and end-of-turn share an id, the end token is not counted).
    """
    inputs = _encode(processor, prompts, images, model.device)
    gen_kwargs.setdefault("do_sample", False)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, **gen_kwargs)
    new = out[:, inputs["input_ids"].shape[1] :]
    texts = processor.batch_decode(new, skip_special_tokens=True)
    pad_id = processor.tokenizer.pad_token_id
    n_generated = new.ne(pad_id).sum(-1).tolist() if pad_id is not None else [new.shape[1]] * len(texts)
    return [t.strip() for t in texts], inputs, n_generated


class HFTarget:
    """A local transformers VLM as a :class:`~zoomvlm.targets.base.Target`.

    Args:
        model_id: hub id (e.g. ``HuggingFaceTB/SmolVLM-256M-Instruct``, ``Qwen/Qwen2.5-VL-7B-Instruct``,
            ``llava-hf/llava-1.5-7b-hf``) or local folder.
        budget: per-view budget applied BEFORE the processor; ``None`` = native, i.e. only the processor's
            own resizing (its ``longest_edge`` / ``max_pixels``).
        max_new_tokens: generation limit; answers are "very brief" by prompt.
        device, dtype: where and how to load (default: CUDA if available, checkpoint dtype).
        model, processor: an already loaded pair (then ``model_id`` is only the name).

    Usage accounting: ``view_pixels`` are the pixels the vision encoder received for each view, read off
    the image processor's own output (``image_grid_thw`` x patch area for Qwen2-VL, the pixel mask of real
    tiles for Idefics3/SmolVLM, tensor size otherwise); ``visual_tokens`` counts the image placeholder
    tokens in ``input_ids``; ``prompt_tokens``/``completion_tokens`` are the non-pad token counts.
    """

    def __init__(
        self,
        model_id: str,
        budget: Budget | int | str | None = None,
        max_new_tokens: int = 32,
        device: str | None = None,
        dtype: str | torch.dtype = "auto",
        model=None,
        processor=None,
    ):
        self.budget = Budget.parse(budget)
        self.max_new_tokens = max_new_tokens
        if model is None or processor is None:
            model, processor = load_vlm(model_id, device=device, dtype=dtype)
        self.model, self.processor = model, processor
        self.image_token_id = _image_token_id(model, processor)
        self.name = f"hf:{model_id}@{self.budget}"

    def _prepare(self, requests: Sequence[TargetRequest], with_answers: bool = False):
        views = [r.views(self.budget) for r in requests]
        prompts = [
            chat_prompt(self.processor, len(v), target_prompt(r.question))
            for v, r in zip(views, requests, strict=True)
        ]
        if with_answers:
            answers = require_answers(requests)
            prompts = [p + answer_text(self.processor, a) for p, a in zip(prompts, answers, strict=True)]
        return views, prompts

    def processed_pixels(self, view: Image.Image) -> int:
        """Pixels of ``view`` as the vision encoder receives it, after the image processor's resizing."""
        out = self.processor.image_processor(images=[view], return_tensors="pt")
        if "image_grid_thw" in out:  # Qwen2-VL family: patches of patch_size^2 pixels
            patch = getattr(self.processor.image_processor, "patch_size", 14)
            return int(out["image_grid_thw"].prod(dim=-1).sum()) * patch * patch
        if "pixel_attention_mask" in out:  # Idefics3/SmolVLM: real (non-padding) pixels of all tiles
            return int(out["pixel_attention_mask"].sum())
        pv = out["pixel_values"]
        return int(pv.numel() // pv.shape[-3]) if pv.dim() >= 3 else int(pv.numel())

    def _usage(
        self, inputs: dict, row: int, views: list[Image.Image], seconds: float, completion: int | None
    ) -> Usage:
        ids = inputs["input_ids"][row]
        mask = inputs["attention_mask"][row].bool()
        visual = int((ids[mask] == self.image_token_id).sum()) if self.image_token_id is not None else None
        return Usage(
            view_pixels=tuple(self.processed_pixels(v) for v in views),
            visual_tokens=visual,
            prompt_tokens=int(mask.sum()),
            completion_tokens=completion,
            seconds=seconds,
        )

    def generate(self, requests: Sequence[TargetRequest]) -> list[Generation]:
        """Greedy answers, one per request, batched in one ``model.generate`` call."""
        if not requests:
            return []
        start = time.perf_counter()
        views, prompts = self._prepare(requests)
        texts, inputs, n_generated = generate_texts(
            self.model, self.processor, prompts, views, max_new_tokens=self.max_new_tokens
        )
        seconds = (time.perf_counter() - start) / len(requests)
        return [
            Generation(text, self._usage(inputs, i, views[i], seconds, n_generated[i])) for i, text in enumerate(texts)
        ]

    @torch.inference_mode()
    def loglikelihood(self, requests: Sequence[TargetRequest]) -> list[float]:
        """Teacher-forced ``sum_t log p(answer_t | views, question, answer_<t)`` in nats, one forward pass.

        The answer follows the generation prompt as the assistant would write it (:func:`answer_text`);
        its tokens are the tail of the full sequence beyond the prompt's tokens, and only they are summed
        (CropVLM's likelihood reward). Rows are left-padded, so answers end at the last position.

        Raises:
            ValueError: a request without an answer, or an answer that tokenizes to nothing.
        """
        if not requests:
            return []
        views, prompts = self._prepare(requests)
        _, full = self._prepare(requests, with_answers=True)
        inputs = _encode(self.processor, full, views, self.model.device)
        prompt_inputs = _encode(self.processor, prompts, views, "cpu")
        logits = self.model(**inputs).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = inputs["input_ids"][:, 1:]
        out = []
        for i in range(len(requests)):
            n_full = int(inputs["attention_mask"][i].sum())
            n_prompt = int(prompt_inputs["attention_mask"][i].sum())
            k = n_full - n_prompt
            if k <= 0:
                raise ValueError(f"answer {requests[i].answer!r} adds no token to the prompt")
            full_ids = inputs["input_ids"][i, -n_full:].cpu()
            if not torch.equal(full_ids[:n_prompt], prompt_inputs["input_ids"][i, -n_prompt:]):
                logger.warning(
                    "prompt tokens changed when the answer %r was appended; score may be off", requests[i].answer
                )
            token_lp = logprobs[i, -k:].gather(-1, targets[i, -k:, None]).squeeze(-1)
            out.append(float(token_lp.sum()))
        return out
