"""GRPO rewards for generated reasoning traces, made of named parts that are logged separately.

Each part is in [0, 1]; the total is their weighted sum (so in [0, sum of weights]). The
scale of the total does not matter to GRPO, whose advantages are normalised per group.

- selection: Jaccard of the selected robots and the gold robots; 0 when no robot parses.
- format: the mean of four quarter-credits, so a perfect trace scores 1.0 and garbage 0:
  tags (share of the six blocks present exactly once, closed and non-empty), order (the
  tags share again when the blocks found are in order and do not overlap, else 0),
  selection (at least one known robot parses) and confidence (a number in [0, 1]).
- consistency: the mean of two agreements with the selected robots (0 when none parse):
  Jaccard with the selection head's choice, and Jaccard with the robots the
  `<robot_evaluation>` block calls suitable (0 when the block is missing). An empty head
  choice, or an evaluation that calls no robot suitable, stands for "No Robot".
- calibration: 1 - (confidence - correct)^2, a Brier-style score of the stated confidence
  against exact-set correctness (bitmar_model.metrics.confidence_target, the target the
  reported ECE uses too); 0 when the confidence is missing or outside [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from bitmar_model.metrics import confidence_target
from bitmar_model.reasoning_format import (
    NO_ROBOT,
    REASONING_TAGS,
    ParsedReasoning,
    parse_reasoning,
    robots_mentioned_positively,
)

PART_NAMES: tuple[str, ...] = ("selection", "format", "consistency", "calibration")


@dataclass(frozen=True)
class RewardWeights:
    selection: float = 1.0
    format: float = 0.5
    consistency: float = 0.25
    calibration: float = 0.25

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"reward weight {field.name} must be finite and >= 0, got {value}")


DEFAULT_WEIGHTS = RewardWeights()


@dataclass
class RewardBreakdown:
    """Per-sample rewards, aligned with the input texts."""

    total: list[float]
    selection: list[float]
    format: list[float]
    consistency: list[float]
    calibration: list[float]
    parsed: list[ParsedReasoning]

    def means(self) -> dict[str, float]:
        """Batch means of the total and of each part, for logging."""
        means = {}
        for name in ("total", *PART_NAMES):
            values = getattr(self, name)
            means[name] = sum(values) / len(values) if values else 0.0
        return means


def _jaccard(a: set[str], b: set[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _confidence_ok(parsed: ParsedReasoning) -> bool:
    return parsed.confidence is not None and 0.0 <= parsed.confidence <= 1.0


def _tag_is_clean(parsed: ParsedReasoning, tag: str) -> bool:
    # The parser reads the first of duplicated or unclosed blocks and reports the rest as
    # errors; those messages are the only record of them in ParsedReasoning.
    defects = (f"<{tag}> appears ", f"</{tag}> appears ", f"unclosed <{tag}>")
    return bool(parsed.sections.get(tag)) and not any(e.startswith(defects) for e in parsed.errors)


def selection_reward(parsed: ParsedReasoning, gold: set[str]) -> float:
    """Jaccard of the parsed selection and the gold robots; 0 when no robot parses."""
    if not parsed.robots:
        return 0.0
    return _jaccard(set(parsed.robots), set(gold))


def format_reward(parsed: ParsedReasoning) -> float:
    """Quarter credits for clean tags, their order, a parseable selection and confidence."""
    tags = sum(_tag_is_clean(parsed, tag) for tag in REASONING_TAGS) / len(REASONING_TAGS)
    order = tags if parsed.tags_in_order else 0.0
    return (tags + order + float(bool(parsed.robots)) + float(_confidence_ok(parsed))) / 4


def consistency_reward(parsed: ParsedReasoning, head_selection: set[str]) -> float:
    """Mean agreement (Jaccard) of the selection with the head and with the evaluation block."""
    if not parsed.robots:
        return 0.0
    selected = set(parsed.robots)
    head = _jaccard(selected, set(head_selection) or {NO_ROBOT})
    evaluation_text = parsed.sections.get("robot_evaluation")
    evaluation = 0.0
    if evaluation_text:
        evaluation = _jaccard(selected, robots_mentioned_positively(evaluation_text) or {NO_ROBOT})
    return (head + evaluation) / 2


def calibration_reward(parsed: ParsedReasoning, gold: set[str]) -> float:
    """1 - (confidence - exact-set correctness)^2; 0 when the confidence is missing or out of range."""
    if not _confidence_ok(parsed):
        return 0.0
    return 1.0 - (parsed.confidence - confidence_target(parsed.robots, gold)) ** 2


def compute_rewards(
    texts: Sequence[str],
    gold: Sequence[set[str]],
    head_selections: Sequence[set[str]],
    weights: RewardWeights = DEFAULT_WEIGHTS,
) -> RewardBreakdown:
    """Parse every text and score it; robot names in `gold` and `head_selections` are canonical."""
    if not len(texts) == len(gold) == len(head_selections):
        raise ValueError(
            f"texts, gold and head_selections differ in length: {len(texts)}, {len(gold)}, {len(head_selections)}"
        )
    parsed = [parse_reasoning(text) for text in texts]
    parts = {
        "selection": [selection_reward(p, g) for p, g in zip(parsed, gold, strict=True)],
        "format": [format_reward(p) for p in parsed],
        "consistency": [
            consistency_reward(p, h) for p, h in zip(parsed, head_selections, strict=True)
        ],
        "calibration": [calibration_reward(p, g) for p, g in zip(parsed, gold, strict=True)],
    }
    total = [
        sum(getattr(weights, name) * parts[name][i] for name in PART_NAMES)
        for i in range(len(parsed))
    ]
    return RewardBreakdown(total=total, parsed=parsed, **parts)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6, std_floor: float = 0.0) -> torch.Tensor:
    """GRPO outcome advantages: (r - group mean) / (max(group std, std_floor) + eps), per row
    of [groups, G].

    The std is the population std (so a group of one is defined). A group whose rewards are
    all equal carries no preference and gets exact zeros rather than rounding noise / eps.
    `std_floor` keeps a group whose rewards barely differ (every completion right, the
    calibration part off by a few hundredths) from having that noise scaled up to unit
    advantages: below the floor, advantages stay proportional to the reward differences.
    """
    if rewards.dim() != 2:
        raise ValueError(
            f"rewards must be [num_groups, group_size], got shape {tuple(rewards.shape)}"
        )
    if not rewards.is_floating_point():
        rewards = rewards.float()
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, correction=0)
    advantages = (rewards - mean) / (std.clamp_min(std_floor) + eps)
    constant = rewards.amax(dim=1, keepdim=True) == rewards.amin(dim=1, keepdim=True)
    return torch.where(constant, torch.zeros_like(advantages), advantages)
