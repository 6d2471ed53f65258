"""Unit tests of the model's building blocks: config, attention, masks, rotary, cache, sampling."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bitmar_model.bitlinear import BitLinear
from bitmar_model.config import BitMarConfig
from bitmar_model.decoder import sample_next_token, token_log_probs
from bitmar_model.encoder import BitMarEncoder
from bitmar_model.layers import (
    FeedForward,
    KVCache,
    MultiHeadAttention,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    causal_window_mask,
    frozen_bitlinear_weights,
    key_padding_mask,
    make_linear,
    positions_from_mask,
)

# ----------------------------------------------------------------------------- config


def test_config_round_trip_and_fingerprint() -> None:
    cfg = BitMarConfig.tiny()
    again = BitMarConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert again.fingerprint() == cfg.fingerprint()
    assert BitMarConfig.tiny(hidden_size=64).fingerprint() != cfg.fingerprint()
    assert len(cfg.fingerprint()) == 16


def test_config_rejects_unknown_keys_by_name() -> None:
    with pytest.raises(ValueError, match="hiden_size"):
        BitMarConfig.from_dict({"hiden_size": 32})


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"hidden_size": 30}, "hidden_size"),
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"dropout": 1.5}, "dropout"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"num_robot_classes": 4}, "num_robot_classes"),
        ({"eos_token_id": 999}, "eos_token_id"),
        ({"vision_num_patches": -1}, "vision_num_patches"),
        ({"memory_alpha": 0.0}, "memory_alpha"),
    ],
)
def test_config_validation_names_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        BitMarConfig.tiny(**overrides)


def test_tiny_config_allows_cls_only_vision() -> None:
    assert BitMarConfig.tiny(vision_num_patches=0).vision_num_patches == 0


# ----------------------------------------------------------------------------- norms, rotary, linears


def test_rms_norm_matches_formula() -> None:
    x = torch.randn(3, 5, 8)
    norm = RMSNorm(8)
    nn.init.uniform_(norm.weight)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_rotary_scores_depend_only_on_relative_position() -> None:
    rotary = RotaryEmbedding(16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq: int, pk: int) -> torch.Tensor:
        cq, sq = rotary(torch.tensor([[pq]]))
        ck, sk = rotary(torch.tensor([[pk]]))
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()

    torch.testing.assert_close(score(7, 3), score(107, 103), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(score(7, 3), score(7, 5))


def test_positions_from_mask_ignore_padding() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


def test_make_linear_selects_the_class() -> None:
    assert type(make_linear(4, 4, quantized=True)) is BitLinear
    assert type(make_linear(4, 4, quantized=False)) is nn.Linear


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_feed_forward_shapes(activation: str) -> None:
    mlp = FeedForward(8, 16, activation=activation)
    assert mlp(torch.randn(2, 3, 8)).shape == (2, 3, 8)


# ----------------------------------------------------------------------------- attention and masks


def test_attention_weights_path_equals_fused_path() -> None:
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 2).eval()
    x = torch.randn(2, 5, 16)
    mask = key_padding_mask(torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    fused = attn(x, attn_mask=mask)
    explicit = attn(x, attn_mask=mask, output_attentions=True)
    assert fused.weights is None
    assert explicit.weights.shape == (2, 2, 5, 5)
    torch.testing.assert_close(fused.hidden_states, explicit.hidden_states, rtol=1e-5, atol=1e-5)
    assert explicit.weights[0, :, :, 3:].abs().max() == 0  # padded keys get no weight
    torch.testing.assert_close(explicit.weights.sum(-1), torch.ones(2, 2, 5))


def test_cross_attention_with_context_width() -> None:
    attn = MultiHeadAttention(16, 4, context_size=24)
    out = attn(torch.randn(2, 3, 16), torch.randn(2, 7, 24), output_attentions=True)
    assert out.hidden_states.shape == (2, 3, 16)
    assert out.weights.shape == (2, 4, 3, 7)


def test_causal_window_mask_keeps_sinks_and_window() -> None:
    positions = torch.arange(8)[None]
    mask = causal_window_mask(positions, positions, torch.ones(1, 8, dtype=torch.bool), sink_tokens=2, window=3)[0, 0]
    for q in range(8):
        visible = [k for k in range(8) if mask[q, k]]
        assert visible == sorted({k for k in range(q + 1) if k < 2 or q - k < 3})


def test_all_padding_rows_do_not_produce_nan() -> None:
    mask = key_padding_mask(torch.zeros(1, 4))
    out = MultiHeadAttention(8, 2)(torch.randn(1, 4, 8), attn_mask=mask)
    assert torch.isfinite(out.hidden_states).all()


def test_encoder_output_is_invariant_to_padding() -> None:
    torch.manual_seed(0)
    cfg = BitMarConfig.tiny(num_encoder_layers=2)
    encoder = BitMarEncoder(cfg).eval()
    x = torch.randn(1, 5, cfg.hidden_size)
    alone = encoder(x, torch.ones(1, 5)).last_hidden_state
    padded_x = torch.cat((torch.randn(1, 3, cfg.hidden_size), x), dim=1)
    padded = encoder(padded_x, torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])).last_hidden_state
    torch.testing.assert_close(padded[:, 3:], alone, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- KV cache


def test_kv_cache_trim_is_bounded_and_per_row() -> None:
    sinks, window, heads, dim = 2, 4, 1, 3
    # Row 0: 10 real tokens. Row 1: 3 left pads then 7 real tokens.
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, :3] = False
    positions = positions_from_mask(valid.long())
    keys = positions[:, None, :, None].float().expand(2, heads, 10, dim)
    cache = KVCache([keys], [keys.clone()], positions, valid).trimmed(sinks, window)
    assert cache.length <= sinks + window
    kept = [cache.positions[r][cache.valid[r]].tolist() for r in range(2)]
    assert kept == [[0, 1, 7, 8, 9], [0, 1, 4, 5, 6]]
    # keys travel with their positions
    for r in range(2):
        torch.testing.assert_close(cache.keys[0][r, 0, cache.valid[r], 0], cache.positions[r][cache.valid[r]].float())


def test_kv_cache_not_trimmed_within_bound() -> None:
    positions = torch.arange(4)[None]
    cache = KVCache([torch.zeros(1, 1, 4, 2)], [torch.zeros(1, 1, 4, 2)], positions, torch.ones(1, 4, dtype=torch.bool))
    assert cache.trimmed(2, 4) is cache


# ----------------------------------------------------------------------------- sampling


def test_greedy_and_degenerate_sampling_agree() -> None:
    logits = torch.randn(4, 50)
    greedy = sample_next_token(logits)
    assert torch.equal(greedy, logits.argmax(-1))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next_token(logits, do_sample=True, top_k=1, generator=g), greedy)
    assert torch.equal(sample_next_token(logits, do_sample=True, top_p=1e-6, generator=g), greedy)


def test_sampling_is_reproducible_and_respects_top_k() -> None:
    logits = torch.randn(64, 30)
    draw = [
        sample_next_token(logits, do_sample=True, temperature=0.7, top_k=5, generator=torch.Generator().manual_seed(3))
        for _ in range(2)
    ]
    assert torch.equal(draw[0], draw[1])
    top5 = logits.topk(5, dim=-1).indices
    assert (top5 == draw[0][:, None]).any(-1).all()


def test_top_p_keeps_the_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    samples = {int(sample_next_token(logits, do_sample=True, top_p=0.7, generator=g)) for _ in range(200)}
    assert samples == {0, 1}


def test_sampling_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="temperature"):
        sample_next_token(torch.randn(1, 5), do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        sample_next_token(torch.randn(1, 5), do_sample=True, top_p=0.0)


def test_token_log_probs() -> None:
    logits = torch.randn(2, 3, 7)
    tokens = torch.randint(0, 7, (2, 3))
    expected = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(token_log_probs(logits, tokens), expected)
    assert math.isclose(
        float(token_log_probs(torch.zeros(1, 1, 4), torch.zeros(1, 1, dtype=torch.long))), math.log(0.25), rel_tol=1e-6
    )


def test_frozen_bitlinear_weights_are_exact_and_scoped() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(BitLinear(16, 8), nn.ReLU(), BitLinear(8, 4, bias=True))
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        expected = model(x)
        with frozen_bitlinear_weights(model):
            assert all("forward" in m.__dict__ for m in model if isinstance(m, BitLinear))
            frozen = model(x)
    assert torch.equal(frozen, expected)
    assert not any("forward" in m.__dict__ for m in model)
