"""Linear probe of vision features on the synthetic sample scenes: can a logistic regression
read each object's colour and shape from the stored patch grid?

Each object owns one cell of the scene's 3 x 3 layout (bitmar_pipeline.data.coco_sample),
so its feature is the overlap-weighted mean of the patch-grid cells covering that layout cell,
mapped through the encoder's resize and crop. Probing "the first object of a caption" instead
would ask for one object of several at random and cap the accuracy far below 1.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from bitmar_pipeline.data.coco_layout import caption_file, image_dir
from bitmar_pipeline.data.coco_sample import POSITIONS, SHAPE_WORDS, generate_sample_coco
from bitmar_pipeline.features.vision_encoder import Preprocessing, VisionEncoder

_CELL_OF_POSITION = {name: cell for cell, name in POSITIONS.items()}
SCENE_CELLS = 3


Box = tuple[float, float, float, float]


def cell_weights(preprocessing: Preprocessing, grid: int, box: Box, image_size: tuple[int, int]) -> np.ndarray:
    """[grid*grid] weights of the pooled patch cells by their overlap with `box` (original pixels)."""
    width, height = image_size
    scale = preprocessing.shortest_edge / min(width, height)
    new_width, new_height = int(width * scale), int(height * scale)
    left = int(round((new_width - preprocessing.crop_width) / 2.0))
    top = int(round((new_height - preprocessing.crop_height) / 2.0))
    x0, y0, x1, y1 = box[0] * scale - left, box[1] * scale - top, box[2] * scale - left, box[3] * scale - top
    edges_x = np.linspace(0, preprocessing.crop_width, grid + 1)
    edges_y = np.linspace(0, preprocessing.crop_height, grid + 1)
    overlap_x = np.clip(np.minimum(x1, edges_x[1:]) - np.maximum(x0, edges_x[:-1]), 0, None)
    overlap_y = np.clip(np.minimum(y1, edges_y[1:]) - np.maximum(y0, edges_y[:-1]), 0, None)
    weights = np.outer(overlap_y, overlap_x).reshape(-1)
    if weights.sum() <= 0:
        raise ValueError(f"box {box} lies outside the encoder's crop")
    return weights / weights.sum()


Images = Sequence[dict[str, Any]]


def object_features(
    images: Images, patches: np.ndarray, preprocessing: Preprocessing, grid: int
) -> tuple[np.ndarray, list[str], list[str], np.ndarray]:
    """Per drawn object: its layout cell's feature, colour, shape and the index of its image."""
    rows, colors, shapes, owners = [], [], [], []
    for index, image in enumerate(images):
        width, height = image["width"], image["height"]
        for obj in image["scene"]["objects"]:
            row, col = _CELL_OF_POSITION[obj["position"]]
            cell_w, cell_h = width / SCENE_CELLS, height / SCENE_CELLS
            box = (col * cell_w, row * cell_h, (col + 1) * cell_w, (row + 1) * cell_h)
            rows.append(cell_weights(preprocessing, grid, box, (width, height)) @ patches[index])
            colors.append(obj["color"])
            shapes.append(obj["shape"])
            owners.append(index)
    return np.stack(rows), colors, shapes, np.asarray(owners)


def probe_accuracy(features: np.ndarray, labels: Sequence[str], owners: np.ndarray) -> float:
    """Held-out accuracy of a logistic regression; objects of one image stay on one side."""
    labels_array = np.asarray(labels)
    train = _train_rows(owners)
    scaler = StandardScaler().fit(features[train])
    classifier = LogisticRegression(max_iter=3000).fit(scaler.transform(features[train]), labels_array[train])
    return float(classifier.score(scaler.transform(features[~train]), labels_array[~train]))


def probe_scene_features(
    images: Images, patches: np.ndarray, preprocessing: Preprocessing, grid: int
) -> dict[str, float]:
    features, colors, shapes, owners = object_features(images, patches, preprocessing, grid)
    return {
        "color_accuracy": probe_accuracy(features, colors, owners),
        "shape_accuracy": probe_accuracy(features, shapes, owners),
        "color_majority": _majority_share(colors, owners),
        "shape_majority": _majority_share(shapes, owners),
        "objects": len(features),
    }


def probe_sample_encoder(encoder: VisionEncoder, root: Path, num_images: int, batch_size: int = 64) -> dict[str, float]:
    """Generate (or reuse) `num_images` sample scenes under root, encode them as the
    vision_features asset stores them (float16) and probe colour and shape."""
    generate_sample_coco(root, num_images=num_images)
    split = "train2017"
    images = json.loads(caption_file(root, split).read_text())["images"]
    folder = image_dir(root, split)
    pooled = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        pixels = torch.stack([encoder.preprocessing(Image.open(folder / i["file_name"]).convert("RGB")) for i in batch])
        pooled.append(encoder.encode(pixels)[1].half().float().numpy())
    return probe_scene_features(images, np.concatenate(pooled), encoder.preprocessing, encoder.patch_grid)


def _majority_share(labels: Sequence[str], owners: np.ndarray) -> float:
    """Accuracy of always answering the most common training label, for comparison."""
    labels_array = np.asarray(labels)
    train = _train_rows(owners)
    values, counts = np.unique(labels_array[train], return_counts=True)
    return float((labels_array[~train] == values[counts.argmax()]).mean())


def _train_rows(owners: np.ndarray) -> np.ndarray:
    """The first three quarters of the images train the probe, the rest test it."""
    return owners < int(0.75 * (owners.max() + 1))


def caption_names_object(caption: str, scene: dict[str, Any]) -> bool:
    """True when the caption says "<colour> <shape word>" for an object drawn in the scene."""
    text = " " + " ".join(caption.lower().replace(",", " ").replace(".", " ").split()) + " "
    return any(
        f" {obj['color']} {word} " in text for obj in scene["objects"] for word in SHAPE_WORDS[obj["shape"]]
    )
