"""Dagster resources: the one place assets get configuration, storage and outside systems."""

from __future__ import annotations

from functools import cached_property, lru_cache
from typing import Any

import dagster as dg

from bitmar_pipeline.config import PipelineConfig, load_config
from bitmar_pipeline.features.vision_encoder import VisionEncoder, resolve_model_source
from bitmar_pipeline.storage import Storage


class BitmarSettings(dg.ConfigurableResource):
    """The pipeline profile: a YAML file (None: the embedded sample profile, or $BITMAR_CONFIG)
    plus dotted-key overrides such as {"vision.model": "facebook/dinov2-base"}, editable in
    the launchpad. Validated when a run starts, so a bad value fails before any work."""

    config_file: str | None = None
    overrides: dict[str, Any] = {}
    progress_bars: bool = False

    @cached_property
    def config(self) -> PipelineConfig:
        return load_config(self.config_file, self.overrides)

    @cached_property
    def storage(self) -> Storage:
        storage = Storage(self.config.storage.root)
        storage.ensure_writable()
        return storage


@lru_cache(maxsize=2)
def _load_encoder(
    model: str, source: str, revision: str | None, patch_grid: int, device: str, dtype: str
) -> VisionEncoder:
    return VisionEncoder(model, source, revision, patch_grid, device, dtype)


class VisionEncoderResource(dg.ConfigurableResource):
    """DINOv2 from the hub id, local directory or `tiny-random`; loaded once per process, so
    consecutive shard runs in one process (the CLI, a multiprocess-free executor) share it."""

    def get(self, settings: BitmarSettings) -> VisionEncoder:
        config = settings.config.vision
        source = resolve_model_source(config.model, settings.storage.path("models"))
        return _load_encoder(config.model, source, config.revision, config.patch_grid, config.device, config.dtype)
