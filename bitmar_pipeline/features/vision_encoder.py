"""DINOv2 image encoder: loading (hub id, local directory or the offline `tiny-random`),
preprocessing, pooling, and the fingerprint that keys the feature cache.

`tiny-random` is a real DINOv2 architecture (fixed seed), written once as a local model
directory and then loaded through the same `from_pretrained` path as `facebook/dinov2-base`,
so the offline profile exercises the production code. Plain random weights would make its
features carry almost nothing (a linear probe could not tell the sample scenes' shapes apart),
so its seeded weights are laid out to compute fixed local features instead: colour per 2x2
pixel sub-region, a colour-independent "saturated pixel" mask, seeded random colour and
mask-pattern detectors (a random two-layer network on that mask), and image-wide means of
them written by uniform attention. `bitmar_pipeline.features.probe` checks the result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModel,
    BitImageProcessorPil,
    Dinov2Config,
    Dinov2Model,
)

from bitmar_model.io import atomic_directory

TINY_RANDOM = "tiny-random"
# Sample images are 96 px: no resize or crop, 8 px patches (a 12 x 12 token map).
_TINY_IMAGE, _TINY_PATCH, _TINY_SUB = 96, 8, 4
_TINY_CONFIG = dict(
    hidden_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    mlp_ratio=2,
    image_size=_TINY_IMAGE,
    patch_size=_TINY_PATCH,
)
TINY_RANDOM_FEATURE_DIM = _TINY_CONFIG["hidden_size"]
_IMAGE_MEAN, _IMAGE_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_TINY_PROCESSOR = dict(
    do_resize=True,
    size={"shortest_edge": _TINY_IMAGE},
    do_center_crop=True,
    crop_size={"height": _TINY_IMAGE, "width": _TINY_IMAGE},
    image_mean=list(_IMAGE_MEAN),
    image_std=list(_IMAGE_STD),
    resample=Image.Resampling.BICUBIC,
)
_COLOR_UNITS, _SHAPE_UNITS = 24, 224  # seeded colour detectors and mask-pattern detectors
_ANCHOR = 100.0  # a constant residual channel that fixes every token's LayerNorm scale
_MASK_LEVEL = 2.0  # residual value of a fully saturated sub-region in the mask channels


class VisionModelError(ValueError):
    """The configured vision model cannot be loaded; the message says which and why."""


def build_tiny_random_encoder(directory: Path, seed: int = 0) -> Path:
    """Write the tiny random DINOv2 model directory (idempotent: kept when already complete)."""
    directory = Path(directory)
    if (directory / "config.json").is_file() and (directory / "preprocessor_config.json").is_file():
        return directory
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = Dinov2Model(Dinov2Config(**_TINY_CONFIG))
    finally:
        torch.random.set_rng_state(generator_state)
    _lay_out_tiny_weights(model, torch.Generator().manual_seed(seed))
    # Parallel shard runs may build it at the same moment: the first to finish wins, the others'
    # identical copies (same seed and config) are dropped, so no reader sees the folder swapped.
    with atomic_directory(directory, replace=False) as staging:
        model.save_pretrained(staging)
        BitImageProcessorPil(**_TINY_PROCESSOR).save_pretrained(staging)
    return directory


def _sub_region_mean_filters() -> torch.Tensor:
    """[3 * S*S, 3, P, P]: mean of each channel over each sub-region of a patch (row-major)."""
    side = _TINY_PATCH // _TINY_SUB
    filters = torch.zeros(3 * _TINY_SUB**2, 3, _TINY_PATCH, _TINY_PATCH)
    for j in range(_TINY_SUB**2):
        row, col = divmod(j, _TINY_SUB)
        for channel in range(3):
            rows, cols = slice(row * side, (row + 1) * side), slice(col * side, (col + 1) * side)
            filters[3 * j + channel, channel, rows, cols] = 1.0 / side**2
    return filters


def _orthonormal_directions(hidden: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """[hidden, count] seeded orthonormal columns with zero sum and nothing in channel 0 (the
    anchor), so LayerNorm's mean subtraction leaves what they carry untouched."""
    random = torch.randn(hidden - 1, count, generator=generator)
    random -= random.mean(dim=0, keepdim=True)
    directions = torch.zeros(hidden, count)
    directions[1:] = torch.linalg.qr(random)[0]
    return directions


def _saturation_directions() -> list[torch.Tensor]:
    """Three hue directions in the RGB plane orthogonal to grey: whites, greys and blacks
    project to zero on all of them, any saturated colour to at least half its chroma on one."""
    red_green = torch.tensor([1.0, -1.0, 0.0]) / math.sqrt(2)
    blue = torch.tensor([1.0, 1.0, -2.0]) / math.sqrt(6)
    return [math.cos(a) * red_green + math.sin(a) * blue for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)]


@torch.no_grad()
def _lay_out_tiny_weights(model: Dinov2Model, generator: torch.Generator) -> None:
    """Seeded weights that make the tiny DINOv2 compute informative local features (see the
    module docstring); every token's LayerNorm scale is fixed by the anchor channel."""
    hidden, sub_regions = model.config.hidden_size, _TINY_SUB**2
    sizes = {
        "rgb": 3 * sub_regions,
        "mask": sub_regions,
        "color": _COLOR_UNITS,
        "shape": _SHAPE_UNITS,
        "global": _COLOR_UNITS + sub_regions,
    }
    directions = _orthonormal_directions(hidden, sum(sizes.values()), generator)
    q = dict(zip(sizes, torch.split(directions, list(sizes.values()), dim=1), strict=True))
    scale = _ANCHOR / math.sqrt(hidden)  # LayerNorm output * scale = residual value
    embeddings = model.embeddings
    conv = embeddings.patch_embeddings.projection
    conv.weight.copy_((q["rgb"] @ _sub_region_mean_filters().flatten(1)).view_as(conv.weight))
    conv.bias.zero_()
    conv.bias[0] = _ANCHOR
    embeddings.position_embeddings.zero_()
    embeddings.cls_token.zero_()
    first, second = model.encoder.layer
    for layer in (first, second):
        layer.layer_scale1.lambda1.fill_(1.0)
        layer.layer_scale2.lambda1.fill_(1.0)
    first.attention.o_proj.weight.zero_()  # layer 1 attention passes tokens through unchanged
    first.attention.o_proj.bias.zero_()
    _set_mlp(first.mlp, *_first_mlp(q, scale, generator, first.mlp.fc1.out_features))
    _set_mlp(second.mlp, *_second_mlp(q, scale, generator, second.mlp.fc1.out_features))
    # Layer 2 attention: zero queries and keys give uniform weights, so every token (the CLS
    # token included) receives the image-wide mean of the colour and mask channels.
    attention = second.attention
    for projection in (attention.q_proj, attention.k_proj):
        projection.weight.zero_()
        projection.bias.zero_()
    attention.v_proj.weight.copy_(torch.eye(hidden))
    attention.v_proj.bias.zero_()
    attention.o_proj.weight.copy_(q["global"] @ torch.cat([q["color"], q["mask"]], dim=1).t() * scale)
    attention.o_proj.bias.zero_()
    model.layernorm.weight[0] = 0.0  # the anchor channel is constant: keep it out of the features


Directions = dict[str, torch.Tensor]


def _first_mlp(q: Directions, scale: float, generator: torch.Generator, width: int) -> tuple[torch.Tensor, ...]:
    """Per sub-region: the saturation mask, clamp((<hue, rgb> - 0.06) / 0.06, 0, 1) summed over
    hues as gelu(a) - gelu(a - gain), and seeded colour detectors summed over sub-regions."""
    hidden, sharp, threshold, ramp = q["rgb"].shape[0], 8.0, 0.06, 0.06
    mean, std = torch.tensor(_IMAGE_MEAN), torch.tensor(_IMAGE_STD)
    color_dirs = torch.nn.functional.normalize(torch.randn(_COLOR_UNITS, 3, generator=generator), dim=1)
    color_thresholds = torch.randn(_COLOR_UNITS, generator=generator)
    w1, b1, w2 = torch.zeros(width, hidden), torch.zeros(width), torch.zeros(hidden, width)
    unit = 0
    for j in range(_TINY_SUB**2):
        read = q["rgb"][:, 3 * j : 3 * j + 3].t() * scale  # LayerNorm output -> normalised RGB
        for hue in _saturation_directions():
            row, bias = (sharp / ramp) * ((hue * std) @ read), (sharp / ramp) * (float(hue @ mean) - threshold)
            for offset, sign in ((0.0, 1.0), (-sharp, -1.0)):
                w1[unit], b1[unit], w2[:, unit] = row, bias + offset, sign * q["mask"][:, j] * _MASK_LEVEL / sharp
                unit += 1
        for k in range(_COLOR_UNITS):
            w1[unit], b1[unit] = 4.0 * (color_dirs[k] @ read), -4.0 * color_thresholds[k]
            w2[:, unit] = q["color"][:, k] / _TINY_SUB**2
            unit += 1
    return w1, b1, w2


def _second_mlp(q: Directions, scale: float, generator: torch.Generator, width: int) -> tuple[torch.Tensor, ...]:
    """Seeded threshold detectors of the patch's mask pattern (a random feature map): averaged
    over a region they tell shapes apart whatever their colour."""
    hidden, sub_regions = q["rgb"].shape[0], _TINY_SUB**2
    weights = torch.randn(_SHAPE_UNITS, sub_regions, generator=generator) * 3.0 / math.sqrt(sub_regions)
    thresholds = torch.rand(_SHAPE_UNITS, generator=generator) * 2 - 0.5
    w1, b1, w2 = torch.zeros(width, hidden), torch.zeros(width), torch.zeros(hidden, width)
    w1[:_SHAPE_UNITS] = 4.0 * weights @ (q["mask"].t() * scale / _MASK_LEVEL)
    b1[:_SHAPE_UNITS] = -4.0 * thresholds
    w2[:, :_SHAPE_UNITS] = q["shape"] / 2.0
    return w1, b1, w2


def _set_mlp(mlp: torch.nn.Module, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor) -> None:
    mlp.fc1.weight.copy_(w1)
    mlp.fc1.bias.copy_(b1)
    mlp.fc2.weight.copy_(w2)
    mlp.fc2.bias.zero_()


def resolve_model_source(name: str, models_dir: Path) -> str:
    """Map the `vision.model` setting to what `from_pretrained` takes."""
    if name == TINY_RANDOM:
        return str(build_tiny_random_encoder(Path(models_dir) / "vision" / TINY_RANDOM))
    return name


def _weights_digest(directory: Path) -> str:
    """Hash of a local model directory's config and weights, so retrained weights at the same
    path get a new fingerprint (and new features) instead of stale cache hits."""
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.suffix in {".json", ".safetensors", ".bin"} and path.is_file():
            digest.update(path.name.encode())
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Preprocessing:
    """The image processor's parameters, applied with PIL + numpy in one pass."""

    shortest_edge: int
    crop_height: int
    crop_width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int
    rescale_factor: float

    @classmethod
    def from_processor(cls, processor) -> Preprocessing:
        size = processor.size
        edge = size.get("shortest_edge") or min(size.get("height", 0), size.get("width", 0))
        crop = processor.crop_size if getattr(processor, "do_center_crop", False) else {"height": edge, "width": edge}
        return cls(
            shortest_edge=int(edge),
            crop_height=int(crop["height"]),
            crop_width=int(crop["width"]),
            mean=tuple(float(v) for v in processor.image_mean),
            std=tuple(float(v) for v in processor.image_std),
            resample=int(processor.resample),
            rescale_factor=float(processor.rescale_factor),
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> normalised float32 tensor [3, H, W] (shortest-edge resize, centre crop)."""
        width, height = image.size
        scale = self.shortest_edge / min(width, height)
        # transformers rounds the long edge down (int()), as in get_resize_output_image_size.
        new_size = (
            (self.shortest_edge, int(height * scale)) if width <= height else (int(width * scale), self.shortest_edge)
        )
        image = image.resize(new_size, resample=self.resample)
        left = int(round((new_size[0] - self.crop_width) / 2.0))
        top = int(round((new_size[1] - self.crop_height) / 2.0))
        image = image.crop((left, top, left + self.crop_width, top + self.crop_height))
        array = np.asarray(image, dtype=np.float32) * self.rescale_factor
        array = (array - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(array.transpose(2, 0, 1).copy())


def resolve_device(device: str, setting: str = "vision.device") -> torch.device:
    """'auto' -> CUDA when present, else CPU; an explicit CUDA device on a machine without one
    is an error naming `setting`, never a silent fall back to CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise VisionModelError(f"{setting} is {device!r} but CUDA is not available on this machine")
    return resolved


def resolve_autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for inference: bf16 (fp16 on GPUs without bf16) on CUDA, none on CPU."""
    if device.type != "cuda" or dtype == "float32":
        return None
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, dtype)


class VisionEncoder:
    """A loaded DINOv2 model plus the preprocessing and pooling the feature cache records."""

    def __init__(
        self,
        model_name: str,
        source: str,
        revision: str | None,
        patch_grid: int,
        device: str = "auto",
        dtype: str = "auto",
    ) -> None:
        try:
            self.model = AutoModel.from_pretrained(source, revision=revision).eval()
            processor = AutoImageProcessor.from_pretrained(source, revision=revision)
        except (OSError, ValueError) as exc:
            raise VisionModelError(f"cannot load vision.model {model_name!r} (from {source!r}): {exc}") from exc
        if getattr(self.model.config, "model_type", "") not in {"dinov2", "dinov2_with_registers"}:
            raise VisionModelError(
                f"vision.model {model_name!r} is a {self.model.config.model_type!r} model; expected DINOv2"
            )
        self.device = resolve_device(device)
        self.model.to(self.device)
        self.autocast_dtype = resolve_autocast_dtype(dtype, self.device)
        self.preprocessing = Preprocessing.from_processor(processor)
        self.patch_grid = patch_grid
        self.patch_size = int(self.model.config.patch_size)
        self.feature_dim = int(self.model.config.hidden_size)
        self.num_prefix_tokens = 1 + int(getattr(self.model.config, "num_register_tokens", 0))
        local = Path(source)
        weights = _weights_digest(local) if local.is_dir() else (revision or "main")
        self.fingerprint = hashlib.sha256(
            json.dumps(
                {
                    "model": model_name if not local.is_dir() else str(local.resolve()),
                    "weights": weights,
                    "preprocessing": self.preprocessing.__dict__,
                    "patch_grid": patch_grid,
                    "storage_dtype": "float16",
                    "compute_dtype": str(self.autocast_dtype or torch.float32),
                },
                sort_keys=True,
            ).encode()
        ).hexdigest()[:20]

    @property
    def num_patch_tokens(self) -> int:
        return self.patch_grid * self.patch_grid

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 3, H, W] -> CLS [B, F] and pooled patches [B, grid*grid, F], float32 on CPU."""
        pixel_values = pixel_values.to(self.device, non_blocking=True)
        autocast = (
            torch.autocast(device_type="cuda", dtype=self.autocast_dtype)
            if self.autocast_dtype
            else contextlib.nullcontext()
        )
        with autocast:
            hidden = self.model(pixel_values=pixel_values).last_hidden_state
        cls = hidden[:, 0]
        if self.patch_grid == 0:
            patches = hidden.new_zeros(hidden.shape[0], 0, hidden.shape[-1])
        else:
            tokens = hidden[:, self.num_prefix_tokens :]
            rows = pixel_values.shape[-2] // self.patch_size
            cols = pixel_values.shape[-1] // self.patch_size
            grid = tokens.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[-1], rows, cols)
            patches = F.adaptive_avg_pool2d(grid.float(), self.patch_grid).flatten(2).transpose(1, 2)
        return cls.float().cpu(), patches.float().cpu()
