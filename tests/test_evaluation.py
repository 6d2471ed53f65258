"""evaluation_report sections on a tiny random model and hand-made tables: which items are
evaluated, and that odd generated text is counted instead of crashing the report."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from bitmar_model.config import BitMarConfig
from bitmar_model.modeling import BitMarModel
from bitmar_pipeline.evaluation import multi_robot_section
from bitmar_pipeline.tokenizer import train_bpe_tokenizer

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
