"""Stage 1 of CropVLM: supervised fine-tuning on model-made boxes with TRL's ``SFTTrainer`` (loss on the box only)."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from transformers.trainer_utils import SchedulerType
from trl import SFTConfig, SFTTrainer

from zoomvlm.core.geometry import Box, Budget, crop_image, format_percent_box, parse_percent_box
from zoomvlm.train.common import (
    TrainerDefaults,
    build_cropper,
    check_resume,
    cropper_views,
    resumed_schedule_callback,
    save_final,
    train_resumable,
)
from zoomvlm.train.recipe import Recipe

logger = logging.getLogger(__name__)

__all__ = ["CropperSFTConfig", "box_preserving_crop", "run_sft", "sft_dataset"]


@dataclass
class CropperSFTConfig(TrainerDefaults, SFTConfig):
    """TRL's ``SFTConfig`` with CropVLM's SFT defaults (METHODS.md: lr 5e-5 cosine, warmup 0.03, effective
    batch 16, 1 epoch, loss on the box only); the ``trainer:`` section of ``sft`` recipes."""

    learning_rate: float = field(default=5e-5, metadata={"help": "CropVLM: 5e-5 (cosine schedule)."})
    lr_scheduler_type: SchedulerType | str = field(default="cosine", metadata={"help": "CropVLM: cosine."})
    warmup_steps: float = field(
        default=0.03, metadata={"help": "CropVLM: 0.03; a float < 1 is a ratio of the total steps (transformers 5)."}
    )
    num_train_epochs: float = field(default=1, metadata={"help": "CropVLM: 1 epoch."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "x accumulation 4 = CropVLM's 16."})
    gradient_accumulation_steps: int = field(default=4, metadata={"help": "Effective batch 16 with 4 per device."})
    completion_only_loss: bool | None = field(default=True, metadata={"help": "Loss on the box tokens only."})
    max_length: int | None = field(default=None, metadata={"help": "Never truncate: a cut splits image tokens."})
    logging_steps: float = field(default=5, metadata={"help": "Log every N steps."})
    save_steps: float = field(default=50, metadata={"help": "Checkpoint every N steps (resume point)."})


def sft_dataset(
    sft_file: str | Path, budget: Budget, limit: int | None = None, augment: float = 0.0, high: Budget | None = None
):
    """A ``datasets.Dataset`` of ``{image, prompt, completion}`` from ``sft.jsonl`` (``zoomvlm curate boxes``).

    ``image`` is the cropper's view (shrunk to ``budget`` once, here, so epochs do not re-decode 6000-px scans);
    ``prompt``/``completion`` are TRL conversational turns (text only: TRL inserts the image into the user turn).

    Args:
        augment: probability that a row, each time it is read, is replaced by a :func:`box_preserving_crop` of
            its view with the completion box rewritten in the crop's frame. A receipt's layout moves with every
            crop, so a cropper can no longer fit the boxes from the question alone and must look at the image.
            ``0`` (CropVLM's recipe) = the stored rows as they are.
        high: the crop-set policy's high view: each view is then AwaRes's low view of the image, as at inference
            (:func:`~zoomvlm.train.common.cropper_view`); ``None`` = the cropper's ``budget`` view.

    Raises:
        FileNotFoundError: no such file. ValueError: a line is not an SFT record (names the line), or
            ``augment`` is not in ``[0, 1]``.
    """
    if not 0.0 <= augment <= 1.0:
        raise ValueError(f"augment is a probability in [0, 1], got {augment}")
    import datasets

    path = Path(sft_file)
    if not path.is_file():
        raise FileNotFoundError(f"SFT file {path} not found; write it with `zoomvlm curate boxes`")
    from zoomvlm.data.samples import iter_jsonl

    rows = []
    for where, row in iter_jsonl(path):  # a bad line is named by file:line
        if not isinstance(row, dict) or not {"image", "prompt", "completion"} <= set(row):
            raise ValueError(f"{where}: an SFT record needs image, prompt and completion")
        rows.append(row)
        if limit and len(rows) >= limit:
            break
    views = cropper_views([r["image"] for r in rows], budget, high=high)
    columns = {
        "image": views,
        "prompt": [_text_only(r["prompt"]) for r in rows],
        "completion": [_text_only(r["completion"]) for r in rows],
    }
    features = {
        "image": datasets.Image(),
        "prompt": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
        "completion": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
    }
    if augment > 0:  # the row index seeds the row's crops (consumed by the transform, never reaches the trainer)
        columns["row"], features["row"] = list(range(len(rows))), datasets.Value("int64")
    dataset = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    return dataset.with_transform(_CropAugment(augment)) if augment > 0 else dataset


def box_preserving_crop(image: Image.Image, box: Box, rng: random.Random) -> tuple[Image.Image, Box]:
    """A random crop of ``image`` that still contains ``box``, and ``box`` in the crop's normalised frame.

    Each side of the crop is drawn uniformly between the image edge and the box's side (the classic
    detection augmentation "random crop keeping the object"), so the object keeps its pixels but moves and
    its normalised size changes.

    Args:
        image: any PIL image. box: normalised to ``image``. rng: the source of randomness.

    Returns:
        ``(crop, box_in_crop)``; ``box_in_crop`` is normalised to ``crop`` (e.g. ``box`` = whole image gives
        the whole image and the whole box back).
    """
    window = Box(rng.uniform(0, box.x0), rng.uniform(0, box.y0), rng.uniform(box.x1, 1), rng.uniform(box.y1, 1))
    crop = crop_image(image, window)
    # Map the box into the window with the window's PIXEL edges (crop_image rounds to whole pixels).
    w, h = image.size
    px0, py0, _, _ = window.to_pixels(w, h)
    cw, ch = crop.size

    def clamp(v: float) -> float:
        return min(1.0, max(0.0, v))

    moved = Box(
        clamp((box.x0 * w - px0) / cw),
        clamp((box.y0 * h - py0) / ch),
        clamp((box.x1 * w - px0) / cw),
        clamp((box.y1 * h - py0) / ch),
    )
    return crop, moved


class _CropAugment:
    """``with_transform`` hook of :func:`sft_dataset`: with probability ``p`` per row read, a box-preserving crop.

    A row's crop is a function of ``(seed, epoch, row)`` alone (``row`` = its index in the dataset, a column the
    transform consumes): every epoch draws new crops, and a run resumed from a checkpoint draws exactly the crops
    the uninterrupted run drew. (A stream of draws does not: a private one restarts on resume and repeated the
    first rows' crops; torch's global one is saved after the dataloader has already prefetched the next batch.)
    ``seed`` and ``epoch`` are set by :class:`AugmentEpochCallback` at the start of every epoch.
    """

    def __init__(self, p: float):
        self.p, self.seed, self.epoch = p, 0, 0

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        images, completions = [], []
        for image, completion, row in zip(batch["image"], batch["completion"], batch["row"], strict=True):
            rng = random.Random(f"{self.seed}:{self.epoch}:{row}")  # str seeds hash with sha512: stable
            if rng.random() < self.p:
                box = parse_percent_box(completion[-1]["content"])
                image, box = box_preserving_crop(image, box, rng)
                completion = [*completion[:-1], {"role": "assistant", "content": format_percent_box(box)}]
            images.append(image)
            completions.append(completion)
        return {**{k: v for k, v in batch.items() if k != "row"}, "image": images, "completion": completions}


class AugmentEpochCallback:
    """Tells an augmented :func:`sft_dataset` the run's seed and the epoch about to start (see ``_CropAugment``).

    The epoch comes from the optimiser step at the epoch's start (``global_step // update steps per epoch``, as the
    Trainer itself counts epochs when it resumes), so a resumed run gets the same number as the uninterrupted one.
    A no-op for a dataset without augmentation.
    """

    def __new__(cls, dataset):
        from transformers import TrainerCallback

        augment = (dataset.format.get("format_kwargs") or {}).get("transform")

        class _Callback(TrainerCallback):
            def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
                if not isinstance(augment, _CropAugment) or train_dataloader is None:
                    return
                batches = len(train_dataloader)
                per_epoch = max(1, -(-batches // args.gradient_accumulation_steps))
                augment.seed, augment.epoch = args.seed, state.global_step // per_epoch

        return _Callback()


def _text_only(turns: list[dict]) -> list[dict]:
    """Turns with string content (the ``{"type": "image"}`` placeholder dropped: TRL adds the image itself)."""
    out = []
    for t in turns:
        content = t["content"]
        if not isinstance(content, str):
            content = "".join(c.get("text", "") for c in content if c.get("type") == "text")
        out.append({"role": t["role"], "content": content})
    return out


def run_sft(recipe: Recipe, output_dir: str | Path | None = None) -> Path:
    """Train a cropper (or the crop-set policy) with ``SFTTrainer``; resumes from the newest checkpoint.

    Returns:
        The ``output_dir/final`` folder (``save_pretrained`` layout, LoRA merged) that ``vlm:`` loads.

    Raises:
        ValueError: the recipe has no ``data.sft_file``.
    """
    args = recipe.trainer_args(output_dir)
    if not recipe.data.sft_file:
        raise ValueError("an sft recipe needs data.sft_file (written by `zoomvlm curate boxes` or `curate awares`)")
    check_resume(args.output_dir, recipe)
    dataset = sft_dataset(recipe.data.sft_file, recipe.data.view_budget, recipe.data.limit,
                          augment=recipe.data.augment, high=recipe.data.policy_high)  # fmt: skip
    model, processor, peft_config = build_cropper(recipe.model)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                         peft_config=peft_config,
                         callbacks=[resumed_schedule_callback(), AugmentEpochCallback(dataset)])  # fmt: skip
    start_step = train_resumable(trainer, args.output_dir)
    return save_final(trainer, processor, args.output_dir, recipe, start_step)
