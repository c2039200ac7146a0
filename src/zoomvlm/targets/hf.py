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

from zoomvlm.core.geometry import Budget, resize_to_budget
from zoomvlm.core.prompts import target_prompt
from zoomvlm.targets.base import Generation, TargetRequest, Usage, require_answers

logger = logging.getLogger(__name__)

__all__ = [
    "HFTarget",
    "answer_text",
    "chat_prompt",
    "encoder_images",
    "encode_inputs",
    "encoder_view",
    "BUDGET_MEANING",
    "generate_texts",
    "image_inputs",
    "load_vlm",
    "processor_family",
    "processor_image_kwargs",
]

# What a view budget means, per family (the README's targets table). The image processors as released do not obey
# a budget on their own: SmolVLM's upscales every view to ``longest_edge`` 2048 and tiles it (9 tiles for a 24x64
# crop), LLaVA-1.5's centre-crops to 336x336. So the target shrinks each view to its budget FIRST and then tells
# the processor not to resize it again (:func:`processor_image_kwargs`), capping at the processor's own maximum
# (:func:`encoder_view`); the vision encoder then sees at most the budget's pixels, up to Qwen2-VL's rounding of
# each side to the NEAREST multiple of 28 px (a 758x2118 view becomes 756x2128: 2052 tokens, where the authors'
# processor with max_pixels = 2048*28*28 on the original rounds down to 2025; about 1 % more at most).
BUDGET_MEANING = {
    "idefics3": "view shrunk to the budget (capped at size.longest_edge, 2048 as released), then rounded UP to "
    "whole 512 px tiles (max_image_size) and split: 64 tokens per tile, plus one 512 px global tile when split. "
    "<=512 px: 1 tile = 64 tokens; <=1024: <=5 tiles = <=320; <=2048: <=17 tiles = <=1088",
    "qwen2_vl": "view shrunk to the budget (the processor caps it at max_pixels), then resized to multiples of "
    "28 px: (H/28)*(W/28) tokens (patch 14, merge 2); a 3:4 view at 384 px = 140 tokens, at 1024 px = 999",
    "llava": "every view is padded to a square (LLaVA-1.5's own evaluation, no centre crop) and resized to "
    "336x336: always 576 tokens; the budget only limits the detail (the view is shrunk to it first)",
}
"""Per family, what a view budget means in visual tokens (measured with the real processors of SmolVLM-256M-Instruct,
Qwen2.5-VL-7B-Instruct and llava-1.5-7b-hf; ``tests/test_real_processors.py``)."""


def load_vlm(model_id: str, device: str | None = None, dtype: str | torch.dtype = "auto"):
    """``(model, processor)`` for a hub id or a local ``save_pretrained`` folder, model in eval mode.

    A folder holding a peft LoRA adapter (``adapter_config.json``) is loaded onto its base model and merged.

    ``device=None`` picks CUDA when available, else CPU. On machines without torchvision the processor is
    rebuilt by :func:`zoomvlm.targets.hf_compat.load_processor`.

    Raises:
        FileNotFoundError: ``model_id`` is a local path (starts with ``/``, ``.`` or ``~``, or has more than one
            ``/``, which no hub id ``namespace/name`` has) that does not exist.
        OSError: the model cannot be found (offline and not cached, or a wrong hub id).
    """
    import json
    from pathlib import Path

    from transformers import AutoModelForImageTextToText

    from zoomvlm.targets.hf_compat import load_processor

    local = model_id.startswith(("/", ".", "~")) or model_id.strip("/").count("/") > 1  # runs/x/final
    if local and not Path(model_id).expanduser().exists():
        raise FileNotFoundError(f"checkpoint folder not found: {model_id} (and it is not a hub id namespace/name)")
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


def processor_family(processor) -> str:
    """``"idefics3"`` (SmolVLM, Idefics3), ``"qwen2_vl"`` (Qwen2-VL, Qwen2.5-VL), ``"llava"`` (a CLIP image
    processor: LLaVA-1.5) or ``"other"``, read off the image processor's class name."""
    name = type(getattr(processor, "image_processor", None)).__name__
    if name.startswith(("Idefics3", "SmolVLM")):
        return "idefics3"
    if name.startswith("Qwen2VL"):
        return "qwen2_vl"
    if name.startswith(("CLIP", "Llava")) and type(processor).__name__.startswith("Llava"):
        return "llava"
    return "other"


def processor_image_kwargs(processor) -> dict:
    """Image-processor overrides that make the processor keep the size :func:`encoder_view` gave a view.

    - ``idefics3`` with image splitting: ``do_resize=False`` (the released processor would first rescale the
      longest side to ``size.longest_edge``, upscaling small views to 2048 px); the view is still rounded up to
      whole tiles and split, as the released model was trained. Without splitting (the tiny cropper) nothing
      changes: the view is resized to one tile.
    - ``llava``: ``do_center_crop=False`` (the view is already padded to a square by :func:`encoder_view`).
    - others: ``{}``.
    """
    family = processor_family(processor)
    if family == "idefics3" and getattr(processor.image_processor, "do_image_splitting", False):
        return {"do_resize": False}
    if family == "llava":
        return {"do_center_crop": False}
    return {}


def align_training_processor(processor) -> dict:
    """Set on ``processor.image_processor`` the overrides inference passes with every call
    (:func:`processor_image_kwargs`), for trainers that call the processor themselves (TRL's SFT and GRPO), so
    that a policy trains on the views it will see. Returns what was set.

    Only ``idefics3`` with splitting (``do_resize=False``): the released SmolVLM processor would otherwise
    upscale a 512 px cropper view to 2048 px and cut it into 13 tiles (832 image tokens) where inference reads one
    tile (64). ``llava``'s override is left out: it needs the square padding of :func:`encoder_view`, which a
    trainer does not apply.
    """
    if processor_family(processor) != "idefics3":
        return {}
    overrides = processor_image_kwargs(processor)
    for key, value in overrides.items():
        setattr(processor.image_processor, key, value)
    return overrides


def _pad_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    # LLaVA-1.5's expand2square (haotian-liu/LLaVA, llava/mm_utils.py): centre the image on a square canvas filled
    # with the processor's mean colour. Three lines, so written here rather than imported from the LLaVA repo.
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def _llava_input_side(image_processor) -> int | None:
    """The side of the square a LLaVA image processor feeds its encoder (``crop_size`` / ``size``), or None."""
    sizes = []
    for attr in ("crop_size", "size"):
        value = getattr(image_processor, attr, None)
        if isinstance(value, int):
            sizes.append(value)
            continue
        for key in ("height", "width", "shortest_edge"):  # a dict, or transformers' SizeDict
            v = value.get(key) if isinstance(value, dict) else getattr(value, key, None)
            if isinstance(v, int):
                sizes.append(v)
    return max(sizes) if sizes else None


def encoder_view(processor, view: Image.Image) -> Image.Image:
    """``view`` (already shrunk to its budget) as the processor must receive it so the budget holds (RGB).

    - ``idefics3`` with splitting: shrunk (never enlarged) so its longest side is at most the processor's
      ``size["longest_edge"]`` (2048 for SmolVLM as released), since :func:`processor_image_kwargs` turns the
      processor's own resize off.
    - ``qwen2_vl``: unchanged (its ``min_pixels``/``max_pixels`` resize already follows the view's size), except
      a view 200 or more times longer than wide (a valid thin crop of a line), which its resize refuses: padded
      with the image mean colour to just under that ratio.
    - ``llava``: padded to a square with the image mean colour, as LLaVA-1.5's evaluation does; a view larger
      than the processor's input (336 px) is first shrunk to it, so the square is never larger than needed (a
      20000 x 200 native view padded first was a 20000 x 20000 canvas: 4+ GB for one request; the processor
      shrinks the square to its input either way, so the pixels it sees are the same up to resampling).
    """
    view = view.convert("RGB")
    family = processor_family(processor)
    ip = getattr(processor, "image_processor", None)
    if family == "idefics3" and processor_image_kwargs(processor):
        cap = (getattr(ip, "size", None) or {}).get("longest_edge")
        if cap:
            view = resize_to_budget(view, Budget(max_side=int(cap)))
    elif family == "llava":
        mean = getattr(ip, "image_mean", None) or (0.5, 0.5, 0.5)
        side = _llava_input_side(ip)
        if side and max(view.size) > side:
            view = resize_to_budget(view, Budget(max_side=side))
        view = _pad_to_square(view, tuple(int(round(255 * m)) for m in mean))
    elif family == "qwen2_vl" and max(view.size) >= QWEN_MAX_ASPECT * min(view.size):
        mean = getattr(ip, "image_mean", None) or (0.5, 0.5, 0.5)
        view = _pad_short_side(
            view, -(-max(view.size) // (QWEN_MAX_ASPECT - 1)), tuple(int(round(255 * m)) for m in mean)
        )
    return view


QWEN_MAX_ASPECT = 200
"""Qwen2-VL's image processor refuses views whose longer side is this many times the shorter (``smart_resize``)."""


def _pad_short_side(image: Image.Image, short: int, fill: tuple[int, ...]) -> Image.Image:
    w, h = image.size
    size = (w, max(h, short)) if w >= h else (max(w, short), h)
    canvas = Image.new(image.mode, size, fill)
    canvas.paste(image, ((size[0] - w) // 2, (size[1] - h) // 2))
    return canvas


def encoder_images(processor, images: list[list[Image.Image]]) -> list[list[Image.Image]]:
    """:func:`encoder_view` of every image of every row."""
    return [[encoder_view(processor, im) for im in row] for row in images]


def image_inputs(processor, images: list[Image.Image]) -> dict:
    """The image processor's outputs (``pixel_values`` ...) for one row of ``images``, prepared as
    :func:`generate_texts` prepares them (:func:`encoder_view` + :func:`processor_image_kwargs`)."""
    views = [encoder_view(processor, im) for im in images]
    return processor.image_processor(images=[views], return_tensors="pt", **processor_image_kwargs(processor))


def _image_token_id(model, processor) -> int | None:
    for owner in (processor, model.config):
        for attr in ("image_token_id", "image_token_index"):
            value = getattr(owner, attr, None)
            if isinstance(value, int):
                return value
    return None


def encode_inputs(processor, prompts: list[str], images: list[list[Image.Image]], device) -> dict:
    """Processor outputs for chat-formatted ``prompts`` (left-padded) and their ``images`` (one list per row), each
    image prepared by :func:`encoder_view` and :func:`processor_image_kwargs`, on ``device``."""
    tokenizer = processor.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        kwargs = (
            {"images": encoder_images(processor, images), **processor_image_kwargs(processor)} if any(images) else {}
        )
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
        row (padding = the id ``generate`` pads with: the model's generation config's, not the tokenizer's;
        where padding and end-of-turn share an id, the end token is not counted).
    """
    inputs = encode_inputs(processor, prompts, images, model.device)
    gen_kwargs.setdefault("do_sample", False)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, **gen_kwargs)
    new = out[:, inputs["input_ids"].shape[1] :]
    texts = processor.batch_decode(new, skip_special_tokens=True)
    pad_id = _generation_pad_id(model, processor)
    n_generated = new.ne(pad_id).sum(-1).tolist() if pad_id is not None else [new.shape[1]] * len(texts)
    return [t.strip() for t in texts], inputs, n_generated


def _generation_pad_id(model, processor) -> int | None:
    """The id ``generate`` pads finished rows with: the model's ``generation_config.pad_token_id``, else its first
    end token (what ``generate`` falls back to), else the tokenizer's padding id."""
    config = getattr(model, "generation_config", None)
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        eos = getattr(config, "eos_token_id", None)
        pad = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    return pad if pad is not None else processor.tokenizer.pad_token_id


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
        self._token_cache: dict[tuple[int, int], int] = {}
        self.name = f"hf:{model_id}@{self.budget}"
        self.model_id = model_id
        self._files_digest: str | None = None

    def cache_identity(self) -> dict:
        """Settings that change the answers but not :attr:`name` (:func:`~zoomvlm.targets.cache.target_identity`):
        ``max_new_tokens``, the weights' dtype and, for a LOCAL checkpoint folder, a digest of its files (a model
        retrained in place under the same path was answered from the cache of the old one)."""
        if self._files_digest is None:
            from zoomvlm.core.resume import files_digest

            self._files_digest = files_digest([self.model_id]) or "hub"  # a hub id: its name names it
        return {"max_new_tokens": self.max_new_tokens, "dtype": str(getattr(self.model, "dtype", "")),
                "files": self._files_digest}  # fmt: skip

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
        """Pixels of ``view`` as the vision encoder receives it, after the image processor's resizing (and the
        family's preparation, :func:`encoder_view`)."""
        out = image_inputs(self.processor, [view])
        if "image_grid_thw" in out:  # Qwen2-VL family: patches of patch_size^2 pixels
            patch = getattr(self.processor.image_processor, "patch_size", 14)
            return int(out["image_grid_thw"].prod(dim=-1).sum()) * patch * patch
        if "pixel_attention_mask" in out:  # Idefics3/SmolVLM: real (non-padding) pixels of all tiles
            return int(out["pixel_attention_mask"].sum())
        pv = out["pixel_values"]
        return int(pv.numel() // pv.shape[-3]) if pv.dim() >= 3 else int(pv.numel())

    def view_visual_tokens(self, view: Image.Image) -> int | None:
        """Image placeholder tokens the processor emits for ``view`` alone in a one-image prompt (``None`` when
        the model has no image-token id). Depends only on the view's size for the three families, so it is
        cached by size."""
        if self.image_token_id is None:
            return None
        key = view.size
        if key not in self._token_cache:
            inputs = encode_inputs(self.processor, [chat_prompt(self.processor, 1, "?")], [[view]], "cpu")
            self._token_cache[key] = int((inputs["input_ids"][0] == self.image_token_id).sum())
        return self._token_cache[key]

    def reference_visual_tokens(self, image: Image.Image, reference: Budget | None = None) -> int | None:
        """RTR's denominator in the model's own currency: visual tokens of the whole ``image`` under ``reference``
        (``None`` = native, i.e. the processor's own maximum: SmolVLM 2048 px tiles, Qwen ``max_pixels``, LLaVA
        336x336), processed once (AwaRes sec. 3.1/4). ``None`` when the model has no image-token id."""
        return self.view_visual_tokens(resize_to_budget(image.convert("RGB"), reference or Budget()))

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
        inputs = encode_inputs(self.processor, full, views, self.model.device)
        prompt_inputs = encode_inputs(self.processor, prompts, views, "cpu")
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
