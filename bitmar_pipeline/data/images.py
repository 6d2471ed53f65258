"""Safe image access: paths confined to the dataset root, full decoding, bomb limits.

Every check returns a reason code instead of raising, because one bad file must become a
quarantine row while the rest of the shard goes on.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})


@dataclass(frozen=True)
class ImageCheck:
    """Outcome of validating one image file: either the facts or a reason it was refused."""

    path: Path
    ok: bool
    reason: str = ""
    detail: str = ""
    width: int = 0
    height: int = 0
    format: str = ""
    content_hash: str = ""


def resolve_inside(root: Path, relative: str) -> Path | None:
    """Resolve `relative` under `root`; None when it is absolute or escapes the root (.., symlinks)."""
    if not relative or Path(relative).is_absolute():
        return None
    root = root.resolve()
    candidate = (root / relative).resolve()
    return candidate if candidate.is_relative_to(root) else None


def open_rgb(data: bytes, max_pixels: int) -> Image.Image:
    """Decode image bytes fully to RGB, refusing images larger than `max_pixels`."""
    with Image.open(io.BytesIO(data)) as image:
        if image.width * image.height > max_pixels:
            raise Image.DecompressionBombError(f"{image.width}x{image.height} exceeds max_image_pixels={max_pixels}")
        return image.convert("RGB")


def check_image(root: Path, relative: str, max_pixels: int) -> ImageCheck:
    """Validate one dataset image: inside root, present, an allowed format, decodes fully."""
    path = resolve_inside(root, relative)
    if path is None:
        return ImageCheck(Path(relative), False, "path_outside_root", f"{relative!r} escapes {root}")
    if not path.is_file():
        return ImageCheck(path, False, "missing_file", str(path))
    data = path.read_bytes()
    if not data:
        return ImageCheck(path, False, "empty_file", str(path))
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x its own limit; ours is enforced in open_rgb.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                fmt = probe.format or ""
            if fmt not in ALLOWED_FORMATS:
                return ImageCheck(
                    path,
                    False,
                    "unsupported_format",
                    f"{fmt or 'unknown'} (allowed: {', '.join(sorted(ALLOWED_FORMATS))})",
                )
            image = open_rgb(data, max_pixels)
    except Image.DecompressionBombError as exc:
        return ImageCheck(path, False, "decompression_bomb", str(exc))
    except UnidentifiedImageError:
        return ImageCheck(path, False, "not_an_image", f"{path.name} is not a decodable image")
    except (OSError, SyntaxError, ValueError) as exc:
        # Truncated JPEG/PNG data surfaces here during the full decode.
        return ImageCheck(path, False, "corrupt_image", f"{type(exc).__name__}: {exc}")
    return ImageCheck(
        path,
        True,
        width=image.width,
        height=image.height,
        format=fmt,
        content_hash=hashlib.sha256(data).hexdigest(),
    )


def is_heldout(content_hash: str, fraction: float) -> bool:
    """Deterministic hold-out by image content, so every caption of an image sits on one
    side. The one place that decides: pretraining, evaluation and the tokenizer corpus use it."""
    return int(hashlib.sha256(("heldout:" + content_hash).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction
