"""The release folder: everything a user needs to run the evaluated model, plus its model card.

`<storage>/release/` (replaced atomically, so a reader or an upload never sees a mix):

    config.json, model.safetensors     save_pretrained: `BitMarModel.from_pretrained(folder)`
                                       gives the evaluated model, output for output
    model.packed.safetensors,          the 2-bit packed form for edge runtimes
    packed_config.json                 (bitmar_model.packing; embeddings, norms and biases in
                                       fp16: equal to the trained model holding them in
                                       fp16, see the quantization report)
    tokenizer/                         the pipeline's tokenizer, byte for byte
    vision_encoder/                    the DINOv2 encoder, when it is a local directory
                                       (a Hub id is recorded instead)
    memory.safetensors                 the episodic memory, tagged with the config fingerprint
    evaluation.json, quantization.json the reports the card is built from
    README.md                          the model card (Hub YAML front matter)
    bitmar_release.json                manifest: vision encoder, source model, SHA-256 of
                                       every other file (inference refuses a mismatch)
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from bitmar_model.calibration import PlattCalibration
from bitmar_model.io import atomic_directory, atomic_write_json, read_json, sha256_file
from bitmar_model.modeling import BitMarModel
from bitmar_model.packing import save_packed
from bitmar_pipeline.config import PipelineConfig
from bitmar_pipeline.evaluation.zero_shot import ZeroShotCalibration
from bitmar_pipeline.markdown import markdown_table
from bitmar_pipeline.release.quantization import REPORT_FILE as QUANTIZATION_REPORT
from bitmar_pipeline.release.quantization import REPORTS_DIR
from bitmar_pipeline.storage import Storage
from bitmar_pipeline.text.corpus import TOKENIZER_DIR
from bitmar_pipeline.training.datasets import check_compatible, load_pipeline_tokenizer
from bitmar_pipeline.training.stages import GRPO, STAGE_INFO_FILE, load_stage_model, model_dir

RELEASE_DIR = "release"
MANIFEST_FILE = "bitmar_release.json"
FORMAT_NAME = "bitmar-release"
FORMAT_VERSION = 1
TOKENIZER_SUBDIR = "tokenizer"
VISION_SUBDIR = "vision_encoder"
MEMORY_FILE = "memory.safetensors"
EVALUATION_FILE = "evaluation.json"
QUANTIZATION_FILE = "quantization.json"
CARD_FILE = "README.md"
EVALUATION_REPORT = "evaluation_report.json"
EMISSIONS_CSV = "emissions.csv"
TAGS = ["bitnet", "ternary", "1.58-bit", "vision-language", "robot-selection", "episodic-memory", "dagster"]
_MAX_OTHER_METRICS = 80
# The tiny random DINOv2 built for tests and the sample profile: no Hub model to name as base_model.
_LOCAL_VISION_MODELS = {"tiny-random"}


class ReleaseError(ValueError):
    """The release cannot be built; the message names the missing or bad input."""


@dataclass(frozen=True)
class VisionSpec:
    """The image encoder the model's vision features came from."""

    model: str  # the vision.model setting ("tiny-random", a Hub id or a directory)
    source: str  # what from_pretrained takes (resolve_model_source)
    revision: str | None
    patch_grid: int


@dataclass(frozen=True)
class CardDatasets:
    """The card's dataset ids: `datasets` metadata and the model-index entries."""

    robot: str = "robot-selection"
    captions: str = "coco"

    @classmethod
    def from_config(cls, config: PipelineConfig) -> CardDatasets:
        """Real data keeps its name; the generated sample sets say they are synthetic."""
        return cls(
            robot="robot-selection" if config.data.robot.source != "sample" else "synthetic-robot-selection",
            captions="coco" if config.data.coco.source != "sample" else "synthetic-shape-captions",
        )


@dataclass
class Release:
    path: Path
    manifest: dict[str, Any]
    card: str


def read_report(storage: Storage, filename: str, asset: str) -> dict[str, Any]:
    path = storage.path(REPORTS_DIR, filename)
    if not path.is_file():
        raise ReleaseError(f"{path} is missing: materialize {asset} before hub_release")
    report = read_json(path, lambda exc: ReleaseError(f"{path}: cannot read the {asset} report ({exc})"))
    if not isinstance(report, dict):
        raise ReleaseError(f"{path}: expected a JSON object of metrics, got {type(report).__name__}")
    return report


# ---------------------------------------------------------------- card sections


def _is_ci(value: Any) -> bool:
    return isinstance(value, dict) and {"value", "ci95_low", "ci95_high"} <= set(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not (isinstance(value, float) and math.isnan(value))


def _cell(value: Any) -> str:
    if _is_ci(value):
        return f"{value['value']:.3f} [{value['ci95_low']:.3f}, {value['ci95_high']:.3f}]"
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _leaves(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    """(dotted path, value) of every number or confidence interval in a nested dict."""
    found = []
    for key, value in tree.items():
        path = (*prefix, str(key))
        if _is_ci(value) or (_is_number(value) and not isinstance(value, bool)):
            found.append((".".join(path), value))
        elif isinstance(value, dict):
            found.extend(_leaves(value, path))
    return found


def metrics_markdown(evaluation: dict[str, Any]) -> str:
    """Robot selection of the model next to its baselines (one table per split), then every
    other number of the evaluation report. Intervals are 95% bootstrap intervals."""
    parts = []
    for split, section in (evaluation.get("robot_selection") or {}).items():
        if not isinstance(section, dict):
            continue
        models = {
            name: metrics for name, metrics in section.items()
            if isinstance(metrics, dict) and metrics and all(_is_ci(m) or _is_number(m) for m in metrics.values())
        }
        if not models:
            continue
        names = list(dict.fromkeys(m for metrics in models.values() for m in metrics))
        table = pd.DataFrame(
            [
                {
                    "metric": m,
                    **{model: _cell(metrics[m]) if m in metrics else "-" for model, metrics in models.items()},
                }
                for m in names
            ]
        )
        n = f", n={section['n']}" if "n" in section else ""
        parts.append(
            f"Robot selection, {split} split{n}; `majority` and `tfidf_logreg` "
            f"are the baselines:\n\n{markdown_table(table)}"
        )
    others = _leaves({k: v for k, v in evaluation.items() if k != "robot_selection"})
    if others:
        shown = pd.DataFrame([{"metric": path, "value": _cell(v)} for path, v in others[:_MAX_OTHER_METRICS]])
        more = (
            f"\n\n({len(others) - _MAX_OTHER_METRICS} more in `evaluation.json`.)"
            if len(others) > _MAX_OTHER_METRICS
            else ""
        )
        parts.append(f"Other metrics:\n\n{markdown_table(shown)}{more}")
    return "\n\n".join(parts) or "The evaluation report holds no numeric metrics; see `evaluation.json`."


def emissions_table(storage: Storage) -> pd.DataFrame | None:
    """codecarbon's records summed per stage over every recorded run, or None when none exist."""
    path = storage.path("emissions", EMISSIONS_CSV)
    if not path.is_file():
        return None
    records = pd.read_csv(path)
    if records.empty or "project_name" not in records:
        return None
    wanted = {"emissions": "kg_co2eq", "energy_consumed": "energy_kwh", "duration": "seconds"}
    present = {k: v for k, v in wanted.items() if k in records}
    table = records.groupby("project_name")[list(present)].sum().rename(columns=present)
    table.insert(0, "runs", records.groupby("project_name").size())
    table.loc["total"] = table.sum()
    return table.reset_index(names="stage")


def training_data_markdown(storage: Storage, config: PipelineConfig) -> str:
    lines = [f"- Images and captions: `data.coco.source: {config.data.coco.source}`"]
    pair_files = [storage.partition_path("image_caption_pairs", p) for p in storage.partitions("image_caption_pairs")]
    if pair_files:
        lines[-1] += (
            f", {sum(pq.read_metadata(p).num_rows for p in pair_files)} image-caption pairs in {len(pair_files)} shards"
        )
    lines.append(f"- Robot selection tasks: `data.robot.source: {config.data.robot.source}`")
    if storage.has_partition("robot_tasks", "all"):
        tasks = storage.read_partition("robot_tasks", "all", columns=["task_key", "split"]).drop_duplicates("task_key")
        counts = tasks["split"].value_counts()
        lines[-1] += ", distinct tasks per split: " + ", ".join(
            f"{split} {int(counts.get(split, 0))}" for split in ("train", "validation", "test")
        )
    lines.append(
        "- Training: multimodal pretraining (captioning, InfoNCE alignment, memory regularisation), "
        "supervised reasoning on targets built from the robot data, then GRPO against the frozen SFT model."
    )
    return "\n".join(lines)


def _bytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _fp16_cost(quantization: dict[str, Any]) -> str:
    cost = quantization.get("agreement", {}).get("fp16_storage_vs_fp32")
    return (
        f"; against fp32 they move robot probabilities by at most {cost['robot_probs_max_abs_diff']:.2e}"
        if cost
        else ""
    )


def _emissions_section(emissions: pd.DataFrame | None) -> str:
    if emissions is None:
        return (
            "No emissions were recorded (codecarbon off: `carbon_tracking.enabled: false`, or no training run tracked)."
        )
    return (
        "Measured with codecarbon (offline, by country), summed over every recorded run of each stage:\n\n"
        + markdown_table(emissions.round(6))
    )


def _size_line(sizes: dict[str, Any]) -> str:
    if not sizes:
        return "See `quantization.json`."
    return (
        f"{sizes['total_parameters']:,} parameters: {_bytes(sizes['fp32_bytes'])} in fp32, "
        f"{_bytes(sizes['fp16_bytes'])} in fp16, {_bytes(sizes['packed_bytes'])} packed "
        f"({sizes['compression_vs_fp32']:.1f}x smaller than fp32)."
    )


def _agreement_line(quantization: dict[str, Any]) -> str:
    """How closely the packed form reproduces the trained model, in one sentence."""
    packed = quantization.get("agreement", {}).get("packed_vs_fake_quant", {})
    if not packed:
        return ""
    if packed["exactly_equal"]:
        match = "reproduces the trained model exactly"
    else:
        diff = format(packed["robot_probs_max_abs_diff"], ".2e")
        match = f"differs from the trained model by at most {diff} in robot probability"
    return (
        f"On {packed['tasks']} test tasks the packed form {match}; "
        f"robot top-1 agreement {packed['robot_top1_agreement']:.3f}, "
        f"next-token agreement {packed['logits_argmax_agreement']:.3f}"
        " (its embeddings, norms and biases are stored in fp16; the trained model holding them in fp16 is the "
        f"reference{_fp16_cost(quantization)})."
    )


def _inference_line(quantization: dict[str, Any]) -> str:
    """The integer model's CPU latency and BitLinear weight memory next to the other forms, in one sentence."""
    latency, integer = quantization.get("latency", {}), quantization.get("integer", {})
    ms = {name: f"{entry['median_ms']:.1f} ms" for name, entry in latency.get("models", {}).items()}
    if not {"integer", "fake_quant", "dense_fp32"} <= set(ms) or "weight_bytes" not in integer:
        return ""
    weights = integer["weight_bytes"]
    return (
        f"`load_predictor` runs the integer model built from the packed file: one forward pass (batch "
        f"{latency['batch_size']}, CPU, {latency['threads']} threads) takes {ms['integer']}, against "
        f"{ms['fake_quant']} for the fake-quant model and {ms['dense_fp32']} for an fp32 model of the same "
        f"shapes; its BitLinear weights take {_bytes(weights['integer_int8'])} of memory as int8, "
        f"{_bytes(weights['fake_quant_fp32'])} as fp32 latent weights."
    )


# ---------------------------------------------------------------- card metadata (Hub YAML)


def _metric_value(value: Any) -> float | None:
    """The number of a report entry (a bare number or a confidence interval), None when absent."""
    if _is_ci(value):
        value = value["value"]
    if isinstance(value, bool) or not _is_number(value) or math.isinf(value):
        return None
    return float(value)


def _section(tree: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return tree


def eval_results(evaluation: dict[str, Any], datasets: CardDatasets) -> list[EvalResult]:
    """model-index entries for the Hub's evaluation widget: the selection head and the reasoning
    text on the robot test split, the head on the user-phrased set, and captioning on held-out
    COCO. A metric the report lacks (absent section, None, NaN) is left out."""
    text = ("robot_selection", "test", "bitmar_reasoning_text")
    robot = {"task_type": "text-classification", "task_name": "Robot selection", "dataset_type": datasets.robot}
    wanted = [
        (robot | {"dataset_name": "Robot selection tasks", "dataset_split": "test"}, metric_type, name, path)
        for metric_type, name, path in (
            ("accuracy", "Selection head top-1", ("robot_selection", "test", "bitmar_head", "top1")),
            ("exact_match", "Selection head exact set", ("robot_selection", "test", "bitmar_head", "exact_set")),
            ("f1", "Selection head sample-F1", ("robot_selection", "test", "bitmar_head", "sample_f1")),
            ("accuracy", "Reasoning text hit", (*text, "hit")),
            ("exact_match", "Reasoning text exact set", (*text, "exact_set")),
        )
    ]
    user_set = robot | {"dataset_name": "User-phrased robot tasks", "dataset_split": "user_set"}
    wanted += [
        (user_set, "accuracy", "Selection head top-1", ("user_phrased", "user_set", "head_top1")),
        (user_set, "accuracy", "Reasoning text hit", ("user_phrased", "user_set", "text_hit")),
    ]
    captions = {
        "task_type": "image-to-text",
        "task_name": "Image captioning",
        "dataset_type": datasets.captions,
        "dataset_name": "COCO captions (held-out images)" if datasets.captions == "coco" else "Synthetic captions",
        "dataset_split": "held-out",
    }
    wanted += [
        (captions, "bleu", "BLEU-4", ("vision_language", "bleu4")),
        (captions, "cider", "CIDEr-D", ("vision_language", "cider_d")),
    ]
    results = []
    for where, metric_type, name, path in wanted:
        value = _metric_value(_section(evaluation, *path))
        if value is not None:
            results.append(EvalResult(**where, metric_type=metric_type, metric_name=name, metric_value=value))
    return results


def _base_model(vision: dict[str, Any]) -> str | None:
    """The DINOv2 encoder's Hub id, when the release names one (a local encoder travels in the
    folder and is no Hub model)."""
    model = vision.get("model")
    if vision.get("path") or not model or model in _LOCAL_VISION_MODELS or Path(str(model)).is_absolute():
        return None
    return str(model)


def card_data(
    manifest: dict[str, Any], evaluation: dict[str, Any], repo_id: str, datasets: CardDatasets
) -> ModelCardData:
    """The card's Hub metadata: license, library and tags (the model class's own merged in),
    base model, datasets, language, pipeline tag and model-index."""
    mixin = BitMarModel._hub_mixin_info.model_card_data
    results = eval_results(evaluation, datasets)
    return ModelCardData(
        model_name=repo_id.rsplit("/", 1)[-1] if results else None,
        base_model=_base_model(manifest.get("vision") or {}),
        datasets=[datasets.captions, datasets.robot],
        language="en",
        license=mixin.license or "mit",
        library_name=mixin.library_name or "bitmar",
        pipeline_tag="text-classification",
        tags=list(dict.fromkeys([*TAGS, *(mixin.tags or [])])),
        eval_results=results or None,
    )


def _own_robots_paragraph(repo_id: str) -> str:
    fleet = '{"Window Cleaner": {"capabilities": ["window cleaning"], "environments": ["glass facades"]}}'
    return (
        "Your own robots, described only by their profiles, are selected zero-shot next to the five:\n"
        f'`load_predictor("{repo_id}", fleet={fleet})` (or `bitmar predict --fleet robots.yaml`); the\n'
        "release's `zero_shot` map, fitted on validation, turns the task's match with a profile into a\n"
        "probability.\n\n"
    )


def render_card(
    manifest: dict[str, Any],
    evaluation: dict[str, Any],
    quantization: dict[str, Any],
    data: str,
    emissions: pd.DataFrame | None,
    repo_id: str,
    datasets: CardDatasets | None = None,
) -> str:
    metadata = card_data(manifest, evaluation, repo_id, datasets or CardDatasets())
    own_robots = _own_robots_paragraph(repo_id) if manifest.get("zero_shot") else ""
    source = manifest["source"]
    vision = manifest["vision"]
    emitted = _emissions_section(emissions)
    size_line = _size_line(quantization.get("sizes", {}))
    agreement = _agreement_line(quantization)
    inference = _inference_line(quantization)
    encoder = f"`{vision['model']}`" + (f" (included in `{vision['path']}/`)" if vision.get("path") else "")
    body = f"""
# BitMar: ternary vision-language robot selection

BitMar picks the robot (Drone, Underwater Robot, Humanoid, Robot with Wheels, Robot with Legs,
or No Robot) for a task and explains why in tagged reasoning (`<thinking>` ... `<robot_selection>`).
Its text encoder and decoder use BitNet b1.58 layers (ternary weights, 8-bit activations); images
enter as DINOv2 features ({encoder}, {vision['patch_grid']}x{vision['patch_grid']} patch grid); an
episodic memory and a reasoning module feed the selection head and the decoder.

This release is the `{source['stage']}` model at step {source.get('step')} (fingerprint `{source.get('fingerprint')}`).

## How to load

```python
from bitmar_pipeline.release.inference import load_predictor
predictor = load_predictor("{repo_id}")
print(predictor.predict("Inspect underwater pipelines").robots)
```

{own_robots}`load_predictor` also takes a local copy of this folder. The model alone:
`BitMarModel.from_pretrained("{repo_id}")` (`from bitmar_model import BitMarModel`).

Files: `model.safetensors` + `config.json` hold the trained latent weights, which BitLinear
ternarizes on the fly; loading them gives the evaluated model's outputs exactly.
`model.packed.safetensors` + `packed_config.json` hold the 2-bit packed form, from which
`load_predictor` builds the integer model it predicts with (`reference=True`: `model.safetensors`).
`memory.safetensors` is the episodic memory,
`tokenizer/` the tokenizer, `bitmar_release.json` the manifest with every file's SHA-256.

## Metrics and baselines

{metrics_markdown(evaluation)}

## Size and quantization

{size_line} {agreement}

{inference}

## Training data

{data}

## Emissions

{emitted}

## Intended use

Research on ternary (1.58-bit) vision-language models for edge devices, and demonstrations of
explainable robot selection among the five robot types above. Outputs are suggestions for a
person to check.

## Limitations

- A tiny model trained on small datasets (a few hundred robot tasks): expect errors outside
  their wording and domains; English only.
- The generated reasoning can be malformed or disagree with the selection head; both are
  reported, and `reasoning_well_formed` / `consistency_with_head` above say how often.
- The head's shown confidence is Platt-scaled on the validation split (`calibration` above, ECE
  before and after); the confidence stated in the text is not calibrated (its ECE is above).
- Image features must come from the encoder named in `bitmar_release.json`; another encoder
  gives features the model was not trained on.
- A robot described only by its profile is found about as well as a trained one when its
  description has words of its own (underwater), far less when its tasks overlap other robots'.
- The public robot data has no "No Robot" task: when the model has a no-robot gate, "No Robot"
  is learned from 100 non-robot tasks written for BitMar (`bitmar_pipeline/data/no_robot_tasks.json`),
  and the probability shown for it is the gate's own, not calibrated.
- With `training.knowledge_typed_tasks` (the default) the task knowledge's classifier also trains
  on 108 short robot tasks written for BitMar (`bitmar_pipeline/data/typed_robot_tasks.json`, kept
  apart from every evaluation task); the user-phrased evaluation sets were written by the same
  project, so their scores may read higher than a stranger's wording would.
- With `training.knowledge_label_sets` (the default) the robots beside the top one come from the
  robot sets the training tasks are labelled with: a short task now and then gets the public data's
  usual companion (Drone with Robot with Legs outdoors) where one robot would do.
- Not for safety-critical decisions.
"""
    # ModelCard parses the header back (a malformed model-index fails here, not on the Hub).
    return str(ModelCard(f"---\n{metadata.to_yaml()}\n---\n{body}"))


# ---------------------------------------------------------------- the folder


def _check_vision(vision: VisionSpec, feature_dim: int, num_patches: int) -> None:
    """Refuse to record an encoder whose features the model was not trained on."""
    if vision.patch_grid**2 != num_patches:
        raise ReleaseError(
            f"vision.patch_grid={vision.patch_grid} gives {vision.patch_grid**2} "
            f"patch tokens; the model was trained on {num_patches}"
        )
    encoder_config = Path(vision.source) / "config.json"
    if encoder_config.is_file():
        width = json.loads(encoder_config.read_text()).get("hidden_size")
        if width != feature_dim:
            raise ReleaseError(
                f"vision encoder {vision.source} has hidden_size {width}; the "
                f"model expects features of width {feature_dim}"
            )


def _vision_entry(vision: VisionSpec, staging: Path) -> dict[str, Any]:
    source = Path(vision.source)
    entry: dict[str, Any] = {
        "model": vision.model,
        "revision": vision.revision,
        "patch_grid": vision.patch_grid,
        "path": None,
    }
    if source.is_dir():
        # A local encoder (tiny-random, a fine-tuned DINOv2) travels with the release:
        # the path it was read from does not exist on the user's machine.
        shutil.copytree(source, staging / VISION_SUBDIR, ignore=shutil.ignore_patterns(".*"))
        # Its name only: the builder's absolute path means nothing to a user (and leaks it).
        entry.update(model=Path(vision.model).name, path=VISION_SUBDIR)
    return entry


def _calibration_entry(evaluation: dict[str, Any]) -> dict[str, Any] | None:
    fitted = evaluation.get("calibration")
    return None if fitted is None else PlattCalibration.from_dict(fitted).to_dict()


def _fleet_entry(evaluation: dict[str, Any], config: PipelineConfig) -> dict[str, Any] | None:
    """The data's fleet as the report drew its reasons from, plus the config's own `robots:`."""
    fleet = evaluation.get("fleet")
    if not config.robots:
        return fleet
    if fleet is None or evaluation.get("zero_shot") is None:
        raise ValueError(
            "robots: the config describes robots of its own, but the evaluation report has no fleet or no "
            "zero-shot map to select them with (training.knowledge_teacher set? re-run evaluation_report)"
        )
    return {**fleet, **{name: profile.model_dump() for name, profile in config.robots.items()}}


def _zero_shot_entry(evaluation: dict[str, Any]) -> dict[str, Any] | None:
    fitted = evaluation.get("zero_shot")
    return None if fitted is None else ZeroShotCalibration.from_dict(fitted).to_dict()


def build_release(
    storage: Storage, config: PipelineConfig, vision: VisionSpec, created: datetime | None = None
) -> Release:
    """Assemble `<storage>/release/` from the latest grpo_policy model and the reports."""
    evaluation = read_report(storage, EVALUATION_REPORT, "evaluation_report")
    quantization = read_report(storage, QUANTIZATION_REPORT, "quantization_report")
    model = load_stage_model(storage, GRPO).eval()
    check_compatible(model.config, load_pipeline_tokenizer(storage))
    _check_vision(vision, model.config.vision_feature_dim, model.config.vision_num_patches)
    info_path = model_dir(storage, GRPO) / STAGE_INFO_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}

    # Built in a staging folder and swapped in whole: readers see the old release or the new one.
    with atomic_directory(storage.path(RELEASE_DIR)) as staging:
        model.save_pretrained(str(staging))
        save_packed(model, staging, model.config.to_dict())
        shutil.copytree(storage.path(TOKENIZER_DIR), staging / TOKENIZER_SUBDIR, ignore=shutil.ignore_patterns(".*"))
        model.memory.save(staging / MEMORY_FILE, fingerprint=model.config.fingerprint())
        atomic_write_json(staging / EVALUATION_FILE, evaluation, indent=2, default=float)
        atomic_write_json(staging / QUANTIZATION_FILE, quantization, indent=2, default=float)
        manifest: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created": (created or datetime.now(timezone.utc)).isoformat(timespec="seconds"),
            "source": {"stage": GRPO, "step": info.get("step"), "fingerprint": info.get("fingerprint")},
            "model_fingerprint": model.config.fingerprint(),
            "max_prompt_tokens": model.config.max_seq_len,
            "tokenizer": TOKENIZER_SUBDIR,
            "memory": MEMORY_FILE,
            "vision": _vision_entry(vision, staging),
            # Platt scaling of the head's top-choice probability, fitted on validation by
            # evaluation_report; null for a report that has none (shown uncalibrated).
            "calibration": _calibration_entry(evaluation),
            # The robots' profiles (capabilities, limitations, environments): the data's, which the
            # report's texts drew their reasons from, then the config's `robots:`; `bitmar predict`
            # guides its texts with them.
            "fleet": _fleet_entry(evaluation, config),
            # Fit score -> probability for robots described only in the fleet (evaluation.zero_shot),
            # fitted on validation; null when the model has no task knowledge to score them with.
            "zero_shot": _zero_shot_entry(evaluation),
        }
        card = render_card(
            manifest, evaluation, quantization, training_data_markdown(storage, config), emissions_table(storage),
            config.huggingface_hub.repo_id, CardDatasets.from_config(config),
        )
        # save_pretrained wrote the mixin's generic card; this one replaces it.
        (staging / CARD_FILE).write_text(card)
        manifest["files"] = {
            p.relative_to(staging).as_posix(): sha256_file(p) for p in sorted(staging.rglob("*")) if p.is_file()
        }
        # Written last: a folder without its manifest is refused by inference.
        atomic_write_json(staging / MANIFEST_FILE, manifest, indent=2, default=float)
    return Release(storage.path(RELEASE_DIR), manifest, card)


def release_files(path: Path) -> pd.DataFrame:
    """Files of a release folder with their sizes, for metadata."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return pd.DataFrame(
        {"file": [p.relative_to(path).as_posix() for p in files], "bytes": [os.path.getsize(p) for p in files]}
    )
