"""The policy registry: a spec string (`--policy`) -> a policy, and the help text of every spec."""

from __future__ import annotations

import re

from zoomvlm.core.geometry import Budget
from zoomvlm.policies.base import ZoomPolicy
from zoomvlm.policies.baselines import CenterCrop, FullResolution, NoZoom, OracleCrop

POLICY_SPECS = {
    "none": "global view at the target's budget only (cheap baseline)",
    "full": "whole image at native resolution (accuracy reference, RTR 1.0)",
    "center[:F]": "one crop of F x width/height about the centre (default 0.5)",
    "oracle[:M]": "crop around the human evidence box padded by M (EVALUATION ONLY: needs labels)",
    "vlm:CKPT": "a learned cropper (CropVLM): a VLM checkpoint (hub id or save_pretrained folder)",
    "vlm": "the shipped learned cropper (a tiny SmolVLM-architecture model trained on receipts, CPU)",
    "vlm[:CKPT]@OPTS": "cropper options, separated by , or @: free (no constrained decoding), boxes=K (up to K "
    "boxes, K crops), t=T (sample at temperature T), side=PX (split the cropper's view into tiles at PX)",
    "proposals[:CKPT]": "learned cropper over the reader's own candidate lines/blocks (PP-OCR text pass, shared "
    "with an ocr target at the same budget; line boxes from the detector at a higher budget; MiniLM question "
    "features); no CKPT: the shipped one (text 384 px, boxes 1024 px, 3 crops, each widened into a window "
    "centred on its region whose text stays legible to the target, at most a quarter of the page)",
    "proposals+prior[:CKPT]": "the prior's box first, then the proposals scorer's top k-1 lines it does not cover",
    "prior[:CKPT]": "non-reading control: the nearest training questions' model-made box, placed in the page's "
    "ink outline; no CKPT: the shipped one",
    "crop-set[:CKPT][@HIGH]": "AwaRes crop-set policy: low-res view + the high-res crops a small VLM requests "
    "(no CKPT: the shipped tiny one; HIGH: the high-resolution budget, default the trained one)",
    "crop-set-reader[:CKPT][@HIGH]": "AwaRes crop-set policy that looks: the reader's pass over a cheap view (shared "
    "with an ocr target reading the same low view) + the proposals scorer find the answer's region; a small head "
    "trained by GRPO on R_ans - C_tool picks NO_CROPS or the crops covering it (AwaRes's set, or the finer text "
    "set if the checkpoint says so); no CKPT: the hand-set initial head",
    "crop-set-fixed:KEYS[@HIGH]": "low-res view + always the crop-set regions KEYS (e.g. all, or 0,1,2,3 or 0+1+2+3; "
    "none = the low view only)",
    "crop-set-oracle[:T][@HIGH]": "low-res view + the crops whose IoU with the human box is >= T (EVALUATION ONLY)",
    "self-zoom[:PROTOCOL][@HIGH]": "hf: targets: the target itself decides (AwaRes): low view, optional GET_CROPS, "
    "answer with the crops and the reused KV cache. PROTOCOL awares (the released AwaRes model's, default) or "
    "zoomvlm (ours); HIGH default pixels:1605632 (awares) / side:768 (zoomvlm)",
    "attention[:F]": "hf: targets: training-free ViCrop crop where the target's own answer-start attention over "
    "the image, relative to a generic question's, is highest; F = crop side fraction (default 0.5)",
}


def spec_kind(spec: str) -> str:
    """The kind of a spec string: ``"vlm:runs/x"`` -> ``"vlm"``, ``"crop-set@side:768"`` -> ``"crop-set"``,
    ``"center[:F]"`` (a :data:`POLICY_SPECS` form) -> ``"center"``."""
    return spec.split("[")[0].split(":")[0].split("@")[0]


def check_policy_spec(spec: str) -> None:
    """Refuse an unknown policy kind BEFORE anything loads (the CLI calls it before loading a target).

    Raises:
        ValueError: the kind is not one of :data:`POLICY_SPECS`, with the accepted forms.
    """
    if spec_kind(spec) not in {spec_kind(form) for form in POLICY_SPECS}:
        forms = "; ".join(f"{k} ({v})" for k, v in POLICY_SPECS.items())
        raise ValueError(f"unknown policy {spec!r}; use one of: {forms}")


def default_crop_set_path() -> str:
    """Folder of the AwaRes crop-set policy shipped inside the package (``crop-set`` with no checkpoint)."""
    from importlib import resources

    return str(resources.files("zoomvlm") / "assets" / "crop_set_policy")


def default_cropper_path() -> str:
    """Folder of the learned cropper shipped inside the package (``vlm`` with no checkpoint)."""
    from importlib import resources

    return str(resources.files("zoomvlm") / "assets" / "cropper")


def load_policy(spec: str, **kwargs) -> ZoomPolicy:
    """Build a policy from its spec string (see :data:`POLICY_SPECS`).

    Raises:
        ValueError: unknown spec or a bad argument, with the accepted forms.
    """
    kind, _, arg = spec.partition(":")
    try:
        if kind.partition("@")[0] == "self-zoom":
            from zoomvlm.awares.self_zoom import SelfZoomPolicy

            head, _, high = spec.partition("@")
            protocol = head.partition(":")[2] or "awares"
            return SelfZoomPolicy(protocol, high=high or None)
        if kind == "attention":
            from zoomvlm.policies.attention import AttentionCrop

            return AttentionCrop(float(arg)) if arg else AttentionCrop()
        if kind == "none" and not arg:
            return NoZoom()
        if kind == "full" and not arg:
            return FullResolution()
        if kind == "center":
            return CenterCrop(float(arg)) if arg else CenterCrop()
        if kind == "oracle":
            return OracleCrop(float(arg)) if arg else OracleCrop()
        if kind == "vlm" or kind.startswith("vlm@"):
            from zoomvlm.cropvlm.cropper import VLMCropper

            return VLMCropper.from_spec(arg or kind[3:], default_cropper_path(), **kwargs)
        if kind == "proposals":
            from zoomvlm.cropvlm.proposals import ProposalCropper

            return ProposalCropper(arg or None, **kwargs)
        if kind == "proposals+prior":
            from zoomvlm.cropvlm.proposals import ProposalCropper
            from zoomvlm.policies.prior import QuestionPrior

            policy = ProposalCropper(arg or None, prior=QuestionPrior(), **kwargs)
            policy.prior.encoder = policy.encoder  # one MiniLM
            policy.name = f"proposals+prior:{arg}" if arg else "proposals+prior"
            return policy
        if kind == "prior":
            from zoomvlm.policies.prior import QuestionPrior

            return QuestionPrior(arg or None, **kwargs)
        if kind.startswith("crop-set"):
            return _crop_set_policy(kind, arg, **kwargs)
    except ValueError as err:
        raise ValueError(f"bad policy {spec!r}: {err}") from err
    forms = "; ".join(f"{k} ({v})" for k, v in POLICY_SPECS.items())
    raise ValueError(f"unknown policy {spec!r}; use one of: {forms}")


def _crop_set_policy(kind: str, arg: str, **kwargs) -> ZoomPolicy:
    if "@" in kind:  # e.g. "crop-set@side:768" arrives as kind "crop-set@side", arg "768"
        kind, _, high_head = kind.partition("@")
        arg, high = "", f"{high_head}:{arg}" if arg else high_head
    else:
        arg, _, high = arg.partition("@")
    high = high or None
    policy, default_high = _build_crop_set_policy(kind, arg, high, **kwargs)
    # "@HIGH" changes the low view and the crops: it is part of the name (records, run.json, reports) unless it is
    # the policy's default anyway, so that "crop-set@side:512" and "crop-set" never pass for one run
    if high is not None and "name" not in kwargs and policy.high != default_high:
        policy.name = f"{policy.name}@{policy.high}"
    return policy


def _build_crop_set_policy(kind: str, arg: str, high: str | None, **kwargs) -> tuple[ZoomPolicy, Budget]:
    """(the policy, the high budget it would have without ``@HIGH``)."""
    from zoomvlm.awares.policies import DEFAULT_HIGH, CropSetPolicy, FixedCropSet, OracleCropSet, trained_high

    if kind == "crop-set-reader":
        from zoomvlm.awares.reader_policy import ReaderCropSetPolicy

        policy = ReaderCropSetPolicy(arg or None, high=high, **kwargs)
        return policy, Budget.parse(policy.config.high)
    if kind == "crop-set":
        checkpoint = arg or str(default_crop_set_path())
        if not arg:
            kwargs.setdefault("name", "crop-set")
        return CropSetPolicy(checkpoint, high=high, **kwargs), trained_high(checkpoint)
    if kind == "crop-set-fixed" and arg:
        # "+" too: lmms-eval splits model_args on commas
        keys = [] if arg == "none" else re.split(r"[,+]", arg)  # "none": the low view only (the policy's own name)
        return FixedCropSet(keys, high=high), DEFAULT_HIGH
    if kind == "crop-set-oracle":
        return (OracleCropSet(high=high, iou_threshold=float(arg)) if arg else OracleCropSet(high=high)), DEFAULT_HIGH
    raise ValueError(f"unknown crop-set policy {kind!r}")
