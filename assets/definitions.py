"""The code location: every asset, check and resource of the BitMar pipeline."""

from typing import Any

import dagster as dg

from assets import data, evaluation, operations, release, training
from bitmar_pipeline.resources.hub import HuggingFaceHubResource
from bitmar_pipeline.resources.settings import BitmarSettings, VisionEncoderResource
from bitmar_pipeline.resources.tracking import CarbonTrackerResource, WandbResource

ALL_ASSETS = [
    data.coco_raw, data.image_caption_pairs, data.vision_features, data.robot_selection_tasks, data.text_tokenizer,
    training.multimodal_pretrain, training.reasoning_sft, training.grpo_policy, evaluation.evaluation_report,
    release.quantization_report, release.hub_release,
]


def default_resources(settings: BitmarSettings) -> dict[str, Any]:
    return {
        "settings": settings,
        "vision_encoder": VisionEncoderResource(),
        "wandb": WandbResource(),
        "carbon": CarbonTrackerResource(),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),  # torchrun launches (compute.nproc_per_node > 1)
        "hub": HuggingFaceHubResource(),
    }


def build_definitions(settings: BitmarSettings | None = None) -> dg.Definitions:
    """Definitions with the given settings (default: $BITMAR_CONFIG or the sample profile).
    The schedule's cron and the automation intervals come from its `schedules` section."""
    settings = settings or BitmarSettings()
    return dg.Definitions(
        assets=[*ALL_ASSETS, operations.build_robot_files_asset(settings.config.schedules)],
        resources=default_resources(settings),
        jobs=operations.JOBS,
        schedules=operations.build_schedules(settings.config.schedules),
        sensors=operations.build_automation_sensors(settings.config.schedules),
    )


defs = build_definitions()
