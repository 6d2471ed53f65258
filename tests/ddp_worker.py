"""A tiny training task for the trainer tests, and the script their subprocesses run.

    python tests/ddp_worker.py slow --checkpoint-dir D --max-steps N --sleep S
        trains slowly (a callback sleeps S seconds per step) so a test can SIGKILL it
        after a checkpoint appears;
    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py ddp --checkpoint-root D --out O
        trains under DDP (gloo on CPU); each rank checkpoints into D/rank-<rank> (so a test
        can see that only rank 0 wrote anything) and writes O/rank-<rank>.json with a digest
        of its final weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from bitmar_model.trainer import Trainer, TrainerConfig


@dataclass
class TinyLMConfig:
    vocab_size: int = 32
    hidden_size: int = 16
    dropout: float = 0.1


class TinyLM(nn.Module):
    """Embedding -> norm -> MLP -> LM head tied to the embedding; dropout makes the result
    depend on the RNG stream, so exact resume needs the RNG state restored."""

    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size)
        self.hidden = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.head.weight = self.embed.weight
        nn.init.normal_(self.embed.weight, std=0.3)  # N(0, 1) logits through the tied head are huge

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(self.embed(tokens))
        return self.head(self.dropout(torch.relu(self.hidden(hidden))) + hidden)


class CountingDataset(Dataset):
    """Sequences t, t+1, t+2, ... (mod vocab) from seeded random starts: learnable fast."""

    def __init__(self, size: int = 40, length: int = 9, vocab_size: int = 32) -> None:
        starts = torch.randint(0, vocab_size, (size, 1), generator=torch.Generator().manual_seed(7))
        self.sequences = (starts + torch.arange(length)) % vocab_size

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.sequences[index]


def lm_loss(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    logits = model(batch[:, :-1])
    targets = batch[:, 1:]
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    accuracy = (logits.argmax(-1) == targets).float().mean().item()
    return loss, {"tokens": targets.numel(), "accuracy": accuracy}


def tiny_config(checkpoint_dir: str | Path | None, **overrides: Any) -> TrainerConfig:
    settings: dict[str, Any] = {
        "learning_rate": 3e-2,
        "weight_decay": 0.01,
        "warmup_steps": 2,
        "max_steps": 10,
        "gradient_accumulation_steps": 2,
        "batch_size": 4,
        "seed": 123,
        "device": "cpu",
        "save_every_n_steps": 4,
        "keep_last_checkpoints": 2,
        "log_every_n_steps": 1,
        "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir is not None else None,
    }
    return TrainerConfig(**(settings | overrides))


def tiny_trainer(checkpoint_dir: str | Path | None, callbacks: tuple = (), **overrides: Any) -> Trainer:
    torch.manual_seed(0)  # identical initial weights for every run
    model = TinyLM(TinyLMConfig())
    return Trainer(model, CountingDataset(), lm_loss, tiny_config(checkpoint_dir, **overrides),
                   callbacks=callbacks)


def weights_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("slow", "ddp"))
    parser.add_argument("--checkpoint-dir")
    parser.add_argument("--checkpoint-root")
    parser.add_argument("--out")
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--sleep", type=float, default=0.0)
    args = parser.parse_args()

    if args.mode == "slow":
        trainer = tiny_trainer(
            args.checkpoint_dir, callbacks=(lambda record: time.sleep(args.sleep),),
            max_steps=args.max_steps,
        )
        trainer.train()
        return

    rank = int(os.environ["RANK"])
    trainer = tiny_trainer(Path(args.checkpoint_root) / f"rank-{rank}", max_steps=args.max_steps)
    result = trainer.train()
    report = {
        "rank": rank,
        "world_size": int(os.environ["WORLD_SIZE"]),
        "final_step": result.final_step,
        "loss": result.history[-1]["train/loss"],
        "digest": weights_digest(trainer.model),
        "checkpoint_path": str(result.checkpoint_path) if result.checkpoint_path else None,
    }
    Path(args.out, f"rank-{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
