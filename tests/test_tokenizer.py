"""BPE tokenizer trained on real COCO captions and robot task texts."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from transformers import AutoTokenizer

from bitmar_pipeline.data.images import is_heldout
from bitmar_pipeline.storage import Storage
from bitmar_pipeline.text.corpus import tokenizer_corpus
from bitmar_pipeline.text.tokenizer import (
    REASONING_TAG_TOKENS,
    SPECIAL_TOKENS,
    load_tokenizer,
    train_bpe_tokenizer,
)

VOCAB_SIZE = 700


@pytest.fixture(scope="module")
def corpus(coco_mini: Path, robot_data: Path) -> list[str]:
    annotations = json.loads(
        (coco_mini / "annotations" / "captions_train2017.json").read_text(encoding="utf-8")
    )
    captions = [a["caption"] for a in annotations["annotations"]]
    tasks = json.loads(
        (robot_data / "multi_robot_selection_dataset.json").read_text(encoding="utf-8")
    )
    robot_texts = [r["input"] for r in tasks] + [s["subtask"] for r in tasks for s in r["subtasks"]]
    return captions + robot_texts


@pytest.fixture(scope="module")
def trained(corpus: list[str], tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("tokenizer")
    return train_bpe_tokenizer(corpus, VOCAB_SIZE, directory), directory


def test_round_trip_is_exact(trained, corpus: list[str]):
    tokenizer, _ = trained
    for text in corpus:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    unseen = "Zebras ☂ über “quoted” high-rise building’s roof."
    assert tokenizer.decode(tokenizer.encode(unseen)) == unseen


def test_tags_and_specials_are_single_tokens(trained):
    tokenizer, _ = trained
    for token in SPECIAL_TOKENS + REASONING_TAG_TOKENS:
        ids = tokenizer.encode(token)
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids) == [token]
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == list(SPECIAL_TOKENS)
    assert (
        tokenizer.pad_token,
        tokenizer.bos_token,
        tokenizer.eos_token,
        tokenizer.unk_token,
    ) == SPECIAL_TOKENS
    text = (
        "<thinking>Water everywhere.</thinking><robot_selection>Underwater Robot</robot_selection>"
    )
    ids = tokenizer.encode(text)
    assert tokenizer.convert_ids_to_tokens(ids[:1]) == ["<thinking>"]
    # Tags are not "special": the reasoning parser still sees them after skip_special_tokens.
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_vocab_size_is_respected(trained):
    tokenizer, _ = trained
    assert len(tokenizer) == VOCAB_SIZE
    assert max(tokenizer.get_vocab().values()) == VOCAB_SIZE - 1
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(["a b"], 100, Path("unused"))


def test_reload_gives_identical_ids(trained, corpus: list[str]):
    tokenizer, directory = trained
    for reloaded in (AutoTokenizer.from_pretrained(directory), load_tokenizer(str(directory))):
        assert reloaded.get_vocab() == tokenizer.get_vocab()
        assert reloaded(corpus[:50])["input_ids"] == tokenizer(corpus[:50])["input_ids"]


def test_training_is_deterministic(trained, corpus: list[str], tmp_path: Path):
    _, directory = trained
    train_bpe_tokenizer(corpus, VOCAB_SIZE, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (directory / name).read_bytes()


def test_load_tokenizer_errors_name_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    missing = str(tmp_path / "no-such-tokenizer")
    with pytest.raises(FileNotFoundError, match="no-such-tokenizer"):
        load_tokenizer(missing)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="bitmar-tests/not-a-real-tokenizer.*HF_HUB_OFFLINE"):
        load_tokenizer("bitmar-tests/not-a-real-tokenizer")


def test_corpus_leaves_out_held_out_captions(tmp_path: Path):
    storage = Storage(tmp_path / ".bitmar")
    hashes = [f"image-{i}" for i in range(40)]
    captions = pd.DataFrame(
        {"image_id": range(40), "caption": [f"caption number {i}" for i in range(40)], "content_hash": hashes}
    )
    storage.write_partition("image_caption_pairs", "s0", captions)
    storage.write_partition(
        "robot_tasks",
        "all",
        pd.DataFrame(
            {
                "task_id": ["t0"],
                "task_text": ["Fly over a roof"],
                "robots": [["Drone"]],
                "instruction": [""],
                "split": ["train"],
            }
        ),
    )
    storage.write_partition(
        "robot_subtasks", "all",
        pd.DataFrame({"task_id": ["t0"], "subtask_text": ["Scan it"], "robot": ["Drone"], "split": ["train"]}),
    )
    held_out = {c for c, h in zip(captions["caption"], hashes, strict=True) if is_heldout(h, 0.25)}
    assert 0 < len(held_out) < 40  # both sides are exercised
    corpus = tokenizer_corpus(storage, ["s0"], heldout_fraction=0.25)
    assert not held_out & set(corpus.texts)
    assert set(captions["caption"]) - held_out <= set(corpus.texts)
    assert corpus.counts["captions"] == 40 - len(held_out)
    assert corpus.counts["held_out_captions_excluded"] == len(held_out)
    # No caption shard (e.g. a Dagster instance where coco_shards were never registered): an error
    # naming the cause, never a caption-less vocabulary.
    for shards, named in (([], "none registered"), (["s9"], "'s9'")):
        with pytest.raises(ValueError, match=f"no captions to train the tokenizer on.*{named}"):
            tokenizer_corpus(storage, shards, heldout_fraction=0.25)
