"""Zoom policies: the protocol, the registry (spec string -> policy) and the method-free baselines.

``load_policy("none" | "full" | "center[:F]" | "oracle[:MARGIN]" | "vlm[:CHECKPOINT]" | "crop-set[...]")``;
the learned policies live with their method (:mod:`zoomvlm.cropvlm`, :mod:`zoomvlm.awares`).
"""

from zoomvlm.policies.base import Proposal, ZoomPolicy
from zoomvlm.policies.registry import (
    POLICY_SPECS,
    check_policy_spec,
    default_crop_set_path,
    default_cropper_path,
    load_policy,
)

__all__ = [
    "POLICY_SPECS",
    "Proposal",
    "ZoomPolicy",
    "check_policy_spec",
    "default_crop_set_path",
    "default_cropper_path",
    "load_policy",
]
