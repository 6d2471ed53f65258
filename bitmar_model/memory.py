"""Fixed-size episodic memory in the style of BitMar / Larimar.

K slots, each a key (where an episode is filed) and a value (what is recalled), both
buffers: they are written by a rule, not learned by gradient descent, and they travel
with the model's state dict.

Reading is differentiable attention: a learned linear projection maps the query into
slot space, then readout = softmax(q . K^T / sqrt(D)) . V. Gradients reach the
projection (and whatever produced the query), never the slots.

Writing happens at training time without gradients, one episode at a time, so a later
episode in a batch sees the slots an earlier one wrote:

  - the episode addresses slots by cosine similarity to the keys;
  - if its best match is at least `novelty_threshold`, every slot moves toward it by its
    address weight w = softmax(cos / WRITE_TEMPERATURE) times alpha:
        k <- (1 - alpha w) k + alpha w e,   v <- (1 - alpha w) v + alpha w value
    so a familiar episode refines the slots that already hold it;
  - otherwise the episode is novel and replaces the least recently used slot outright,
    so new content never smears a well-used slot. Never-written slots count as no
    match and as least recently used, so a fresh memory fills up first.

Usage decays by `usage_decay` per episode and accumulates the address weights (a
replaced slot restarts at 1), so it measures recent demand; `last_used` is the write
step at which a slot was last the best match or replaced, and drives LRU. Reads have no
side effects, so evaluation is deterministic.

`save` writes safetensors with the configuration, a caller-supplied fingerprint (of the
encoder whose representations the memory holds) and a SHA-256 over tensors and
configuration; `load` / `load_into` validate all of it before assigning anything.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from bitmar_model.io import atomic_path, check_stored_tensors

FORMAT_NAME = "bitmar-episodic-memory"
FORMAT_VERSION = 1
INIT_STD = 0.02
# Sharp enough that a familiar episode mostly updates the slots it resembles.
WRITE_TEMPERATURE = 0.1
# Usage above this counts as active: a slot fully written ~230 episodes ago at decay 0.99.
ACTIVE_USAGE = 0.1
_CONFIG_TYPES = {
    "num_slots": int,
    "slot_dim": int,
    "alpha": float,
    "query_dim": int,
    "novelty_threshold": float,
    "usage_decay": float,
}


@dataclass
class MemoryReadout:
    readout: torch.Tensor  # [B, slot_dim]
    attention: torch.Tensor  # [B, num_slots]


def _check_batch(name: str, x: torch.Tensor, width: int) -> None:
    if x.dim() != 2 or x.shape[1] != width:
        raise ValueError(f"{name} must have shape [batch, {width}], got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def _checksum(tensors: dict[str, torch.Tensor], config: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for key in sorted(config):
        digest.update(f"{key}={config[key]}\n".encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class EpisodicMemory(nn.Module):
    def __init__(
        self,
        num_slots: int = 32,
        slot_dim: int = 128,
        alpha: float = 0.1,
        query_dim: int | None = None,
        *,
        novelty_threshold: float = 0.3,
        usage_decay: float = 0.99,
    ) -> None:
        super().__init__()
        query_dim = slot_dim if query_dim is None else query_dim
        if min(num_slots, slot_dim, query_dim) < 1:
            raise ValueError(
                f"num_slots, slot_dim and query_dim must be positive, got {num_slots}, {slot_dim}, {query_dim}"
            )
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if not -1.0 <= novelty_threshold <= 1.0:
            raise ValueError(f"novelty_threshold is a cosine and must be in [-1, 1], got {novelty_threshold}")
        if not 0.0 < usage_decay <= 1.0:
            raise ValueError(f"usage_decay must be in (0, 1], got {usage_decay}")
        self.num_slots = num_slots
        self.slot_dim = slot_dim
        self.query_dim = query_dim
        self.alpha = alpha
        self.novelty_threshold = novelty_threshold
        self.usage_decay = usage_decay
        self.query_proj = nn.Linear(query_dim, slot_dim)
        # Small random slots rather than zeros: reads get non-uniform attention from the
        # first step, and no key has the zero norm that cosine addressing divides by.
        self.register_buffer("keys", torch.randn(num_slots, slot_dim) * INIT_STD)
        self.register_buffer("values", torch.randn(num_slots, slot_dim) * INIT_STD)
        self.register_buffer("usage", torch.zeros(num_slots))
        self.register_buffer("last_used", torch.zeros(num_slots, dtype=torch.long))
        self.register_buffer("write_step", torch.zeros((), dtype=torch.long))

    def config(self) -> dict[str, str]:
        """Constructor arguments as strings (the safetensors metadata form)."""
        return {
            "num_slots": str(self.num_slots),
            "slot_dim": str(self.slot_dim),
            "query_dim": str(self.query_dim),
            "alpha": repr(self.alpha),
            "novelty_threshold": repr(self.novelty_threshold),
            "usage_decay": repr(self.usage_decay),
        }

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config().items())

    def read(self, query: torch.Tensor) -> MemoryReadout:
        """Attend over the slots with a projected query [B, query_dim]."""
        _check_batch("query", query, self.query_dim)
        q = self.query_proj(query)
        scores = q @ self.keys.to(q.dtype).T / math.sqrt(self.slot_dim)
        attention = scores.softmax(dim=-1)
        return MemoryReadout(readout=attention @ self.values.to(q.dtype), attention=attention)

    @torch.no_grad()
    def write(self, episodes: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """File episodes [B, slot_dim]; `values` (same shape) defaults to the episodes (auto-associative)."""
        _check_batch("episodes", episodes, self.slot_dim)
        if values is None:
            values = episodes
        elif values.shape != episodes.shape:
            raise ValueError(
                f"values must have the shape of episodes {tuple(episodes.shape)}, got {tuple(values.shape)}"
            )
        else:
            _check_batch("values", values, self.slot_dim)

        # Work in fp32 on copies: slow moving averages are lost in bf16, and the buffers
        # change only once the whole batch is filed.
        keys, slot_values = self.keys.float(), self.values.float()
        usage, last_used = self.usage.float(), self.last_used.clone()
        step = int(self.write_step)
        # Branches are taken with torch.where, not Python ifs, so writing a batch on a
        # GPU never waits for the device.
        for episode, value in zip(episodes.float(), values.float(), strict=True):
            step += 1
            similarity = F.cosine_similarity(keys, episode.unsqueeze(0), dim=-1)
            # A never-written slot holds only its random init: it must not pass as a
            # match, so a fresh memory fills with real episodes before it averages.
            similarity = similarity.masked_fill(last_used == 0, -1.0)
            best_similarity, best = similarity.max(dim=0)
            novel = best_similarity < self.novelty_threshold
            lru = last_used.argmin()
            replace = F.one_hot(lru, self.num_slots).float() * novel
            address = (similarity / WRITE_TEMPERATURE).softmax(dim=0)
            rate = torch.where(novel, replace, self.alpha * address).unsqueeze(-1)
            keys = (1 - rate) * keys + rate * episode
            slot_values = (1 - rate) * slot_values + rate * value
            usage = usage * self.usage_decay * (1 - replace) + torch.where(novel, replace, address)
            last_used[torch.where(novel, lru, best)] = step
        # Rebind the buffers instead of copy_(): a read earlier in the same training step
        # saved the old tensors for backward, and an in-place update would invalidate it.
        self.keys = keys.to(self.keys.dtype)
        self.values = slot_values.to(self.values.dtype)
        self.usage = usage.to(self.usage.dtype)
        self.last_used = last_used
        self.write_step = torch.full_like(self.write_step, step)

    @torch.no_grad()
    def stats(self) -> dict[str, float]:
        """Slot usage, share of active slots, and key diversity (1 - mean pairwise cosine)."""
        usage = self.usage.float()
        keys = F.normalize(self.keys.float(), dim=-1)
        k = self.num_slots
        cosine = keys @ keys.T
        mean_cosine = float((cosine.sum() - cosine.diagonal().sum()) / (k * (k - 1))) if k > 1 else 0.0
        return {
            "num_slots": float(k),
            "writes": float(self.write_step),
            "mean_usage": float(usage.mean()),
            "max_usage": float(usage.max()),
            "active_share": float((usage > ACTIVE_USAGE).float().mean()),
            "diversity": 1.0 - mean_cosine,
        }

    def save(self, path: str | Path, fingerprint: str) -> None:
        """Write the memory (slots, counters and query projection) atomically to `path`."""
        path = Path(path)
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        config = self.config() | {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "fingerprint": str(fingerprint),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=config | {"checksum": _checksum(tensors, config)})

    @classmethod
    def load(cls, path: str | Path, expected_fingerprint: str | None = None) -> EpisodicMemory:
        """A memory rebuilt from `path`, with the configuration it was saved with."""
        config, tensors = _read_validated(Path(path), expected_fingerprint)
        # Building the module draws random slots; keep the caller's RNG stream untouched.
        with torch.random.fork_rng(devices=[]):
            try:
                memory = cls(**config)
            except ValueError as exc:
                raise ValueError(f"{path}: invalid configuration in metadata ({exc})") from exc
        memory._assign(Path(path), tensors)
        return memory

    def load_into(self, path: str | Path, expected_fingerprint: str | None = None) -> None:
        """Replace this memory's state with the file's; shapes must match (hyperparameters stay)."""
        path = Path(path)
        config, tensors = _read_validated(path, expected_fingerprint)
        for field in ("num_slots", "slot_dim", "query_dim"):
            if config[field] != getattr(self, field):
                raise ValueError(
                    f"{path}: {field} is {config[field]} in the file but {getattr(self, field)} in this memory"
                )
        self._assign(path, tensors)

    def _assign(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        # Check every key and shape first, so a bad file leaves the memory untouched.
        check_stored_tensors(path, self.state_dict(), tensors, "tensor")
        self.load_state_dict(tensors)


def _read_validated(
    path: Path, expected_fingerprint: str | None
) -> tuple[dict[str, int | float], dict[str, torch.Tensor]]:
    """The file's constructor arguments and tensors, after format, checksum and fingerprint checks."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for truncated or malformed files
        raise ValueError(f"{path}: not a readable episodic memory file ({exc})") from exc
    checksum = metadata.pop("checksum", None)
    if metadata.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: not a {FORMAT_NAME} file (format={metadata.get('format')!r})")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise ValueError(
            f"{path}: format_version {metadata.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
        )
    if checksum != _checksum(tensors, metadata):
        raise ValueError(f"{path}: checksum mismatch; the file is corrupt or was modified")
    if expected_fingerprint is not None and metadata.get("fingerprint") != expected_fingerprint:
        raise ValueError(
            f"{path}: fingerprint {metadata.get('fingerprint')!r} does not match the expected {expected_fingerprint!r}"
        )
    try:
        config = {field: kind(metadata[field]) for field, kind in _CONFIG_TYPES.items()}
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: malformed configuration metadata ({exc!r})") from exc
    return config, tensors
