"""Robot selection with reasoning from a release folder or a Hub repo: `bitmar predict` and its
Python API.

    from bitmar_pipeline.release.inference import load_predictor
    predictor = load_predictor(".bitmar/release")
    print(predictor.predict("Inspect underwater pipelines").robots)

A prediction carries the selection head's robots and probabilities, the generated reasoning,
what parsing that text finds, and the reasoning module's quality score. Greedy decoding and a
read-only memory make predictions reproducible.

The model is the integer one built from `model.packed.safetensors` (int8 ternary weights,
8-bit activations, integer matmuls: bitmar_model.packing.PackedBitLinear); it computes exactly
what the trained model computes with the file's fp16 embeddings, norms and biases (see the
quantization report). `reference=True` (`bitmar predict --reference`) loads the fake-quant fp32
model from `model.safetensors` instead, the trained latent weights as evaluated.

Input rules: an empty task is an error. A task longer than the model's context (the encoder's
`max_seq_len`, `max_prompt_tokens` in bitmar_release.json) keeps its first tokens and the
prediction says so (`truncated` and a note). An image is encoded with the release's DINOv2
encoder (or `vision_model`); an unreadable one is an error naming the file. A folder with a
missing or altered file (checked against the manifest's SHA-256s) is refused.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from huggingface_hub import snapshot_download
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from bitmar_model.bitlinear import placeholder_weights
from bitmar_model.calibration import PlattCalibration
from bitmar_model.config import BitMarConfig
from bitmar_model.io import read_json, sha256_file
from bitmar_model.modeling import BitMarModel
from bitmar_model.packing import load_packed_into, packed_skeleton, read_packed_config
from bitmar_model.reasoning_format import NO_ROBOT, parse_reasoning
from bitmar_model.robots import ROBOT_CLASSES, normalize_robot_name, select_robots, with_fleet_robots
from bitmar_pipeline.config import FLEET, ConfigError, DataConfig, check_fleet_names, load_config
from bitmar_pipeline.data.images import open_rgb
from bitmar_pipeline.evaluation.selection_quality import head_guidance
from bitmar_pipeline.evaluation.zero_shot import ZeroShotCalibration, fleet_scores, unknown_phrases
from bitmar_pipeline.features.vision_encoder import VisionEncoder, VisionModelError
from bitmar_pipeline.release.folder import (
    FORMAT_NAME,
    MANIFEST_FILE,
    RELEASE_DIR,
)
from bitmar_pipeline.training.reasoning_targets import format_prompt, profile_phrase_forms

MAX_IMAGE_PIXELS = DataConfig().max_image_pixels
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class PredictionError(ValueError):
    """Bad input or an unusable model folder; the message is meant for the user."""


@dataclass
class Prediction:
    task: str
    robots: list[str]  # selection head (select_robots): >= 0.5 and the best, or "No Robot" alone
    probabilities: dict[str, float]  # per robot class (independent sigmoids), then each fleet-only robot's zero-shot
    confidence: float  # probability of the most probable robot, calibrated when the release is
    confidence_calibrated: bool  # the release holds a calibration fitted on validation (manifest)
    reasoning: str  # generated tagged reasoning
    reasoning_well_formed: bool
    reasoning_robots: list[str]  # the selection written in the text
    reasoning_confidence: float | None  # the confidence written in the text
    reasoning_errors: list[str]
    reasoning_quality: float  # mean thought score of the reasoning module
    image: str | None = None
    truncated: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise PredictionError(f"{folder} is not a BitMar release folder: {MANIFEST_FILE} is missing")
    manifest = read_json(path, lambda exc: PredictionError(f"{path}: unreadable manifest ({exc})"))
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT_NAME
        or not isinstance(manifest.get("files"), dict)
    ):
        raise PredictionError(f"{path}: not a {FORMAT_NAME} manifest")
    for name, digest in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            raise PredictionError(f"{folder}: {name} is missing (listed in {MANIFEST_FILE})")
        if sha256_file(file) != digest:
            raise PredictionError(
                f"{file}: contents do not match {MANIFEST_FILE} (corrupted, or copied from another release)"
            )
    return manifest


def _resolve_folder(model: str | Path) -> Path:
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise PredictionError(f"model {path} is a file; expected a release folder")
    name = str(model)
    if isinstance(model, Path) or not _HUB_ID.fullmatch(name):
        raise PredictionError(f"model folder {path} does not exist")
    try:
        return Path(snapshot_download(repo_id=name))
    except Exception as exc:  # offline, unknown repo, no access: all end the same way for the user
        raise PredictionError(
            f"model {name!r} is not a local folder, and downloading it from "
            f"the Hugging Face Hub failed: {type(exc).__name__}: {exc}"
        ) from None


class Predictor:
    """A loaded release: model, tokenizer and (loaded on first use) the vision encoder."""

    def __init__(
        self,
        folder: Path,
        manifest: dict[str, Any],
        model: BitMarModel,
        tokenizer: PreTrainedTokenizerBase,
        vision_model: str | None = None,
        fleet: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    ) -> None:
        self.folder = folder
        self.manifest = manifest
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.vision_model = vision_model
        self._vision: VisionEncoder | None = None
        fitted = manifest.get("calibration")
        self.calibration = None if fitted is None else PlattCalibration.from_dict(fitted)
        # The release's fleet (None for a release built before it was recorded) and `fleet`'s robots.
        released = manifest.get("fleet") or {}
        fleet = validated_fleet(fleet, "fleet", released) if fleet else {}
        self.profiles = {**released, **fleet} or None
        # Robots no data labelled (the config's `robots:`, --fleet): scored zero-shot (evaluation.zero_shot).
        self.described_robots = [r for r in (self.profiles or {}) if normalize_robot_name(r) is None]
        fitted = manifest.get("zero_shot")
        self.zero_shot = None if fitted is None else ZeroShotCalibration.from_dict(fitted)
        if self.described_robots and (self.zero_shot is None or not model.config.knowledge_dim):
            raise PredictionError(
                f"{folder}: {', '.join(self.described_robots)} are described only in the fleet; selecting them "
                "zero-shot needs a release with task knowledge (training.knowledge_teacher) and its fitted "
                "zero-shot map (manifest 'zero_shot'), and this release has none"
            )
        self.fleet_notes = [note for robot in self.described_robots if (note := self._unknown_words_note(robot))]

    def _unknown_words_note(self, robot: str) -> str | None:
        """None when the model knows a word of each of the robot's phrases; a note naming the unknown
        ones; PredictionError when it knows none (the robot would score like any other so described)."""
        unknown = unknown_phrases(self.model, self.tokenizer, self.profiles[robot])
        if not unknown:
            return None
        if len(unknown) == len(profile_phrase_forms(self.profiles[robot])):
            raise PredictionError(f"fleet robot {robot!r}: the model knows no word of its capabilities or environments")
        return f"fleet robot {robot!r}: the model knows no word of {', '.join(map(repr, unknown))}; they do not count"

    def shown_confidence(self, top_probability: float, robot: str | None = None) -> float:
        """The head's top-choice probability as users see it: calibrated on validation when the
        release says how (manifest "calibration"), else as the head gives it. A robot described
        only in the fleet has its zero-shot probability, calibrated already; "No Robot", when a no-robot
        gate decided it, the gate's (no validation task of the public data is "No Robot" to calibrate it on)."""
        gated = robot == NO_ROBOT and self.model.config.knowledge_no_robot_gate
        if self.calibration is None or robot in self.described_robots or gated:
            return float(top_probability)
        return float(self.calibration(top_probability))

    def _fleet_probabilities(self, task: str, head_probs: np.ndarray) -> tuple[list[str], np.ndarray]:
        """(names, [1, 6 + described robots]): the head's classes, then each robot described only in
        the fleet with its zero-shot probability (its fit score among the whole fleet's)."""
        names = list(ROBOT_CLASSES)
        if not self.described_robots:
            return names, head_probs
        scores = fleet_scores(self.model, self.tokenizer, [task], self.profiles, self.zero_shot.top_k)
        columns = [list(self.profiles).index(r) for r in self.described_robots]
        return names + self.described_robots, with_fleet_robots(head_probs, self.zero_shot(scores[:, columns]))

    @property
    def max_prompt_tokens(self) -> int:
        return self.model.config.max_seq_len

    def vision_encoder(self) -> VisionEncoder:
        """Loaded lazily: text-only use never pays for (or downloads) DINOv2."""
        if self._vision is None:
            spec = self.manifest["vision"]
            if self.vision_model is not None:
                name, source, revision = self.vision_model, self.vision_model, None
            else:
                name, revision = spec["model"], spec.get("revision")
                source = str(self.folder / spec["path"]) if spec.get("path") else spec["model"]
            try:
                encoder = VisionEncoder(name, source, revision, int(spec["patch_grid"]), device="cpu", dtype="float32")
            except VisionModelError as exc:
                raise PredictionError(str(exc)) from None
            if encoder.feature_dim != self.model.config.vision_feature_dim:
                raise PredictionError(
                    f"vision model {name!r} gives features of width {encoder.feature_dim}; "
                    f"this model expects {self.model.config.vision_feature_dim}"
                )
            self._vision = encoder
        return self._vision

    def _image_features(self, image: Path) -> dict[str, torch.Tensor]:
        path = Path(image)
        try:
            rgb = open_rgb(path.read_bytes(), MAX_IMAGE_PIXELS)
        except FileNotFoundError:
            raise PredictionError(f"image {path} does not exist") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise PredictionError(f"cannot read image {path}: {exc}") from None
        encoder = self.vision_encoder()
        cls, patches = encoder.encode(encoder.preprocessing(rgb)[None])
        return {"cls": cls, "patches": patches}

    def _encode_task(self, task: str) -> tuple[torch.Tensor, bool, int]:
        if not isinstance(task, str) or not task.strip():
            raise PredictionError("the task text is empty")
        ids = self.tokenizer(format_prompt(task), add_special_tokens=False)["input_ids"]
        truncated = len(ids) > self.max_prompt_tokens
        return torch.tensor([ids[: self.max_prompt_tokens]]), truncated, len(ids)

    @torch.no_grad()
    def predict(self, task: str, image: Path | None = None, max_new_tokens: int = 200) -> Prediction:
        if max_new_tokens < 1:
            raise PredictionError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        ids, truncated, length = self._encode_task(task)
        vision = self._image_features(Path(image)) if image is not None else None
        out = self.model(ids, vision_features=vision)
        analysis = BitMarModel.get_reasoning_analysis(out)
        names, probs = self._fleet_probabilities(task, out.robot_probs.float().numpy())
        robots = [names[i] for i in np.flatnonzero(select_robots(probs)[0])]
        shown = self.shown_confidence(float(probs[0].max()), names[int(probs[0].argmax())])
        # The text states the head's selection and the confidence shown here (bitmar_model.guided).
        guidance = head_guidance(
            self.tokenizer, probs, self.calibration, self.profiles, [task], self.model, names, [shown]
        )
        generated = self.model.generate(
            ids, vision_features=vision, max_new_tokens=max_new_tokens, logits_processor=guidance
        )
        tokens = generated.new_tokens.masked_fill(generated.new_token_mask == 0, self.tokenizer.pad_token_id)
        text = self.tokenizer.decode(tokens[0].tolist(), skip_special_tokens=True)
        parsed = parse_reasoning(text, self.described_robots)
        probabilities = {name: float(p) for name, p in zip(names, probs[0], strict=True)}
        notes = list(self.fleet_notes)
        if truncated:
            notes.append(
                f"task truncated: its prompt has {length} tokens, the model reads the first {self.max_prompt_tokens}"
            )
        return Prediction(
            task=task,
            robots=robots,
            probabilities=probabilities,
            confidence=shown,
            confidence_calibrated=self.calibration is not None,
            reasoning=text,
            reasoning_well_formed=parsed.well_formed,
            reasoning_robots=parsed.robots,
            reasoning_confidence=parsed.confidence,
            reasoning_errors=parsed.errors,
            reasoning_quality=analysis["reasoning_quality"][0],
            image=None if image is None else str(image),
            truncated=truncated,
            notes=notes,
        )

    def predict_batch(self, path: str | Path, max_new_tokens: int = 200) -> list[Prediction]:
        """Predict every row of a .jsonl or .csv file with a `task` column (and optionally
        `image`, relative to the file's folder)."""
        predictions = []
        for where, task, image in read_batch(Path(path)):
            try:
                predictions.append(self.predict(task, image, max_new_tokens))
            except PredictionError as exc:
                raise PredictionError(f"{where}: {exc}") from None
        return predictions


def read_batch(path: Path) -> list[tuple[str, str, Path | None]]:
    """(location for messages, task, image path or None) per row."""
    if not path.is_file():
        raise PredictionError(f"batch file {path} does not exist")
    rows: list[tuple[str, Any, Any]] = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PredictionError(f"{path}, line {number}: not JSON ({exc})") from None
            if not isinstance(record, dict) or "task" not in record:
                raise PredictionError(f"{path}, line {number}: expected an object with a \"task\" field")
            rows.append((f"{path}, line {number}", record["task"], record.get("image")))
    elif path.suffix == ".csv":
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (ValueError, pd.errors.ParserError) as exc:
            raise PredictionError(f"{path}: unreadable CSV ({exc})") from None
        if "task" not in frame:
            raise PredictionError(f"{path}: no \"task\" column (columns: {list(frame.columns)})")
        images = frame["image"] if "image" in frame else [None] * len(frame)
        rows = [
            (f"{path}, row {i + 2}", task, image)
            for i, (task, image) in enumerate(zip(frame["task"], images, strict=True))
        ]
    else:
        raise PredictionError(f"batch file {path}: expected a .jsonl or .csv file")
    if not rows:
        raise PredictionError(f"batch file {path} has no rows")
    return [(where, task, path.parent / image if image else None) for where, task, image in rows]


def load_network(folder: Path, reference: bool = False) -> BitMarModel:
    """The release's integer model (from the packed file), or with `reference` the fake-quant fp32 one."""
    if reference:
        return BitMarModel.from_pretrained(str(folder))
    config = BitMarConfig.from_dict(read_packed_config(folder))
    with placeholder_weights():  # the packed layers replace them: never allocate fp32 latent weights
        network = packed_skeleton(BitMarModel(config))
    load_packed_into(network, folder)
    return network


def load_predictor(
    model: str | Path,
    vision_model: str | None = None,
    *,
    reference: bool = False,
    fleet: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
) -> Predictor:
    """Load a release folder (or download a Hub repo `owner/name`) for prediction.

    vision_model: a DINOv2 Hub id or directory replacing the release's encoder (it must give
    features of the width the model was trained on).
    reference: predict with the fake-quant fp32 model (`model.safetensors`) instead of the
    integer model built from `model.packed.safetensors`.
    fleet: robots described only by their profiles (`read_fleet`), added to the release's fleet
    and selected zero-shot.
    """
    folder = _resolve_folder(model)
    manifest = _read_manifest(folder)
    try:
        network = load_network(folder, reference)
        tokenizer = AutoTokenizer.from_pretrained(folder / manifest["tokenizer"])
        network.memory.load_into(folder / manifest["memory"], expected_fingerprint=manifest["model_fingerprint"])
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise PredictionError(f"{folder}: cannot load the release ({type(exc).__name__}: {exc})") from None
    # The config as stored, not as loaded: a release saved before a config key existed lacks it.
    config_file = folder / "config.json"
    if reference:
        stored = read_json(config_file, lambda e: PredictionError(f"{config_file}: unreadable ({e})"))
    else:
        stored = read_packed_config(folder)
    if BitMarConfig.fingerprint_of(stored) != manifest["model_fingerprint"]:
        raise PredictionError(f"{folder}: config.json does not match {MANIFEST_FILE} (model_fingerprint)")
    if len(tokenizer) != network.config.vocab_size:
        raise PredictionError(
            f"{folder}: the tokenizer has {len(tokenizer)} tokens, the model {network.config.vocab_size}"
        )
    return Predictor(folder, manifest, network, tokenizer, vision_model, fleet)


def validated_fleet(robots: Any, source: str, released: Iterable[str] = ()) -> dict[str, dict[str, list[str]]]:
    """Robots described only by their profiles, checked as the config's `robots:` section is (new
    names the parser reads back, none already `released`, a capability or environment each);
    PredictionError names `source`."""
    try:
        fleet = check_fleet_names(FLEET.validate_python(robots), released)
    except ValueError as exc:
        raise PredictionError(f"{source}: {exc}") from None
    return {name: profile.model_dump() for name, profile in fleet.items()}


def read_fleet(path: Path) -> dict[str, dict[str, list[str]]]:
    """A YAML or JSON file of robots described only by their profiles, as the config's `robots:`
    section: name -> {capabilities, limitations, environments}."""
    try:
        robots = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PredictionError(f"fleet file {path}: {exc}") from None
    return validated_fleet(robots, f"fleet file {path}")


# ---------------------------------------------------------------- CLI


def add_predict_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict", help="select robots for a task and explain why, from a release folder or Hub repo"
    )
    parser.add_argument("task", nargs="?", help="the task text (or use --batch)")
    parser.add_argument("--image", help="an image of the scene (JPEG, PNG, WEBP)")
    parser.add_argument(
        "--model",
        help=(
            f"release folder or Hub repo id (default: <storage.root>/{RELEASE_DIR} "
            "of $BITMAR_CONFIG or the sample profile)"
        ),
    )
    parser.add_argument("--vision-model", help="DINOv2 Hub id or directory replacing the release's encoder")
    parser.add_argument("--batch", help="a .jsonl or .csv file with a 'task' column (and optional 'image')")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="reasoning length limit (default 200)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument(
        "--fleet", help="a YAML/JSON file of your own robots' profiles (as the config's robots:), selected zero-shot"
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help="predict with the fake-quant fp32 model (model.safetensors), not the integer one (model.packed.*)",
    )


def _print_text(prediction: Prediction) -> None:
    print(prediction.reasoning.strip())
    print(f"Selected Robot: {', '.join(prediction.robots)} (confidence {prediction.confidence:.2f})")
    for note in prediction.notes:
        print(f"note: {note}", file=sys.stderr)


def predict_main(args: argparse.Namespace) -> int:
    """`bitmar predict`: 0 on success, 2 with a one-line `bitmar: ...` message on any error."""
    try:
        if (args.task is None) == (args.batch is None):
            raise PredictionError("give either a TASK or --batch FILE")
        if args.batch is not None and args.image is not None:
            raise PredictionError("--image applies to a single TASK; put images in the batch file's 'image' column")
        model = args.model or load_config().storage.root / RELEASE_DIR
        fleet = read_fleet(Path(args.fleet)) if args.fleet else None
        predictor = load_predictor(model, args.vision_model, reference=args.reference, fleet=fleet)
        if args.batch is not None:
            predictions = predictor.predict_batch(args.batch, args.max_new_tokens)
        else:
            predictions = [predictor.predict(args.task, Path(args.image) if args.image else None, args.max_new_tokens)]
    except (PredictionError, ConfigError) as exc:
        print(f"bitmar: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug, not bad input; still one line, never a traceback
        print(f"bitmar: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        result = [p.to_dict() for p in predictions] if args.batch is not None else predictions[0].to_dict()
        print(json.dumps(result, indent=2))
    else:
        for prediction in predictions:
            if args.batch is not None:
                print(f"== {prediction.task}")
            _print_text(prediction)
    return 0
