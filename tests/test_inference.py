"""`load_predictor` / `bitmar predict` against a tiny release: predictions, the README's
three lines, batches, bad input and damaged folders."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bitmar_model.bitlinear import BitLinear
from bitmar_model.calibration import PlattCalibration
from bitmar_model.guided import Choice
from bitmar_model.packing import PackedBitLinear, round_to_stored
from bitmar_model.robots import ROBOT_CLASSES
from bitmar_pipeline.evaluation.selection_quality import head_guidance
from bitmar_pipeline.release.inference import (
    Prediction,
    PredictionError,
    Predictor,
    add_predict_parser,
    load_network,
    load_predictor,
    predict_main,
)
from bitmar_pipeline.storage import Storage
from tests.factories import EVALUATION

README_LINES = """\
from bitmar_pipeline.release.inference import load_predictor
predictor = load_predictor(".bitmar/release")
print(predictor.predict("Inspect underwater pipelines").robots)
"""


@pytest.fixture(scope="module")
def predictor(released: Storage) -> Predictor:
    return load_predictor(released.path("release"))


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(path)
    return path


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bitmar")
    add_predict_parser(parser.add_subparsers(dest="command", required=True))
    return predict_main(parser.parse_args(["predict", *argv]))


def test_readme_lines(released: Storage, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(released.root.parent)
    exec(README_LINES, {})
    robots = eval(capsys.readouterr().out.strip().splitlines()[-1])
    assert robots and set(robots) <= set(ROBOT_CLASSES)


def test_prediction_fields(predictor: Predictor) -> None:
    prediction = predictor.predict("Survey a wide field from above", max_new_tokens=12)
    assert list(prediction.probabilities) == list(ROBOT_CLASSES)
    assert prediction.robots
    assert prediction.confidence == predictor.shown_confidence(max(prediction.probabilities.values()))
    assert all(prediction.probabilities[r] >= 0.5 for r in prediction.robots) or len(prediction.robots) == 1
    assert isinstance(prediction.reasoning, str) and isinstance(prediction.reasoning_well_formed, bool)
    assert isinstance(prediction.reasoning_quality, float) and not prediction.truncated
    assert json.loads(json.dumps(prediction.to_dict()))["task"] == "Survey a wide field from above"
    # Greedy decoding and a read-only memory: the same input gives the same prediction.
    assert predictor.predict("Survey a wide field from above", max_new_tokens=12) == prediction


def test_prediction_with_an_image(predictor: Predictor, image: Path) -> None:
    with_image = predictor.predict("Survey a wide field from above", image=image, max_new_tokens=4)
    without = predictor.predict("Survey a wide field from above", max_new_tokens=4)
    assert with_image.image == str(image)
    assert with_image.probabilities != without.probabilities
    assert predictor.vision_encoder().num_patch_tokens == predictor.model.config.vision_num_patches


def test_long_task_is_truncated_and_says_so(predictor: Predictor) -> None:
    prediction = predictor.predict("inspect the pipeline " * 60, max_new_tokens=2)
    assert prediction.truncated
    assert prediction.notes and f"the model reads the first {predictor.max_prompt_tokens}" in prediction.notes[0]


@pytest.mark.parametrize("task", ["", "   \n"])
def test_empty_task_is_an_error(predictor: Predictor, task: str) -> None:
    with pytest.raises(PredictionError, match="task text is empty"):
        predictor.predict(task)


def test_unreadable_image_is_an_error_naming_it(predictor: Predictor, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(PredictionError, match=r"cannot read image .*broken\.jpg"):
        predictor.predict("Survey a field", image=broken)
    with pytest.raises(PredictionError, match=r"image .*missing\.png does not exist"):
        predictor.predict("Survey a field", image=tmp_path / "missing.png")


def test_batch_files(predictor: Predictor, image: Path, tmp_path: Path) -> None:
    shutil.copy(image, tmp_path / "scene.png")
    jsonl = tmp_path / "tasks.jsonl"
    jsonl.write_text(
        json.dumps({"task": "Inspect underwater pipelines"})
        + "\n\n"
        + json.dumps({"task": "Survey a field", "image": "scene.png"})
        + "\n"
    )
    csv = tmp_path / "tasks.csv"
    csv.write_text("task,image\nInspect underwater pipelines,\nSurvey a field,scene.png\n")
    for path in (jsonl, csv):
        predictions = predictor.predict_batch(path, max_new_tokens=2)
        assert [p.task for p in predictions] == ["Inspect underwater pipelines", "Survey a field"]
        assert predictions[0].image is None and predictions[1].image == str(tmp_path / "scene.png")
    bad = tmp_path / "bad.csv"
    bad.write_text("task\nInspect pipelines\n\"\"\n")
    with pytest.raises(PredictionError, match=r"bad\.csv, row 3: the task text is empty"):
        predictor.predict_batch(bad, max_new_tokens=2)
    no_column = tmp_path / "no_column.jsonl"
    no_column.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(PredictionError, match=r"line 1: expected an object with a \"task\" field"):
        predictor.predict_batch(no_column)


def test_missing_folder_and_offline_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PredictionError, match=r"model folder .*nowhere does not exist"):
        load_predictor(tmp_path / "nowhere")
    with pytest.raises(PredictionError, match="is not a BitMar release folder"):
        load_predictor(tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(
        PredictionError, match=r"'someone/no-such-bitmar' is not a local folder, and downloading it .* failed"
    ):
        load_predictor("someone/no-such-bitmar")


@pytest.mark.parametrize(("damage", "message"), [
    (lambda d: (d / "model.safetensors").unlink(), r"model\.safetensors is missing"),
    (lambda d: (d / "tokenizer" / "tokenizer.json").write_text("{}"), r"tokenizer\.json: contents do not match"),
    (lambda d: (d / "memory.safetensors").write_bytes(b"x"), r"memory\.safetensors: contents do not match"),
])
def test_damaged_release_is_refused(released: Storage, tmp_path: Path, damage, message: str) -> None:
    copy = tmp_path / "release"
    shutil.copytree(released.path("release"), copy)
    damage(copy)
    with pytest.raises(PredictionError, match=message):
        load_predictor(copy)


def test_cli_text_json_and_errors(released: Storage, image: Path, capsys: pytest.CaptureFixture) -> None:
    model = str(released.path("release"))
    assert run_cli(["Inspect underwater pipelines", "--model", model, "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("Selected Robot: ") and "(confidence " in out

    assert (
        run_cli(
            ["Inspect underwater pipelines", "--model", model, "--image", str(image), "--json", "--max-new-tokens", "4"]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert set(result) == set(Prediction.__dataclass_fields__) and result["image"] == str(image)

    for argv, message in (
        (["Inspect", "--model", model, "--image", str(image.with_name("nope.png"))], "nope.png does not exist"),
        (["", "--model", model], "task text is empty"),
        (["Inspect", "--model", str(released.root / "absent")], "absent does not exist"),
        (["--model", model], "give either a TASK or --batch FILE"),
    ):
        assert run_cli(argv) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith("bitmar: ") and message in captured.err and "Traceback" not in captured.err
        assert captured.out == ""


def test_a_release_saved_before_a_config_key_existed_still_loads(released: Storage, tmp_path: Path) -> None:
    """Its config.json, packed config and manifest were written without `knowledge_no_robot_gate`
    (added later, default off): the stored dicts still match the manifest, and the model loads."""
    from bitmar_model.config import BitMarConfig
    from bitmar_model.io import sha256_file

    copy = tmp_path / "release"
    shutil.copytree(released.path("release"), copy)
    config = json.loads((copy / "config.json").read_text())
    assert config.pop("knowledge_no_robot_gate") is False
    packed = json.loads((copy / "packed_config.json").read_text())
    del packed["config"]["knowledge_no_robot_gate"]
    (copy / "config.json").write_text(json.dumps(config))
    (copy / "packed_config.json").write_text(json.dumps(packed))
    # The memory file names the model it was saved with: the fingerprint of that older config.
    memory = load_network(copy, reference=True).memory
    memory.load_into(copy / "memory.safetensors")
    memory.save(copy / "memory.safetensors", fingerprint=BitMarConfig.fingerprint_of(config))
    manifest = json.loads((copy / "bitmar_release.json").read_text())
    manifest["model_fingerprint"] = BitMarConfig.fingerprint_of(config)
    rewritten = ("config.json", "packed_config.json", "memory.safetensors")
    manifest["files"] |= {name: sha256_file(copy / name) for name in rewritten}
    (copy / "bitmar_release.json").write_text(json.dumps(manifest))
    for reference in (False, True):
        assert not load_predictor(copy, reference=reference).model.config.knowledge_no_robot_gate
    config["dropout"] += 0.1  # a stored config that differs from the manifest is still refused
    (copy / "config.json").write_text(json.dumps(config))
    manifest["files"]["config.json"] = sha256_file(copy / "config.json")
    (copy / "bitmar_release.json").write_text(json.dumps(manifest))
    with pytest.raises(PredictionError, match="config.json does not match"):
        load_predictor(copy, reference=True)


def test_shown_confidence_is_the_release_calibration_of_the_head_probability(predictor: Predictor):
    assert predictor.manifest["calibration"]["method"] == "platt"
    assert predictor.calibration == PlattCalibration(a=0.5, b=0.2)
    prediction = predictor.predict("Inspect underwater pipelines", max_new_tokens=4)
    top = max(prediction.probabilities.values())
    assert prediction.confidence_calibrated
    assert prediction.confidence == pytest.approx(float(PlattCalibration(a=0.5, b=0.2)(top)))
    assert prediction.confidence != pytest.approx(top)


def test_a_no_robot_pick_of_a_gated_model_shows_the_gates_own_probability(
    predictor: Predictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No validation task calibrates "No Robot": with a no-robot gate its pick shows the gate's
    probability; a robot's is calibrated as before, and so is a gateless head's "No Robot"."""
    calibrated = float(PlattCalibration(a=0.5, b=0.2)(0.9))
    assert predictor.shown_confidence(0.9, "No Robot") == pytest.approx(calibrated)
    gated = dataclasses.replace(predictor.model.config, knowledge_no_robot_gate=True)
    monkeypatch.setattr(predictor.model, "config", gated)
    assert predictor.shown_confidence(0.9, "No Robot") == 0.9
    assert predictor.shown_confidence(0.9, "Drone") == pytest.approx(calibrated)


def test_the_release_guides_reasons_with_the_fleet_the_report_used(predictor: Predictor):
    """The manifest carries the report's fleet profiles; the predictor's guide draws each robot's
    reason from them (bitmar_model.guided.Choice parts)."""
    assert predictor.manifest["fleet"] == EVALUATION["fleet"] and predictor.profiles == EVALUATION["fleet"]
    probs = np.array([[0.9, 0.1, 0.1, 0.1, 0.1, 0.0]])
    guide = head_guidance(predictor.tokenizer, probs, predictor.calibration, predictor.profiles)
    choices = [p for p in guide._rows[0].parts if isinstance(p, Choice)]
    assert choices[0] == Choice((" drone work\n",)) and choices[1] == Choice((" not this\n",))


def test_default_model_is_the_integer_one_and_reference_the_fake_quant(released: Storage, predictor: Predictor):
    reference = load_predictor(released.path("release"), reference=True)
    assert any(isinstance(m, PackedBitLinear) for m in predictor.model.modules())
    assert not any(isinstance(m, BitLinear) for m in predictor.model.modules())
    assert not any(isinstance(m, PackedBitLinear) for m in reference.model.modules())
    # The integer model is the fake-quant model holding the packed file's fp16 tensors (the
    # episodic memory comes from memory.safetensors in both), output for output.
    rounded = round_to_stored(reference.model)
    rounded.memory.load_state_dict(reference.model.memory.state_dict())
    ids, _, _ = predictor._encode_task("Inspect underwater pipelines")
    batch = {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    with torch.no_grad():
        expected, actual = rounded(**batch), predictor.model(**batch)
    assert torch.equal(actual.robot_probs, expected.robot_probs) and torch.equal(actual.logits, expected.logits)
    a = predictor.predict("Inspect underwater pipelines", max_new_tokens=4)
    b = reference.predict("Inspect underwater pipelines", max_new_tokens=4)
    assert a.probabilities.keys() == b.probabilities.keys()


def test_cli_reference_flag(released: Storage, capsys: pytest.CaptureFixture) -> None:
    model = str(released.path("release"))
    argv = ["Inspect underwater pipelines", "--model", model, "--reference", "--json", "--max-new-tokens", "4"]
    assert run_cli(argv) == 0
    assert set(json.loads(capsys.readouterr().out)) == set(Prediction.__dataclass_fields__)
