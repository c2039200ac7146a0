"""Workarounds for loading/building transformers processors on machines WITHOUT torchvision.

Why this module exists
----------------------
transformers 5.x builds every multimodal processor (SmolVLM, Qwen2.5-VL, LLaVA, ...) through
``ProcessorMixin``, which type-checks each sub-processor against a base class looked up *by name* on the
lazily imported ``transformers`` module (``transformers.processing_utils.transformers_module``). On a machine
without torchvision (e.g. the CPU-only CI box: no torchvision wheel exists for its torch build) the name
``VideoProcessorMixin`` is not exported there, so even a processor that is only ever fed images fails to build,
and ``AutoProcessor.from_pretrained`` additionally tries to load a torchvision-backed video processor.

Real users who ``pip install torchvision`` need NONE of this: every function here is a no-op pass-through for
them (``ensure_processors_without_torchvision`` returns early, ``load_processor`` just calls
``AutoProcessor.from_pretrained``). Keep all such shims in this one module so they are easy to delete.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

__all__ = [
    "ensure_processors_without_torchvision",
    "load_processor",
    "placeholder_video_processor",
    "torchvision_available",
]

# Image processor classes that need torchvision, mapped to the PIL/numpy twin that does the same maths.
# Used when a saved folder names the torchvision class (e.g. a checkpoint saved on a torchvision machine).
_PIL_TWINS = {
    "Idefics3ImageProcessor": "Idefics3ImageProcessorPil",
    "SmolVLMImageProcessor": "SmolVLMImageProcessorPil",
    "Qwen2VLImageProcessor": "Qwen2VLImageProcessorPil",
    "CLIPImageProcessor": "CLIPImageProcessorPil",
    "LlavaImageProcessor": "LlavaImageProcessorPil",
}

# `from_pretrained` arguments that concern *where* files come from; everything else passed to `load_processor`
# overrides a processor/image-processor setting (as with AutoProcessor, e.g. `size=...`).
_LOADER_KWARGS = frozenset(
    {"cache_dir", "force_download", "local_files_only", "token", "revision", "trust_remote_code", "proxies"}
)

_SHIM_APPLIED = False


def torchvision_available() -> bool:
    """True when ``import torchvision`` would succeed (then no shim is needed)."""
    return importlib.util.find_spec("torchvision") is not None


def ensure_processors_without_torchvision() -> bool:
    """Make transformers' processors constructible without torchvision. Idempotent.

    Returns True when the shim is (now) in place, False when torchvision is importable and nothing was done.

    The shim: ``ProcessorMixin.check_argument_for_proper_class`` resolves the expected base class of a
    ``video_processor`` argument with ``getattr(transformers_module, "VideoProcessorMixin")``, where
    ``transformers_module`` is the lazy module object held by ``transformers.processing_utils``. Without
    torchvision that lazy module does not export the name (it is guarded by a torchvision requirement), so
    building e.g. ``SmolVLMProcessor`` raises before any image is touched. The class itself lives in
    ``transformers.video_processing_utils`` and imports fine, so we expose it on that exact module object.
    (Setting ``transformers.VideoProcessorMixin`` through the package does not help: the lookup goes through
    the separate ``transformers_module`` object.)
    """
    global _SHIM_APPLIED
    if torchvision_available():
        return False
    if _SHIM_APPLIED:
        return True
    import transformers.processing_utils as processing_utils
    from transformers.video_processing_utils import VideoProcessorMixin

    module = getattr(processing_utils, "transformers_module", None)
    if module is not None and module.__dict__.get("VideoProcessorMixin") is not VideoProcessorMixin:
        module.VideoProcessorMixin = VideoProcessorMixin
    _SHIM_APPLIED = True
    return True


@cache
def _images_only_video_processor_class() -> type:
    # Built lazily: subclassing BaseVideoProcessor imports transformers' image stack (~3 s), which
    # `import zoomvlm.targets.hf_compat` should not pay.
    from transformers.video_processing_utils import BaseVideoProcessor

    class ImagesOnlyVideoProcessor(BaseVideoProcessor):
        """Placeholder ``video_processor`` for processors that require one, used when torchvision is missing.

        ``Qwen2VLVideoProcessor`` imports torchvision at module import time, so it cannot even be instantiated
        here, yet ``Qwen2_5_VLProcessor`` type-checks its ``video_processor`` argument (and ``AutoProcessor``
        cannot load ``SmolVLMVideoProcessor`` either). This subclass of ``BaseVideoProcessor`` satisfies the
        check and carries the geometry attributes the processors read (``merge_size``, ``patch_size``,
        ``temporal_patch_size``); calling it raises. ``to_dict`` (hence ``save_pretrained``) writes back
        ``saved_config`` under the type name ``saved_as``, so a folder re-saved here still loads with the real
        video processor on a machine that has torchvision.
        """

        patch_size = 14
        temporal_patch_size = 2
        merge_size = 2
        model_input_names = ["pixel_values_videos", "video_grid_thw"]

        def __init__(
            self,
            saved_as: str = "Qwen2VLVideoProcessor",
            saved_config: dict[str, Any] | None = None,
            **kwargs: Any,
        ) -> None:
            kwargs.pop("video_processor_type", None)
            super().__init__(**kwargs)
            self.saved_as = saved_as
            self.saved_config = dict(saved_config or {})

        def __call__(self, *args: Any, **kwargs: Any):
            raise NotImplementedError(
                "Video inputs need torchvision; this placeholder (zoomvlm.targets.hf_compat) only lets image-only "
                "processors build."
            )

        preprocess = __call__

        def to_dict(self) -> dict[str, Any]:
            out = super().to_dict()
            out.pop("saved_as", None)
            out.pop("saved_config", None)
            out.update(self.saved_config)
            out["video_processor_type"] = self.saved_as
            return out

    ImagesOnlyVideoProcessor.__module__ = __name__
    ImagesOnlyVideoProcessor.__qualname__ = "ImagesOnlyVideoProcessor"
    return ImagesOnlyVideoProcessor


def placeholder_video_processor(**kwargs: Any):
    """An :class:`ImagesOnlyVideoProcessor` (``saved_as``, ``merge_size``, ``patch_size``, ... as kwargs)."""
    return _images_only_video_processor_class()(**kwargs)


def __getattr__(name: str) -> Any:
    """``ImagesOnlyVideoProcessor`` is created on first access (see ``_images_only_video_processor_class``)."""
    if name == "ImagesOnlyVideoProcessor":
        return _images_only_video_processor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _transformers_class(name: str):
    import transformers

    try:
        return getattr(transformers, name)
    except (AttributeError, ImportError):
        return None


def _image_processor_from_config(config: dict[str, Any], overrides: dict[str, Any] | None = None):
    """Instantiate the PIL twin of the image processor described by a saved config dict."""
    config = {**config, **(overrides or {})}
    name = config.pop("image_processor_type", None) or ""
    config.pop("processor_class", None)
    candidates = [] if name.endswith("Pil") else [_PIL_TWINS.get(name, name + "Pil")]
    candidates.append(name)
    for cand in candidates:
        cls = _transformers_class(cand)
        if cls is None or "dummy" in getattr(cls, "__module__", ""):
            continue
        return cls(**config)
    raise ValueError(f"no torchvision-free image processor found for image_processor_type={name!r}")


def _video_processor_from_config(config: dict[str, Any] | None):
    """A torchvision-free stand-in for the saved video processor (videos need torchvision anyway)."""
    config = dict(config or {})
    name = config.pop("video_processor_type", None) or "Qwen2VLVideoProcessor"
    keep = {k: config[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "size") if k in config}
    return placeholder_video_processor(saved_as=name, saved_config=config, **keep)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _rebuild_processor(folder: Path, **kwargs: Any):
    """Rebuild a processor saved with ``processor.save_pretrained(folder)`` without AutoProcessor."""
    import transformers
    from transformers import AutoTokenizer

    ensure_processors_without_torchvision()
    proc_cfg = _read_json(folder / "processor_config.json") or {}
    pre_cfg = _read_json(folder / "preprocessor_config.json") or {}
    video_cfg = _read_json(folder / "video_preprocessor_config.json")
    tok_cfg = _read_json(folder / "tokenizer_config.json") or {}

    class_name = proc_cfg.get("processor_class") or pre_cfg.get("processor_class") or tok_cfg.get("processor_class")
    if not class_name:
        raise ValueError(f"{folder}: no 'processor_class' in processor_config.json / preprocessor_config.json")
    processor_cls = getattr(transformers, class_name)
    params = inspect.signature(processor_cls.__init__).parameters

    loader_kwargs = {k: v for k, v in kwargs.items() if k in _LOADER_KWARGS}
    processor_overrides = {k: v for k, v in kwargs.items() if k not in _LOADER_KWARGS and k in params}
    image_overrides = {k: v for k, v in kwargs.items() if k not in _LOADER_KWARGS and k not in params}

    init: dict[str, Any] = {}
    init["tokenizer"] = AutoTokenizer.from_pretrained(str(folder), **loader_kwargs)
    if "image_processor" in params:
        image_cfg = proc_cfg.get("image_processor") or pre_cfg
        if not image_cfg:
            raise ValueError(f"{folder}: no image processor config found")
        init["image_processor"] = _image_processor_from_config(image_cfg, image_overrides)
    if "video_processor" in params:
        init["video_processor"] = _video_processor_from_config(proc_cfg.get("video_processor") or video_cfg)

    # Plain (non sub-processor) constructor arguments, e.g. image_seq_len, patch_size, chat_template.
    for key, value in proc_cfg.items():
        if key in params and key not in init and key not in ("self", "kwargs"):
            init[key] = value
    if "chat_template" in params and not init.get("chat_template"):
        template_file = folder / "chat_template.jinja"
        template_json = _read_json(folder / "chat_template.json")
        if template_file.is_file():
            init["chat_template"] = template_file.read_text(encoding="utf-8")
        elif template_json and template_json.get("chat_template"):
            init["chat_template"] = template_json["chat_template"]
        elif getattr(init["tokenizer"], "chat_template", None):
            init["chat_template"] = init["tokenizer"].chat_template
    init.update(processor_overrides)
    return processor_cls(**init)


def _local_folder(path_or_id: str | os.PathLike, **kwargs: Any) -> Path | None:
    """``path_or_id`` as a local folder: itself, or the hub cache's snapshot of that repo id (no network)."""
    folder = Path(path_or_id)
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        cached = snapshot_download(
            str(path_or_id), local_files_only=True, cache_dir=kwargs.get("cache_dir"), revision=kwargs.get("revision")
        )
    except (LocalEntryNotFoundError, HFValidationError):  # not in the local hub cache, or not a repo id at all
        return None
    return Path(cached)


def load_processor(path_or_id: str | os.PathLike, **kwargs: Any):
    """Load a multimodal processor; works for local folders even without torchvision.

    1. ``AutoProcessor.from_pretrained(path_or_id, **kwargs)`` (the only step for users with torchvision or
       for hub ids);
    2. only if that fails with the ImportError of a missing torchvision, and ``path_or_id`` is a local folder
       written by ``processor.save_pretrained`` (or a hub id already in the local cache): rebuild the processor class
       named in ``processor_config.json`` from the saved tokenizer, the PIL twin of the saved image processor
       (``SmolVLMImageProcessorPil``, ``Qwen2VLImageProcessorPil``, ``CLIPImageProcessorPil``) and, where
       needed, a video processor that builds without torchvision (``ImagesOnlyVideoProcessor``; SmolVLM and
       Qwen2.5-VL need one).

    Extra ``kwargs`` are passed to ``AutoProcessor``; in the fallback, loader arguments (``revision``,
    ``cache_dir``, ...) go to the tokenizer, processor arguments (``image_seq_len``, ``chat_template``, ...) to
    the processor and anything else (``size``, ``max_pixels``, ...) to the image processor. If both steps fail
    the ``RuntimeError`` names both causes.
    """
    from transformers import AutoProcessor

    if torchvision_available():  # the normal path: nothing to work around
        return AutoProcessor.from_pretrained(str(path_or_id), **kwargs)
    ensure_processors_without_torchvision()
    try:
        return AutoProcessor.from_pretrained(str(path_or_id), **kwargs)
    except ImportError as auto_err:  # "...VideoProcessor requires the Torchvision library": what we work around
        folder = _local_folder(path_or_id, **kwargs)
        if folder is None:
            raise
        try:
            return _rebuild_processor(folder, **kwargs)
        except (ValueError, TypeError, KeyError, AttributeError, OSError) as rebuild_err:  # a config we cannot read
            raise RuntimeError(
                f"Could not load a processor from {str(path_or_id)!r}.\n"
                f"  AutoProcessor.from_pretrained failed: {type(auto_err).__name__}: {auto_err}\n"
                f"  Rebuilding without torchvision (zoomvlm.targets.hf_compat) failed: "
                f"{type(rebuild_err).__name__}: {rebuild_err}\n"
                "Installing torchvision usually fixes the first error."
            ) from rebuild_err
