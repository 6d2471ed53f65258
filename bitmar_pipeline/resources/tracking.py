"""Experiment tracking resources: Weights & Biases and codecarbon.

W&B runs `offline` by default (files under `<storage>/wandb`, sync later with `wandb sync`),
`online` with the credentials wandb itself finds (WANDB_API_KEY, or what `wandb login` stored
in ~/.netrc or wandb's settings; asking for online without any is an error, not a silent switch
to offline), or `disabled`. The key is read at run start and handed to wandb directly: it is
never put in a config, log line or metadata. Each stage's metadata links its W&B run (online)
or names its local run folder (offline).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg

from bitmar_pipeline.config import CarbonConfig, WandbConfig

WANDB_KEY_ENV = "WANDB_API_KEY"


class TrackingError(RuntimeError):
    """A tracking backend was asked for but cannot be used; the message says why."""


class MetricLogger:
    """What a training stage logs to: W&B when enabled, and always an in-memory copy."""

    def __init__(self, run: Any | None) -> None:
        self.run = run

    def log(self, record: dict[str, float], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def log_image(self, name: str, path: Path) -> None:
        if self.run is not None:
            import wandb

            self.run.log({name: wandb.Image(str(path))})

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def link_metadata(self) -> dict[str, dg.MetadataValue]:
        """The W&B run as a link (online), or its local folder (offline: `wandb sync <folder>`)."""
        if self.run is None:
            return {}
        if not getattr(self.run, "offline", False) and getattr(self.run, "url", None):
            return {"wandb_run": dg.MetadataValue.url(self.run.url)}
        return {"wandb_run_dir": dg.MetadataValue.path(str(Path(self.run.dir).parent))}


class WandbResource(dg.ConfigurableResource):
    """Weights & Biases runs for the training stages (mode and project from the profile)."""

    @contextlib.contextmanager
    def run(
        self, config: WandbConfig, name: str, run_config: dict[str, Any], directory: Path
    ) -> Iterator[MetricLogger]:
        if config.mode == "disabled":
            yield MetricLogger(None)
            return
        key = os.environ.get(WANDB_KEY_ENV)
        import wandb

        # No network here: verify=False only asks whether wandb has credentials (env, netrc, settings).
        if config.mode == "online" and not key and not wandb.login(verify=False, prompt=False):
            raise TrackingError(
                f"wandb.mode is 'online' but W&B has no credentials: run `wandb login`, set {WANDB_KEY_ENV}, "
                "or use mode 'offline'"
            )

        directory.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(silent=True, api_key=key) if key else wandb.Settings(silent=True)
        run = wandb.init(
            mode=config.mode, project=config.project, entity=config.entity, name=name, dir=str(directory),
            config=run_config, reinit="create_new", settings=settings,
        )
        try:
            yield MetricLogger(run)
        finally:
            run.finish()


@dataclass
class Emissions:
    kg_co2eq: float
    energy_kwh: float
    seconds: float
    tracked: bool

    def metadata(self) -> dict[str, float | bool]:
        return {"emissions_kg_co2eq": self.kg_co2eq, "energy_kwh": self.energy_kwh, "emissions_tracked": self.tracked}


class CarbonTrackerResource(dg.ConfigurableResource):
    """codecarbon's OfflineEmissionsTracker around a stage (no network: country from config)."""

    @contextlib.contextmanager
    def track(self, config: CarbonConfig, stage: str, directory: Path) -> Iterator[list[Emissions]]:
        result: list[Emissions] = []
        started = time.perf_counter()
        if not config.enabled:
            yield result
            result.append(Emissions(0.0, 0.0, time.perf_counter() - started, tracked=False))
            return
        from codecarbon import OfflineEmissionsTracker

        directory.mkdir(parents=True, exist_ok=True)
        logging.getLogger("codecarbon").setLevel(logging.ERROR)
        tracker = OfflineEmissionsTracker(
            country_iso_code=config.country_iso_code, output_dir=str(directory), project_name=stage,
            log_level="error", save_to_file=True,
        )
        tracker.start()
        try:
            yield result
        finally:
            kg = tracker.stop() or 0.0
            energy = float(getattr(tracker.final_emissions_data, "energy_consumed", 0.0) or 0.0)
            result.append(Emissions(float(kg), energy, time.perf_counter() - started, tracked=True))
