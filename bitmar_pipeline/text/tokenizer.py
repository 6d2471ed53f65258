"""The text tokenizer: a byte-level BPE trained on captions and robot texts, or a pretrained one.

The reasoning tags are added tokens (single ids, never split by BPE) but deliberately not
*special* tokens: `decode(..., skip_special_tokens=True)` drops special tokens, and the
reasoning parser needs the tags to survive decoding. No <bos>/<eos> are inserted
automatically; the training code adds them where a sequence needs them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from bitmar_model.reasoning_format import REASONING_TAGS

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
# The opening and closing token of every reasoning tag (bitmar_model.reasoning_format names them).
REASONING_TAG_TOKENS: tuple[str, ...] = tuple(
    tag for name in REASONING_TAGS for tag in (f"<{name}>", f"</{name}>")
)
# Byte-level BPE needs all 256 byte symbols in its base vocabulary.
_BYTE_ALPHABET_SIZE = len(pre_tokenizers.ByteLevel.alphabet())
_TRUE_VALUES = {"1", "true", "yes", "on"}


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, output_dir: Path, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE and save it so `AutoTokenizer.from_pretrained(output_dir)` loads it.

    `vocab_size` bounds the whole vocabulary, special tokens and reasoning tags included.
    The result is deterministic for the same texts (in the same order) and settings.
    """
    minimum = len(SPECIAL_TOKENS) + len(REASONING_TAG_TOKENS) + _BYTE_ALPHABET_SIZE
    if vocab_size <= minimum:
        raise ValueError(
            f"vocab_size must exceed {minimum} (specials, tags and the byte alphabet), got {vocab_size}"
        )
    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        # The tags are appended after training, so leave room for them in the budget.
        vocab_size=vocab_size - len(REASONING_TAG_TOKENS),
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.add_tokens(
        [AddedToken(tag, special=False, normalized=False) for tag in REASONING_TAG_TOKENS]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        # Byte-level BPE decodes exactly; the legacy clean-up would alter spaces before punctuation.
        clean_up_tokenization_spaces=False,
    )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(output_dir)
    return fast


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerFast:
    """Load a fast tokenizer from a local directory or a Hugging Face Hub id.

    A path-like name that does not exist raises FileNotFoundError; a Hub id needs network
    unless it is cached, and with HF_HUB_OFFLINE set only the local cache is consulted.
    Nothing falls back to another tokenizer.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        tokenizer = AutoTokenizer.from_pretrained(path)
    elif _looks_like_path(name_or_path):
        raise FileNotFoundError(f"tokenizer directory {name_or_path!r} does not exist")
    else:
        # Read at call time: huggingface_hub reads HF_HUB_OFFLINE only once, at import.
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE_VALUES
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=offline)
        except OSError as error:
            where = (
                "the local Hugging Face cache (HF_HUB_OFFLINE is set)"
                if offline
                else "the Hugging Face Hub"
            )
            raise OSError(
                f"tokenizer {name_or_path!r} is neither a local directory nor loadable from {where}: {error}"
            ) from error
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise TypeError(f"tokenizer {name_or_path!r} has no fast (tokenizers) implementation")
    return tokenizer


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else is meant as a filesystem path.
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name
