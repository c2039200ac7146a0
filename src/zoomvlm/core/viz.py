"""Pictures people would rather look at than read: crops drawn on the image."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from zoomvlm.core.geometry import Box, Budget, resize_to_budget

CROP_COLOR = (230, 40, 40)
EVIDENCE_COLOR = (20, 160, 60)


def draw_crops(
    image: Image.Image,
    boxes: Sequence[Box],
    evidence: Sequence[Box] = (),
    caption: str | None = None,
    max_side: int = 1200,
) -> Image.Image:
    """The image (shrunk to ``max_side`` px) with proposed crops in red and human evidence boxes in green.

    Args:
        image: the native image; boxes are normalised, so they are drawn on the shrunk copy directly.
        caption: optional text printed in a white band above the image (wrapped).

    Returns:
        A new RGB image; the input is not modified.
    """
    canvas = resize_to_budget(image.convert("RGB"), Budget(max_side=max_side)).copy()
    draw = ImageDraw.Draw(canvas)
    w, h = canvas.size
    line = max(2, round(max(w, h) / 300))
    for color, group in ((EVIDENCE_COLOR, evidence), (CROP_COLOR, boxes)):
        for box in group:
            x0, y0, x1, y1 = box.to_pixels(w, h)
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=color, width=line)
    if not caption:
        return canvas
    font = ImageFont.load_default(size=max(12, w // 40))
    chars = max(20, int(w / (font.size * 0.55)))
    lines = [seg for para in caption.splitlines() for seg in (textwrap.wrap(para, chars) or [""])]
    band = int(len(lines) * font.size * 1.3) + 8
    out = Image.new("RGB", (w, h + band), "white")
    out.paste(canvas, (0, band))
    ImageDraw.Draw(out).multiline_text((6, 4), "\n".join(lines), fill="black", font=font, spacing=font.size * 0.3)
    return out
