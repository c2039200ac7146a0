"""Random-weight VLMs built from the REAL configuration, tokenizer, chat-template and processor files.

``../shared/models/`` (or ``$ZOOMVLM_REAL_MODELS``) holds the released files of SmolVLM-256M-Instruct
(``idefics3``), Qwen2.5-VL-7B-Instruct and llava-1.5-7b-hf, without weights. The builders here load the real
processor (real tokenizer, real chat template, real image processor: tiling, ``min/max_pixels``, CLIP
resizing) and build the model from the real ``config.json`` with only SIZE keys shrunk (layers, hidden
widths, heads), so every token count, special-token id, patch/merge size and prompt is the released
model's, while a forward pass takes milliseconds on 2 CPU cores.

Which builder is for what (see also ``tests/tiny_models.py``):

- ``tests/real_models.py`` (this file): anything that depends on what the released processors DO
  (budgets reaching the encoder, visual-token counts, RTR in tokens, chat templates, the released AwaRes
  protocol rendered by the real Qwen template, self-zoom on the real ``idefics3`` model type, attention
  maps laid out as the real token grids).
- ``tests/tiny_models.py``: fast end-to-end and training tests (SFT/GRPO steps, cropper, rewards) that need
  a small shared vocabulary and small images more than the real processors.

Every shrunk value keeps a reason comment; vocabularies (hence embedding matrices) stay real-sized, which
is what makes these models 6-20M parameters rather than 2M.
"""

from __future__ import annotations

import os
from pathlib import Path

REAL_MODELS_DIR = Path(
    os.environ.get("ZOOMVLM_REAL_MODELS", Path(__file__).resolve().parents[1] / ".." / "shared" / "models")
)
if not REAL_MODELS_DIR.is_dir():  # worktrees live elsewhere; the shared folder is at the project root
    REAL_MODELS_DIR = Path("/work/shared/models")

FOLDERS = {
    "smolvlm": "smolvlm-256m-instruct",
    "qwen2_5_vl": "qwen2.5-vl-7b-instruct",
    "llava": "llava-1.5-7b-hf",
}

__all__ = ["FOLDERS", "REAL_MODELS_DIR", "build_real", "real_folder", "save_real"]


def real_folder(family: str) -> Path:
    """Folder of the real files of ``family`` (``smolvlm``, ``qwen2_5_vl`` or ``llava``)."""
    return REAL_MODELS_DIR / FOLDERS[family]


def _shrink(family: str, config):
    """Shrink only the size keys of a real config, in place."""
    if family == "smolvlm":
        t = config.text_config
        t.num_hidden_layers = 2  # real 30: two layers keep a real KV cache across layers
        t.hidden_size = 64  # real 576
        t.intermediate_size = 128  # real 1536
        t.num_attention_heads = 2  # real 9 (head_dim 64 -> 32)
        t.num_key_value_heads = 1  # real 3: keeps grouped-query attention
        t.head_dim = 32
        v = config.vision_config
        v.num_hidden_layers = 1  # real 12
        v.hidden_size = 32  # real 768
        v.intermediate_size = 64  # real 3072
        v.num_attention_heads = 2  # real 12
        # unchanged: patch_size 16, image_size 512, scale_factor 4 (-> 64 tokens per 512 px tile)
    elif family == "qwen2_5_vl":
        t = config.text_config
        t.num_hidden_layers = 2  # real 28
        t.hidden_size = 64  # real 3584
        t.intermediate_size = 128  # real 18944
        t.num_attention_heads = 2  # real 28 (head_dim 128 -> 32)
        t.num_key_value_heads = 1  # real 4
        t.max_window_layers = 2
        # M-RoPE sections must sum to head_dim / 2 = 16 (real [16, 24, 24] for head_dim 128; same proportions)
        rope = dict(getattr(t, "rope_parameters", None) or {})
        rope["mrope_section"] = [4, 6, 6]
        t.rope_parameters = rope
        v = config.vision_config
        v.depth = 2  # real 32
        v.hidden_size = 32  # real 1280
        v.intermediate_size = 64  # real 3420
        v.num_heads = 2  # real 16
        v.fullatt_block_indexes = [1]  # real [7, 15, 23, 31]: one windowed + one full-attention block
        v.out_hidden_size = 64  # projector output = text width
        # unchanged: patch_size 14, spatial_merge_size 2, temporal_patch_size 2, window_size 112
    elif family == "llava":
        t = config.text_config
        t.num_hidden_layers = 2  # real 32
        t.hidden_size = 64  # real 4096
        t.intermediate_size = 128  # real 11008
        t.num_attention_heads = 2  # real 32
        t.num_key_value_heads = 2
        t.head_dim = 32
        v = config.vision_config
        v.num_hidden_layers = 2  # real 24; vision_feature_layer -2 needs at least 2
        v.hidden_size = 32  # real 1024
        v.intermediate_size = 64  # real 4096
        v.num_attention_heads = 2  # real 16
        v.projection_dim = 32
        # unchanged: image_size 336, patch_size 14 (-> 24 x 24 = 576 tokens)
    else:
        raise KeyError(family)
    t = config.text_config
    if getattr(t, "layer_types", None):  # derived per layer at load time: keep it consistent with the layer count
        t.layer_types = t.layer_types[: t.num_hidden_layers]
    return config


def build_real(family: str, seed: int = 0):
    """``(model, processor)``: the real processor of ``family`` and a random-weight model of its real config
    with only size keys shrunk (float32, eval mode)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    from zoomvlm.targets.hf_compat import load_processor

    folder = real_folder(family)
    processor = load_processor(str(folder))
    config = _shrink(family, AutoConfig.from_pretrained(str(folder)))
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32).eval()
    model.name_or_path = str(folder)
    if (folder / "generation_config.json").exists():  # the released end / padding ids (SmolVLM ends turns with
        # <end_of_utterance>, not config.json's eos; Qwen2.5-VL pads with <|endoftext|>); its sampling settings are
        # not taken (greedy here, and Qwen's temperature 1e-6 without do_sample would not save)
        released = GenerationConfig.from_pretrained(str(folder))
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(model.generation_config, key, getattr(released, key))
    model.generation_config.do_sample = False
    return model, processor


def save_real(model, processor, path: str | Path) -> str:
    """Save a built pair as a model folder (``zoomvlm ... --target hf:FOLDER``); returns the path."""
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)
