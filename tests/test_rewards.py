"""GRPO reward parts on hand-made traces (exact values) and group-normalised advantages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitmar_model.metrics import CONFIDENCE_TARGET, MetricWithCI
from bitmar_model.reasoning_format import ReasoningTrace, format_reasoning, parse_reasoning
from bitmar_model.rewards import (
    RewardWeights,
    calibration_reward,
    compute_rewards,
    consistency_reward,
    format_reward,
    group_advantages,
    selection_reward,
)
from bitmar_model.robots import NUM_ROBOT_CLASSES
from bitmar_pipeline.evaluation.report import reasoning_section
from bitmar_pipeline.evaluation.selection_quality import ReasoningEvaluation

ROBOTS = ("Drone", "Underwater Robot", "Humanoid", "Robot with Wheels", "Robot with Legs")
DRONE = {"Drone"}


def trace(robots: list[str], confidence: float, suitable: set[str] | None = None) -> str:
    suitable = set(robots) if suitable is None else suitable
    return format_reasoning(
        ReasoningTrace(
            thinking="Goal: inspect the roof.",
            environment_analysis="Cues: outdoor.",
            robot_evaluation={r: (r in suitable, "reason") for r in ROBOTS},
            selection_reasoning="It flies.",
            confidence_check="One robot needed.",
            robots=robots,
            confidence=confidence,
            justification="Best match: aerial inspection.",
        )
    )


PERFECT = trace(["Drone"], 0.9)


def drop_block(text: str, tag: str) -> str:
    start, end = text.index(f"<{tag}>"), text.index(f"</{tag}>") + len(f"</{tag}>\n")
    return text[:start] + text[end:]


def parts(
    text: str, gold: set[str] = DRONE, head: set[str] = DRONE
) -> tuple[float, float, float, float]:
    parsed = parse_reasoning(text)
    return (
        selection_reward(parsed, gold),
        format_reward(parsed),
        consistency_reward(parsed, head),
        calibration_reward(parsed, gold),
    )


def test_perfect_trace():
    assert parts(PERFECT) == pytest.approx((1.0, 1.0, 1.0, 0.99))


def test_wrong_robot():
    # Format is fine and the evaluation agrees with the selection, but the head does not.
    assert parts(trace(["Humanoid"], 0.8)) == pytest.approx((0.0, 1.0, 0.5, 1 - 0.8**2))


def test_partly_right_selection_is_wrong_for_calibration():
    # Selection credit is the Jaccard; the confidence predicts exact-set correctness (here 0).
    assert parts(trace(["Drone", "Robot with Legs"], 0.5)) == pytest.approx((0.5, 1.0, 0.75, 0.75))
    assert parts(trace(["Drone", "Robot with Legs"], 0.0)) == pytest.approx((0.5, 1.0, 0.75, 1.0))


def test_evaluation_that_contradicts_the_selection():
    text = trace(["Drone"], 0.9, suitable={"Drone", "Humanoid"})
    assert parts(text) == pytest.approx((1.0, 1.0, 0.75, 0.99))


def test_missing_tag():
    # Five of six clean tags, in order: (5/6 + 5/6 + 1 + 1) / 4.
    assert parts(drop_block(PERFECT, "environment_analysis")) == pytest.approx(
        (1.0, 11 / 12, 1.0, 0.99)
    )
    # Without the evaluation block, only the head half of consistency remains.
    assert parts(drop_block(PERFECT, "robot_evaluation")) == pytest.approx(
        (1.0, 11 / 12, 0.5, 0.99)
    )


def test_duplicated_and_unclosed_tags_lose_their_tag_credit():
    duplicated = PERFECT + "\n<thinking>\nagain\n</thinking>"
    assert format_reward(parse_reasoning(duplicated)) == pytest.approx(11 / 12)
    unclosed = PERFECT.replace("</confidence_check>\n", "")
    assert format_reward(parse_reasoning(unclosed)) == pytest.approx(11 / 12)


def test_out_of_order_blocks_lose_the_order_credit():
    thinking = "<thinking>\nGoal: inspect the roof.\n</thinking>\n"
    swapped = PERFECT.replace(thinking, "").replace(
        "</environment_analysis>\n", "</environment_analysis>\n" + thinking
    )
    assert format_reward(parse_reasoning(swapped)) == pytest.approx(0.75)


def test_confidence_out_of_range():
    text = PERFECT.replace("Confidence: 0.90", "Confidence: 1.5")
    assert parts(text) == pytest.approx((1.0, 0.75, 1.0, 0.0))


def test_truncated_trace():
    text = PERFECT[: PERFECT.index("Underwater Robot:")]  # cut inside <robot_evaluation>
    # thinking and environment_analysis are clean and in order; nothing else parses.
    assert parts(text) == pytest.approx((0.0, (2 / 6 + 2 / 6) / 4, 0.0, 0.0))


@pytest.mark.parametrize(
    "garbage", ["", "hello world", "<thinking></thinking>", "Selected Robot: Drone"]
)
def test_garbage_scores_zero(garbage):
    assert parts(garbage) == (0.0, 0.0, 0.0, 0.0)


def test_no_robot_is_consistent_with_an_empty_head_and_an_all_unsuitable_evaluation():
    text = trace(["No Robot"], 1.0, suitable=set())
    assert parts(text, gold={"No Robot"}, head=set()) == pytest.approx((1.0, 1.0, 1.0, 1.0))


def test_compute_rewards_weights_and_logs_each_part():
    texts = [PERFECT, trace(["Humanoid"], 0.8), "garbage"]
    gold = [DRONE, DRONE, DRONE]
    breakdown = compute_rewards(texts, gold, [DRONE, DRONE, DRONE])
    assert breakdown.selection == [1.0, 0.0, 0.0]
    assert breakdown.format == [1.0, 1.0, 0.0]
    assert breakdown.consistency == [1.0, 0.5, 0.0]
    assert breakdown.calibration == pytest.approx([0.99, 0.36, 0.0])
    # Default weights 1, 0.5, 0.25, 0.25.
    assert breakdown.total == pytest.approx([1 + 0.5 + 0.25 + 0.25 * 0.99, 0.5 + 0.125 + 0.09, 0.0])
    assert [p.robots for p in breakdown.parsed] == [["Drone"], ["Humanoid"], []]
    assert breakdown.means()["selection"] == pytest.approx(1 / 3)
    only_format = compute_rewards(
        texts, gold, gold, RewardWeights(selection=0, format=1, consistency=0, calibration=0)
    )
    assert only_format.total == [1.0, 1.0, 0.0]


def test_compute_rewards_rejects_bad_input():
    with pytest.raises(ValueError, match="length"):
        compute_rewards([PERFECT], [DRONE, DRONE], [DRONE])
    with pytest.raises(ValueError, match="selection"):
        RewardWeights(selection=-1.0)


def test_advantages_are_zero_mean_unit_std_per_group():
    rewards = torch.rand(4, 8, generator=torch.Generator().manual_seed(0))
    advantages = group_advantages(rewards)
    assert advantages.shape == (4, 8)
    assert torch.allclose(advantages.mean(dim=1), torch.zeros(4), atol=1e-6)
    assert torch.allclose(advantages.std(dim=1, correction=0), torch.ones(4), atol=1e-4)
    assert torch.equal(advantages.argsort(dim=1), rewards.argsort(dim=1))


def test_advantages_exact_small_group():
    advantages = group_advantages(torch.tensor([[1.0, 0.0]], dtype=torch.float64), eps=0.0)
    assert advantages.dtype == torch.float64
    assert advantages.tolist() == [[1.0, -1.0]]


def test_constant_groups_get_exact_zeros():
    rewards = torch.tensor([[0.1, 0.1, 0.1], [0.0, 1.0, 2.0], [1.9975, 1.9975, 1.9975]])
    advantages = group_advantages(rewards)
    assert torch.equal(advantages[0], torch.zeros(3))
    assert torch.equal(advantages[2], torch.zeros(3))
    assert advantages[1].abs().sum() > 0
    assert torch.equal(group_advantages(torch.tensor([[5.0], [2.0]])), torch.zeros(2, 1))
    integer = group_advantages(torch.tensor([[1, 1], [0, 2]]))
    assert torch.allclose(integer, torch.tensor([[0.0, 0.0], [-1.0, 1.0]]), atol=1e-5)


def test_std_floor_keeps_near_equal_rewards_small():
    rewards = torch.tensor([[2.0, 1.98, 2.0, 1.98], [2.0, 1.0, 2.0, 1.0]], dtype=torch.float64)
    plain = group_advantages(rewards, eps=0.0)
    floored = group_advantages(rewards, eps=0.0, std_floor=0.1)
    assert torch.allclose(plain[0].abs(), torch.ones(4, dtype=torch.float64))  # noise blown up to +-1
    assert torch.allclose(floored[0], (rewards[0] - rewards[0].mean()) / 0.1)  # +-0.1
    assert torch.equal(floored[1], plain[1])  # an informative group is still a z-score


def test_advantages_need_a_group_dimension():
    with pytest.raises(ValueError, match="num_groups"):
        group_advantages(torch.ones(4))


def test_calibration_reward_and_reported_ece_score_the_same_target():
    """One definition of what a stated confidence predicts (exact-set correctness): for a
    single trace the report's ECE is |c - target| and the reward 1 - (c - target)^2, so
    ECE^2 == 1 - reward, whether the selection is exact, partly right or wrong."""
    cases = [
        (trace(["Drone"], 0.9), DRONE),
        (trace(["Drone", "Robot with Legs"], 0.5), DRONE),
        (trace(["Humanoid"], 0.3), DRONE),
    ]
    for text, gold in cases:
        parsed = parse_reasoning(text)
        evaluation = ReasoningEvaluation(
            "test", 1, np.eye(NUM_ROBOT_CLASSES)[:1], [["Drone"]], [text], [parsed], [sorted(gold)],
            {"reasoning_well_formed": MetricWithCI(1.0, 1.0, 1.0, 1)},
        )
        section, _, _ = reasoning_section(evaluation, ["inspect the roof"], n_resamples=100)
        assert section["stated_confidence_ece"] ** 2 == pytest.approx(1 - calibration_reward(parsed, gold), abs=1e-4), (
            text
        )
        assert section["stated_confidence_target"] == CONFIDENCE_TARGET == "exact-set correctness"
