"""The code location: every asset, check and resource of the BitMar pipeline."""

import dagster as dg

from assets import data, training
from bitmar_pipeline.resources import BitmarSettings, VisionEncoderResource
from bitmar_pipeline.tracking import CarbonTrackerResource, WandbResource

ALL_ASSETS = [
    data.coco_raw, data.image_caption_pairs, data.vision_features, data.robot_selection_tasks, data.text_tokenizer,
    training.multimodal_pretrain, training.reasoning_sft, training.grpo_policy,
]


def default_resources(settings: BitmarSettings) -> dict[str, dg.ConfigurableResource]:
    return {"settings": settings, "vision_encoder": VisionEncoderResource(), "wandb": WandbResource(), "carbon": CarbonTrackerResource()}


def build_definitions(settings: BitmarSettings | None = None) -> dg.Definitions:
    """Definitions with the given settings (default: $BITMAR_CONFIG or the sample profile)."""
    return dg.Definitions(
        assets=ALL_ASSETS,
        resources=default_resources(settings or BitmarSettings()),
    )


defs = build_definitions()
