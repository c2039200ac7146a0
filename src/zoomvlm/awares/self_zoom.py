"""AwaRes self-zoom for trainable transformers VLMs: the model itself asks for high-resolution crops.

Protocol (AwaRes sec. 3.1; METHODS.md "AwaRes"; layout of :mod:`zoomvlm.awares.protocol`):

- Turn 1: ``[system, user(low-res view, question)]`` -> greedy generation. A text without ``GET_CROPS`` is the
  direct answer. ``GET_CROPS: [...]`` names crop-set regions (:data:`~zoomvlm.awares.protocol.CROP_SET`).
- Turn 2: the model's own turn-1 text becomes the assistant turn, then ``user(crop * k, tool text)`` with the
  crops cut from the ORIGINAL image (``views="same_scale"``: at the ``high`` view's scale; ``"released"``, the
  ``awares`` protocol's: each crop at native resolution capped by ``high``); greedy generation gives the answer.
- A tool call that cannot be parsed (:class:`~zoomvlm.awares.protocol.ToolCallError`) is recorded in
  :attr:`SelfZoomResult.tool_error` and logged; the answer is then the turn-1 text as is. It is never replaced
  by the full image (the official AwaRes parser silently does that).

KV-cache reuse (``reuse_kv=True``, the default): turn 2 does not recompute the turn-1 prefix. The cache that
turn-1 ``generate`` returns holds ``prompt + generated[:-1]``; turn 2 tokenizes the FULL rendered conversation,
keeps the longest cached prefix that equals it token for token (the template may render the assistant turn
differently from what was generated, e.g. another end token, or a re-tokenization of the decoded text), crops the
cache to that length and feeds only the rest, with the crops' pixels only. Qwen2.5-VL's 3-D M-RoPE positions of
the new slice are taken from ``get_rope_index`` on the full conversation (all images' ``image_grid_thw``), so
they equal a full recompute's. ``reuse_kv=False`` recomputes turn 2 from scratch (the reference).
Samples run one at a time (a per-sample loop): batching turn 2 would put padding inside the cached prefix.

Retain Token Ratio (AwaRes sec. 3.1 and 4): ``rtr = (visual tokens of the low view + visual tokens of the crops)
/ visual tokens of the whole image under ``high`` processed once``, the denominator counted by running the
processor on that high view alone. It counts each image once, as the paper does, whether or not turn 2 reused
the cache; what each turn actually fed is :attr:`SelfZoomResult.usage`.

Example (a tiny random-weight model; any Qwen2.5-VL / SmolVLM / LLaVA checkpoint works the same)::

    from zoomvlm.core.geometry import Budget
    from zoomvlm.awares.self_zoom import self_zoom_generate
    from tiny_models import build_tiny_qwen25vl

    model, processor = build_tiny_qwen25vl()
    results = self_zoom_generate(model, processor, [image], ["What is the total?"], Budget(max_side=768))
    results[0].text, results[0].crops, results[0].rtr
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from zoomvlm.awares.protocol import (
    AWARES_SYSTEM_PROMPT,
    PROTOCOLS,
    SelfZoomProtocol,
    ToolCallError,
    high_res_crops,
    low_res_view,
    parse_get_crops,
    trajectory_messages,
)
from zoomvlm.core.geometry import Budget, resize_to_budget
from zoomvlm.targets.base import Usage
from zoomvlm.targets.hf import HFTarget, answer_text, encode_inputs, image_inputs

logger = logging.getLogger(__name__)

__all__ = [
    "KV_REUSE_ARCHITECTURES",
    "SelfZoomResult",
    "SelfZoomPolicy",
    "Turn1State",
    "continue_with_crops",
    "count_outcomes",
    "finish_self_zoom",
    "full_image_cost",
    "self_zoom_generate",
    "start_self_zoom",
]

KV_REUSE_ARCHITECTURES: dict[str, str] = {"qwen2_5_vl": "mrope", "smolvlm": "1d", "idefics3": "1d", "llava": "1d"}
"""``config.model_type`` -> position scheme, for the architectures whose turn-2 KV reuse is tested equal to a full
recompute (``tests/test_self_zoom.py``). Others raise NotImplementedError with ``reuse_kv=True``."""


@dataclass(frozen=True)
class SelfZoomResult:
    """One sample's self-zoom outcome and what it cost.

    Args:
        text: the final answer (turn 2's text; turn 1's when there was no valid tool call).
        turn1_text: what the model said in turn 1 (decoded without special tokens, stripped).
        crops: crop-set keys requested by a valid tool call, in order; ``[]`` for a direct answer or a tool error.
        tool_error: why the turn-1 tool call could not be parsed, else None.
        usage: one :class:`~zoomvlm.targets.base.Usage` per turn run. ``view_pixels``: pixels the vision encoder
            received for each image fed in that turn (after the image processor's resizing); ``visual_tokens``:
            image placeholder tokens in the ``input_ids`` actually fed (turn 2 with KV reuse: the crops only;
            recompute: low view + crops again); ``prompt_tokens``: tokens fed; ``seconds``: wall time of the turn.
        visual_tokens: image tokens of the distinct images the model saw: low view + crops (the RTR numerator).
        full_visual_tokens: image tokens of the whole image under ``high``, processed once (the denominator).
        rtr: ``visual_tokens / full_visual_tokens`` (AwaRes sec. 3.1/4; about 0.25 for a direct answer when the
            high budget does not shrink the image, more when it does under the released views (0.31 for a tall
            receipt on Qwen2.5-VL) and for tiling models; plus about 0.25 per quadrant); None when the model has
            no image-token id to count.
        rtr_pixels: the same ratio in processed pixels (low view + crops over the high view).
        reused_tokens: turn-2 prefix tokens taken from the turn-1 KV cache (0: no turn 2, or recomputed).
        seconds: wall time of the whole sample, both turns.
        turn2_logits: ``[n_generated, vocab]`` float32 logits of each turn-2 step, only with ``output_logits=True``
            (cache-consistency tests); else None.
    """

    text: str
    turn1_text: str
    crops: list[str]
    tool_error: str | None
    usage: tuple[Usage, ...]
    visual_tokens: int | None
    full_visual_tokens: int | None
    rtr: float | None
    rtr_pixels: float
    reused_tokens: int
    seconds: float
    turn2_logits: torch.Tensor | None = field(default=None, repr=False, compare=False)


@dataclass
class Turn1State:
    """Everything turn 2 needs, kept after turn 1 (mutable: :func:`continue_with_crops` consumes ``cache``).

    Args:
        target: the model, processor and pixel/token accounting (:class:`~zoomvlm.targets.hf.HFTarget`).
        image: the ORIGINAL image (crops are cut from it); question, high, system: as given.
        low_view: the turn-1 view, RGB (``same_scale``: ``high`` with each side halved; ``released``: the original
            halved, then capped by ``high``).
        prompt_ids: ``[P]`` turn-1 prompt token ids (system + user(low view, question) + generation prompt), CPU.
        generated_ids: ``[n]`` turn-1 generated ids, including the end token when generation stopped on one, CPU.
        text: turn-1 text (``generated_ids`` decoded without special tokens, stripped).
        cache: KV cache of ``cat(prompt_ids, generated_ids)[:cache.get_seq_length()]`` (``generate`` never feeds
            its last token); None once consumed.
        usage: turn-1 usage; full: ``(visual tokens, processed pixels)`` of the whole image under ``high``;
        seconds: turn-1 wall time. crops_text: the crops' user turn carries the tool text; views: how the low
        view and crops are cut (both: see :class:`~zoomvlm.awares.protocol.SelfZoomProtocol`).
    """

    target: HFTarget
    image: Image.Image
    question: str
    high: Budget
    system: str | None
    low_view: Image.Image
    prompt_ids: torch.Tensor
    generated_ids: torch.Tensor
    text: str
    cache: object | None
    usage: Usage
    full: tuple[int | None, int]
    seconds: float
    crops_text: bool = True
    views: str = "same_scale"


def _encode(processor, text: str, images: list[Image.Image], device) -> dict:
    return encode_inputs(processor, [text], [images], device)


def _count_visual(target: HFTarget, ids: torch.Tensor) -> int | None:
    return int((ids == target.image_token_id).sum()) if target.image_token_id is not None else None


def full_image_cost(target: HFTarget, image: Image.Image, high: Budget) -> tuple[int | None, int]:
    """``(visual tokens, processed pixels)`` of the whole ``image`` under ``high``, processed once: RTR's
    denominator (AwaRes sec. 3.1/4), as :meth:`~zoomvlm.targets.hf.HFTarget.reference_visual_tokens` and
    :meth:`~zoomvlm.targets.hf.HFTarget.processed_pixels` count them (None tokens: no image-token id)."""
    view = resize_to_budget(image.convert("RGB"), high)
    return target.reference_visual_tokens(image, high), target.processed_pixels(view)


def _turn1_messages(question: str, system: str | None) -> list[dict]:
    return trajectory_messages(question, None, (), system=system)


def _conversation(
    question: str, turn1_text: str, keys: Sequence[str], system: str | None, crops_text: bool = True
) -> list[dict]:
    """``trajectory_messages``'s tool-call layout, with the model's own turn-1 text as the assistant turn."""
    messages = trajectory_messages(question, None, keys, system=system, crops_text=crops_text)
    assistant = messages[-2]
    assert assistant["role"] == "assistant", messages
    assistant["content"] = [{"type": "text", "text": turn1_text}]
    return messages


@torch.inference_mode()
def start_self_zoom(
    target: HFTarget,
    image: Image.Image,
    question: str,
    high: Budget,
    *,
    max_new_tokens: int = 32,
    system: str | None = AWARES_SYSTEM_PROMPT,
    forced_text: str | None = None,
    crops_text: bool = True,
    views: str = "same_scale",
) -> Turn1State:
    """Turn 1: the low-resolution view and the question -> greedy text, keeping the KV cache for turn 2.

    Args:
        target: an HF target (its own ``budget`` is ignored: views follow ``high``).
        image: the ORIGINAL image, any mode and size.
        high: the high-resolution view's budget; the turn-1 view is it with each side halved (``views``
            ``same_scale``), or the original halved and capped by it (``released``).
        forced_text: teacher forcing (tests, debugging): skip generation and take this as the model's turn-1
            text, followed by the end-of-turn token; the cache then comes from one forward pass over
            ``prompt + text tokens`` (all but the last, as ``generate`` leaves it).
        system, crops_text, views: the protocol's (:class:`~zoomvlm.awares.protocol.SelfZoomProtocol`): turn-1
            system prompt, whether the crops' turn names them, how the low view and crops are cut.

    Returns:
        The :class:`Turn1State`; its ``text`` is the direct answer or a tool call.
    """
    start = time.perf_counter()
    model, processor = target.model, target.processor
    low = low_res_view(image, high, views)
    prompt = processor.apply_chat_template(_turn1_messages(question, system), add_generation_prompt=True)
    inputs = _encode(processor, prompt, [low], model.device)
    prompt_ids = inputs["input_ids"][0]
    if forced_text is None:
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True)
        generated = out.sequences[0, prompt_ids.shape[0] :]
        cache = out.cache
        text = processor.decode(generated, skip_special_tokens=True).strip()
    else:
        suffix = answer_text(processor, forced_text, end_of_turn=True)
        generated = processor.tokenizer(suffix, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        generated = generated.to(model.device)
        fed = {**inputs, "input_ids": torch.cat([prompt_ids, generated[:-1]])[None]}
        n_extra = generated.shape[0] - 1
        fed["attention_mask"] = torch.ones_like(fed["input_ids"])
        if "mm_token_type_ids" in inputs:  # the forced tokens are text (type 0)
            fed["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, n_extra))
        cache = model(**fed, use_cache=True).cache
        text = forced_text.strip()
    seconds = time.perf_counter() - start
    usage = Usage(
        view_pixels=(target.processed_pixels(low),),
        visual_tokens=_count_visual(target, prompt_ids),
        prompt_tokens=int(prompt_ids.shape[0]),
        completion_tokens=int(generated.shape[0]),
        seconds=seconds,
    )
    return Turn1State(
        target=target,
        image=image,
        question=question,
        high=high,
        system=system,
        low_view=low,
        prompt_ids=prompt_ids.cpu(),
        generated_ids=generated.cpu(),
        text=text,
        cache=cache,
        usage=usage,
        full=full_image_cost(target, image, high),
        seconds=seconds,
        crops_text=crops_text,
        views=views,
    )


def _result(state: Turn1State, text: str, crops: list[str], tool_error: str | None, **turn2) -> SelfZoomResult:
    usage = (state.usage, *turn2.pop("usage", ()))
    full_tokens, full_pixels = state.full
    visual = turn2.pop("visual_tokens", state.usage.visual_tokens)
    pixels = turn2.pop("pixels", state.usage.pixels)
    return SelfZoomResult(
        text=text,
        turn1_text=state.text,
        crops=crops,
        tool_error=tool_error,
        usage=usage,
        visual_tokens=visual,
        full_visual_tokens=full_tokens,
        rtr=visual / full_tokens if visual is not None and full_tokens else None,
        rtr_pixels=pixels / full_pixels,
        reused_tokens=turn2.pop("reused_tokens", 0),
        seconds=sum(u.seconds for u in usage),
        **turn2,
    )


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.shape[0], b.shape[0])
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0, 0]) if differ.numel() else n


def _rope_module(model):
    """The submodule owning ``get_rope_index`` (Qwen2_5_VLModel), found through any wrapper (peft, ...)."""
    for module in model.modules():
        if callable(getattr(module, "get_rope_index", None)):
            return module
    raise NotImplementedError(f"{type(model).__name__} has no get_rope_index for its M-RoPE positions")


def _check_kv_reuse(model) -> str:
    arch = getattr(model.config, "model_type", None)
    if arch not in KV_REUSE_ARCHITECTURES:
        raise NotImplementedError(
            f"self-zoom KV-cache reuse is not implemented for model_type {arch!r} (tested: "
            f"{', '.join(KV_REUSE_ARCHITECTURES)}); pass reuse_kv=False to recompute turn 2"
        )
    return KV_REUSE_ARCHITECTURES[arch]


@torch.inference_mode()
def continue_with_crops(
    state: Turn1State,
    keys: Sequence[str],
    *,
    max_new_tokens: int = 32,
    reuse_kv: bool = True,
    output_logits: bool = False,
) -> SelfZoomResult:
    """Turn 2: append the model's turn-1 text and ``user(crops of keys, tool text)``; greedy answer.

    Args:
        state: from :func:`start_self_zoom`. With ``reuse_kv`` its cache is extended in place and consumed.
        keys: crop-set keys (from :func:`~zoomvlm.awares.protocol.parse_get_crops`), at least one.
        reuse_kv: feed only the tokens after the longest cached prefix of the full conversation (see the module
            docstring); False recomputes the whole conversation (the reference).
        output_logits: keep the turn-2 logits in :attr:`SelfZoomResult.turn2_logits`.

    Returns:
        The sample's :class:`SelfZoomResult`; ``rtr`` counts the low view plus these crops.

    Raises:
        ToolCallError: a key not in :data:`~zoomvlm.awares.protocol.CROP_SET`. ValueError: no key, or the state's
        cache was already consumed. NotImplementedError: ``reuse_kv`` for an architecture outside
        :data:`KV_REUSE_ARCHITECTURES`.
    """
    if not keys:
        raise ValueError("continue_with_crops needs at least one crop key")
    positions = _check_kv_reuse(state.target.model) if reuse_kv else None
    if reuse_kv and state.cache is None:
        raise ValueError("this Turn1State's KV cache was already consumed by an earlier continue_with_crops")
    start = time.perf_counter()
    target, keys = state.target, list(keys)
    model, processor = target.model, target.processor
    crops = high_res_crops(state.image, keys, state.high, state.views)
    text = processor.apply_chat_template(
        _conversation(state.question, state.text, keys, state.system, state.crops_text), add_generation_prompt=True
    )
    full = _encode(processor, text, [state.low_view, *crops], model.device)
    full_ids = full["input_ids"][0]
    gen_kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "return_dict_in_generate": True}
    gen_kwargs["output_logits"] = output_logits
    reused = 0
    if reuse_kv:
        cache, state.cache = state.cache, None
        cached_len = cache.get_seq_length()
        cached_ids = torch.cat([state.prompt_ids, state.generated_ids])[:cached_len]
        reused = min(_common_prefix(cached_ids, full_ids.cpu()), full_ids.shape[0] - 1)
        if reused < state.prompt_ids.shape[0]:
            # The template rewrote the turn-1 prompt itself: the images' tokens are no longer a cached prefix.
            logger.warning("turn-1 prompt is not a prefix of the conversation; recomputing turn 2")
            reused = 0
    if reused:
        if reused < cached_len:  # the rendered assistant turn differs from the generated tokens from here on
            cache.crop(reused - cached_len)  # transformers 5: a negative count of tokens to drop
            assert cache.get_seq_length() == reused, (cache.get_seq_length(), reused)
        new_images = image_inputs(processor, crops).to(model.device)
        kwargs = {**new_images, "input_ids": full_ids[None], "attention_mask": full["attention_mask"]}
        if positions == "mrope":  # the new slice's 3-D positions as a full recompute gives them
            kwargs["position_ids"], _ = _rope_module(model).get_rope_index(
                full["input_ids"],
                mm_token_type_ids=full["mm_token_type_ids"],
                image_grid_thw=full["image_grid_thw"],
                attention_mask=full["attention_mask"],
            )
        # ``cache=`` (transformers >= 5.24): ``past_key_values=`` is announced for removal in transformers 6.
        out = model.generate(**kwargs, cache=cache, **gen_kwargs)
        fed_ids = full_ids[reused:]
        fed_pixels = tuple(target.processed_pixels(c) for c in crops)
    else:
        out = model.generate(**full, **gen_kwargs)
        fed_ids = full_ids
        fed_pixels = (target.processed_pixels(state.low_view), *(target.processed_pixels(c) for c in crops))
    generated = out.sequences[0, full_ids.shape[0] :]
    answer = processor.decode(generated, skip_special_tokens=True).strip()
    usage = Usage(
        view_pixels=fed_pixels,
        visual_tokens=_count_visual(target, fed_ids),
        prompt_tokens=int(fed_ids.shape[0]),
        completion_tokens=int(generated.shape[0]),
        seconds=time.perf_counter() - start,
    )
    all_visual = _count_visual(target, full_ids)
    return _result(
        state,
        answer,
        keys,
        None,
        usage=(usage,),
        visual_tokens=all_visual,  # low view + crops, each once
        pixels=state.usage.pixels + sum(target.processed_pixels(c) for c in crops),
        reused_tokens=reused,
        turn2_logits=torch.cat([x.float().cpu() for x in out.logits]) if output_logits else None,
    )


@torch.inference_mode()
def finish_self_zoom(state: Turn1State, *, max_new_tokens: int = 32, reuse_kv: bool = True) -> SelfZoomResult:
    """Act on the turn-1 text: a direct answer ends the sample; a valid ``GET_CROPS`` runs
    :func:`continue_with_crops`; an unparseable one is recorded in ``tool_error`` and the turn-1 text is the
    answer (no crops, no full image: its cost stays the low view's).
    """
    try:
        keys = parse_get_crops(state.text)
    except ToolCallError as err:
        return _result(state, state.text, [], str(err))
    if keys is None:
        return _result(state, state.text, [], None)
    return continue_with_crops(state, keys, max_new_tokens=max_new_tokens, reuse_kv=reuse_kv)


def count_outcomes(results: Sequence[SelfZoomResult]) -> dict[str, int]:
    """How many samples answered directly, called for crops, or made an unparseable tool call.

    >>> count_outcomes([])
    {'direct': 0, 'crops': 0, 'tool_error': 0}
    """
    counts = {"direct": 0, "crops": 0, "tool_error": 0}
    for r in results:
        counts["tool_error" if r.tool_error is not None else "crops" if r.crops else "direct"] += 1
    return counts


def _self_zoom(
    target: HFTarget,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    high: Budget,
    *,
    max_new_tokens: int,
    reuse_kv: bool,
    system: str | None,
    crops_text: bool = True,
    views: str = "same_scale",
) -> list[SelfZoomResult]:
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images for {len(questions)} questions")
    if reuse_kv:
        _check_kv_reuse(target.model)
    results = []
    for image, question in zip(images, questions, strict=True):
        state = start_self_zoom(target, image, question, high, max_new_tokens=max_new_tokens, system=system,
                                crops_text=crops_text, views=views)  # fmt: skip
        results.append(finish_self_zoom(state, max_new_tokens=max_new_tokens, reuse_kv=reuse_kv))
    n_errors = count_outcomes(results)["tool_error"]
    if n_errors:
        logger.warning("%d of %d self-zoom tool calls could not be parsed (kept as answers)", n_errors, len(results))
    return results


def self_zoom_generate(
    model,
    processor,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    high: Budget,
    *,
    max_new_tokens: int = 32,
    reuse_kv: bool = True,
    system: str | None = AWARES_SYSTEM_PROMPT,
    crops_text: bool = True,
    views: str = "same_scale",
) -> list[SelfZoomResult]:
    """AwaRes self-zoom (sec. 3.1) for each ``(image, question)``: turn 1 on the low view, turn 2 on the crops
    it asks for; greedy, one sample at a time.

    Args:
        model, processor: a transformers image-text-to-text model and its processor (eval mode).
        images: ORIGINAL images, any size. questions: one per image, used verbatim.
        high: the high-resolution view's budget (``same_scale`` views: the turn-1 view is it halved and crops are at
            its scale; ``released``: see :class:`~zoomvlm.awares.protocol.SelfZoomProtocol`).
        max_new_tokens: per turn. reuse_kv: see :func:`continue_with_crops`. system: turn-1 system prompt.
        crops_text: the crops' user turn carries a text naming them (ours) or only the images (released AwaRes).
        views: ``same_scale`` (ours) or ``released`` (see :class:`~zoomvlm.awares.protocol.SelfZoomProtocol`).

    Returns:
        One :class:`SelfZoomResult` per sample, in order.

    Raises:
        ValueError: ``images`` and ``questions`` differ in length. NotImplementedError: ``reuse_kv`` for an
        architecture outside :data:`KV_REUSE_ARCHITECTURES`.
    """
    name = getattr(model, "name_or_path", "") or type(model).__name__
    target = HFTarget(name, model=model, processor=processor)
    return _self_zoom(
        target,
        images,
        questions,
        high,
        max_new_tokens=max_new_tokens,
        reuse_kv=reuse_kv,
        system=system,
        crops_text=crops_text,
        views=views,
    )


class SelfZoomPolicy:
    """``--policy self-zoom[:PROTOCOL][@HIGH]``: the ``hf:`` target itself decides where to look (AwaRes).

    Unlike the other policies it does not hand views to the target: :meth:`answer_with` runs both turns on the
    target (turn 1 on the low view, an optional ``GET_CROPS`` tool call, turn 2 with the crops and the reused
    turn-1 KV cache) and returns, per sample, the :class:`~zoomvlm.policies.base.Proposal` (the crop-set boxes of
    the action, the turn-1 text as ``raw``, an unparseable call as ``error``) and the
    :class:`~zoomvlm.targets.base.Generation` whose usage counts every DISTINCT image once (low view + crops:
    ``view_pixels``, ``visual_tokens``), so :func:`~zoomvlm.core.pipeline.run_batch` computes RTR as for any
    policy. :attr:`last_turn_seconds` (each turn's seconds) and :attr:`last_actions` (``direct``, ``crops:3,0`` or
    ``tool_error``) of the last call go into the records.

    Args:
        protocol: a name in :data:`~zoomvlm.awares.protocol.PROTOCOLS` (``awares``: the released
            ``Kimhi/AWARES-Qwen2.5-VL-7B`` protocol, the default; ``zoomvlm``: our own prompt) or a
            :class:`~zoomvlm.awares.protocol.SelfZoomProtocol`.
        high: the high-resolution budget; default the protocol's. The CLI counts RTR against it, as AwaRes does.
        reuse_kv: reuse the turn-1 KV cache in turn 2 (see :func:`continue_with_crops`).

    Raises:
        ValueError: an unknown protocol name.
    """

    def __init__(
        self, protocol: str | SelfZoomProtocol = "awares", high: Budget | str | int | None = None, reuse_kv=True
    ):
        if isinstance(protocol, str):
            if protocol not in PROTOCOLS:
                raise ValueError(f"unknown self-zoom protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
            protocol = PROTOCOLS[protocol]
        self.protocol = protocol
        self.high = protocol.high if high is None else Budget.parse(high)
        self.reuse_kv = reuse_kv
        suffix = "" if protocol.name == "awares" else f":{protocol.name}"
        self.name = f"self-zoom{suffix}" + ("" if high is None else f"@{self.high}")

    def propose(self, images, questions, evidence=None):
        """Not available: self-zoom's crop decision is the target's own first turn, so it cannot run apart from the
        target. Use :meth:`answer_with`.

        Raises:
            TypeError: always.
        """
        raise TypeError("self-zoom needs the target to decide: call answer_with(target, images, questions)")

    def answer_with(self, target, images: Sequence[Image.Image], questions: Sequence[str]) -> list[tuple]:
        """Run self-zoom on ``target`` (an :class:`~zoomvlm.targets.hf.HFTarget`, possibly behind a response cache,
        which self-zoom bypasses). Returns ``[(Proposal, Generation), ...]`` in order (see the class docstring).

        Raises:
            ValueError: ``target`` is not an ``hf:`` target (API and OCR targets cannot run the two-turn protocol).
        """
        from zoomvlm.awares.protocol import CROP_SET
        from zoomvlm.policies.base import Proposal
        from zoomvlm.targets.base import Generation

        hf = getattr(target, "target", target)  # unwrap a CachedTarget
        if not isinstance(hf, HFTarget):
            raise ValueError(f"--policy self-zoom needs an hf: target (the model decides itself), got {target.name}")
        results = _self_zoom(
            hf,
            images,
            questions,
            self.high,
            max_new_tokens=hf.max_new_tokens,
            reuse_kv=self.reuse_kv,
            system=self.protocol.system,
            crops_text=self.protocol.crops_text,
            views=self.protocol.views,
        )
        out = []
        self.last_turn_seconds = [[u.seconds for u in r.usage] for r in results]
        self.last_actions = [
            "tool_error" if r.tool_error is not None else "crops:" + ",".join(r.crops) if r.crops else "direct"
            for r in results
        ]
        for r in results:
            proposal = Proposal(boxes=tuple(CROP_SET[k] for k in r.crops), raw=r.turn1_text, error=r.tool_error)
            pixels = r.usage[0].view_pixels + (r.usage[1].view_pixels[-len(r.crops) :] if r.crops else ())
            usage = Usage(
                view_pixels=pixels,
                visual_tokens=r.visual_tokens,
                prompt_tokens=sum(u.prompt_tokens or 0 for u in r.usage),
                completion_tokens=sum(u.completion_tokens or 0 for u in r.usage),
                seconds=r.seconds,
            )
            out.append((proposal, Generation(r.text, usage)))
        return out
