"""End-to-end tests of BitMarModel: outputs, gradients, generation, serialisation, validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from bitmar_model import (
    BitMarConfig,
    BitMarModel,
    BitMarOutput,
    create_bitmar_model,
    parameter_report,
)
from bitmar_model.cell_words import cell_bag_of_words_loss
from bitmar_model.layers import positions_from_mask
from bitmar_model.robots import ROBOT_CLASSES


def make_batch(cfg: BitMarConfig, batch: int = 3, text_len: int = 7, dec_len: int = 6, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(3, cfg.vocab_size, (batch, text_len), generator=g),
        "vision_features": {
            "cls": torch.randn(batch, cfg.vision_feature_dim, generator=g),
            "patches": torch.randn(batch, cfg.vision_num_patches, cfg.vision_feature_dim, generator=g),
        },
        "decoder_input_ids": torch.randint(3, cfg.vocab_size, (batch, dec_len), generator=g),
    }


def build(seed: int = 0, **overrides) -> BitMarModel:
    torch.manual_seed(seed)
    return BitMarModel(BitMarConfig.tiny(**overrides))


def generation_model(**overrides) -> BitMarModel:
    # A large init makes a random model's greedy continuations varied (with the default
    # init they repeat one token), so the equality checks below are meaningful.
    return build(initializer_range=1.0, **overrides).eval()


# ----------------------------------------------------------------------------- outputs


def test_output_shapes() -> None:
    model = build().eval()
    cfg = model.config
    batch = make_batch(cfg)
    out = model(**batch, labels=batch["decoder_input_ids"], output_attentions=True)
    assert isinstance(out, BitMarOutput)
    b, r = 3, len(ROBOT_CLASSES)
    assert out.logits.shape == (b, 6, cfg.vocab_size)
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert out.robot_logits.shape == out.robot_probs.shape == (b, r)
    assert ((out.robot_probs > 0) & (out.robot_probs < 1)).all()
    assert out.value.shape == (b,)
    assert out.thought_scores.shape == (b, cfg.reasoning_steps)
    assert out.reasoning_state.shape == out.joint_embedding.shape == (b, cfg.hidden_size)
    assert out.memory_readout.shape == (b, cfg.memory_dim)
    assert out.memory_attention.shape == (b, cfg.memory_slots)
    assert out.image_embeds.shape == out.text_embeds.shape == (b, cfg.projection_dim)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(b))
    assert out.logit_scale.shape == () and 1.0 <= out.logit_scale.item() <= cfg.logit_scale_max
    assert out.has_image.all()
    att = out.attentions
    heads, t, n, p = cfg.num_attention_heads, 7, cfg.num_vision_tokens, cfg.vision_num_patches
    assert [a.shape for a in att["encoder"]] == [(b, heads, t, t)] * cfg.num_encoder_layers
    assert att["vision_pooling"].shape == (b, heads, 1 + n, 1 + p)
    assert att["fusion_text_to_vision"][0].shape == (b, heads, t, n)
    assert att["fusion_vision_to_text"][0].shape == (b, heads, n, t)
    assert att["memory"].shape == (b, cfg.memory_slots)
    assert att["reasoning_context"].shape == (b, cfg.reasoning_steps, 1 + t + n)
    assert att["reasoning_robots"].shape == (b, cfg.reasoning_steps, r)
    assert att["decoder_self"][0].shape == (b, heads, 6, 6)
    # memory, reasoning state, selection, vision, then the cell words and the task's tokens
    assert att["decoder_cross"][0].shape == (b, heads, 6, 3 + n + cfg.cell_words + t)


def test_text_only_forward_and_tuple_features() -> None:
    model = build().eval()
    batch = make_batch(model.config)
    out = model(batch["input_ids"], decoder_input_ids=batch["decoder_input_ids"])
    assert out.image_embeds is None and not out.has_image.any()
    assert out.logits.shape[:2] == (3, 6) and torch.isfinite(out.logits).all()
    vf = batch["vision_features"]
    as_tuple = model(batch["input_ids"], vision_features=(vf["cls"], vf["patches"]))
    as_dict = model(batch["input_ids"], vision_features=vf)
    assert as_tuple.logits is None
    assert torch.equal(as_tuple.robot_logits, as_dict.robot_logits)
    assert not torch.equal(as_dict.robot_logits, out.robot_logits)


def test_cls_only_features() -> None:
    model = build(vision_num_patches=0).eval()
    cls = torch.randn(2, model.config.vision_feature_dim)
    out = model(torch.randint(3, 50, (2, 4)), vision_features={"cls": cls})
    assert out.image_embeds.shape == (2, model.config.projection_dim)


def test_gradients_reach_every_parameter() -> None:
    model = build(dropout=0.1).train()
    batch = make_batch(model.config, batch=4)
    # Half the rows without an image, so the learned "no image" tokens are used too.
    batch["vision_features"]["has_image"] = torch.tensor([True, False, True, False])
    # The decoder quotes two task tokens in a row, so the copy head's "follows the copied token" cue fires.
    batch["decoder_input_ids"][:, 1:3] = batch["input_ids"][:, :2]
    out = model(**batch, labels=batch["decoder_input_ids"])
    targets = torch.zeros_like(out.robot_logits)
    targets[:, 0] = 1
    contrastive = out.logit_scale * out.image_embeds @ out.text_embeds.t()
    labels = torch.arange(4)
    loss = (
        out.loss
        + torch.nn.functional.binary_cross_entropy_with_logits(out.robot_logits, targets)
        + (
            torch.nn.functional.cross_entropy(contrastive, labels)
            + torch.nn.functional.cross_entropy(contrastive.t(), labels)
        )
        / 2
        + out.value.pow(2).mean()
        + torch.nn.functional.binary_cross_entropy(out.thought_scores, torch.ones_like(out.thought_scores))
        # The cell reader learns from its own loss (pretraining's), the task standing in for a caption.
        + cell_bag_of_words_loss(out.cell_word_logits, batch["input_ids"], torch.ones_like(batch["input_ids"]), (0,))
    )
    loss.backward()
    missing = [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert not missing, f"parameters without gradient: {missing}"


def test_language_loss_reads_the_selection_but_does_not_train_the_head() -> None:
    model = build().train()
    batch = make_batch(model.config)
    model(**batch, labels=batch["decoder_input_ids"]).loss.backward()
    assert model.selection_embed.weight.grad.abs().sum() > 0
    assert model.reasoning.policy_head.weight.grad is None


def test_update_memory_writes_slots_without_gradients() -> None:
    model = build().train()
    before = model.memory.keys.clone()
    out = model(**make_batch(model.config), update_memory=True)
    assert not torch.equal(model.memory.keys, before)
    assert int(model.memory.write_step) == 3
    assert out.memory_attention.shape == (3, model.config.memory_slots)


def test_robot_selection_and_reasoning_analysis() -> None:
    model = build().eval()
    out = model(**make_batch(model.config))
    selections = model.extract_robot_selections(out, threshold=1.1)  # nothing passes: argmax only
    best = out.robot_probs.argmax(-1).tolist()
    assert selections == [[ROBOT_CLASSES[i]] for i in best]
    everything = BitMarModel.extract_robot_selections(out, threshold=0.0)  # every robot passes
    assert all(s == ["No Robot"] or s == list(ROBOT_CLASSES[:-1]) for s in everything)
    analysis = model.get_reasoning_analysis(out)
    assert set(analysis["robot_probabilities"][0]) == set(ROBOT_CLASSES)
    assert len(analysis["reasoning_quality"]) == 3
    assert 0.0 < analysis["mean_reasoning_quality"] < 1.0
    assert analysis["selections"] == model.extract_robot_selections(out)


def test_a_fleet_robot_does_not_overrule_no_robot() -> None:
    """Fleet robots (scored zero-shot, after the head's columns) keep their probability unless the head
    chose "No Robot"; then none claims more than 1 - P(no robot), and "No Robot" stays the selection."""
    from bitmar_model.robots import select_robots, with_fleet_robots

    head = np.array([[0.01, 0.02, 0.01, 0.01, 0.01, 0.9], [0.8, 0.1, 0.1, 0.1, 0.1, 0.01]])
    fleet = np.array([[0.95], [0.95]])
    probs = with_fleet_robots(head, fleet)
    np.testing.assert_allclose(probs[:, 6], [0.1, 0.95])
    np.testing.assert_array_equal(probs[:, :6], head)
    chosen = select_robots(probs)
    assert chosen[0].tolist() == [False] * 5 + [True, False] and chosen[1, [0, 6]].all()


def test_no_robot_is_exclusive_and_decided_against_the_best_robot() -> None:
    out = build().eval()(**make_batch(BitMarConfig.tiny(), batch=5))
    # Columns: Drone, Underwater Robot, Humanoid, Robot with Wheels, Robot with Legs, No Robot.
    probs = torch.tensor(
        [
            [0.9, 0.2, 0.1, 0.1, 0.1, 0.7],  # No Robot passes the threshold but loses to Drone
            [0.6, 0.55, 0.1, 0.1, 0.1, 0.8],  # No Robot beats the best robot: alone
            [0.3, 0.2, 0.1, 0.1, 0.1, 0.4],  # nothing passes; No Robot is the most probable
            [0.7, 0.6, 0.1, 0.1, 0.1, 0.6],  # a tie with a selected robot is not a No Robot
            [0.3, 0.2, 0.1, 0.1, 0.1, 0.1],  # nothing passes: the best robot
        ]
    )
    logits = torch.logit(probs)
    hand_made = dataclasses.replace(out, robot_logits=logits, robot_probs=torch.sigmoid(logits))
    assert BitMarModel.extract_robot_selections(hand_made) == [
        ["Drone"],
        ["No Robot"],
        ["No Robot"],
        ["Drone", "Underwater Robot"],
        ["Drone"],
    ]
    assert BitMarModel.get_reasoning_analysis(hand_made)["selections"][0] == ["Drone"]


# ----------------------------------------------------------------------------- generation


def test_cached_greedy_generation_equals_uncached() -> None:
    model = generation_model()
    batch = make_batch(model.config, batch=2)
    args = (batch["input_ids"], None, batch["vision_features"])
    # 40 new tokens run past the window (32): trimming must not change anything.
    cached = model.generate(*args, max_new_tokens=40, stop_at_eos=False)
    uncached = model.generate(*args, max_new_tokens=40, stop_at_eos=False, use_cache=False)
    assert len(set(cached.new_tokens[0].tolist())) > 3
    assert torch.equal(cached.new_tokens, uncached.new_tokens)
    # ...and equals step-by-step argmax of full forward passes.
    seq = cached.sequences[:, :1]
    for _ in range(40):
        logits = model(*args, decoder_input_ids=seq).logits
        seq = torch.cat((seq, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(seq, cached.sequences)


def test_sliding_window_matches_full_attention_and_bounds_the_cache() -> None:
    windowed = generation_model(sliding_window=12, attention_sink_tokens=2)
    full = BitMarModel(BitMarConfig.tiny(initializer_range=1.0, sliding_window=1024)).eval()
    full.load_state_dict(windowed.state_dict())
    batch = make_batch(windowed.config, batch=2)
    args = (batch["input_ids"], None, batch["vision_features"])
    # prompt (1 BOS) + 11 new tokens = 12 positions: fits in the window.
    a = windowed.generate(*args, max_new_tokens=11, stop_at_eos=False)
    b = full.generate(*args, max_new_tokens=11, stop_at_eos=False)
    assert torch.equal(a.sequences, b.sequences)

    # Beyond the window the cache stays at sinks + window slots per layer.
    cfg = windowed.config
    decoder, embed = windowed.decoder, windowed.embed_tokens
    with torch.no_grad():
        context = windowed._condition(
            batch["input_ids"], torch.ones_like(batch["input_ids"]), None, False, False
        ).decoder_context
        tokens = torch.full((2, 1), cfg.bos_token_id)
        out = decoder(embed(tokens), torch.ones_like(tokens), context, use_cache=True)
        lengths = []
        for step in range(1, 60):
            token = torch.randint(3, cfg.vocab_size, (2, 1))
            out = decoder(
                embed(token),
                torch.ones_like(token),
                position_ids=torch.full((2, 1), step),
                cache=out.cache,
                use_cache=True,
            )
            lengths.append(out.cache.self_attention.length)
            assert all(k.shape[2] == out.cache.self_attention.length for k in out.cache.self_attention.keys)
    assert max(lengths) <= cfg.attention_sink_tokens + cfg.sliding_window
    assert out.cache.self_attention.positions[0, : cfg.attention_sink_tokens].tolist() == [0, 1]
    assert out.cache.self_attention.positions[0, -1] == 59


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_generation_with_padding_equals_per_sample(side: str) -> None:
    model = generation_model()
    cfg = model.config
    g = torch.Generator().manual_seed(5)
    texts = [torch.randint(3, cfg.vocab_size, (n,), generator=g) for n in (3, 7, 5)]
    prompts = [
        torch.cat((torch.tensor([cfg.bos_token_id]), torch.randint(3, cfg.vocab_size, (n,), generator=g)))
        for n in (4, 1, 2)
    ]
    features = [
        (
            torch.randn(1, cfg.vision_feature_dim, generator=g),
            torch.randn(1, cfg.vision_num_patches, cfg.vision_feature_dim, generator=g),
        )
        for _ in texts
    ]

    def pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), cfg.pad_token_id)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
            ids[i, span], mask[i, span] = r, 1
        return ids, mask

    input_ids, attention_mask = pad(texts)
    dec_ids, dec_mask = pad(prompts)
    vision = (torch.cat([f[0] for f in features]), torch.cat([f[1] for f in features]))
    batched = model.generate(
        input_ids, attention_mask, vision, decoder_input_ids=dec_ids, decoder_attention_mask=dec_mask,
        max_new_tokens=12, stop_at_eos=False, return_log_probs=True,
    )
    # GRPO scoring: teacher-forced log-probs of the padded sequences match the sampler's.
    # Not bit-exact: the cached and the teacher-forced paths sum in different orders, and
    # the per-token 8-bit activation rounding can turn that ulp into one quantization step
    # (seen: 3.5e-4 on one of 36 log-probs), far below what moves a PPO ratio clipped at 0.2.
    teacher = model.sequence_log_probs(input_ids, attention_mask, vision, batched.sequences, batched.attention_mask)
    torch.testing.assert_close(teacher[:, dec_ids.shape[1] - 1 :], batched.log_probs, rtol=1e-3, atol=1e-3)
    for i in range(3):
        alone = model.generate(
            texts[i][None], None, features[i], decoder_input_ids=prompts[i][None], max_new_tokens=12, stop_at_eos=False
        )
        assert torch.equal(batched.new_tokens[i], alone.new_tokens[0]), f"row {i} ({side} padding)"


def test_eos_stops_each_row_and_log_probs_match_teacher_forcing() -> None:
    model = generation_model()
    batch = make_batch(model.config, batch=3)
    args = (batch["input_ids"], None, batch["vision_features"])
    free = model.generate(*args, max_new_tokens=8, stop_at_eos=False)
    # Declare the eos a token that one row produces for the first time at position >= 1 and
    # that no other row ever produces: that row stops right after it, the others run on.
    rows = free.new_tokens.tolist()
    row, stop = next(
        (r, k)
        for r, tokens in enumerate(rows)
        for k in range(1, len(tokens))
        if tokens[k] not in tokens[:k] and all(tokens[k] not in other for o, other in enumerate(rows) if o != r)
    )
    model.config.eos_token_id = rows[row][stop]
    out = model.generate(*args, max_new_tokens=8, return_log_probs=True)
    kept = stop + 1
    assert out.new_token_mask[row].tolist() == [1] * kept + [0] * (out.new_tokens.shape[1] - kept)
    assert (out.new_tokens[row, kept:] == model.config.pad_token_id).all()
    assert torch.equal(out.new_tokens[row, :kept], free.new_tokens[row, :kept])
    assert all(out.new_token_mask[o].all() for o in range(len(rows)) if o != row)

    teacher = model.sequence_log_probs(*args, out.sequences, out.attention_mask)
    torch.testing.assert_close(teacher, out.log_probs * out.new_token_mask, rtol=1e-4, atol=1e-4)


def test_sampling_is_reproducible_with_a_generator() -> None:
    model = generation_model()
    batch = make_batch(model.config, batch=2)
    args = (batch["input_ids"], None, batch["vision_features"])
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=0.9, top_k=20, top_p=0.9, stop_at_eos=False)
    a = model.generate(*args, generator=torch.Generator().manual_seed(7), **kwargs)
    b = model.generate(*args, generator=torch.Generator().manual_seed(7), **kwargs)
    c = model.generate(*args, generator=torch.Generator().manual_seed(8), **kwargs)
    assert torch.equal(a.new_tokens, b.new_tokens)
    assert not torch.equal(a.new_tokens, c.new_tokens)


# ----------------------------------------------------------------------------- training


def test_tiny_model_overfits_a_batch() -> None:
    model = build().train()
    batch = make_batch(model.config, batch=8, text_len=8, dec_len=12, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=0.0)
    losses = []
    for _ in range(60):
        loss = model(**batch, labels=batch["decoder_input_ids"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] <= 0.1 * losses[0], losses[::10]


# ----------------------------------------------------------------------------- serialisation and size


def test_save_pretrained_round_trip_is_exact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = build().train()
    batch = make_batch(model.config)
    model(**batch, update_memory=True)  # memory slots are state too
    model.eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    capsys.readouterr()
    loaded = BitMarModel.from_pretrained(tmp_path)
    assert capsys.readouterr().out == ""  # the Hub mixin's print would corrupt `bitmar predict --json`
    assert loaded.config == model.config
    assert not loaded.training
    a, b = model(**batch), loaded(**batch)
    for name in ("logits", "robot_logits", "value", "thought_scores", "memory_readout", "image_embeds", "text_embeds"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(loaded.memory.keys, model.memory.keys)


def test_from_pretrained_refuses_incomplete_checkpoints(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model = build()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors.pop("reasoning.policy_head.bias")
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(RuntimeError, match="reasoning.policy_head.bias"):
        BitMarModel.from_pretrained(tmp_path)


def test_paper_config_size_and_report() -> None:
    model = create_bitmar_model(BitMarConfig.paper())
    n = sum(p.numel() for p in model.parameters())
    assert 12_000_000 <= n <= 16_000_000, n
    report = parameter_report(model)
    assert report["total_parameters"] == n
    assert sum(c["parameters"] for c in report["components"].values()) == n
    assert report["packed_bytes"] < report["fp16_bytes"] < report["fp32_bytes"]
    assert report["components"]["decoder"]["packed_bytes"] < report["components"]["decoder"]["fp32_bytes"] / 10


def test_unquantized_variant_has_no_bitlinear() -> None:
    from bitmar_model.bitlinear import BitLinear

    model = build(quantized=False)
    assert not any(isinstance(m, BitLinear) for m in model.modules())
    assert any(isinstance(m, BitLinear) for m in build().modules())


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("change", "argument"),
    [
        (lambda b: b.update(input_ids=b["input_ids"][0]), "input_ids"),
        (lambda b: b.update(input_ids=b["input_ids"][:0]), "input_ids"),
        (lambda b: b.update(input_ids=b["input_ids"].float()), "input_ids"),
        (lambda b: b.update(input_ids=b["input_ids"] + 10_000), "input_ids"),
        (lambda b: b.update(attention_mask=torch.ones(3, 5)), "attention_mask"),
        (lambda b: b["vision_features"].update(cls=torch.randn(3, 31)), "vision_features"),
        (lambda b: b["vision_features"].update(cls=torch.randn(3, 1, 32)), "vision_features"),
        (lambda b: b["vision_features"].update(patches=torch.randn(3, 5, 32)), "vision_features"),
        (lambda b: b["vision_features"].update(patches=torch.full((3, 4, 32), float("nan"))), "vision_features"),
        (lambda b: b["vision_features"].update(cls=torch.randn(2, 32)), "vision_features"),
        (lambda b: b.update(decoder_input_ids=b["decoder_input_ids"][:2]), "decoder_input_ids"),
        (lambda b: b.update(decoder_attention_mask=torch.ones(3, 2)), "decoder_attention_mask"),
        (lambda b: b.update(labels=torch.ones(3, 2, dtype=torch.long)), "labels"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(change, argument: str) -> None:
    model = build().eval()
    batch = make_batch(model.config)
    change(batch)
    with pytest.raises(ValueError, match=argument):
        model(**batch)


def test_vision_width_error_reports_expected_and_received_shapes() -> None:
    model = build()
    batch = make_batch(model.config)
    batch["vision_features"]["cls"] = torch.randn(3, 768)
    with pytest.raises(ValueError, match=r"vision_features.*\[3, 32\].*\[3, 768\]"):
        model(**batch)


def test_positions_continue_across_padding_in_generation() -> None:
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    assert positions_from_mask(mask)[:, -1].tolist() == [1, 2]


def test_packed_model_reproduces_outputs_and_generation() -> None:
    from bitmar_model.packing import pack_model

    model = generation_model()
    packed = pack_model(model)
    batch = make_batch(model.config)
    a, b = model(**batch), packed(**batch)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.robot_logits, b.robot_logits)
    args = (batch["input_ids"], None, batch["vision_features"])
    assert torch.equal(
        model.generate(*args, max_new_tokens=8).sequences, packed.generate(*args, max_new_tokens=8).sequences
    )
