"""Dagster resources: the one place assets get configuration, storage and outside systems."""

from __future__ import annotations

import enum
import types
import typing
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Literal, Optional

import dagster as dg
import torch
from pydantic import BaseModel, Field, create_model

from bitmar_pipeline.config import PipelineConfig, load_config
from bitmar_pipeline.features.vision_encoder import VisionEncoder, resolve_model_source
from bitmar_pipeline.storage import Storage


def _launch_type(annotation: Any, name: str) -> Any:
    """The Dagster config type of a PipelineConfig field (Dagster takes no Literal, Path or tuple)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in args if a is not type(None)]
        return _launch_type(inner, name)
    if origin is Literal:
        return enum.Enum(name, {str(v): str(v) for v in args})
    if origin is tuple:
        return list[_launch_type(args[0], name)]
    if origin is list:
        return list[_launch_type(args[0], name)]
    if origin is dict:
        return dict[str, _launch_type(args[1], name)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _launch_section(annotation, name)
    return str if annotation is Path else annotation


def _launch_section(model: type[BaseModel], name: str) -> type[dg.Config]:
    """A Dagster Config mirroring a PipelineConfig section: every field typed and documented with
    the schema's default, and optional (unset: the value of config_file or the profile)."""
    fields: dict[str, Any] = {}
    for key, info in model.model_fields.items():
        kind = _launch_type(info.annotation, f"{name}_{key}")
        if isinstance(kind, type) and issubclass(kind, dg.Config):
            fields[key] = (kind, Field(default_factory=kind, description=model.__doc__ or None))
            continue
        default = info.get_default(call_default_factory=True)
        shown = default.value if isinstance(default, enum.Enum) else default
        choices = f"One of {', '.join(m.value for m in kind)}." if isinstance(kind, type(enum.Enum)) else None
        text = " ".join(filter(None, [info.description, choices, f"Default: {shown!r}."]))
        fields[key] = (Optional[kind], Field(default=None, description=text))  # noqa: UP045 (Dagster reads Optional)
    return create_model(name, __base__=dg.Config, **fields)


# The launchpad's typed form of the whole schema (resources.settings.config.profile).
PipelineProfile = _launch_section(PipelineConfig, "PipelineProfile")


def profile_overrides(profile: dg.Config, prefix: str = "") -> dict[str, Any]:
    """The fields set in a launchpad profile as dotted-key overrides ({"vision.batch_size": 8})."""
    overrides: dict[str, Any] = {}
    for key in type(profile).model_fields:
        value = getattr(profile, key)
        if isinstance(value, dg.Config):
            overrides.update(profile_overrides(value, f"{prefix}{key}."))
        elif isinstance(value, dict):  # a map of sections (robots: name -> profile) is one value
            overrides[f"{prefix}{key}"] = {k: profile_overrides(v) for k, v in value.items()}
        elif value is not None:
            overrides[f"{prefix}{key}"] = value.value if isinstance(value, enum.Enum) else value
    return overrides


class BitmarSettings(dg.ConfigurableResource):
    """The pipeline profile: a YAML file (None: the embedded sample profile, or $BITMAR_CONFIG),
    then the typed `profile` fields set in the launchpad (the schema's sections, documented, with
    their defaults), then dotted-key `overrides` such as {"vision.model": "facebook/dinov2-base"}.
    The launchpad checks names, types and choices before launching; the whole profile is
    validated when the run initializes this resource, before any asset runs."""

    config_file: str | None = Field(
        default=None, description="YAML profile (configs/coco.yaml); unset: $BITMAR_CONFIG or the sample profile."
    )
    profile: PipelineProfile = Field(  # type: ignore[valid-type]
        default_factory=PipelineProfile, description="Typed settings laid over config_file; unset fields keep it."
    )
    overrides: dict[str, Any] = Field(default={}, description='Dotted keys over both: {"vision.batch_size": 8}.')
    progress_bars: bool = False
    console_progress: bool = Field(
        default=False, description="Training progress on stderr (a bar on a TTY, else 4 lines); set by `bitmar run`."
    )

    @cached_property
    def config(self) -> PipelineConfig:
        return load_config(self.config_file, {**profile_overrides(self.profile), **self.overrides})

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        config = self.config  # a bad value fails here, naming its key, before any asset runs
        if config.compute.cpu_threads is not None:
            torch.set_num_threads(config.compute.cpu_threads)

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
