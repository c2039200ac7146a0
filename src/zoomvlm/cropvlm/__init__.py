"""CropVLM (arXiv 2511.19820): an external learned cropper in front of any target.

- :mod:`~zoomvlm.cropvlm.cropper`: the VLM cropper policy (``--policy vlm[:CKPT]``);
- :mod:`~zoomvlm.cropvlm.curation`: model-made seed boxes (``zoomvlm curate boxes``), percentile expansion;
- :mod:`~zoomvlm.cropvlm.rewards`: the GRPO rewards (format, accuracy, likelihood) on the target's own signal.
"""

DEFAULT_CROPPER_BUDGET = 512
"""The cropper's input budget (longest side, px) when neither a recipe nor a checkpoint gives one (CropVLM: 512)."""
