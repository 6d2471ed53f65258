"""GRPO objective terms on a tiny BitMarModel: the entropy bonus and the selection anchor."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest
import torch

from bitmar_model import BitMarConfig, BitMarModel
from bitmar_model.grpo import (
    GroupSample,
    GRPOSettings,
    gold_multi_hot,
    grpo_loss,
    grpo_update,
    sample_groups,
)
from bitmar_model.losses import class_balance_weights, selection_loss
from bitmar_model.metrics import label_matrix
from bitmar_model.rewards import RewardWeights
from bitmar_model.robots import ROBOT_CLASSES
from bitmar_pipeline.evaluation.selection_quality import evaluate_reasoning
from bitmar_pipeline.training.stages import head_drift

GOLD = [{"Drone"}, {"Humanoid", "Robot with Legs"}]


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_policy(seed: int = 0) -> BitMarModel:
    torch.manual_seed(seed)
    # A large init makes sampled completions varied and the next-token entropy far from flat.
    return BitMarModel(BitMarConfig.tiny(initializer_range=0.5)).eval()


def prompts(seed: int = 1, batch: int = 2, length: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))
    return ids, torch.ones_like(ids)


def sampled(policy: BitMarModel, settings: GRPOSettings) -> GroupSample:
    ids, mask = prompts()
    # Equal texts give equal rewards, so every advantage is exactly zero: only the entropy
    # (and anchor) terms are left in the loss.
    def decode(tokens: torch.Tensor) -> list[str]:
        return [""] * len(tokens)

    reference = copy.deepcopy(policy).requires_grad_(False)
    generator = torch.Generator().manual_seed(3)
    return sample_groups(policy, reference, ids, mask, GOLD, decode, settings, RewardWeights(), generator)


def completion_entropy(policy: BitMarModel, sample: GroupSample, temperature: float) -> torch.Tensor:
    """The policy's mean per-token entropy over each completion, averaged over completions,
    computed directly from the full next-token distributions."""
    logits = (
        policy(sample.prompt_ids, sample.prompt_mask, None, sample.sequences, sample.sequence_mask).logits[:, :-1]
        / temperature
    )
    log_p = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(log_p.exp() * log_p).sum(dim=-1)
    mask = sample.completion_mask
    return ((entropy * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)).mean()


def gradients(policy: BitMarModel, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    policy.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


def test_entropy_bonus_is_the_gradient_of_the_policy_entropy() -> None:
    policy = tiny_policy()
    settings = GRPOSettings(
        group_size=3,
        max_new_tokens=6,
        reasoning_temperature=0.8,
        kl_beta=0.0,
        entropy_coef=0.3,
        selection_anchor_weight=0.0,
    )
    sample = sampled(policy, settings)
    assert sample.completion_mask.sum() > 6 and bool((sample.advantages == 0).all())

    loss, _ = grpo_loss(policy, sample, settings)
    bonus = gradients(policy, loss)
    expected = gradients(
        policy, -settings.entropy_coef * completion_entropy(policy, sample, settings.reasoning_temperature)
    )
    assert expected.keys() <= bonus.keys()
    for name, grad in expected.items():
        assert torch.allclose(bonus[name], grad, atol=1e-6, rtol=1e-4), name

    # The test tells the old term apart: -log pi of the drawn tokens has another gradient.
    drawn = policy.sequence_log_probs(
        sample.prompt_ids,
        sample.prompt_mask,
        None,
        sample.sequences,
        sample.sequence_mask,
        settings.reasoning_temperature,
    )
    mask = sample.completion_mask
    old = gradients(policy, settings.entropy_coef * ((drawn * mask).sum(dim=1) / mask.sum(dim=1)).mean())
    assert not torch.allclose(old["embed_tokens.weight"], expected["embed_tokens.weight"], atol=1e-4)


def selection_text(tokens: torch.Tensor) -> list[str]:
    """A trace whose selected robot follows the first sampled token, so rewards (and the
    advantages, and the trunk's gradient) vary within every group."""
    names = [ROBOT_CLASSES[int(t) % 5] for t in tokens[:, 0]]
    return [f"<robot_selection>\nSelected Robot: {name}\nConfidence: 0.5\n</robot_selection>" for name in names]


def anchor_data(n: int = 8) -> tuple[torch.Tensor, list[set[str]], torch.Tensor]:
    """Training prompts over a small vocabulary with their gold robots, and unseen prompts
    that differ from them in the first token (tasks that share most of their words)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 40, (n, 6), generator=generator)
    heldout = ids.clone()
    heldout[:, 0] = torch.randint(3, 40, (n,), generator=generator)
    return ids, [{ROBOT_CLASSES[i % 5]} for i in range(n)], heldout


def sft_fitted_policy(ids: torch.Tensor, gold: list[set[str]]) -> BitMarModel:
    """A tiny policy whose selection head fits the training prompts, as after SFT."""
    policy = tiny_policy()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    for _ in range(60):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            policy(ids, torch.ones_like(ids)).robot_logits, gold_multi_hot(gold)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return policy


def head_under_grpo(anchor_weight: float, steps: int = 6) -> tuple[float, float, float]:
    """After `steps` GRPO updates: the head's BCE on the GRPO tasks' gold robots, the max change
    of its probabilities on unseen prompts, and the largest gradient the last update left on it."""
    ids, gold, heldout = anchor_data()
    mask = torch.ones_like(ids)
    policy = sft_fitted_policy(ids, gold)
    reference = copy.deepcopy(policy).requires_grad_(False)
    before = policy(heldout, mask).robot_probs.detach()
    settings = GRPOSettings(group_size=4, max_new_tokens=4, selection_anchor_weight=anchor_weight)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3, weight_decay=0.0)
    for step in range(steps):
        sample = sample_groups(
            policy,
            reference,
            ids,
            mask,
            gold,
            selection_text,
            settings,
            RewardWeights(),
            torch.Generator().manual_seed(step),
        )
        assert sample.advantages.abs().sum() > 0
        grpo_update(policy, optimizer, sample, settings)
    grad = policy.reasoning.policy_head.weight.grad
    head_grad = 0.0 if grad is None else float(grad.abs().max())
    target = torch.tensor(label_matrix(gold), dtype=torch.float32)
    bce = float(torch.nn.functional.binary_cross_entropy_with_logits(policy(ids, mask).robot_logits, target))
    drift = float((policy(heldout, mask).robot_probs.detach() - before).abs().max())
    return bce, drift, head_grad


def test_selection_anchor_supervises_the_head() -> None:
    free_bce, free_drift, free_head_grad = head_under_grpo(anchor_weight=0.0)
    anchored_bce, anchored_drift, anchored_head_grad = head_under_grpo(anchor_weight=1.0)
    print(f"task BCE {free_bce:.4f} -> {anchored_bce:.4f}; held-out drift {free_drift:.4f} -> {anchored_drift:.4f}")
    # Without the anchor the head itself gets no gradient, yet its outputs move with the trunk.
    assert free_head_grad == 0 and free_drift > 0.05
    assert anchored_head_grad > 0
    # The anchored objective is the GRPO objective plus the weighted SFT selection loss on the
    # same forward. Its effect on unseen prompts varies with the seed (reported by the stage as
    # head_prob_drift), so it is not bounded here.
    ids, gold, _ = anchor_data()
    policy = sft_fitted_policy(ids, gold)
    settings = GRPOSettings(group_size=4, max_new_tokens=4, selection_anchor_weight=0.0)
    sample = sample_groups(
        policy, copy.deepcopy(policy), ids, torch.ones_like(ids), gold, selection_text, settings,
        RewardWeights(), torch.Generator().manual_seed(0),
    )
    plain, stats = grpo_loss(policy, sample, settings)
    anchored, _ = grpo_loss(policy, sample, GRPOSettings(group_size=4, max_new_tokens=4, selection_anchor_weight=2.0))
    expected = torch.tensor(2.0 * stats["selection_anchor_loss"])
    torch.testing.assert_close(anchored - plain, expected, rtol=1e-5, atol=1e-6)
    # A class-balanced anchor uses SFT's weighted BCE (selection_loss with the same pos_weight).
    pos_weight = (1.0, 3.0, 1.0, 1.0, 1.0, 1.0)
    balanced = GRPOSettings(group_size=4, max_new_tokens=4, selection_pos_weight=pos_weight)
    _, balanced_stats = grpo_loss(policy, sample, balanced)
    logits = policy(sample.prompt_ids, sample.prompt_mask).robot_logits
    expected = selection_loss(logits, sample.gold_labels, torch.tensor(pos_weight))
    assert balanced_stats["selection_anchor_loss"] == pytest.approx(float(expected), rel=1e-5)
    assert balanced_stats["selection_anchor_loss"] != pytest.approx(stats["selection_anchor_loss"], rel=1e-3)


def test_class_balance_weights_weigh_rare_robots_up() -> None:
    targets = torch.zeros(10, 6)
    targets[:8, 0] = 1  # common
    targets[8:, 1] = 1  # rare
    assert class_balance_weights(targets, 0.0) is None
    full = class_balance_weights(targets, 1.0)
    assert full[0] == pytest.approx(2 / 8) and full[1] == pytest.approx(8 / 2)
    assert full[2] == 1.0  # no positives: unweighted
    assert class_balance_weights(targets, 0.5)[1] == pytest.approx(2.0)


class _CharTokenizer:
    """Just enough of a tokenizer for evaluate_reasoning without generation."""

    def __call__(self, texts: list[str], **_: object) -> dict[str, torch.Tensor]:
        ids = torch.tensor([[3 + ord(c) % 200 for c in text[:12].ljust(12)] for text in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_grpo_metadata_reports_head_metrics_and_drift_per_split() -> None:
    tasks = pd.DataFrame(
        {
            "split": ["validation"] * 3,
            "task_key": ["a", "b", "c"],
            "task_text": ["inspect a roof", "swim to the reef", "walk up stairs"],
            "robots": [["Drone"], ["Underwater Robot"], ["Humanoid"]],
        }
    )
    before = evaluate_reasoning(tiny_policy(0), _CharTokenizer(), tasks, "validation", generate=False, n_resamples=100)
    after = evaluate_reasoning(tiny_policy(1), _CharTokenizer(), tasks, "validation", generate=False, n_resamples=100)
    assert {"head_top1", "head_exact_set", "head_sample_f1"} <= set(after.summary())
    drift = head_drift(before, after)
    change = np.abs(after.head_probs - before.head_probs)
    assert drift == {
        "validation_head_prob_drift_mean": round(float(change.mean()), 4),
        "validation_head_prob_drift_max": round(float(change.max()), 4),
    }
    assert drift["validation_head_prob_drift_max"] > 0
