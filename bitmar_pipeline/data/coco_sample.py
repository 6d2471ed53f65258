"""A synthetic COCO-layout caption set for offline runs: simple scenes of coloured shapes, five
captions per image, each stating only what is drawn (colour, shape, size, position, background),
so a model can learn image-text alignment from it.

Deterministic: every image's content comes from its own RNG seeded by (seed, split, index), so
the same arguments give byte-identical files and a smaller set is a prefix of a larger one.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from bitmar_model.io import atomic_directory
from bitmar_pipeline.data.coco_layout import caption_file, image_dir, write_json_atomic

# Bump when drawing or captioning changes, so existing sets with the same arguments are rebuilt.
GENERATOR_VERSION = 1
CAPTIONS_PER_IMAGE = 5
MIN_IMAGE_SIZE = 32

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 30),
    "orange": (245, 130, 20),
    "purple": (130, 50, 170),
    "pink": (245, 120, 180),
    "brown": (125, 75, 35),
    "cyan": (40, 200, 210),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "gray": (150, 150, 150),
    "black": (15, 15, 15),
}
# Words a caption may use for each drawn shape; any of them names the same drawing.
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "ball"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle",),
    "star": ("star",),
    "diamond": ("diamond", "rhombus"),
    "cross": ("cross", "plus sign"),
}
# Half-extent of a shape as a fraction of its grid cell.
SIZES = {"small": 0.26, "large": 0.44}
# A 3x3 grid: each object gets its own cell, so objects never overlap and positions are unambiguous.
POSITIONS = {
    (0, 0): "top left",
    (0, 1): "top",
    (0, 2): "top right",
    (1, 0): "left",
    (1, 1): "center",
    (1, 2): "right",
    (2, 0): "bottom left",
    (2, 1): "bottom",
    (2, 2): "bottom right",
}
LOCATION_PHRASES = {
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    row: int
    col: int
    bbox: tuple[int, int, int, int]

    @property
    def position(self) -> str:
        return POSITIONS[(self.row, self.col)]


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]


def generate_sample_coco(
    root: Path,
    num_images: int = 1000,
    seed: int = 0,
    image_size: int = 96,
    split: str = "train2017",
) -> Path:
    """Write `annotations/captions_<split>.json` and `<split>/*.png` under root; return root.

    A marker `.bitmar-sample-<split>.json` records the arguments. It is written as incomplete
    before anything is replaced and as complete last, so a killed run is never taken for a
    finished one; a complete marker with the same arguments returns at once."""
    _check_arguments(num_images, seed, image_size, split)
    root = Path(root)
    params = {
        "generator_version": GENERATOR_VERSION,
        "split": split,
        "num_images": num_images,
        "seed": seed,
        "image_size": image_size,
    }
    marker = root / f".bitmar-sample-{split}.json"
    annotations, images = caption_file(root, split), image_dir(root, split)
    if (
        _read_marker(marker) == {**params, "complete": True}
        and annotations.is_file()
        and images.is_dir()
    ):
        return root

    _remove_previous(root, split, marker, annotations, images)
    write_json_atomic(marker, {**params, "complete": False})
    # Images are rendered into a hidden staging folder and moved in with one rename (no fsync
    # per image: the marker says complete only after both, and an incomplete set is redone).
    with atomic_directory(images, sync=False) as staging:
        data = _render_split(staging, num_images, seed, image_size, split)
    write_json_atomic(annotations, data)
    write_json_atomic(marker, {**params, "complete": True})
    return root


def make_scene(rng: random.Random, image_size: int) -> Scene:
    background = rng.choice(sorted(BACKGROUNDS))
    cell = image_size / 3
    objects = []
    for row, col in rng.sample(sorted(POSITIONS), rng.randint(1, 3)):
        size = rng.choice(sorted(SIZES))
        half = SIZES[size] * cell
        slack = cell / 2 - half - 1
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        bbox = (round(cx - half), round(cy - half), round(cx + half), round(cy + half))
        objects.append(
            SceneObject(
                rng.choice(sorted(SHAPE_WORDS)), rng.choice(sorted(COLORS)), size, row, col, bbox
            )
        )
    return Scene(background, tuple(objects))


def draw_scene(scene: Scene, image_size: int) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_shape(draw, obj.shape, obj.bbox, COLORS[obj.color])
    return image


def caption_scene(scene: Scene, rng: random.Random) -> list[str]:
    """Five captions from five different templates; every word comes from the scene."""
    return [template(scene, rng) for template in rng.sample(_TEMPLATES, CAPTIONS_PER_IMAGE)]


def _check_arguments(num_images: int, seed: int, image_size: int, split: str) -> None:
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if not split or split.startswith(".") or any(c in split for c in "/\\:"):
        raise ValueError(f"split must be a plain folder name, got {split!r}")


def _read_marker(marker: Path) -> dict[str, Any] | None:
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _remove_previous(root: Path, split: str, marker: Path, annotations: Path, images: Path) -> None:
    """Remove an earlier generated set of this split; refuse to touch data the generator did not make."""
    if not marker.exists():
        foreign = [str(p) for p in (annotations, images) if p.exists()]
        if foreign:
            raise FileExistsError(
                f"{root} already holds split {split!r} not made by the sample generator "
                f"({', '.join(foreign)}); refusing to overwrite it"
            )
        return
    annotations.unlink(missing_ok=True)
    shutil.rmtree(images, ignore_errors=True)
    for stale in root.glob(f".sample-{split}-*"):  # staging folders of killed runs
        shutil.rmtree(stale, ignore_errors=True)


def _render_split(
    folder: Path, num_images: int, seed: int, image_size: int, split: str
) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        rng = random.Random(f"bitmar-sample:{seed}:{split}:{index}")
        scene = make_scene(rng, image_size)
        image_id = index + 1
        file_name = f"{image_id:012d}.png"
        draw_scene(scene, image_size).save(folder / file_name, format="PNG")
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "width": image_size,
                "height": image_size,
                "scene": _scene_record(scene),
            }
        )
        for k, caption in enumerate(caption_scene(scene, rng)):
            annotations.append(
                {"id": index * CAPTIONS_PER_IMAGE + k + 1, "image_id": image_id, "caption": caption}
            )
    return {
        "info": {
            "description": "BitMar synthetic shapes caption set",
            "version": str(GENERATOR_VERSION),
            "seed": seed,
            "split": split,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
    }


def _scene_record(scene: Scene) -> dict[str, Any]:
    # Kept in the annotation file as ground truth for checks; COCO readers ignore extra keys.
    return {
        "background": scene.background,
        "objects": [
            {
                "shape": o.shape,
                "color": o.color,
                "size": o.size,
                "position": o.position,
                "bbox": list(o.bbox),
            }
            for o in scene.objects
        ],
    }


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    bbox: tuple[int, int, int, int],
    fill: tuple[int, int, int],
) -> None:
    x0, y0, x1, y1 = bbox
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "circle":
        draw.ellipse(bbox, fill=fill)
    elif shape == "square":
        inset = r * 0.15  # a full-box square looks much bigger than the other shapes
        draw.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=fill)
    elif shape == "triangle":
        draw.polygon(_ring(cx, cy, [r], 3), fill=fill)
    elif shape == "star":
        draw.polygon(_ring(cx, cy, [r, r * 0.45], 10), fill=fill)
    elif shape == "diamond":
        draw.polygon(_ring(cx, cy, [r], 4), fill=fill)
    elif shape == "cross":
        arm = r * 0.32
        draw.rectangle((cx - arm, y0, cx + arm, y1), fill=fill)
        draw.rectangle((x0, cy - arm, x1, cy + arm), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _ring(cx: float, cy: float, radii: list[float], points: int) -> list[tuple[float, float]]:
    """Polygon vertices starting straight up, cycling through radii (two radii make a star)."""
    return [
        (
            cx + radii[i % len(radii)] * math.cos(-math.pi / 2 + 2 * math.pi * i / points),
            cy + radii[i % len(radii)] * math.sin(-math.pi / 2 + 2 * math.pi * i / points),
        )
        for i in range(points)
    ]


# Caption wording -------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun(obj: SceneObject, rng: random.Random, with_size: bool | None = None) -> str:
    """'a small red ball': colour and shape always, size when asked or by chance."""
    if with_size is None:
        with_size = rng.random() < 0.5
    words = [obj.size] if with_size else []
    words += [obj.color, rng.choice(SHAPE_WORDS[obj.shape])]
    phrase = " ".join(words)
    return f"{_article(phrase)} {phrase}"


def _location(obj: SceneObject) -> str:
    return LOCATION_PHRASES.get(obj.position, f"in the {obj.position} corner")


def _relation(a: SceneObject, b: SceneObject) -> str:
    """Where a is relative to b; cells differ, so one of the four always holds."""
    if a.col != b.col:
        return "to the left of" if a.col < b.col else "to the right of"
    return "above" if a.row < b.row else "below"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def _shuffled(scene: Scene, rng: random.Random) -> list[SceneObject]:
    return rng.sample(list(scene.objects), len(scene.objects))


def _t_count(scene: Scene, rng: random.Random) -> str:
    n = len(scene.objects)
    nouns = _join([_noun(o, rng) for o in _shuffled(scene, rng)])
    return _sentence(f"{NUMBER_WORDS[n]} shape{'s' if n > 1 else ''}: {nouns}")


def _t_located(scene: Scene, rng: random.Random) -> str:
    return _sentence(_join([f"{_noun(o, rng)} {_location(o)}" for o in _shuffled(scene, rng)]))


def _t_background(scene: Scene, rng: random.Random) -> str:
    nouns = _join([_noun(o, rng) for o in _shuffled(scene, rng)])
    return _sentence(f"{nouns} on {_article(scene.background)} {scene.background} background")


def _t_there(scene: Scene, rng: random.Random) -> str:
    verb = "is" if len(scene.objects) == 1 else "are"
    return _sentence(
        f"there {verb} {_join([_noun(o, rng) for o in _shuffled(scene, rng)])} in the picture"
    )


def _t_relation(scene: Scene, rng: random.Random) -> str:
    objects = _shuffled(scene, rng)
    if len(objects) == 1:
        only = objects[0]
        return _sentence(
            f"{_noun(only, rng)} {_location(only)}, alone on a {scene.background} background"
        )
    a, b, *rest = objects
    text = f"{_noun(a, rng)} {_relation(a, b)} {_noun(b, rng)}"
    if rest:
        text += f", with {_noun(rest[0], rng)} {_location(rest[0])}"
    return _sentence(text)


def _t_sizes(scene: Scene, rng: random.Random) -> str:
    nouns = _join([_noun(o, rng, with_size=True) for o in _shuffled(scene, rng)])
    return _sentence(f"a picture of {nouns}")


def _t_scene(scene: Scene, rng: random.Random) -> str:
    items = _join([f"{_noun(o, rng)} {_location(o)}" for o in _shuffled(scene, rng)])
    return _sentence(f"on a {scene.background} background, {items}")


_TEMPLATES: list[Callable[[Scene, random.Random], str]] = [
    _t_count,
    _t_located,
    _t_background,
    _t_there,
    _t_relation,
    _t_sizes,
    _t_scene,
]
