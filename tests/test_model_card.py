"""The release's model card as the Hub reads it: huggingface_hub.ModelCard parses the written
README.md (a local path, no network) into card data with a model-index."""

from __future__ import annotations

import copy
from pathlib import Path

from huggingface_hub import ModelCard

from bitmar_model.modeling import BitMarModel
from bitmar_pipeline.release.folder import CardDatasets, card_data, eval_results, render_card
from bitmar_pipeline.storage import Storage
from tests.factories import EVALUATION

MANIFEST = {
    "source": {"stage": "grpo_policy", "step": 7, "fingerprint": "0123456789abcdef"},
    "vision": {"model": "tiny-random", "revision": None, "patch_grid": 2, "path": "vision_encoder"},
}


def _metrics(card: ModelCard) -> dict[tuple[str, str, str], float]:
    return {
        (r.dataset_name, r.dataset_split, r.metric_name): r.metric_value for r in card.data.eval_results or []
    }


def test_release_card_parses_as_a_hub_model_card(released: Storage) -> None:
    path = released.path("release", "README.md")
    card = ModelCard.load(path)
    head_top1 = EVALUATION["robot_selection"]["test"]["bitmar_head"]["top1"]["value"]
    assert _metrics(card)[("Robot selection tasks", "test", "Selection head top-1")] == head_top1
    result = next(r for r in card.data.eval_results if r.metric_name == "Selection head top-1")
    assert result.task_type == "text-classification" and result.metric_type == "accuracy"
    assert "model-index" in card.data.to_dict()
    assert set(BitMarModel._hub_mixin_info.model_card_data.tags) <= set(card.data.tags)
    assert {"bitnet", "1.58-bit", "dagster"} <= set(card.data.tags)
    assert card.data.language == "en" and card.data.license == "mit" and card.data.library_name == "bitmar"
    assert card.data.pipeline_tag == "text-classification"
    # The test storage uses the generated sample data and the local tiny-random encoder: no base model.
    assert card.data.datasets == ["synthetic-shape-captions", "synthetic-robot-selection"]
    assert card.data.base_model is None
    # The markdown body is the card's, after the header.
    assert card.text.lstrip().startswith("# BitMar: ternary vision-language robot selection")
    assert "| top1 | 0.330 [0.000, 1.000] | 0.500 [0.000, 1.000] | 0.670 [0.000, 1.000] |" in card.text


def test_full_report_gives_every_eval_result_and_hub_base_model(tmp_path: Path) -> None:
    evaluation = copy.deepcopy(EVALUATION)
    ci = {"ci95_low": 0.0, "ci95_high": 1.0, "n": 3}
    evaluation["robot_selection"]["test"]["bitmar_head"].update(
        exact_set={"value": 0.6, **ci}, sample_f1={"value": 0.7, **ci}
    )
    evaluation["robot_selection"]["test"]["bitmar_reasoning_text"] = {"hit": {"value": 0.55, **ci}}
    evaluation["user_phrased"] = {"user_set": {"n": 56, "head_top1": {"value": 0.45, **ci}, "text_hit": None}}
    evaluation["vision_language"] = {"bleu4": 0.16, "cider_d": 0.25}
    manifest = {**MANIFEST, "vision": {**MANIFEST["vision"], "model": "facebook/dinov2-small", "path": None}}
    path = tmp_path / "README.md"
    path.write_text(render_card(manifest, evaluation, {}, "data", None, "bitmar/bitmar-robot-reasoning"))
    card = ModelCard.load(path)
    assert _metrics(card) == {
        ("Robot selection tasks", "test", "Selection head top-1"): 0.67,
        ("Robot selection tasks", "test", "Selection head exact set"): 0.6,
        ("Robot selection tasks", "test", "Selection head sample-F1"): 0.7,
        ("Robot selection tasks", "test", "Reasoning text hit"): 0.55,
        ("User-phrased robot tasks", "user_set", "Selection head top-1"): 0.45,
        ("COCO captions (held-out images)", "held-out", "BLEU-4"): 0.16,
        ("COCO captions (held-out images)", "held-out", "CIDEr-D"): 0.25,
    }
    assert {r.metric_type for r in card.data.eval_results} == {"accuracy", "exact_match", "f1", "bleu", "cider"}
    assert card.data.model_name == "bitmar-robot-reasoning"
    assert card.data.base_model == "facebook/dinov2-small"
    assert card.data.datasets == ["coco", "robot-selection"]


def test_report_lacking_sections_still_renders(tmp_path: Path) -> None:
    evaluation = {"robot_selection": {"test": {"bitmar_head": {"top1": None}}}, "reasoning": "not a dict"}
    assert eval_results(evaluation, CardDatasets()) == []
    assert eval_results({}, CardDatasets()) == []
    assert eval_results({"vision_language": {"bleu4": float("nan"), "cider_d": True}}, CardDatasets()) == []
    data = card_data(MANIFEST, {}, "bitmar/x", CardDatasets())
    assert data.eval_results is None and "model-index" not in data.to_dict()

    path = tmp_path / "README.md"
    path.write_text(render_card(MANIFEST, evaluation, {}, "data", None, "bitmar/x"))
    card = ModelCard.load(path)
    assert not card.data.eval_results and card.data.language == "en"
    assert "## Metrics and baselines" in card.text
