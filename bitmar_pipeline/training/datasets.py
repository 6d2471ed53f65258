"""Training tensors built from storage: caption pairs joined with cached features, and the
robot-reasoning SFT examples. Everything is tokenised once, up front; batches only pad."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from bitmar_model.config import BitMarConfig
from bitmar_model.modeling import IGNORE_INDEX
from bitmar_model.robots import NUM_ROBOT_CLASSES, ROBOT_INDEX
from bitmar_pipeline.config import PipelineConfig
from bitmar_pipeline.data.images import is_heldout
from bitmar_pipeline.features.extraction import load_features
from bitmar_pipeline.storage import Storage
from bitmar_pipeline.text.corpus import TOKENIZER_DIR
from bitmar_pipeline.training.reasoning_targets import SftExample

# The captioning pass encodes this instead of the caption (see bitmar_model.losses).
CAPTION_PROMPT = "Describe the image."


class TrainingDataError(ValueError):
    """Training cannot start on this data; the message says what is wrong and where."""


def load_pipeline_tokenizer(storage: Storage) -> PreTrainedTokenizerBase:
    path = storage.path(TOKENIZER_DIR)
    if not (path / "tokenizer.json").is_file():
        raise TrainingDataError(f"no tokenizer at {path}: materialize text_tokenizer first")
    return AutoTokenizer.from_pretrained(path)


def build_model_config(
    config: PipelineConfig, tokenizer: PreTrainedTokenizerBase, feature_dim: int, num_patches: int
) -> BitMarConfig:
    """BitMarConfig from the profile's `model` section, the tokenizer and the feature cache."""
    return BitMarConfig(
        **config.model.model_dump(),
        vocab_size=len(tokenizer),
        vision_feature_dim=feature_dim,
        vision_num_patches=num_patches,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def check_compatible(
    model_config: BitMarConfig,
    tokenizer: PreTrainedTokenizerBase,
    feature_dim: int | None = None,
    num_patches: int | None = None,
) -> None:
    """Refuse, before any step, an upstream model that does not match the tokenizer or features."""
    if model_config.vocab_size != len(tokenizer):
        raise TrainingDataError(
            f"tokenizer/model vocabulary mismatch: the model has vocab_size={model_config.vocab_size}, "
            f"the tokenizer has {len(tokenizer)} tokens; re-materialize the stages after text_tokenizer"
        )
    if feature_dim is not None and (model_config.vision_feature_dim, model_config.vision_num_patches) != (
        feature_dim,
        num_patches,
    ):
        raise TrainingDataError(
            f"vision features have width {feature_dim} x {num_patches} patches but the model expects "
            f"{model_config.vision_feature_dim} x {model_config.vision_num_patches}; "
            "re-run multimodal_pretrain for this encoder"
        )


def _encode(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_len: int, add_bos_eos: bool
) -> list[list[int]]:
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    if add_bos_eos:
        return [[tokenizer.bos_token_id, *row[: max_len - 2], tokenizer.eos_token_id] for row in ids]
    return [row[:max_len] for row in ids]


def _pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def _decoder_batch(rows: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    ids, mask = _pad(rows, pad_id)
    return {"decoder_ids": ids, "decoder_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)}


@dataclass
class CaptionSet(torch.utils.data.Dataset):
    image_ids: np.ndarray  # one row per caption
    feature_rows: np.ndarray  # index into cls/patches
    cls: torch.Tensor
    patches: torch.Tensor
    caption_ids: list[list[int]]
    target_ids: list[list[int]]
    prompt_ids: list[int]
    pad_id: int

    def __len__(self) -> int:
        return len(self.caption_ids)

    def __getitem__(self, index: int) -> int:
        return index

    def cell_word_batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(patches, caption_ids, caption_mask): what the cell reader's warm-up reads, without the rest."""
        captions, caption_mask = _pad([self.caption_ids[i] for i in indices], self.pad_id)
        return self.patches[self.feature_rows[list(indices)]], captions, caption_mask

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = self.feature_rows[list(indices)]
        captions, caption_mask = _pad([self.caption_ids[i] for i in indices], self.pad_id)
        prompt, prompt_mask = _pad([self.prompt_ids] * len(indices), self.pad_id)
        return {
            "image_ids": torch.as_tensor(self.image_ids[list(indices)]),
            "cls": self.cls[rows],
            "patches": self.patches[rows],
            "caption_ids": captions,
            "caption_mask": caption_mask,
            "prompt_ids": prompt,
            "prompt_mask": prompt_mask,
            **_decoder_batch([self.target_ids[i] for i in indices], self.pad_id),
        }


@dataclass
class CaptionData:
    train: CaptionSet
    heldout: CaptionSet
    feature_dim: int
    num_patches: int
    images: int
    image_hashes: tuple[str, ...] = ()  # content hash of each image key (CaptionSet.image_ids)


def load_caption_data(
    storage: Storage,
    shards: Sequence[str],
    fingerprint: str,
    tokenizer: PreTrainedTokenizerBase,
    max_len: int,
    heldout_fraction: float,
) -> CaptionData:
    """Pairs of the given shards joined by image content hash with this encoder's features."""
    missing = [s for s in shards if not storage.has_partition("image_caption_pairs", s)]
    if not shards or missing:
        raise TrainingDataError(
            f"image_caption_pairs missing for shards {missing or '(none registered)'}: "
            "materialize the data stages first"
        )
    pairs = storage.read_table(
        "image_caption_pairs", columns=["image_id", "caption", "content_hash"], partitions=shards
    )
    index, cls, patches = load_features(storage, fingerprint, list(shards))
    row_of_hash = pd.Series(np.arange(len(index)), index=index["content_hash"]).groupby(level=0).first()
    pairs = pairs[pairs["content_hash"].isin(row_of_hash.index)].reset_index(drop=True)
    if pairs.empty:
        raise TrainingDataError(
            "no caption pair has vision features for the current encoder: materialize vision_features"
        )
    feature_rows = row_of_hash.loc[pairs["content_hash"]].to_numpy()
    heldout = np.array([is_heldout(h, heldout_fraction) for h in pairs["content_hash"]])
    captions = _encode(tokenizer, pairs["caption"], max_len, add_bos_eos=False)
    targets = _encode(tokenizer, pairs["caption"], max_len, add_bos_eos=True)
    prompt = _encode(tokenizer, [CAPTION_PROMPT], max_len, add_bos_eos=False)[0]
    cls_t, patches_t = torch.from_numpy(cls), torch.from_numpy(patches)
    # Image ids can repeat across COCO splits; the content hash cannot, so it identifies images.
    image_keys, image_hashes = pd.factorize(pairs["content_hash"])

    def subset(mask: np.ndarray) -> CaptionSet:
        chosen = np.flatnonzero(mask)
        return CaptionSet(
            image_keys[chosen], feature_rows[chosen], cls_t, patches_t,
            [captions[i] for i in chosen], [targets[i] for i in chosen], prompt, tokenizer.pad_token_id,
        )

    if heldout.all() or not heldout.any():
        raise TrainingDataError(
            f"{len(pairs)} pairs cannot be split into train and held-out with "
            f"training.heldout_fraction={heldout_fraction}"
        )
    return CaptionData(
        subset(~heldout), subset(heldout), cls.shape[1], patches.shape[1], len(row_of_hash), tuple(image_hashes)
    )


@dataclass
class SftSet(torch.utils.data.Dataset):
    prompt_ids: list[list[int]]
    target_ids: list[list[int]]
    robots: torch.Tensor  # [N, 6] multi-hot
    pad_id: int

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def __getitem__(self, index: int) -> int:
        return index

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        prompt, prompt_mask = _pad([self.prompt_ids[i] for i in indices], self.pad_id)
        return {
            "prompt_ids": prompt,
            "prompt_mask": prompt_mask,
            "robots": self.robots[list(indices)],
            **_decoder_batch([self.target_ids[i] for i in indices], self.pad_id),
        }


@dataclass
class RehearsalSftSet(torch.utils.data.Dataset):
    """SFT examples; every batch also carries a few pretraining caption pairs (`rehearsal_*`
    keys), so reasoning SFT keeps training captioning instead of overwriting it."""

    sft: SftSet
    captions: CaptionSet
    captions_per_batch: int

    def __len__(self) -> int:
        return len(self.sft)

    def __getitem__(self, index: int) -> int:
        return index

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        # Drawn from the batch's own indices: a resumed run replays the same data order and
        # so the same caption pairs, and different batches get different pairs.
        rng = np.random.default_rng([int(i) for i in indices])
        rows = rng.choice(len(self.captions), size=min(self.captions_per_batch, len(self.captions)), replace=False)
        captions = self.captions.collate(rows.tolist())
        rehearsal = {
            k: captions[k]
            for k in ("cls", "patches", "prompt_ids", "prompt_mask", "decoder_ids", "decoder_mask", "labels")
        }
        return {**self.sft.collate(indices), **{f"rehearsal_{k}": v for k, v in rehearsal.items()}}


def robot_multi_hot(robot_sets: Sequence[Sequence[str]]) -> torch.Tensor:
    out = torch.zeros(len(robot_sets), NUM_ROBOT_CLASSES)
    for i, robots in enumerate(robot_sets):
        for robot in robots:
            out[i, ROBOT_INDEX[robot]] = 1.0
    return out


def build_sft_set(
    examples: Sequence[SftExample], tokenizer: PreTrainedTokenizerBase, max_prompt_len: int, max_target_len: int
) -> SftSet:
    if not examples:
        raise TrainingDataError("the robot training split is empty: check data.robot and robot_selection_tasks")
    labels = {tuple(sorted(e.robots)) for e in examples if e.kind == "task"}
    if len(labels) < 2:
        raise TrainingDataError(
            f"the robot training split has a single label set {sorted(labels)}: a selection head cannot learn from it"
        )
    return SftSet(
        _encode(tokenizer, [e.prompt for e in examples], max_prompt_len, add_bos_eos=False),
        _encode(tokenizer, [e.target for e in examples], max_target_len, add_bos_eos=True),
        robot_multi_hot([e.robots for e in examples]),
        tokenizer.pad_token_id,
    )


def data_files_fingerprint(paths: Sequence[Path]) -> str:
    """Fingerprint of a stage's input files: names plus the content of small files (tokenizer,
    robot tables) or the size of big ones (feature shards); changes whenever the data changes.
    Not a file checksum: that is bitmar_model.io.sha256_file."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        digest.update(path.name.encode())
        if path.stat().st_size < 50_000_000:
            digest.update(path.read_bytes())
        else:
            digest.update(str(path.stat().st_size).encode())
    return digest.hexdigest()[:16]
