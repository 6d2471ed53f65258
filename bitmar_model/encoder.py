"""BitNet text encoder: a bidirectional pre-norm transformer over token embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bitmar_model.config import BitMarConfig
from bitmar_model.layers import (
    FeedForward,
    MultiHeadAttention,
    RMSNorm,
    RotaryEmbedding,
    key_padding_mask,
    positions_from_mask,
)


@dataclass
class EncoderOutput:
    last_hidden_state: torch.Tensor  # [B, T, hidden]
    attentions: tuple[torch.Tensor, ...] | None  # per layer [B, H, T, T]


class EncoderLayer(nn.Module):
    def __init__(self, config: BitMarConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size)
        self.attn = MultiHeadAttention(
            config.hidden_size, config.num_attention_heads, dropout=config.dropout, quantized=config.quantized
        )
        self.mlp_norm = RMSNorm(config.hidden_size)
        self.mlp = FeedForward(
            config.hidden_size,
            config.intermediate_size,
            activation=config.hidden_act,
            dropout=config.dropout,
            quantized=config.quantized,
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attn_mask: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        output_attentions: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn = self.attn(
            self.attn_norm(hidden_states), attn_mask=attn_mask, rotary=rotary, output_attentions=output_attentions
        )
        hidden_states = hidden_states + self.dropout(attn.hidden_states)
        hidden_states = hidden_states + self.dropout(self.mlp(self.mlp_norm(hidden_states)))
        return hidden_states, attn.weights


class BitMarEncoder(nn.Module):
    """Bidirectional encoder; padding is excluded from attention and from rotary positions."""

    def __init__(self, config: BitMarConfig) -> None:
        super().__init__()
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_encoder_layers))
        self.norm = RMSNorm(config.hidden_size)

    def forward(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, output_attentions: bool = False
    ) -> EncoderOutput:
        """inputs_embeds [B, T, hidden], attention_mask [B, T] (1 = token, 0 = padding)."""
        rotary = self.rotary(positions_from_mask(attention_mask))
        mask = key_padding_mask(attention_mask)
        hidden_states = inputs_embeds
        attentions = []
        for layer in self.layers:
            hidden_states, weights = layer(hidden_states, mask, rotary, output_attentions)
            attentions.append(weights)
        return EncoderOutput(
            last_hidden_state=self.norm(hidden_states),
            attentions=tuple(attentions) if output_attentions else None,
        )
