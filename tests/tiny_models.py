"""Tiny, randomly initialised VLMs of the REAL architectures, built offline in a fraction of a second.

Three builders return ``(model, processor)`` pairs that behave like the real checkpoints in every way that
matters to the zoom pipeline (processor maths, image-token expansion, chat templates, ``generate``), only
with a handful of parameters and a small byte-level BPE vocabulary trained on a built-in corpus.

Which builder is for what: these tiny models serve the fast training and end-to-end tests (SFT/GRPO steps, the
cropper, rewards, KV reuse on SmolVLM2-class models), where one small shared vocabulary and small images matter
more than the released processors. Anything that depends on what the RELEASED processors do (budgets reaching the
encoder, visual-token counts and RTR, the real chat templates, the ``idefics3`` model type, attention-map layouts)
uses ``tests/real_models.py`` (the real files of ``../shared/models``, random weights, size keys shrunk).

=======================  =========================================  ==============================  ======
builder                  model class                                processor (image processor)     params
=======================  =========================================  ==============================  ======
``build_tiny_smolvlm``   ``SmolVLMForConditionalGeneration``        ``SmolVLMProcessor``            2.8 M
                                                                    (``SmolVLMImageProcessorPil``)
``build_tiny_qwen25vl``  ``Qwen2_5_VLForConditionalGeneration``     ``Qwen2_5_VLProcessor``         2.2 M
                                                                    (``Qwen2VLImageProcessorPil``)
``build_tiny_llava``     ``LlavaForConditionalGeneration``          ``LlavaProcessor``              2.1 M
                                                                    (``CLIPImageProcessorPil``)
=======================  =========================================  ==============================  ======

All three share ONE vocabulary (:func:`build_tokenizer`, 1427 tokens), so a special token has the same id
everywhere; only the roles (bos/eos/pad) and the chat template differ per architecture. Everything is
deterministic given ``seed``; nothing touches the network. ``model.config.image_token_id`` is the placeholder
id the processor expands in ``input_ids`` for every architecture (LLaVA stores it as ``image_token_index``;
``image_token_id`` is an alias); ``processor.image_token_id`` holds the same id.

Building inputs (identical tensors for all three routes and all three architectures)::

    messages = [{"role": "user", "content": [
        {"type": "image", "image": img1}, {"type": "image", "image": img2}, {"type": "text", "text": q}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    # or: images not in the messages ({"type": "image"} only) and processor_kwargs={"images": [img1, img2]}
    # or: prompt = processor.apply_chat_template(messages, add_generation_prompt=True)   # str
    #     inputs = processor(text=[prompt], images=[[img1, img2]], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)

Scoring an answer by teacher forcing: ``processor(text=[prompt + assistant_suffix(processor, answer)],
images=[[img1, img2]], return_tensors="pt")``; the first ``len(prompt ids)`` tokens equal the prompt's, the rest
are the answer and the end-of-turn token. Always pass ALL processor outputs to the model: Qwen2.5-VL silently
falls back to 1-D positions (different logits) without ``mm_token_type_ids``.
"""

from __future__ import annotations

import os
import random
from functools import lru_cache
from typing import Any

from zoomvlm.awares.weighted_sft import TINY_SMOLVLM_CHAT_TEMPLATE
from zoomvlm.targets.hf_compat import (
    ensure_processors_without_torchvision,
    load_processor,
    placeholder_video_processor,
)

__all__ = [
    "LLAVA_CHAT_TEMPLATE",
    "QWEN25VL_CHAT_TEMPLATE",
    "SMOLVLM_CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "assistant_suffix",
    "build_tiny_llava",
    "build_tiny_qwen25vl",
    "build_tiny_smolvlm",
    "build_tokenizer",
    "load_tiny",
    "save_tiny",
]

# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------

# Every special token any of the three processors emits or looks up. Order fixes the ids (0, 1, 2, ...), so
# the same token has the same id in every tiny model.
SPECIAL_TOKENS: list[str] = [
    "<|endoftext|>",  # Qwen pad / SmolVLM unk
    "<|im_start|>",  # SmolVLM bos, ChatML turn start
    "<|im_end|>",  # Qwen eos, SmolVLM pad
    "<s>",  # LLaVA (llama) bos
    "</s>",  # LLaVA eos
    "<pad>",  # LLaVA pad
    "<unk>",  # LLaVA unk
    "<image>",  # SmolVLM / LLaVA image placeholder
    "<video>",  # SmolVLM video placeholder (looked up by the processor)
    "<fake_token_around_image>",  # SmolVLM tile separator
    "<global-img>",  # SmolVLM global (downscaled) view marker
    "<end_of_utterance>",  # SmolVLM end of turn (= eos)
    "<|vision_start|>",  # Qwen2.5-VL
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",  # Qwen2.5-VL image placeholder
    "<|video_pad|>",
] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]  # SmolVLM tile positions (<= 6x6 grid)

# SmolVLM-Instruct's stock template (as shipped with HuggingFaceTB/SmolVLM-256M-Instruct, plus <video>).
SMOLVLM_CHAT_TEMPLATE = TINY_SMOLVLM_CHAT_TEMPLATE  # defined in the package: shipped checkpoints carry it

# Qwen2.5-VL-Instruct's ChatML template (as shipped with Qwen/Qwen2.5-VL-3B-Instruct).
QWEN25VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# llava-hf/llava-1.5-7b-hf's template: "USER: <image>\n<image>\nq ASSISTANT:" (images first, then text).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_ARCH_TOKENS: dict[str | None, dict[str, Any]] = {
    # Roles as in the real tokenizers. None = architecture-neutral.
    None: {"eos_token": "<|endoftext|>", "pad_token": "<pad>", "chat_template": None},
    "smolvlm": {
        "bos_token": "<|im_start|>",
        "eos_token": "<end_of_utterance>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "chat_template": SMOLVLM_CHAT_TEMPLATE,
    },
    "qwen2_5_vl": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": QWEN25VL_CHAT_TEMPLATE},
    "llava": {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "chat_template": LLAVA_CHAT_TEMPLATE,
    },
}

_BASE_SENTENCES = """\
The quick brown fox jumps over the lazy dog.
What is the total amount on this receipt?
What is the date on the receipt?
What is the name of the store?
Where should I look to read the total?
The total amount due is 9.00 RM.
The answer is in the bottom part of the image.
Please describe this image in detail.
Look at the crops and answer the question.
Which region of the image contains the answer?
I need a closer look at the top left corner.
Zoom in on the region with the prices.
The text is too small to read, so I will zoom in.
Answer with a single word or phrase.
Output the bounding box of the total as [x1, y1, x2, y2].
The bounding box is [12, 34, 56, 78].
The box is [0, 0, 100, 100].
GET_CROPS: ['0', '5']
GET_CROPS: ['1', '2', '3']
GET_CROPS: []
ANSWER: 12.50
Thank you for shopping with us. Please come again!
CASH CHANGE SUBTOTAL TAX DISCOUNT ROUNDING QTY PRICE AMOUNT ITEM
TOTAL RM 45.60
GST 6% included in total.
Tel: 03-1234 5678 Fax: 03-8765 4321
Invoice No: INV-000123 Date: 25/12/2018 Time: 14:35
SDN BHD, JALAN, KUALA LUMPUR, SELANGOR, MALAYSIA
user assistant system User Assistant System USER ASSISTANT
You are a helpful assistant.
yes no one two three four five six seven eight nine ten
The image shows a document with text, numbers, tables and a logo.
Picture 1: Picture 2: Video 1:
Vision-language models read an image and a question, then write an answer one token at a time.
A small model cannot see fine print in a large photograph, because the image is resized before encoding.
Cropping the relevant region and looking again at higher resolution often recovers the missing details.
The policy chooses which tiles to request; the reader model then answers from the crops it received.
Receipts, invoices, menus, forms, charts, maps, street signs and screenshots all contain small text.
Good answers are short, exact and copied from the document: amounts, dates, names, addresses and codes.
The store opened in January and closes at ten in the evening on weekdays, except on public holidays.
Customers paid by credit card, debit card, cash, voucher or mobile wallet; the change was returned.
Each line lists the quantity, the unit price and the amount; the subtotal, service charge and tax follow.
Please keep this receipt as proof of purchase. Goods sold are not returnable or exchangeable.
The weather was cold and windy, so we stayed inside, drank hot chocolate and talked about the trip.
Scientists measure temperature, pressure, distance and speed with instruments that must be calibrated.
History, geography, mathematics, physics, chemistry, biology, music and literature are school subjects.
Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April May June July
August September October November December morning afternoon evening night today tomorrow yesterday
red green blue yellow black white orange purple brown grey pink gold silver dark light bright
north south east west up down inside outside above below between near far before after during
people person man woman child children family friend teacher doctor driver cashier customer manager
house school office shop market restaurant hotel hospital station airport street road city country
bank account card payment balance credit debit transfer deposit withdrawal receipt refund order
Hello, how are you? I am fine, thank you. Could you help me find the nearest train station, please?
It is important to check the numbers carefully, since a single wrong digit changes the meaning.
The chart shows that sales increased from 2019 to 2021 and decreased slightly in the following year.
"""

_ITEMS = ["MILO", "RICE", "BREAD", "EGG", "SUGAR", "TEA", "COFFEE", "NOODLE", "CHICKEN", "WATER", "SOAP", "MILK"]
_WORDS = (
    "the a an of in on at to for with and or is are was be this that it its from by as what which where how "
    "image text total receipt store date price amount number answer question region crop zoom look read left "
    "right top bottom middle corner line table page document small large first second last value"
).split()


@lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    """A small deterministic English + receipt corpus (~1.6k lines) for training the BPE."""
    rng = random.Random(1234)
    lines = [ln for ln in _BASE_SENTENCES.splitlines() if ln]
    for _ in range(400):
        price = f"{rng.randint(0, 999)}.{rng.randint(0, 99):02d}"
        date = f"{rng.randint(1, 28):02d}/{rng.randint(1, 12):02d}/20{rng.randint(10, 25)}"
        box = [rng.randint(0, 999) for _ in range(4)]
        crops = sorted(rng.sample(range(16), rng.randint(0, 3)))
        lines += [
            f"{rng.choice(_ITEMS)} {rng.randint(1, 9)} x {price} RM {price}",
            f"TOTAL: RM {price}  Date: {date}",
            f"[{box[0]}, {box[1]}, {box[2]}, {box[3]}].",
            "GET_CROPS: " + str([str(c) for c in crops]),
            " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))).capitalize() + rng.choice(".?!,;:"),
        ]
    return tuple(lines)


@lru_cache(maxsize=1)
def _trained_tokenizer_json(vocab_size: int = 1536) -> str:
    """Train the byte-level BPE once per process (~0.1 s on 2 cores); cached as its JSON serialisation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Digits one by one (as Qwen2 / SmolLM2 do), then GPT-2 byte-level splitting.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_corpus()), trainer=trainer)
    return tok.to_str()


def build_tokenizer(save_dir: str | os.PathLike | None = None, arch: str | None = None):
    """A ``PreTrainedTokenizerFast`` (byte-level BPE, 1427 tokens) trained offline on a built-in corpus.

    ``arch`` in ``{None, "smolvlm", "qwen2_5_vl", "llava"}`` picks the special-token roles and chat template of
    that model family (e.g. LLaVA's tokenizer prepends ``<s>`` like the llama tokenizer does; SmolVLM and Qwen
    add nothing). The vocabulary and the ids are identical for every ``arch``. Saved to ``save_dir`` if given.
    """
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    if arch not in _ARCH_TOKENS:
        raise ValueError(f"arch must be one of {list(_ARCH_TOKENS)}, got {arch!r}")
    backend = Tokenizer.from_str(_trained_tokenizer_json())
    roles = dict(_ARCH_TOKENS[arch])
    chat_template = roles.pop("chat_template")
    if arch == "llava":
        bos_id = backend.token_to_id("<s>")
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    named = set(roles.values())
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=8192,  # = the tiny models' max_position_embeddings
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in named],
        chat_template=chat_template,
        **roles,
    )
    if save_dir is not None:
        tokenizer.save_pretrained(save_dir)
    return tokenizer


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


def _init_model(model_cls, config, seed: int):
    """Instantiate ``model_cls(config)`` with weights drawn from ``seed`` without touching the global RNG."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.eval()


def _set_generation_ids(model, tokenizer, eos_ids: list[int] | None = None) -> None:
    """pad/eos/bos ids on ``generation_config`` so ``generate`` needs no extra arguments (and does not warn)."""
    gen = model.generation_config
    gen.pad_token_id = tokenizer.pad_token_id
    gen.eos_token_id = eos_ids if eos_ids is not None else tokenizer.eos_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    gen.do_sample = False


def _text_config(tokenizer, **overrides: Any) -> dict[str, Any]:
    """The shared tiny decoder (llama-style): 2 layers of width 256 instead of ~30 layers of width 576-3584."""
    cfg: dict[str, Any] = {
        "vocab_size": len(tokenizer),  # 1427 instead of 49k-152k: the tiny BPE vocabulary
        "hidden_size": 256,  # 576 (SmolVLM-256M) ... 2048 (Qwen2.5-VL-3B): width dominates CPU time
        "intermediate_size": 512,  # 2x hidden instead of ~2.7-5.4x: cheapest MLP that is still an MLP
        "num_hidden_layers": 2,  # 2 instead of 30-36: enough to exercise the KV cache across layers
        "num_attention_heads": 4,  # head_dim 64 (real: 64-128)
        "num_key_value_heads": 2,  # keeps grouped-query attention (real models use GQA)
        "max_position_embeddings": 8192,  # rotary: costs no parameters; room for several images
        "rms_norm_eps": 1e-5,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }
    cfg.update(overrides)
    return cfg


def build_tiny_smolvlm(seed: int = 0, *, tile_size: int = 256, longest_edge: int = 512, image_splitting: bool = True):
    """A ~2.8M-parameter ``SmolVLMForConditionalGeneration`` + ``SmolVLMProcessor``.

    Image path (same code as SmolVLM-256M/500M/2.2B): an image is resized so its longest side is
    ``longest_edge`` (default 512), then up to the next multiple of ``tile_size`` (default 256) and cut into
    ``rows x cols`` tiles of ``tile_size``^2 plus one global view resized to ``tile_size``^2;
    ``pixel_values`` is ``[batch, n_tiles_max, 3, tile_size, tile_size]`` (padded with zero tiles,
    ``pixel_attention_mask`` marks real ones). Each tile becomes ``(tile_size/16)^2 / 4^2`` = 16 ``<image>``
    tokens (``processor.image_seq_len``), wrapped as ``<fake_token_around_image><row_r_col_c><image>*16`` and
    ``<fake_token_around_image><global-img><image>*16<fake_token_around_image>``. A 300x200 image gives 2x2
    tiles + global = 80 image tokens; images whose resized size fits one tile give 16.
    ``image_splitting=False`` keeps only the global view (16 tokens per image, the cheapest input; the CPU
    cropper recipe uses it).
    """
    ensure_processors_without_torchvision()
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMProcessor
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    patch_size, scale_factor = 16, 4  # as in SmolVLM-256M/500M (patch 16, pixel-shuffle 4)
    if tile_size % (patch_size * scale_factor):
        raise ValueError(f"tile_size must be a multiple of {patch_size * scale_factor}")
    image_seq_len = (tile_size // patch_size) ** 2 // scale_factor**2
    tokenizer = build_tokenizer(arch="smolvlm")
    config = SmolVLMConfig(
        vision_config={
            "hidden_size": 128,  # 768 in SmolVLM-256M: width is the vision tower's main cost
            "intermediate_size": 256,  # 2x hidden instead of 4x
            "num_hidden_layers": 2,  # 12 in SmolVLM-256M
            "num_attention_heads": 4,  # head_dim 32
            "image_size": tile_size,  # 512 in the real model: 256 px tiles are 4x fewer patches per tile
            "patch_size": patch_size,
        },
        text_config=_text_config(tokenizer, model_type="llama", rope_theta=100000.0),
        scale_factor=scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = _init_model(SmolVLMForConditionalGeneration, config, seed)
    _set_generation_ids(model, tokenizer)

    image_processor = SmolVLMImageProcessorPil(
        size={"longest_edge": longest_edge},  # 2048 in SmolVLM-256M: few tiles per image
        max_image_size={"longest_edge": tile_size},  # tile side = vision image_size
        do_image_splitting=image_splitting,
    )
    video_processor = SmolVLMVideoProcessor(
        size={"longest_edge": tile_size}, max_image_size={"longest_edge": tile_size}
    )  # never used for images; required by the processor's constructor
    processor = SmolVLMProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        image_seq_len=image_seq_len,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )
    return model, processor


def build_tiny_qwen25vl(seed: int = 0, *, max_pixels: int = 128 * 28 * 28, min_pixels: int = 8 * 28 * 28):
    """A ~2.2M-parameter ``Qwen2_5_VLForConditionalGeneration`` + ``Qwen2_5_VLProcessor``.

    Image path (same code as Qwen2.5-VL-3B/7B): the image is resized to multiples of 28 px with
    ``min_pixels <= H*W <= max_pixels`` (default max 128*28*28 = 100k px, i.e. <= 128 merged tokens), cut into
    14 px patches flattened with the temporal axis (images are repeated twice): ``pixel_values`` is
    ``[sum_i (H_i/14)*(W_i/14), 3*2*14*14 = 1176]``, ``image_grid_thw`` is ``[n_images, 3]`` = ``(1, H/14, W/14)``.
    Each image becomes ``t*h*w / 2^2`` ``<|image_pad|>`` tokens between ``<|vision_start|>`` and
    ``<|vision_end|>`` (a 300x200 image -> 196x308 px -> 7*11 = 77 tokens). Positions use 3-D M-RoPE.
    """
    ensure_processors_without_torchvision()
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = build_tokenizer(arch="qwen2_5_vl")
    ids = tokenizer.convert_tokens_to_ids
    text_hidden = 256
    config = Qwen2_5_VLConfig(
        vision_config={
            "depth": 2,  # 32 in the real model
            "hidden_size": 64,  # 1280 in the real model
            "intermediate_size": 128,  # 3420 in the real model
            "num_heads": 2,  # head_dim 32 (real: 80)
            "patch_size": 14,  # unchanged: the processor's geometry depends on it
            "spatial_merge_size": 2,  # unchanged
            "temporal_patch_size": 2,  # unchanged
            "window_size": 112,  # unchanged (window attention over 112 px = 4x4 merged tokens)
            "fullatt_block_indexes": [1],  # real: [7, 15, 23, 31]; keep one windowed + one full-attention block
            "out_hidden_size": text_hidden,  # projector output = text width
            "tokens_per_second": 2,
        },
        text_config=_text_config(
            tokenizer,
            hidden_size=text_hidden,
            bos_token_id=ids("<|endoftext|>"),  # Qwen's tokenizer adds no bos; config names <|endoftext|>
            # M-RoPE: (temporal, height, width) sections of the rotary half-dim; must sum to head_dim/2 = 32
            # (real: [16, 24, 24] for head_dim 128; same proportions here).
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]},
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    model = _init_model(Qwen2_5_VLForConditionalGeneration, config, seed)
    # As Qwen2.5-VL-Instruct's generation_config: stop on <|im_end|> or <|endoftext|>.
    _set_generation_ids(model, tokenizer, eos_ids=[ids("<|im_end|>"), ids("<|endoftext|>")])

    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels,  # real: 56*56 / 3136; 8 merged tokens minimum keeps tiny crops usable
        max_pixels=max_pixels,  # real: 12845056 (16k tokens); 128 tokens per image keeps the forward fast
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=_qwen_video_processor(min_pixels, max_pixels),
        chat_template=QWEN25VL_CHAT_TEMPLATE,
    )
    return model, processor


def _qwen_video_processor(min_pixels: int, max_pixels: int):
    """The real ``Qwen2VLVideoProcessor`` when torchvision exists, else the images-only placeholder."""
    geometry = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    if ensure_processors_without_torchvision():
        return placeholder_video_processor(size=size, **geometry)
    from transformers import Qwen2VLVideoProcessor

    return Qwen2VLVideoProcessor(size=size, **geometry)


def build_tiny_llava(seed: int = 0, *, image_size: int = 112):
    """A ~2.1M-parameter ``LlavaForConditionalGeneration`` (CLIP vision tower + llama decoder) + ``LlavaProcessor``.

    Image path (same code as llava-1.5-7b-hf): ``CLIPImageProcessorPil`` resizes the shortest side to
    ``image_size`` (default 112) and center-crops to ``image_size``^2: ``pixel_values`` is
    ``[n_images, 3, image_size, image_size]``. CLIP with 14 px patches gives ``(image_size/14)^2`` = 64 patch
    features (+CLS, dropped by ``vision_feature_select_strategy="default"``) taken from the second-to-last layer,
    so every image becomes exactly 64 ``<image>`` tokens (``model.config.image_seq_length``).
    """
    ensure_processors_without_torchvision()
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    patch_size = 14  # as in CLIP ViT-L/14-336 used by LLaVA-1.5
    if image_size % patch_size:
        raise ValueError(f"image_size must be a multiple of {patch_size}")
    n_tokens = (image_size // patch_size) ** 2
    tokenizer = build_tokenizer(arch="llava")
    config = LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 64,  # 1024 in CLIP ViT-L
            "intermediate_size": 128,  # 4096 in CLIP ViT-L
            "num_hidden_layers": 2,  # 24 in CLIP ViT-L; >= 2 because features come from layer -2
            "num_attention_heads": 2,  # head_dim 32
            "image_size": image_size,  # 336 in LLaVA-1.5: 64 instead of 576 tokens per image
            "patch_size": patch_size,
            "projection_dim": 64,
        },
        text_config=_text_config(tokenizer, model_type="llama"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=n_tokens,
        vision_feature_select_strategy="default",  # drop CLS, as LLaVA-1.5
        vision_feature_layer=-2,  # as LLaVA-1.5
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    model = _init_model(LlavaForConditionalGeneration, config, seed)
    _set_generation_ids(model, tokenizer)

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},  # 336 in LLaVA-1.5
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",  # must match the model: 64 tokens, no CLS
        num_additional_image_tokens=1,  # CLIP's CLS token (removed again by the "default" strategy)
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return model, processor


def save_tiny(model, processor, path: str | os.PathLike) -> str:
    """Save model + processor in the standard ``save_pretrained`` layout (one folder); returns the path.

    Reload with :func:`load_tiny`, or ``zoomvlm.targets.hf_compat.load_processor(path)`` +
    ``AutoModelForImageTextToText.from_pretrained(path)``.
    """
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def load_tiny(path: str | os.PathLike):
    """``(model, processor)`` from a folder written by :func:`save_tiny` (model in eval mode)."""
    from transformers import AutoModelForImageTextToText

    processor = load_processor(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    return model, processor


def assistant_suffix(processor, answer: str) -> str:
    """The text after the generation prompt when the assistant answers ``answer`` and ends its turn:
    SmolVLM ``" {answer}<end_of_utterance>"``, Qwen2-VL/Qwen2.5-VL ``"{answer}<|im_end|>"``, LLaVA-1.5
    ``" {answer}</s>"`` (delegates to :func:`zoomvlm.targets.hf.answer_text`, the one place that knows)."""
    from zoomvlm.targets.hf import answer_text

    return answer_text(processor, answer, end_of_turn=True)
