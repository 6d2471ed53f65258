"""evaluation_report sections on a tiny random model and hand-made tables: which items are
evaluated, and that odd generated text is counted instead of crashing the report."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from bitmar_model.config import BitMarConfig
from bitmar_model.decoder import GenerationOutput
from bitmar_model.metrics import bootstrap_ci
from bitmar_model.modeling import BitMarModel
from bitmar_model.reasoning_format import ReasoningTrace, format_reasoning, parse_reasoning
from bitmar_model.robots import ROBOT_CLASSES
from bitmar_pipeline.evaluation.report import multi_robot_section, reasoning_section, vision_language_section
from bitmar_pipeline.evaluation.selection_quality import ReasoningEvaluation, evaluate_reasoning
from bitmar_pipeline.text.tokenizer import train_bpe_tokenizer
from bitmar_pipeline.training.datasets import CaptionSet

TASKS = pd.DataFrame(
    {
        "task_id": ["m1", "m2", "m3"],
        "task_text": ["Inspect the roof", "Guard the gate.", "Fix the hull."],
        "robots": [["Drone"], ["Robot with Legs"], ["Underwater Robot"]],
        "split": ["train", "test", "test"],
    }
)
SUBTASKS = pd.DataFrame(
    {
        "task_id": ["m1", "m2", "m2", "m3", "m3"],
        "subtask_text": ["Scan the roof", "Scan the roof.", "Carry the tools", "Carry the tools", "Dive to the hull"],
        "robot": ["Drone", "Drone", "Robot with Legs", "Humanoid", "Underwater Robot"],
        "split": ["train", "test", "test", "test", "test"],
    }
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[BitMarModel, object]:
    texts = [f"Task: {t}" for t in [*TASKS["task_text"], *SUBTASKS["subtask_text"]]]
    tokenizer = train_bpe_tokenizer(texts * 3, 300, tmp_path_factory.mktemp("tokenizer"), min_frequency=1)
    config = BitMarConfig.tiny(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return BitMarModel(config).eval(), tokenizer


def test_multi_robot_section_evaluates_unseen_subtask_texts_only(tiny) -> None:
    model, tokenizer = tiny
    section = multi_robot_section(model, tokenizer, TASKS, SUBTASKS, "test", n_resamples=50)
    # "Scan the roof." is a training prompt; "Carry the tools" is gold for two robots.
    assert section["n"] == 2
    assert section["excluded_seen_in_training"] == 1
    assert section["conflicting_labels"] == 1
    assert section["gold"] == "union of the robots a text is assigned to"
    assert section["assignment_top1"]["n"] == 2
    assert set(section["per_assigned_robot"]) == {"Humanoid", "Robot with Legs", "Underwater Robot"}
    assert np.isfinite(section["assignment_top1"]["value"])
    empty = multi_robot_section(model, tokenizer, TASKS, SUBTASKS, "validation", n_resamples=50)
    assert empty == {"n": 0, "excluded_seen_in_training": 0, "conflicting_labels": 0}


def test_reasoning_section_counts_out_of_range_confidences_as_missing() -> None:
    gold = [["Drone"], ["Humanoid"], ["Drone"], ["Humanoid"]]
    texts = [
        format_reasoning(ReasoningTrace("t", "e", "Drone: suitable.", "s", "c", ["Drone"], 0.9, "j")),
        format_reasoning(ReasoningTrace("t", "e", "Humanoid: suitable.", "s", "c", ["Humanoid"], 0.5, "j")),
        format_reasoning(ReasoningTrace("t", "e", "Drone: suitable.", "s", "c", ["Drone"], 0.5, "j")),
        "<thinking>t</thinking>\nSelected robot: Humanoid",  # no confidence at all
    ]
    texts[1] = texts[1].replace("Confidence: 0.50", "Confidence: 95")
    texts[2] = texts[2].replace("Confidence: 0.50", "Confidence: 1.5")
    parsed = [parse_reasoning(t) for t in texts]
    assert [p.confidence for p in parsed] == [0.9, 95.0, 1.5, None]
    well_formed = np.array([p.well_formed for p in parsed], dtype=float)
    head_probs = np.full((4, len(ROBOT_CLASSES)), 0.1)
    head_probs[:, 0] = 0.5
    model_eval = ReasoningEvaluation(
        "test", 4, head_probs, [["Drone"]] * 4, texts, parsed, gold,
        {"reasoning_well_formed": bootstrap_ci(np.mean, well_formed, n_resamples=50)},
    )
    section, _, _ = reasoning_section(
        model_eval, ["Survey a field", "Greet guests", "Map a roof", "Greet guests"], n_resamples=50
    )
    assert section["stated_confidence_out_of_range"] == 2
    assert section["stated_confidence_missing"] == 1
    assert 0.0 <= section["stated_confidence_ece"] <= 1.0


def test_head_selections_never_combine_no_robot_with_robots(tiny) -> None:
    model, tokenizer = tiny
    model = copy.deepcopy(model)
    with torch.no_grad():  # a constant head: Drone 0.9, No Robot 0.7, the others 0.1
        model.reasoning.policy_head.weight.zero_()
        model.reasoning.policy_head.bias.copy_(torch.logit(torch.tensor([0.9, 0.1, 0.1, 0.1, 0.1, 0.7])))
    model_eval = evaluate_reasoning(
        model, tokenizer, TASKS.assign(task_key=TASKS["task_text"]), "test", generate=False, n_resamples=50
    )
    assert model_eval.head_selections == [["Drone"], ["Drone"]]


def test_vision_language_section_reports_captions_naming_a_drawn_object(tiny, monkeypatch) -> None:
    """caption_names_object: share of held-out images whose caption names a drawn colour + shape."""
    model, tokenizer = tiny
    model = copy.deepcopy(model)
    config = model.config
    captions = [tokenizer.encode(t, add_special_tokens=False) for t in ("a red ball", "a blue box", "a red box")]
    heldout = CaptionSet(
        np.arange(3), np.arange(3), torch.zeros(3, config.vision_feature_dim),
        torch.zeros(3, config.vision_num_patches, config.vision_feature_dim),
        captions, captions, captions[0], tokenizer.pad_token_id,
    )

    def generate(prompt_ids, *args, **kwargs) -> GenerationOutput:  # the reference captions, in order
        ids = torch.tensor([c + [tokenizer.pad_token_id] * (16 - len(c)) for c in captions])
        return GenerationOutput(ids, ids != tokenizer.pad_token_id, ids, (ids != tokenizer.pad_token_id).long(), None)

    monkeypatch.setattr(model, "generate", generate)
    scene = {"objects": [{"color": "red", "shape": "circle"}]}  # "ball" is a circle word
    scenes = {0: scene, 1: scene, 2: {"objects": [{"color": "red", "shape": "square"}]}}
    section = vision_language_section(model, tokenizer, heldout, {}, max_images=3, scenes=scenes)
    assert section["caption_names_object"] == pytest.approx(2 / 3, abs=1e-4)
    assert "caption_names_object" not in vision_language_section(model, tokenizer, heldout, {}, max_images=3)
