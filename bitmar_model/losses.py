"""Training objectives of the two supervised stages.

Multimodal pretraining runs the model twice per batch, on purpose:
- a *contrastive* pass encodes the caption itself: its unfused text embedding and the image
  embedding go into a symmetric InfoNCE with the model's learned temperature;
- a *captioning* pass encodes only a fixed instruction prompt plus the image, and the decoder
  learns the caption conditioned on image and memory. Feeding the caption to the encoder of
  this pass would let the decoder copy it through fusion and memory, and captioning at
  inference time (where no caption exists) would never have been trained.

Reasoning SFT trains the decoder on the tagged reasoning text and the selection head with a
multi-label (sigmoid) loss, since several robots can be right at once. When the batch
carries `rehearsal_*` caption pairs, the captioning pass of pretraining runs on them too:
without it the reasoning targets overwrite captioning (held-out BLEU-4 0.26 after
pretraining, 0.00 after SFT).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bitmar_model.cell_words import cell_bag_of_words_loss
from bitmar_model.modeling import IGNORE_INDEX, BitMarModel, BitMarOutput


@dataclass(frozen=True)
class PretrainWeights:
    text_generation: float = 1.0
    cross_modal: float = 1.0
    memory_regularization: float = 0.05
    cell_words: float = 1.0  # the cell reader's bag-of-words loss (config.cell_words)


def info_nce(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor, image_ids: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE over the batch. Rows whose image is the same (two captions of one
    image) are not treated as negatives of each other: they are masked out, not pushed apart."""
    logits = logit_scale * image_embeds @ text_embeds.t()
    same_image = image_ids[:, None] == image_ids[None, :]
    eye = torch.eye(len(image_ids), dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(same_image & ~eye, torch.finfo(logits.dtype).min)
    targets = torch.arange(len(image_ids), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))


def memory_usage_regularizer(memory_attention: torch.Tensor) -> torch.Tensor:
    """1 - H(mean slot attention) / log K: zero when the batch spreads its reads over all
    slots, one when every read hits the same slot (a collapsed memory)."""
    usage = memory_attention.float().mean(dim=0).clamp_min(1e-9)
    entropy = -(usage * usage.log()).sum()
    return 1.0 - entropy / math.log(memory_attention.shape[-1])


def captioning_pass(
    model: BitMarModel, batch: dict[str, torch.Tensor], prefix: str = "", update_memory: bool = False
) -> BitMarOutput:
    """Caption language modelling with the encoder seeing only the fixed prompt and the image."""
    return model(
        batch[f"{prefix}prompt_ids"],
        batch[f"{prefix}prompt_mask"],
        {"cls": batch[f"{prefix}cls"], "patches": batch[f"{prefix}patches"]},
        decoder_input_ids=batch[f"{prefix}decoder_ids"],
        decoder_attention_mask=batch[f"{prefix}decoder_mask"],
        labels=batch[f"{prefix}labels"],
        update_memory=update_memory,
    )


def label_token_count(batch: dict[str, torch.Tensor]) -> float:
    """Tokens the decoder loss of a batch is a mean over (labels are shifted by one inside the
    model), for the trainer's token-weighted gradient accumulation. The per-sample terms
    (InfoNCE, selection BCE, rehearsal) ride on the same weight."""
    return float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def pretrain_loss(
    model: BitMarModel, batch: dict[str, torch.Tensor], weights: PretrainWeights
) -> tuple[torch.Tensor, dict[str, float]]:
    vision = {"cls": batch["cls"], "patches": batch["patches"]}
    contrastive = model(batch["caption_ids"], batch["caption_mask"], vision)
    captioning = captioning_pass(model, batch, update_memory=model.training)
    nce = info_nce(contrastive.image_embeds, contrastive.text_embeds, contrastive.logit_scale, batch["image_ids"])
    memory_reg = memory_usage_regularizer(captioning.memory_attention)
    loss = (
        weights.text_generation * captioning.loss
        + weights.cross_modal * nce
        + weights.memory_regularization * memory_reg
    )
    extra = {}
    if captioning.cell_word_logits is not None:
        config = getattr(model, "module", model).config  # DDP wraps the model
        cell_bow = cell_bag_of_words_loss(
            captioning.cell_word_logits, batch["caption_ids"], batch["caption_mask"], config.special_token_ids
        )
        loss = loss + weights.cell_words * cell_bow
        extra["cell_word_loss"] = float(cell_bow.detach())
    with torch.no_grad():
        similarity = contrastive.image_embeds @ contrastive.text_embeds.t()
        matched = similarity.diagonal().mean()
        off_diagonal = batch["image_ids"][:, None] != batch["image_ids"][None, :]
        mismatched = similarity[off_diagonal].mean() if off_diagonal.any() else similarity.new_zeros(())
    return loss, {
        "text_generation_loss": float(captioning.loss.detach()),
        "cross_modal_loss": float(nce.detach()),
        "memory_regularization": float(memory_reg.detach()),
        "cross_modal_similarity": float(matched),
        "mismatched_similarity": float(mismatched),
        "logit_scale": float(contrastive.logit_scale.detach()),
        "tokens": float(batch["decoder_mask"].sum() + batch["caption_mask"].sum() + batch["prompt_mask"].sum()),
        **extra,
    }


def class_balance_weights(targets: torch.Tensor, power: float) -> torch.Tensor | None:
    """BCE `pos_weight` per class, (negatives / positives) ** power, from multi-hot targets [N, C].

    power 0 is the plain loss; 1 weighs a class's positives as much as its negatives, so a robot
    with 22 of 526 training rows is not out-voted by the label prior on tasks unlike the training
    ones; 0.5 is in between. A class without positives keeps weight 1.
    """
    if power == 0:
        return None
    positives = targets.float().sum(dim=0)
    ratio = (targets.shape[0] - positives) / positives.clamp_min(1.0)
    return torch.where(positives > 0, ratio.clamp_min(1e-3) ** power, torch.ones_like(ratio))


def selection_loss(
    robot_logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """The selection head's multi-label BCE (SFT, and GRPO's anchor), optionally class-balanced."""
    if pos_weight is not None:
        pos_weight = pos_weight.to(robot_logits.device)
    return F.binary_cross_entropy_with_logits(robot_logits.float(), targets.float(), pos_weight=pos_weight)


def sft_loss(
    model: BitMarModel,
    batch: dict[str, torch.Tensor],
    selection_weight: float,
    rehearsal_weight: float = 0.0,
    selection_pos_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    out = model(
        batch["prompt_ids"],
        batch["prompt_mask"],
        None,
        decoder_input_ids=batch["decoder_ids"],
        decoder_attention_mask=batch["decoder_mask"],
        labels=batch["labels"],
        update_memory=model.training,
    )
    selection = selection_loss(out.robot_logits, batch["robots"], selection_pos_weight)
    loss = out.loss + selection_weight * selection
    tokens = batch["decoder_mask"].sum() + batch["prompt_mask"].sum()
    extra: dict[str, float] = {}
    if rehearsal_weight > 0 and "rehearsal_decoder_ids" in batch:
        rehearsal = captioning_pass(model, batch, prefix="rehearsal_").loss
        loss = loss + rehearsal_weight * rehearsal
        tokens = tokens + batch["rehearsal_decoder_mask"].sum() + batch["rehearsal_prompt_mask"].sum()
        extra["caption_rehearsal_loss"] = float(rehearsal.detach())
    with torch.no_grad():
        top = out.robot_probs.argmax(dim=-1)
        top1 = batch["robots"].gather(1, top[:, None]).float().mean()
    return loss, {
        "text_generation_loss": float(out.loss.detach()),
        "selection_loss": float(selection.detach()),
        "robot_selection_accuracy": float(top1),
        "thought_score": float(out.thought_scores.detach().mean()),
        **extra,
        "tokens": float(tokens),
    }
