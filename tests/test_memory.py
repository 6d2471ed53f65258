"""Episodic memory: differentiable reads, rule-based writes, LRU, validated save/load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bitmar_model.memory import EpisodicMemory


def filled_memory(num_slots: int = 8, slot_dim: int = 16, query_dim: int = 12) -> EpisodicMemory:
    """A memory whose slot i holds the basis vector e_i (all slots written once)."""
    torch.manual_seed(0)
    memory = EpisodicMemory(num_slots, slot_dim, alpha=0.5, query_dim=query_dim)
    memory.write(torch.eye(slot_dim)[:num_slots])
    return memory


def snapshot(memory: EpisodicMemory) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in memory.state_dict().items()}


def assert_same_state(memory: EpisodicMemory, state: dict[str, torch.Tensor]) -> None:
    assert all(torch.equal(state[k], v) for k, v in memory.state_dict().items())


def test_read_shapes_and_gradient_reaches_query_projection() -> None:
    memory = filled_memory()
    query = torch.randn(5, 12, requires_grad=True)
    out = memory.read(query)
    assert out.readout.shape == (5, 16)
    assert out.attention.shape == (5, 8)
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(5))
    out.readout.pow(2).sum().backward()
    assert memory.query_proj.weight.grad is not None and memory.query_proj.weight.grad.abs().sum() > 0
    assert query.grad is not None
    assert not memory.keys.requires_grad and not memory.values.requires_grad


def test_initial_slots_follow_caller_rng() -> None:
    torch.manual_seed(7)
    a = EpisodicMemory(4, 8)
    torch.manual_seed(7)
    b = EpisodicMemory(4, 8)
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert a.keys.abs().max() < 0.2


def test_fresh_memory_fills_slots_in_order() -> None:
    memory = filled_memory()
    torch.testing.assert_close(memory.keys, torch.eye(16)[:8])
    assert memory.last_used.tolist() == list(range(1, 9))
    assert memory.stats()["active_share"] == 1.0
    assert memory.stats()["diversity"] == pytest.approx(1.0)


def test_write_updates_the_addressed_slot_and_usage() -> None:
    memory = filled_memory()
    before = snapshot(memory)
    episode = torch.eye(16)[3] + 0.3 * torch.eye(16)[10]  # familiar: close to slot 3
    memory.write(episode.unsqueeze(0))
    change = (memory.values - before["values"]).norm(dim=-1)
    assert int(change.argmax()) == 3
    assert change[3] > 10 * change[torch.arange(8) != 3].max()
    assert F.cosine_similarity(memory.values[3], episode, dim=0) > F.cosine_similarity(
        before["values"][3], episode, dim=0
    )
    assert int((memory.usage - before["usage"] * memory.usage_decay).argmax()) == 3
    assert int(memory.last_used[3]) == 9 and int(memory.write_step) == 9


def test_novel_episode_replaces_least_recently_used_slot() -> None:
    memory = filled_memory()
    memory.write(torch.eye(16)[[0, 1]] * 2)  # refresh slots 0 and 1; slot 2 is now the oldest
    novel = torch.eye(16)[12].unsqueeze(0)
    untouched = memory.values[torch.arange(8) != 2].clone()
    memory.write(novel)
    assert torch.equal(memory.keys[2], novel[0]) and torch.equal(memory.values[2], novel[0])
    assert torch.equal(memory.values[torch.arange(8) != 2], untouched)
    assert float(memory.usage[2]) == 1.0
    assert int(memory.last_used[2]) == int(memory.write_step)


def test_separate_values_are_stored() -> None:
    memory = filled_memory()
    memory.write(torch.eye(16)[[13]], values=torch.full((1, 16), 5.0))
    assert torch.equal(memory.keys[0], torch.eye(16)[13])
    assert torch.equal(memory.values[0], torch.full((16,), 5.0))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: m.read(torch.randn(3, 16)), r"query must have shape \[batch, 12\], got \(3, 16\)"),
        (lambda m: m.read(torch.randn(12)), r"query must have shape \[batch, 12\], got \(12,\)"),
        (lambda m: m.write(torch.randn(2, 3, 16)), r"episodes must have shape \[batch, 16\], got \(2, 3, 16\)"),
        (lambda m: m.write(torch.full((1, 16), float("nan"))), "episodes contains NaN"),
        (lambda m: m.read(torch.full((1, 12), float("inf"))), "query contains NaN"),
        (lambda m: m.write(torch.randn(2, 16), values=torch.randn(3, 16)), "values must have the shape"),
    ],
)
def test_invalid_inputs_are_refused(call, match: str) -> None:
    memory = filled_memory()
    before = snapshot(memory)
    with pytest.raises(ValueError, match=match):
        call(memory)
    assert_same_state(memory, before)


def test_save_load_round_trip(tmp_path) -> None:
    memory = filled_memory()
    memory.write(torch.randn(6, 16))
    path = tmp_path / "memory.safetensors"
    memory.save(path, fingerprint="encoder-abc")

    rng_before = torch.random.get_rng_state()
    loaded = EpisodicMemory.load(path, expected_fingerprint="encoder-abc")
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert loaded.config() == memory.config()
    assert_same_state(loaded, snapshot(memory))
    query = torch.randn(2, 12)
    with torch.no_grad():
        assert torch.equal(loaded.read(query).readout, memory.read(query).readout)

    target = EpisodicMemory(8, 16, query_dim=12)
    target.load_into(path)
    assert_same_state(target, snapshot(memory))


def _damaged(path, damage: str) -> None:
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    if damage == "truncate":
        data = data[: len(data) - 17]
    elif damage == "flip_data":
        data[8 + header_len + 5] ^= 0x01
    elif damage == "flip_last":
        data[-1] ^= 0x80
    elif damage == "flip_header":
        data[8 + header_len // 2] ^= 0x01
    elif damage == "empty":
        data = bytearray()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncate", "flip_data", "flip_last", "flip_header", "empty"])
def test_corrupted_file_is_refused_and_target_unchanged(tmp_path, damage: str) -> None:
    path = tmp_path / "memory.safetensors"
    filled_memory().save(path, fingerprint="fp")
    _damaged(path, damage)
    torch.manual_seed(1)
    target = EpisodicMemory(8, 16, query_dim=12)
    before = snapshot(target)
    with pytest.raises(ValueError, match="memory.safetensors"):
        target.load_into(path, expected_fingerprint="fp")
    assert_same_state(target, before)
    with pytest.raises(ValueError, match="memory.safetensors"):
        EpisodicMemory.load(path)


def test_mismatched_fingerprint_and_shapes_are_refused(tmp_path) -> None:
    path = tmp_path / "memory.safetensors"
    filled_memory().save(path, fingerprint="encoder-abc")
    target = EpisodicMemory(8, 16, query_dim=12)
    before = snapshot(target)
    with pytest.raises(ValueError, match="fingerprint 'encoder-abc' does not match the expected 'encoder-xyz'"):
        target.load_into(path, expected_fingerprint="encoder-xyz")
    with pytest.raises(ValueError, match="fingerprint"):
        EpisodicMemory.load(path, expected_fingerprint="encoder-xyz")
    assert_same_state(target, before)

    wrong_slots = EpisodicMemory(16, 16, query_dim=12)
    before = snapshot(wrong_slots)
    with pytest.raises(ValueError, match="num_slots is 8 in the file but 16 in this memory"):
        wrong_slots.load_into(path)
    assert_same_state(wrong_slots, before)
    with pytest.raises(ValueError, match="query_dim is 12 in the file but 16"):
        EpisodicMemory(8, 16).load_into(path)
