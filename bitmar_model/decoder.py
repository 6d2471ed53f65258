"""BitNet causal decoder conditioned on memory and vision, with bounded-memory generation.

Each layer: causal self-attention (rotary, attention sinks + sliding window), cross-attention
over a small context token set ([memory read-out, reasoning state, selection, fused vision tokens,
and the task's own tokens when config.decoder_reads_task; padded task tokens are masked]),
then an MLP. The token embedding and the (tied) LM head belong to BitMarModel and are
passed in, since the encoder shares them.

Positions: queries and keys are rotated by their absolute positions before keys are
cached (see layers.KVCache), and the training-time mask applies the same sink + window
rule over positions. Cached generation therefore equals recomputing the full sequence
at every step, even after the cache has been trimmed, and the cache never holds more
than `attention_sink_tokens + sliding_window` slots per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from bitmar_model.config import BitMarConfig
from bitmar_model.layers import (
    FeedForward,
    KVCache,
    MultiHeadAttention,
    RMSNorm,
    RotaryEmbedding,
    causal_window_mask,
    frozen_bitlinear_weights,
    key_padding_mask,
    positions_from_mask,
)


@dataclass
class DecoderCache:
    self_attention: KVCache
    context_key_values: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, computed once
    context_mask: torch.Tensor | None = None  # [B, 1, 1, C] bool key mask of the context, when it has padding


@dataclass
class DecoderOutput:
    last_hidden_state: torch.Tensor  # [B, T, hidden]
    cache: DecoderCache | None
    self_attentions: tuple[torch.Tensor, ...] | None  # per layer [B, H, T, S]
    cross_attentions: tuple[torch.Tensor, ...] | None  # per layer [B, H, T, C]


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # [B, T0 + N]: the prompt as given (padding kept) then the new tokens
    attention_mask: torch.Tensor  # [B, T0 + N]: prompt mask then new_token_mask
    new_tokens: torch.Tensor  # [B, N]; pad_token_id after a row's eos
    new_token_mask: torch.Tensor  # [B, N] long: 1 for generated tokens up to and including eos
    log_probs: torch.Tensor | None  # [B, N] log-prob of each new token (0 where masked), when requested


class DecoderLayer(nn.Module):
    def __init__(self, config: BitMarConfig) -> None:
        super().__init__()
        hidden, heads, q = config.hidden_size, config.num_attention_heads, config.quantized
        self.self_norm = RMSNorm(hidden)
        self.self_attn = MultiHeadAttention(hidden, heads, dropout=config.dropout, quantized=q)
        self.cross_norm = RMSNorm(hidden)
        self.cross_attn = MultiHeadAttention(hidden, heads, dropout=config.dropout, quantized=q)
        self.mlp_norm = RMSNorm(hidden)
        self.mlp = FeedForward(
            hidden, config.intermediate_size, activation=config.hidden_act, dropout=config.dropout, quantized=q
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        self_mask: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        past_key_value: tuple[torch.Tensor, torch.Tensor] | None,
        context_key_value: tuple[torch.Tensor, torch.Tensor],
        context_mask: torch.Tensor | None,
        output_attentions: bool,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
        attn = self.self_attn(
            self.self_norm(hidden_states),
            attn_mask=self_mask,
            rotary=rotary,
            past_key_value=past_key_value,
            output_attentions=output_attentions,
        )
        hidden_states = hidden_states + self.dropout(attn.hidden_states)
        cross = self.cross_attn(
            self.cross_norm(hidden_states),
            key_value=context_key_value,
            attn_mask=context_mask,
            output_attentions=output_attentions,
        )
        hidden_states = hidden_states + self.dropout(cross.hidden_states)
        hidden_states = hidden_states + self.dropout(self.mlp(self.mlp_norm(hidden_states)))
        return hidden_states, (attn.key, attn.value), attn.weights, cross.weights


class BitMarDecoder(nn.Module):
    def __init__(self, config: BitMarConfig) -> None:
        super().__init__()
        self.config = config
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.context_norm = RMSNorm(config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_decoder_layers))
        self.norm = RMSNorm(config.hidden_size)

    def context_key_values(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer cross-attention keys/values of the context tokens [B, C, hidden]."""
        context = self.context_norm(context)
        return [layer.cross_attn.project_key_value(context) for layer in self.layers]

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        context_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: DecoderCache | None = None,
        use_cache: bool = False,
        output_attentions: bool = False,
    ) -> DecoderOutput:
        """inputs_embeds [B, T, hidden]; attention_mask [B, T] for these tokens; context
        [B, C, hidden] and its mask [B, C] (1 = real token; None = all real), both unused when
        `cache` holds their keys/values; position_ids [B, T] (default: counted from the mask,
        continuing after the cache's newest position)."""
        cfg = self.config
        valid = attention_mask.bool()
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
            if cache is not None:
                last = torch.where(cache.self_attention.valid, cache.self_attention.positions, -1).amax(1, keepdim=True)
                position_ids = position_ids + last + 1
        if cache is not None:
            context_kv, cross_mask = cache.context_key_values, cache.context_mask
            key_positions = torch.cat((cache.self_attention.positions, position_ids), dim=1)
            key_valid = torch.cat((cache.self_attention.valid, valid), dim=1)
        else:
            if context is None:
                raise ValueError("BitMarDecoder: `context` is required when no cache is given")
            context_kv = self.context_key_values(context)
            cross_mask = None if context_mask is None else key_padding_mask(context_mask)
            key_positions, key_valid = position_ids, valid
        self_mask = causal_window_mask(
            position_ids, key_positions, key_valid, cfg.attention_sink_tokens, cfg.sliding_window
        )
        rotary = self.rotary(position_ids)

        hidden_states = inputs_embeds
        keys, values, self_attns, cross_attns = [], [], [], []
        for i, layer in enumerate(self.layers):
            past = None if cache is None else (cache.self_attention.keys[i], cache.self_attention.values[i])
            hidden_states, (k, v), self_w, cross_w = layer(
                hidden_states,
                self_mask=self_mask,
                rotary=rotary,
                past_key_value=past,
                context_key_value=context_kv[i],
                context_mask=cross_mask,
                output_attentions=output_attentions,
            )
            keys.append(k)
            values.append(v)
            self_attns.append(self_w)
            cross_attns.append(cross_w)

        new_cache = None
        if use_cache:
            kv = KVCache(keys=keys, values=values, positions=key_positions, valid=key_valid)
            new_cache = DecoderCache(kv.trimmed(cfg.attention_sink_tokens, cfg.sliding_window), context_kv, cross_mask)
        return DecoderOutput(
            last_hidden_state=self.norm(hidden_states),
            cache=new_cache,
            self_attentions=tuple(self_attns) if output_attentions else None,
            cross_attentions=tuple(cross_attns) if output_attentions else None,
        )

    @torch.no_grad()
    def generate(
        self,
        embed_tokens: nn.Embedding,
        context: torch.Tensor,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        *,
        context_mask: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        return_log_probs: bool = False,
        output_head: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        logits_processor: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> GenerationOutput:
        """Continue each prompt row (left or right padded) with up to `max_new_tokens` tokens.

        Logits come from the tied head (`embed_tokens.weight`), or from `output_head(hidden [B, d],
        the last two tokens read [B, 2]) -> [B, V]` when given (the model's copy head). Each row continues from its
        last real token, at the next position; rows stop at `eos_token_id` independently
        and the loop ends early once all have stopped. `use_cache=False` recomputes the
        whole sequence every step (the reference the cache is tested and benchmarked
        against). `logits_processor(new tokens so far [B, n], logits [B, V]) -> logits`
        runs before each choice (e.g. `bitmar_model.guided.HeadGuidedDecoding`). Log-probs are of the
        temperature-scaled distribution before top-k/top-p truncation, which is what
        `token_log_probs` recomputes under teacher forcing.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        batch = prompt_ids.shape[0]
        rows = torch.arange(batch, device=prompt_ids.device)
        prompt_mask = prompt_mask.long()
        positions = positions_from_mask(prompt_mask)
        last_index = last_valid_index(prompt_mask)
        next_position = positions[rows, last_index] + 1

        # Weights are fixed during generation: quantize them once, not once per token. The
        # tied head is read once per token too; a contiguous [hidden, vocab] copy makes that
        # small-batch GEMV several times faster on CPU than F.linear over the [vocab, hidden] table.
        head = embed_tokens.weight.t().contiguous()
        if output_head is None:

            def output_head(hidden: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
                return hidden @ head

        with frozen_bitlinear_weights(self):
            out = self(
                embed_tokens(prompt_ids),
                prompt_mask,
                context,
                context_mask=context_mask,
                position_ids=positions,
                use_cache=use_cache,
            )
            hidden = out.last_hidden_state[rows, last_index]
            # (y_{t-1}, y_t) as the model's forward reads them (copying.read_tokens): raw columns.
            before = torch.where(last_index >= 1, prompt_ids[rows, (last_index - 1).clamp_min(0)], -1)
            read = torch.stack((before, prompt_ids[rows, last_index]), dim=1)
            cache = out.cache
            seq = (prompt_ids, prompt_mask, positions)  # the whole sequence, for use_cache=False

            finished = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)
            tokens, token_masks, log_probs = [], [], []
            for step in range(max_new_tokens):
                logits = output_head(hidden, read).float()
                if logits_processor is not None:
                    so_far = torch.stack(tokens, dim=1) if tokens else prompt_ids.new_zeros(batch, 0)
                    logits = logits_processor(so_far, logits)
                token = sample_next_token(
                    logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
                )
                token = torch.where(finished, torch.full_like(token, pad_token_id), token)
                token_masks.append((~finished).long())
                tokens.append(token)
                if return_log_probs:
                    scaled = logits / temperature if do_sample else logits
                    log_probs.append(token_log_probs(scaled[:, None], token[:, None])[:, 0] * (~finished))
                read = torch.stack((read[:, 1], token), dim=1)
                if eos_token_id is not None:
                    finished = finished | (token == eos_token_id)
                if step == max_new_tokens - 1 or bool(finished.all()):
                    break
                if use_cache:
                    hidden, cache = self._step_cached(embed_tokens, token, next_position, cache)
                else:
                    hidden, seq = self._recompute_last(embed_tokens, context, context_mask, seq, token, next_position)
                next_position = next_position + 1

        return _generation_output(prompt_ids, prompt_mask, tokens, token_masks, log_probs if return_log_probs else None)

    def _step_cached(
        self, embed_tokens: nn.Embedding, token: torch.Tensor, position: torch.Tensor, cache: DecoderCache
    ) -> tuple[torch.Tensor, DecoderCache]:
        """Feed one new token per row ([B]) at `position` through the cache: its last hidden state
        and the grown cache."""
        new_mask = torch.ones_like(token)[:, None]
        out = self(embed_tokens(token[:, None]), new_mask, position_ids=position[:, None], cache=cache, use_cache=True)
        return out.last_hidden_state[:, -1], out.cache

    def _recompute_last(
        self,
        embed_tokens: nn.Embedding,
        context: torch.Tensor,
        context_mask: torch.Tensor | None,
        seq: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        token: torch.Tensor,
        position: torch.Tensor,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Append `token` ([B]) at `position` to `seq` (ids, mask, positions) and run the whole
        sequence again: the uncached reference path. Returns the last hidden state and `seq`."""
        ids, mask, positions = seq
        ids = torch.cat((ids, token[:, None]), dim=1)
        mask = torch.cat((mask, torch.ones_like(token)[:, None]), dim=1)
        positions = torch.cat((positions, position[:, None]), dim=1)
        out = self(embed_tokens(ids), mask, context, context_mask=context_mask, position_ids=positions)
        return out.last_hidden_state[:, -1], (ids, mask, positions)


def _generation_output(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    tokens: list[torch.Tensor],
    token_masks: list[torch.Tensor],
    log_probs: list[torch.Tensor] | None,
) -> GenerationOutput:
    """Stack the per-step tokens ([B] each) of `generate` and append them to the prompts."""
    new_tokens = torch.stack(tokens, dim=1)
    new_token_mask = torch.stack(token_masks, dim=1)
    return GenerationOutput(
        sequences=torch.cat((prompt_ids, new_tokens), dim=1),
        attention_mask=torch.cat((prompt_mask, new_token_mask), dim=1),
        new_tokens=new_tokens,
        new_token_mask=new_token_mask,
        log_probs=torch.stack(log_probs, dim=1) if log_probs is not None else None,
    )


def last_valid_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last real token ([B, T] mask -> [B]); 0 for an all-padding row."""
    columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.bool() * columns).amax(dim=1)


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per position: logits [B, T, V], tokens [B, T] -> [B, T] (fp32)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def sample_next_token(
    logits: torch.Tensor,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Greedy argmax, or sampling with temperature, top-k and nucleus (top-p) truncation.

    logits [B, V] -> token ids [B]. Pass a seeded torch.Generator for reproducible samples.
    """
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p; the most likely
        # token always survives.
        drop = (probs.cumsum(dim=-1) - probs) > top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
