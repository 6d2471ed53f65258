"""DINOv2 image encoder: loading (hub id, local directory or the offline `tiny-random`),
preprocessing, pooling, and the fingerprint that keys the feature cache.

`tiny-random` is a real DINOv2 architecture with random weights (fixed seed), written once
as a local model directory and then loaded through the same `from_pretrained` path as
`facebook/dinov2-base`, so the offline profile exercises the production code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import uuid
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

TINY_RANDOM = "tiny-random"
_TINY_CONFIG = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=112, patch_size=14
)
_TINY_PROCESSOR = dict(
    do_resize=True,
    size={"shortest_edge": 128},
    do_center_crop=True,
    crop_size={"height": 112, "width": 112},
    image_mean=[0.485, 0.456, 0.406],
    image_std=[0.229, 0.224, 0.225],
    resample=Image.Resampling.BICUBIC,
)


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
    # A private temp name: parallel shard runs may build it at the same moment.
    tmp = directory.with_name(f"{directory.name}.tmp-{uuid.uuid4().hex}")
    model.save_pretrained(tmp)
    BitImageProcessorPil(**_TINY_PROCESSOR).save_pretrained(tmp)
    try:
        tmp.rename(directory)
    except OSError:
        # Another process finished first; its copy is identical (same seed and config).
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


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
        new_size = (self.shortest_edge, int(height * scale)) if width <= height else (int(width * scale), self.shortest_edge)
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

    def __init__(self, model_name: str, source: str, revision: str | None, patch_grid: int, device: str = "auto", dtype: str = "auto") -> None:
        try:
            self.model = AutoModel.from_pretrained(source, revision=revision).eval()
            processor = AutoImageProcessor.from_pretrained(source, revision=revision)
        except (OSError, ValueError) as exc:
            raise VisionModelError(f"cannot load vision.model {model_name!r} (from {source!r}): {exc}") from exc
        if getattr(self.model.config, "model_type", "") not in {"dinov2", "dinov2_with_registers"}:
            raise VisionModelError(f"vision.model {model_name!r} is a {self.model.config.model_type!r} model; expected DINOv2")
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
            torch.autocast(device_type="cuda", dtype=self.autocast_dtype) if self.autocast_dtype else contextlib.nullcontext()
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
