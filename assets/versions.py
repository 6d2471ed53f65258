"""Code versions and data versions: what Dagster compares to mark an asset stale.

Code version: bump an asset's constant below when a change to its logic changes what it writes
for the same inputs and settings. The training stages also carry `MODEL_REVISION` (bumped when
the model's forward semantics change) and the release assets the file formats they write, so
those bumps mark them stale too. Dagster shows "code version changed" on the asset and
"upstream changed" on everything downstream (the UI's stale markers, `dagster asset list`).

Data version: each asset reports the content fingerprint the pipeline already computes
(manifest and shard file hashes, encoder fingerprint + image hashes, the stage fingerprint
that names a training checkpoint). A re-run that writes the same content keeps the version,
so nothing downstream turns stale; new images, a new encoder or a changed training setting
give a new version and mark the readers stale. Assets without one (evaluation, quantization,
release) get Dagster's default: a hash of their code version and their inputs' versions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import dagster as dg

from bitmar_model.io import sha256_file
from bitmar_model.modeling import MODEL_REVISION
from bitmar_model.packing import FORMAT_VERSION as PACKED_FORMAT_VERSION
from bitmar_pipeline.data.coco_sample import GENERATOR_VERSION
from bitmar_pipeline.release.folder import FORMAT_VERSION as RELEASE_FORMAT_VERSION

# Data stages: bump when the stage's own logic changes its output.
COCO_RAW = 1
IMAGE_CAPTION_PAIRS = 1
VISION_FEATURES = 1
ROBOT_SELECTION_TASKS = 1
TEXT_TOKENIZER = 2
# Training stages: bump when a stage's training code changes (losses, data it builds, schedule).
# grpo_policy 2: selection anchor, full-entropy bonus, exact-set calibration target.
# reasoning_sft 2: installs the teacher-distilled selection knowledge (training.knowledge_teacher).
# reasoning_sft 3: ... next to a token TF-IDF view (training.knowledge_token_tfidf).
# reasoning_sft 4: ... over a table of whole words found by hash (training.knowledge_table).
# reasoning_sft 5: ... read by a context encoder distilled from the teacher (training.knowledge_context_layers).
# multimodal_pretrain 2: the cell reader's warm-up and bag-of-words loss (model.cell_words).
STAGE_CODE = {"multimodal_pretrain": 2, "reasoning_sft": 5, "grpo_policy": 2}
# Report and release stages.
# 2: texts guided by the fleet's profiles; the report records the fleet; 3: task cues; 4: the Platt fit
# no longer diverges (halved Newton steps, l2 1) and the guided "Goal:" line is the task
EVALUATION_REPORT = 4
QUANTIZATION_REPORT = 3  # 3: the integer form's latency, matmul calls and weight bytes
HUB_RELEASE = 4  # 4: the manifest carries the fleet's profiles (3: the integer model's latency in the card)


def data_code_version(version: int, **parts: int) -> str:
    """`1`, or `1.generator1` with the versions of what the stage embeds."""
    return ".".join([str(version), *(f"{name}{value}" for name, value in sorted(parts.items()))])


def training_code_version(stage: str) -> str:
    """The model revision and the stage's code version, e.g. `model6.stage1`."""
    return f"model{MODEL_REVISION}.stage{STAGE_CODE[stage]}"


CODE_VERSIONS: dict[str, str] = {
    "coco_raw": data_code_version(COCO_RAW, generator=GENERATOR_VERSION),
    "image_caption_pairs": data_code_version(IMAGE_CAPTION_PAIRS),
    "vision_features": data_code_version(VISION_FEATURES),
    "robot_selection_tasks": data_code_version(ROBOT_SELECTION_TASKS),
    "text_tokenizer": data_code_version(TEXT_TOKENIZER),
    **{stage: training_code_version(stage) for stage in STAGE_CODE},
    "evaluation_report": f"{EVALUATION_REPORT}.model{MODEL_REVISION}",
    "quantization_report": f"{QUANTIZATION_REPORT}.model{MODEL_REVISION}.packed{PACKED_FORMAT_VERSION}",
    "hub_release": (
        f"{HUB_RELEASE}.model{MODEL_REVISION}.packed{PACKED_FORMAT_VERSION}.release{RELEASE_FORMAT_VERSION}"
    ),
}


def content_version(*parts: str) -> dg.DataVersion:
    """A data version from fingerprints and hashes (order matters), 16 hex characters."""
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()
    return dg.DataVersion(digest[:16])


def files_version(paths: Iterable[Path]) -> dg.DataVersion:
    """The data version of files written by a stage: their names and SHA-256 digests."""
    return content_version(*(f"{Path(p).name}:{sha256_file(p)}" for p in sorted(Path(p) for p in paths)))
