"""The code location: every asset, check and resource of the BitMar pipeline."""

import dagster as dg

from assets import data
from bitmar_pipeline.resources import BitmarSettings, VisionEncoderResource

ALL_ASSETS = [data.coco_raw, data.image_caption_pairs, data.vision_features, data.robot_selection_tasks, data.text_tokenizer]


def build_definitions(settings: BitmarSettings | None = None) -> dg.Definitions:
    """Definitions with the given settings (default: $BITMAR_CONFIG or the sample profile)."""
    return dg.Definitions(
        assets=ALL_ASSETS,
        resources={"settings": settings or BitmarSettings(), "vision_encoder": VisionEncoderResource()},
    )


defs = build_definitions()
