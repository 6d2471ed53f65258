"""Dagster resources: the one place assets get configuration, storage and outside systems."""

from __future__ import annotations

from functools import cached_property
from typing import Any

import dagster as dg
from pydantic import PrivateAttr

from bitmar_pipeline.config import PipelineConfig, load_config
from bitmar_pipeline.storage import Storage
from bitmar_pipeline.vision_encoder import VisionEncoder, resolve_model_source


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


class VisionEncoderResource(dg.ConfigurableResource):
    """DINOv2 loaded once per process from the hub id, local directory or `tiny-random`."""

    _encoder: VisionEncoder | None = PrivateAttr(default=None)

    def get(self, settings: BitmarSettings) -> VisionEncoder:
        config = settings.config.vision
        if self._encoder is None:
            source = resolve_model_source(config.model, settings.storage.path("models"))
            self._encoder = VisionEncoder(config.model, source, config.revision, config.patch_grid, config.device, config.dtype)
        return self._encoder
