"""``--policy attention``: a training-free crop from the target's own attention (ViCrop).

ViCrop (Zhang et al., ICLR 2025, "MLLMs know where to look: training-free perception of small visual details",
sec. 4, "rel-att"): for image ``x`` and question ``q``, let ``A(x, q)`` be the attention of the answer-start
position (the last prompt token, which predicts the first answer token) over the image tokens, averaged over heads
(their Eq. 1: ``softmax(Q_st K_img^T / sqrt(d))``). Attention also flows to tokens that attract it whatever is
asked, so they normalise by a generic question ``q'`` ("Write a general description of the image."):

    A_rel(x, q) = A(x, q) / A(x, q')                                                   (ViCrop, rel-att)

The map is laid back onto the image and the crop is the high-attention region. We average ``A`` over ALL decoder
layers (the paper picks a layer per model on a validation split; we have none to pick on) and take the window of
``fraction`` x the image width and height with the largest summed ``A_rel``.

Token layout, per family (:func:`image_token_boxes`: the ORIGINAL image's region each image token stands for):

- LLaVA-1.5: one 24x24 grid (336 px / patch 14) over the view padded to a square (:func:`~zoomvlm.targets.hf.
  encoder_view`); tokens over the padding map to no image region and are dropped.
- Qwen2.5-VL: a variable grid ``(H/14/2) x (W/14/2)`` per image (``image_grid_thw``, merge 2), row-major; the view
  is resized to multiples of 28 px, so the grid covers the whole image.
- SmolVLM / Idefics3: ``rows x cols`` tiles (row-major) of ``g x g`` tokens each (``g = sqrt(image_seq_len)`` = 8
  for SmolVLM: 512 px / patch 16 / pixel-shuffle 4), then one global ``g x g`` view of the whole image; a view that
  fits one tile is a single ``g x g`` grid. Tiles cover the image resized to whole tiles, i.e. the whole image.

The policy needs the model's internals, so it runs only with ``hf:`` targets (ViCrop cannot serve an API model).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from PIL import Image

from zoomvlm.core.geometry import Box
from zoomvlm.core.prompts import target_prompt
from zoomvlm.policies.base import Proposal

logger = logging.getLogger(__name__)

__all__ = ["GENERIC_QUESTION", "AttentionCrop", "attention_heatmap", "best_window", "image_token_boxes"]

GENERIC_QUESTION = "Write a general description of the image."
"""ViCrop's generic question ``q'`` (sec. 4), whose attention normalises the question's."""


_WHOLE = Box(0.0, 0.0, 1.0, 1.0)


def _grid(rows: int, cols: int, frame: Box = _WHOLE) -> list[Box]:
    """``rows x cols`` cells of ``frame``, row-major, normalised."""
    w, h = (frame.x1 - frame.x0) / cols, (frame.y1 - frame.y0) / rows
    x, y = frame.x0, frame.y0
    cells = [(x + c * w, y + r * h, x + (c + 1) * w, y + (r + 1) * h) for r in range(rows) for c in range(cols)]
    return [Box(*(min(1.0, v) for v in cell)) for cell in cells]  # min: float sums may overshoot 1 by 1e-16


def _unpad_square(cells: list[Box], width: int, height: int) -> list[Box | None]:
    # LLaVA: cells are in the padded square's frame; the image sits centred in it (see hf._pad_to_square).
    side = max(width, height)
    ox, oy = (side - width) // 2, (side - height) // 2
    out: list[Box | None] = []
    for b in cells:
        x0, x1 = (b.x0 * side - ox) / width, (b.x1 * side - ox) / width
        y0, y1 = (b.y0 * side - oy) / height, (b.y1 * side - oy) / height
        x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(1.0, x1), min(1.0, y1)
        out.append(Box(x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None)
    return out


def image_token_boxes(processor, view: Image.Image, inputs: dict, n_tokens: int) -> list[Box | None]:
    """The normalised region of ``view`` (= the whole original image) each of its ``n_tokens`` image tokens covers,
    in prompt order (see the module docstring); ``None`` for a token over padding.

    Args:
        processor: the target's processor; ``view``: the one image of the prompt, as given to
            :func:`~zoomvlm.targets.hf.encode_inputs`; ``inputs``: its outputs (``image_grid_thw`` for Qwen).

    Raises:
        ValueError: the family is unknown, or the token count does not fit its layout.
    """
    from zoomvlm.targets.hf import encoder_view, processor_family, processor_image_kwargs

    family = processor_family(processor)
    if family == "qwen2_vl":
        merge = getattr(processor.image_processor, "merge_size", 2)
        _, gh, gw = (int(v) for v in inputs["image_grid_thw"][0])
        boxes: list[Box | None] = list(_grid(gh // merge, gw // merge))
    elif family == "llava":
        side = math.isqrt(n_tokens)
        boxes = _unpad_square(_grid(side, side), *view.size)
    elif family == "idefics3":
        seq = int(processor.image_seq_len)
        g = math.isqrt(seq)
        out = processor.image_processor(
            images=[[encoder_view(processor, view)]],
            return_row_col_info=True,
            **processor_image_kwargs(processor),
        )
        rows, cols = int(out["rows"][0][0]), int(out["cols"][0][0])
        boxes = []
        for tile in _grid(rows, cols) if rows and cols else []:
            boxes.extend(_grid(g, g, tile))
        boxes.extend(_grid(g, g))  # the global view (or the only tile)
    else:
        raise ValueError(f"no image-token layout known for processor {type(processor).__name__}")
    if len(boxes) != n_tokens:
        raise ValueError(f"{family} layout gives {len(boxes)} token regions for {n_tokens} image tokens")
    return boxes


def attention_heatmap(boxes: Sequence[Box | None], weights: torch.Tensor, cells: int = 48) -> torch.Tensor:
    """``[cells, cells]`` map of the image (row = y): each token's weight spread evenly over the cells its box
    covers (so a tile grid and the global view of SmolVLM add up on one map). Units: weight per cell."""
    heat = torch.zeros(cells, cells)
    for box, w in zip(boxes, weights.tolist(), strict=True):
        if box is None:
            continue
        c0, c1 = int(box.x0 * cells), max(int(box.x0 * cells) + 1, math.ceil(box.x1 * cells))
        r0, r1 = int(box.y0 * cells), max(int(box.y0 * cells) + 1, math.ceil(box.y1 * cells))
        heat[r0:r1, c0:c1] += w / ((r1 - r0) * (c1 - c0))
    return heat


def best_window(heat: torch.Tensor, fraction: float) -> Box:
    """The window of about ``fraction`` x the image width and height with the largest summed ``heat``.

    ``heat``: ``[rows, cols]`` attention over the image's token grid. The window is made of whole grid cells, so
    its sides are ``round(fraction x rows)`` and ``round(fraction x cols)`` cells (at least one): on a 48 x 48 grid
    ``fraction`` 0.3 gives 14 cells, 0.2917 of the image. Returned normalised to the image; ties go to the first
    window in row-major order.
    """
    rows, cols = heat.shape
    kh, kw = max(1, round(fraction * rows)), max(1, round(fraction * cols))
    sums = torch.nn.functional.avg_pool2d(heat[None, None], (kh, kw), stride=1)[0, 0]
    r, c = divmod(int(sums.argmax()), sums.shape[1])
    return Box(c / cols, r / rows, min(1.0, (c + kw) / cols), min(1.0, (r + kh) / rows))


def _answer_start_attention(model, inputs: dict, image_token_id: int) -> torch.Tensor:
    """``A(x, q)``: attention of the last prompt position over the image tokens, mean over heads and layers,
    ``[n_image_tokens]`` float32 (ViCrop Eq. 1). Runs with eager attention (other kernels return no weights)."""
    previous = model.config._attn_implementation
    if previous != "eager":
        model.set_attn_implementation("eager")
    try:
        out = model(**inputs, output_attentions=True, use_cache=False)
    finally:
        if previous != "eager":
            model.set_attn_implementation(previous)
    attentions = [a for a in (out.attentions or ()) if a is not None]
    if not attentions:
        raise RuntimeError(f"{type(model).__name__} returned no attention weights")
    image = inputs["input_ids"][0] == image_token_id
    # each: [batch, heads, query, key] -> the answer-start row over image keys
    rows = torch.stack([a[0, :, -1, :].float().mean(0) for a in attentions]).mean(0)  # [key]
    return rows[image.to(rows.device)].cpu()


class AttentionCrop:
    """``attention[:FRACTION]``: ViCrop's relative-attention crop for ``hf:`` targets (see the module docstring).

    Args:
        fraction: crop side as a fraction of the image width and height, in (0, 1] (default 0.5, AwaRes's centre
            crop size, so the two are comparable).

    Raises:
        ValueError: ``fraction`` outside (0, 1]; from :meth:`bind_target`, a target that is not ``hf:``.
    """

    def __init__(self, fraction: float = 0.5):
        if not 0 < fraction <= 1:
            raise ValueError(f"attention crop fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction
        self.name = "attention" if fraction == 0.5 else f"attention:{fraction:g}"
        self.target = None

    def bind_target(self, target) -> None:
        """Use ``target``'s model (an :class:`~zoomvlm.targets.hf.HFTarget`, possibly cached) for attention."""
        from zoomvlm.targets.hf import HFTarget

        hf = getattr(target, "target", target)
        if not isinstance(hf, HFTarget):
            raise ValueError(
                f"--policy attention needs an hf: target (it reads the model's attention), got {target.name}"
            )
        self.target = hf

    @torch.inference_mode()
    def relative_attention(self, image: Image.Image, question: str) -> tuple[list[Box | None], torch.Tensor]:
        """``(token boxes, A_rel)`` for one image: :func:`image_token_boxes` and ``A(x, q) / A(x, q')``."""
        from zoomvlm.core.geometry import resize_to_budget
        from zoomvlm.targets.hf import chat_prompt, encode_inputs

        t = self.target
        if t is None:
            raise TypeError("the attention policy has no target: call bind_target(target) first")
        view = resize_to_budget(image.convert("RGB"), t.budget)
        maps = []
        for q in (question, GENERIC_QUESTION):
            inputs = encode_inputs(
                t.processor, [chat_prompt(t.processor, 1, target_prompt(q))], [[view]], t.model.device
            )
            maps.append(_answer_start_attention(t.model, inputs, t.image_token_id))
        boxes = image_token_boxes(t.processor, view, inputs, int(maps[0].shape[0]))
        return boxes, maps[0] / maps[1].clamp_min(1e-12)

    def propose(self, images: Sequence[Image.Image], questions: Sequence[str], evidence=None) -> list[Proposal]:
        out = []
        for image, question in zip(images, questions, strict=True):
            boxes, rel = self.relative_attention(image, question)
            out.append(Proposal((best_window(attention_heatmap(boxes, rel), self.fraction),)))
        return out
