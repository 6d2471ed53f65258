"""text_tokenizer: the training texts (captions + robot texts) and the tokenizer built from them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from bitmar_pipeline.config import TokenizerConfig
from bitmar_pipeline.data.images import is_heldout
from bitmar_pipeline.data.robot_tasks import parse_instruction_capabilities
from bitmar_pipeline.storage import Storage
from bitmar_pipeline.text.tokenizer import load_tokenizer, train_bpe_tokenizer
from bitmar_pipeline.training.reasoning_targets import build_sft_examples

TOKENIZER_DIR = "tokenizer"


@dataclass
class TokenizerCorpus:
    texts: list[str]
    counts: dict[str, int]


def tokenizer_corpus(storage: Storage, shards: Iterable[str], heldout_fraction: float) -> TokenizerCorpus:
    """Captions of the given shards' training images (not the images held out for
    perplexity, BLEU, CIDEr and retrieval: `is_heldout` with training.heldout_fraction) plus
    the robot texts of the training split only, so no evaluation wording shapes the vocabulary. The training split's
    reasoning targets
    are included: the capability words they repeat appear once in the instruction text, and
    below min_frequency they would be spelled out byte by byte in every target."""
    shards = list(shards)
    available = [s for s in shards if storage.has_partition("image_caption_pairs", s)]
    if not available:
        # A vocabulary without captions spells them out byte by byte: never train one silently.
        raise ValueError(
            "no captions to train the tokenizer on: image_caption_pairs has none of the coco_shards "
            f"partitions {shards or '(none registered in this Dagster instance)'}; materialize coco_raw and "
            "image_caption_pairs first (in the same instance)"
        )
    pairs = storage.read_table("image_caption_pairs", columns=["caption", "content_hash"], partitions=available)
    heldout = [is_heldout(h, heldout_fraction) for h in pairs["content_hash"]]
    captions = [c for c, held in zip(pairs["caption"], heldout, strict=True) if not held]
    tasks = storage.read_partition("robot_tasks", "all")
    subtasks = storage.read_partition("robot_subtasks", "all")
    train_tasks = tasks[tasks["split"] == "train"]
    task_texts = train_tasks["task_text"].tolist()
    # The capability block is shared by every row; once is enough to learn its words.
    instructions = sorted(set(train_tasks["instruction"]))
    subtask_texts = subtasks.loc[subtasks["split"] == "train", "subtask_text"].tolist()
    capabilities = parse_instruction_capabilities(instructions[0]) if instructions else {}
    targets = (
        [e.target for e in build_sft_examples(tasks, subtasks, capabilities, split="train")] if capabilities else []
    )
    texts = captions + task_texts + instructions + subtask_texts + targets
    if not texts:
        raise ValueError(
            "no texts to train the tokenizer on: materialize image_caption_pairs and robot_selection_tasks first"
        )
    return TokenizerCorpus(
        texts,
        {
            "captions": len(captions),
            "held_out_captions_excluded": sum(heldout),
            "robot_tasks": len(task_texts),
            "instructions": len(instructions),
            "subtasks": len(subtask_texts),
            "reasoning_targets": len(targets),
        },
    )


def build_tokenizer(config: TokenizerConfig, texts: list[str], output_dir: Path) -> PreTrainedTokenizerFast:
    if config.source == "pretrained":
        tokenizer = load_tokenizer(config.name_or_path)
        tokenizer.save_pretrained(output_dir)
        return tokenizer
    return train_bpe_tokenizer(texts, config.vocab_size, output_dir, config.min_frequency)
