"""FIBER-style cross-modal fusion and the CLIP-style contrastive heads.

Each fusion layer lets text attend to the vision tokens and the vision tokens attend to the
text, both from the previous layer's states (a symmetric, simultaneous update as in FIBER),
with residual connections and per-modality MLPs.

The contrastive embeddings are computed from the *unfused* inputs (encoder text, adapter
image vector), as in FIBER's image-text contrastive loss: after fusion each text has
already seen its own image, so an InfoNCE over fused states would be trivially solvable
and the in-batch negatives would never have been paired with the text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bitmar_model.config import BitMarConfig
from bitmar_model.layers import (
    FeedForward,
    MultiHeadAttention,
    RMSNorm,
    key_padding_mask,
    make_linear,
)


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens: states [B, T, D], mask [B, T] -> [B, D]."""
    weights = mask.to(states.dtype)[..., None]
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)


@dataclass
class FusionOutput:
    text_states: torch.Tensor  # [B, T, hidden] fused text
    vision_tokens: torch.Tensor  # [B, N, hidden] fused vision tokens
    joint_embedding: torch.Tensor  # [B, hidden] pooled text + vision
    image_embeds: torch.Tensor  # [B, projection_dim], L2-normalised
    text_embeds: torch.Tensor  # [B, projection_dim], L2-normalised
    logit_scale: torch.Tensor  # scalar, exp of the clamped learned log-scale
    text_to_vision_attentions: tuple[torch.Tensor, ...] | None  # per layer [B, H, T, N]
    vision_to_text_attentions: tuple[torch.Tensor, ...] | None  # per layer [B, H, N, T]


class FusionLayer(nn.Module):
    def __init__(self, config: BitMarConfig) -> None:
        super().__init__()
        hidden, heads, q = config.hidden_size, config.num_attention_heads, config.quantized
        self.text_norm = RMSNorm(hidden)
        self.vision_norm = RMSNorm(hidden)
        self.text_to_vision = MultiHeadAttention(hidden, heads, dropout=config.dropout, quantized=q)
        self.vision_to_text = MultiHeadAttention(hidden, heads, dropout=config.dropout, quantized=q)
        self.text_mlp_norm = RMSNorm(hidden)
        self.vision_mlp_norm = RMSNorm(hidden)
        mlp = dict(activation=config.hidden_act, dropout=config.dropout, quantized=q)
        self.text_mlp = FeedForward(hidden, config.intermediate_size, **mlp)
        self.vision_mlp = FeedForward(hidden, config.intermediate_size, **mlp)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, text: torch.Tensor, vision: torch.Tensor, text_key_mask: torch.Tensor, output_attentions: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        text_n, vision_n = self.text_norm(text), self.vision_norm(vision)
        t2v = self.text_to_vision(text_n, vision_n, output_attentions=output_attentions)
        v2t = self.vision_to_text(vision_n, text_n, attn_mask=text_key_mask, output_attentions=output_attentions)
        text = text + self.dropout(t2v.hidden_states)
        vision = vision + self.dropout(v2t.hidden_states)
        text = text + self.dropout(self.text_mlp(self.text_mlp_norm(text)))
        vision = vision + self.dropout(self.vision_mlp(self.vision_mlp_norm(vision)))
        return text, vision, t2v.weights, v2t.weights


class CrossModalFusion(nn.Module):
    def __init__(self, config: BitMarConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.layers = nn.ModuleList(FusionLayer(config) for _ in range(config.num_fusion_layers))
        self.text_out_norm = RMSNorm(hidden)
        self.vision_out_norm = RMSNorm(hidden)
        self.joint_proj = make_linear(2 * hidden, hidden, quantized=config.quantized)
        self.joint_norm = RMSNorm(hidden)
        self.text_projection = make_linear(hidden, config.projection_dim, quantized=config.quantized)
        self.image_projection = make_linear(hidden, config.projection_dim, quantized=config.quantized)
        # CLIP: temperature learned in log space (positive, scale-free steps), capped so the
        # logits cannot blow up and destabilise training.
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        self.max_log_scale = math.log(config.logit_scale_max)

    def forward(
        self,
        text_states: torch.Tensor,
        text_mask: torch.Tensor,
        vision_tokens: torch.Tensor,
        vision_pooled: torch.Tensor,
        output_attentions: bool = False,
    ) -> FusionOutput:
        text_embeds = F.normalize(self.text_projection(masked_mean(text_states, text_mask)), dim=-1)
        image_embeds = F.normalize(self.image_projection(vision_pooled), dim=-1)

        key_mask = key_padding_mask(text_mask)
        text, vision = text_states, vision_tokens
        t2v_all, v2t_all = [], []
        for layer in self.layers:
            text, vision, t2v, v2t = layer(text, vision, key_mask, output_attentions)
            t2v_all.append(t2v)
            v2t_all.append(v2t)
        text, vision = self.text_out_norm(text), self.vision_out_norm(vision)
        joint = self.joint_norm(self.joint_proj(torch.cat((masked_mean(text, text_mask), vision.mean(1)), dim=-1)))
        return FusionOutput(
            text_states=text,
            vision_tokens=vision,
            joint_embedding=joint,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            logit_scale=self.logit_scale.clamp(0.0, self.max_log_scale).exp(),
            text_to_vision_attentions=tuple(t2v_all) if output_attentions else None,
            vision_to_text_attentions=tuple(v2t_all) if output_attentions else None,
        )
