"""Group Relative Policy Optimization (Shao et al., 2024, DeepSeekMath), applied Tiny-R1
style to the model's own generated reasoning.

For each task prompt the current policy samples a group of G completions. Each completion
gets a scalar reward (bitmar_model.rewards: selection, format, consistency, calibration);
advantages are the rewards normalised within their group, so no value function is needed.
The policy is updated with the PPO clipped ratio objective over the generated tokens, and a
per-token KL penalty to the frozen SFT reference (the unbiased k3 estimator of the paper):

    L = -1/G sum_i 1/|o_i| sum_t [ min(r A_i, clip(r, 1-eps, 1+eps) A_i) - beta KL_t + c H_t ]
    KL_t = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1
    H_t  = -sum_v pi_theta(v | o_<t) log pi_theta(v | o_<t)   (entropy bonus, c = entropy_coef, 0 by default)

One departure, off with `advantage_std_floor=0`: the group std is floored before dividing.
Once SFT fits the training tasks, every completion of a group is right and the rewards
differ by calibration noise alone (std ~0.02-0.06 measured); the plain z-score turned that
noise into unit advantages and moved the policy at random.

The selection head is not part of the policy's text, but it reads the trunk the objective
moves; `selection_anchor_weight` keeps the supervised selection loss of SFT (BCE on the gold
robots) on every GRPO batch, so the head stays trained instead of drifting with the trunk
and the consistency reward compares the text with a head that still means something.

`train_grpo` runs the steps through the loop machinery the Trainer uses (bitmar_model.loop):
resume, the non-finite-step policy and checkpoints are the same for every stage.

Dropout is off while sampling and while computing ratios, so with one policy epoch the
ratio is exactly 1 at the first step and the objective's gradient is the policy gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bitmar_model.loop import LoopSettings, StepLoop
from bitmar_model.losses import selection_loss
from bitmar_model.modeling import BitMarModel
from bitmar_model.rewards import RewardBreakdown, RewardWeights, compute_rewards, group_advantages
from bitmar_model.robots import NUM_ROBOT_CLASSES, ROBOT_INDEX


@dataclass(frozen=True)
class GRPOSettings:
    group_size: int = 8
    clip_epsilon: float = 0.2
    kl_beta: float = 0.04
    reasoning_temperature: float = 1.0  # sampling temperature of the group completions
    top_p: float = 1.0
    max_new_tokens: int = 160
    policy_epochs: int = 1
    advantage_std_floor: float = 0.1
    entropy_coef: float = 0.0
    selection_anchor_weight: float = 1.0
    selection_pos_weight: tuple[float, ...] | None = None  # the anchor's class balance, as in SFT
    loss_weight: float = 1.0
    reward_scaling: float = 1.0
    max_grad_norm: float = 0.5


@dataclass
class GroupSample:
    """One batch of tasks x G completions, with everything the update needs (no gradients)."""

    prompt_ids: torch.Tensor  # [B*G, Tp]
    prompt_mask: torch.Tensor
    sequences: torch.Tensor  # [B*G, 1 + N]: BOS then the completion
    sequence_mask: torch.Tensor
    completion_mask: torch.Tensor  # [B*G, N] float
    old_log_probs: torch.Tensor  # [B*G, N]
    ref_log_probs: torch.Tensor  # [B*G, N]
    advantages: torch.Tensor  # [B*G]
    gold_labels: torch.Tensor  # [B*G, num_robot_classes] multi-hot, for the selection anchor
    rewards: RewardBreakdown
    texts: list[str]


def gold_multi_hot(gold: Sequence[set[str]], device: torch.device | str = "cpu") -> torch.Tensor:
    """[len(gold), num_robot_classes] targets of the selection head (canonical robot names)."""
    labels = torch.zeros(len(gold), NUM_ROBOT_CLASSES, device=device)
    for row, robots in enumerate(gold):
        labels[row, [ROBOT_INDEX[r] for r in robots]] = 1.0
    return labels


def _completion_log_probs(
    model: BitMarModel,
    sample_prompt: tuple[torch.Tensor, torch.Tensor],
    sequences: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    prompt_ids, prompt_mask = sample_prompt
    # sequences = [BOS, o_1..o_N]; position t of the result is log p(o_{t+1} | BOS, o_<=t).
    return model.sequence_log_probs(prompt_ids, prompt_mask, None, sequences, mask, temperature=temperature)


@torch.no_grad()
def sample_groups(
    policy: BitMarModel,
    reference: BitMarModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    gold: Sequence[set[str]],
    decode: Callable[[torch.Tensor], list[str]],
    settings: GRPOSettings,
    weights: RewardWeights,
    generator: torch.Generator | None = None,
) -> GroupSample:
    """Sample G completions per prompt from the policy and score them."""
    policy.eval()
    group = settings.group_size
    ids = prompt_ids.repeat_interleave(group, dim=0)
    mask = prompt_mask.repeat_interleave(group, dim=0)
    generated = policy.generate(
        ids,
        mask,
        max_new_tokens=settings.max_new_tokens,
        do_sample=True,
        temperature=settings.reasoning_temperature,
        top_p=settings.top_p,
        generator=generator,
        return_log_probs=True,
    )
    texts = decode(generated.new_tokens.masked_fill(generated.new_token_mask == 0, policy.config.pad_token_id))
    head = BitMarModel.extract_robot_selections(policy(prompt_ids, prompt_mask))
    head_sets = [set(head[i // group]) for i in range(len(texts))]
    gold_sets = [set(gold[i // group]) for i in range(len(texts))]
    rewards = compute_rewards(texts, gold_sets, head_sets, weights)
    totals = torch.tensor(rewards.total, dtype=torch.float32).view(-1, group) * settings.reward_scaling
    advantages = group_advantages(totals, std_floor=settings.advantage_std_floor).flatten()

    sequences, sequence_mask = generated.sequences, generated.attention_mask
    completion_mask = generated.new_token_mask.float()
    old = generated.log_probs
    ref = _completion_log_probs(reference, (ids, mask), sequences, sequence_mask, settings.reasoning_temperature)
    labels = gold_multi_hot(gold, old.device).repeat_interleave(group, dim=0)
    return GroupSample(
        ids,
        mask,
        sequences,
        sequence_mask,
        completion_mask,
        old,
        ref * completion_mask,
        advantages.to(old.device),
        labels,
        rewards,
        texts,
    )


def grpo_loss(
    policy: BitMarModel, sample: GroupSample, settings: GRPOSettings
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped, KL-regularised GRPO objective (to minimise) and its diagnostics."""
    scores = policy.sequence_scores(
        sample.prompt_ids,
        sample.prompt_mask,
        None,
        sample.sequences,
        sample.sequence_mask,
        settings.reasoning_temperature,
        entropy=settings.entropy_coef > 0,
    )
    log_probs = scores.log_probs
    mask = sample.completion_mask
    ratio = torch.exp(log_probs - sample.old_log_probs)
    advantages = sample.advantages[:, None]
    surrogate = torch.minimum(
        ratio * advantages, ratio.clamp(1 - settings.clip_epsilon, 1 + settings.clip_epsilon) * advantages
    )
    log_ref_ratio = sample.ref_log_probs - log_probs
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
    per_token = surrogate - settings.kl_beta * kl
    if scores.entropy is not None:
        # The full next-token entropy: -log pi of the drawn tokens alone has zero expected
        # gradient at pi = pi_old and pushes away from pi_old on later epochs.
        per_token = per_token + settings.entropy_coef * scores.entropy
    lengths = mask.sum(dim=1).clamp_min(1.0)
    objective = ((per_token * mask).sum(dim=1) / lengths).mean()
    loss = -settings.loss_weight * objective
    pos_weight = None if settings.selection_pos_weight is None else torch.tensor(settings.selection_pos_weight)
    anchor = selection_loss(scores.robot_logits, sample.gold_labels, pos_weight)
    if settings.selection_anchor_weight > 0:
        loss = loss + settings.selection_anchor_weight * anchor
    with torch.no_grad():
        tokens = mask.sum().clamp_min(1.0)
        clipped = (((ratio - 1).abs() > settings.clip_epsilon).float() * mask).sum() / tokens
        mean_kl = (kl * mask).sum() / tokens
    return loss, {
        "kl": float(mean_kl),
        "clip_fraction": float(clipped),
        "completion_tokens": float(lengths.mean()),
        "selection_anchor_loss": float(anchor.detach()),
    }


def grpo_update(
    policy: BitMarModel, optimizer: torch.optim.Optimizer, sample: GroupSample, settings: GRPOSettings
) -> dict[str, float]:
    """`policy_epochs` optimizer steps on one sampled batch; returns the last step's metrics."""
    policy.eval()  # no dropout: ratios compare the same deterministic policy
    metrics: dict[str, float] = {}
    for _ in range(settings.policy_epochs):
        loss, metrics = grpo_loss(policy, sample, settings)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"GRPO loss is {float(loss.detach())}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), settings.max_grad_norm)
        optimizer.step()
        metrics = {**metrics, "loss": float(loss.detach()), "grad_norm": float(grad_norm)}
    return metrics


# One step's tasks: prompt ids [B, Tp], prompt mask [B, Tp] and each task's gold robot names.
GroupBatch = tuple[torch.Tensor, torch.Tensor, list[set[str]]]
StepRecordCallback = Callable[[dict[str, float]], None]


@dataclass
class GRPOResult:
    final_step: int
    resumed_from_step: int | None
    checkpoint_path: Path | None


def train_grpo(
    policy: BitMarModel,
    reference: BitMarModel,
    batch_for_step: Callable[[int], GroupBatch],
    decode: Callable[[torch.Tensor], list[str]],
    settings: GRPOSettings,
    weights: RewardWeights,
    loop_settings: LoopSettings,
    run_config: Mapping[str, Any],
    *,
    learning_rate: float,
    seed: int,
    callbacks: Sequence[StepRecordCallback] = (),
) -> GRPOResult:
    """GRPO steps until `loop_settings.max_steps`, resuming from the latest checkpoint;
    `batch_for_step(step)` gives the tasks of step `step` (0-based), the same on a resume."""
    device = next(policy.parameters()).device
    optimizer = torch.optim.AdamW(policy.parameters(), lr=learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loop = StepLoop(loop_settings, run_config, device)
    loop.resume(policy, optimizer, scheduler)
    while not loop.done:
        ids, mask, gold = batch_for_step(loop.step)
        # Sampling randomness depends only on (seed, step), so a resumed run draws the same groups.
        generator = torch.Generator(device=device).manual_seed(seed * 100_003 + loop.step)
        sample = sample_groups(policy, reference, ids, mask, gold, decode, settings, weights, generator)
        try:
            update = grpo_update(policy, optimizer, sample, settings)
        except FloatingPointError:
            update = {"skipped": 1.0}
        step = loop.finish_step("skipped" not in update)
        record = _step_record(step, sample, update)
        for callback in callbacks:
            callback(record)
        if loop.checkpoint_due(step):
            loop.save(policy, optimizer, scheduler, {})
    return GRPOResult(loop.step, loop.resumed_from, loop.last_checkpoint)


def _step_record(step: int, sample: GroupSample, update: Mapping[str, float]) -> dict[str, float]:
    means = sample.rewards.means()
    return {
        "step": step,
        "train/grpo_reasoning_loss": update.get("loss", float("nan")),
        **{f"reward/{k}": v for k, v in means.items()},
        "reward/std": float(np.std(sample.rewards.total)),
        "reasoning/well_formed": float(np.mean([p.well_formed for p in sample.rewards.parsed])),
        **{f"grpo/{k}": v for k, v in update.items() if k != "loss"},
    }
