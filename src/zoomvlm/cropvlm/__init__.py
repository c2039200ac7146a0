"""CropVLM (arXiv 2511.19820): an external learned cropper in front of any target.

- :mod:`~zoomvlm.cropvlm.cropper`: the VLM cropper policy (``--policy vlm[:CKPT]``);
- :mod:`~zoomvlm.cropvlm.curation`: model-made seed boxes (``zoomvlm curate boxes``), percentile expansion;
- :mod:`~zoomvlm.cropvlm.rewards`: the GRPO rewards (format, accuracy, likelihood) on the target's own signal;
- :mod:`~zoomvlm.cropvlm.proposals`: the reader-proposal cropper (``--policy proposals[:CKPT]``), trained by
  :mod:`~zoomvlm.cropvlm.proposal_train` (seed) and :mod:`~zoomvlm.cropvlm.proposal_grpo` (GRPO).
"""

DEFAULT_CROPPER_BUDGET = 512
"""The cropper's input budget (longest side, px) when neither a recipe nor a checkpoint gives one (CropVLM: 512)."""
