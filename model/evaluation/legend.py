"""The preview image's caption and legend, drawn into its pixels: MLflow's image view shows a
logged PNG with no caption of its own, so the image says which half is the label and what
each colour is.

    label | prediction          <- caption, over each half
    [label]    [prediction]     <- the BEV pair, scaled up to be readable
    # background  # divider ... <- one swatch per class, the class name beside it
"""

from __future__ import annotations

import numpy as np

MIN_WIDTH_PX = 480  # the pair is scaled up by a whole factor to at least this width
PAD_PX = 4
SWATCH_PX = 10
PAPER = (255, 255, 255)
INK = (0, 0, 0)


def with_legend(
    label: np.ndarray, prediction: np.ndarray, classes: list[str], palette: np.ndarray
) -> np.ndarray:
    """(H', W', 3) uint8: `label | prediction` side by side (each (H, W, 3) uint8), captioned,
    above a legend of `classes` in the colours `palette[i]` (class i)."""
    from PIL import Image, ImageDraw, ImageFont

    pair = np.concatenate([label, prediction], axis=1)
    scale = max(1, -(-MIN_WIDTH_PX // pair.shape[1]))
    pair = pair.repeat(scale, axis=0).repeat(scale, axis=1)
    height, width = pair.shape[:2]
    font = ImageFont.load_default()
    line_px = _text_height(font) + 2 * PAD_PX
    rows = _legend_rows(classes, font, width)
    canvas = Image.new("RGB", (width, line_px + height + len(rows) * line_px), PAPER)
    canvas.paste(Image.fromarray(pair), (0, line_px))
    draw = ImageDraw.Draw(canvas)
    for half, caption in enumerate(("label", "prediction")):
        draw.text((half * width // 2 + PAD_PX, PAD_PX), caption, fill=INK, font=font)
    draw.line([(width // 2, 0), (width // 2, line_px - 1)], fill=INK)  # the "|" between them
    for row, entries in enumerate(rows):
        top = line_px + height + row * line_px + PAD_PX
        for left, index in entries:
            colour = tuple(int(c) for c in palette[index])
            draw.rectangle([left, top, left + SWATCH_PX, top + SWATCH_PX], fill=colour, outline=INK)
            draw.text((left + SWATCH_PX + PAD_PX, top), classes[index], fill=INK, font=font)
    return np.asarray(canvas)


def _text_height(font) -> int:
    left, top, right, bottom = font.getbbox("Ag")
    return max(int(bottom - top), SWATCH_PX)


def _legend_rows(classes: list[str], font, width: int) -> list[list[tuple[int, int]]]:
    """(x, class index) of each legend entry, wrapped into rows that fit `width`."""
    rows: list[list[tuple[int, int]]] = [[]]
    left = PAD_PX
    for index, name in enumerate(classes):
        entry_px = SWATCH_PX + 2 * PAD_PX + int(font.getlength(name)) + 3 * PAD_PX
        if rows[-1] and left + entry_px > width:
            rows.append([])
            left = PAD_PX
        rows[-1].append((left, index))
        left += entry_px
    return rows
