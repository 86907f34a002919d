"""The BEV preview image (MLflow's `bev_prediction`) says what it shows: "label" over the left
half, "prediction" over the right, and a swatch of each class colour with its name."""

from __future__ import annotations

import numpy as np

from model.evaluation.legend import with_legend

PALETTE = np.array([[40, 40, 40], [255, 200, 0], [0, 170, 255], [255, 60, 60]], np.uint8)
CLASSES = ["background", "divider", "ped_crossing", "boundary"]
LABEL_RGB, PREDICTION_RGB = np.array([12, 34, 56], np.uint8), np.array([65, 43, 21], np.uint8)


def pair(size: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Two flat images in colours no legend uses: where they are is where the pair is."""
    label = np.zeros((size, size, 3), np.uint8) + LABEL_RGB
    prediction = np.zeros((size, size, 3), np.uint8) + PREDICTION_RGB
    return label, prediction


def pair_rows(image: np.ndarray) -> np.ndarray:
    return np.flatnonzero((image == LABEL_RGB).all(axis=2).any(axis=1))


def colour_present(region: np.ndarray, colour: np.ndarray) -> bool:
    return bool((region.reshape(-1, 3) == colour).all(axis=1).any())


def test_the_label_is_the_left_half_and_the_prediction_the_right_one_scaled_up():
    label, prediction = pair()
    image = with_legend(label, prediction, CLASSES, PALETTE)
    rows = pair_rows(image)
    left, right = image[rows, : image.shape[1] // 2], image[rows, image.shape[1] // 2 :]
    assert (left == LABEL_RGB).all() and (right == PREDICTION_RGB).all()
    assert image.shape[1] >= 480  # readable in the UI's image view


def test_the_caption_writes_text_over_each_half():
    label, prediction = pair()
    image = with_legend(label, prediction, CLASSES, PALETTE)
    top = pair_rows(image)[0]
    caption = image[:top]
    assert top >= 8, "no caption strip above the pair"
    half = image.shape[1] // 2
    for side in (caption[:, 1 : half - 1], caption[:, half + 1 :]):
        assert (side.min(axis=2) < 128).any(), "no text in the caption over this half"


def test_the_legend_shows_every_class_colour_below_the_pair():
    label, prediction = pair()
    image = with_legend(label, prediction, CLASSES, PALETTE)
    bottom = pair_rows(image)[-1] + 1
    legend = image[bottom:]
    for colour in PALETTE:
        assert colour_present(legend, colour), f"no swatch of {colour.tolist()}"


def test_a_long_class_list_wraps_into_rows_inside_the_image():
    label, prediction = pair()
    classes = [f"class_with_a_long_name_{i}" for i in range(12)]
    palette = np.stack([PALETTE[i % 4] + i for i in range(12)]).astype(np.uint8)
    image = with_legend(label, prediction, classes, palette)
    bottom = pair_rows(image)[-1] + 1
    for colour in palette:
        assert colour_present(image[bottom:], colour), colour.tolist()
