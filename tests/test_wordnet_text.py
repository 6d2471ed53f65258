"""The bundled WordNet usage examples: extraction from the dictionary's own line format, the pinned
file, deterministic draws, and errors that name what is wrong."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import pytest

from bitmar_pipeline.data.wordnet_text import (
    BUNDLED_EXAMPLES,
    BUNDLED_SHA256,
    DATA_FILES,
    bundled_examples,
    examples_of_gloss,
    read_wordnet_examples,
)

# Real lines of WordNet 3.0's data.verb (the licence header's lines start with two spaces).
LICENSE_LINE = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
HAUL = '01454828 35 v 04 haul 1 hale 0 cart 0 drag 1 009 @ 01448118 v 0000 + 00114871 n 0401 + 10492202 n 0403 + 04476116 n 0402 + 00115036 n 0102 + 10162507 n 0101 + 00115036 n 0103 + 01105909 n 0101 ~ 01455113 v 0000 02 + 08 00 + 21 00 | draw slowly or heavily; "haul stones"; "haul nets"  \n'  # noqa: E501
TRANSPORT = '01452273 35 v 01 haul 0 007 @ 01449992 v 0000 + 00115036 n 0102 + 10162507 n 0101 + 00115036 n 0103 + 01105909 n 0101 ~ 01602114 v 0000 ~ 01602209 v 0000 04 + 08 00 + 09 00 + 20 00 + 21 00 | transport in a vehicle; "haul stones from the quarry in a truck"; "haul vegetables to the market"  \n'  # noqa: E501
BREATHE = '00001740 29 v 04 breathe 0 take_a_breath 0 respire 0 suspire 3 021 * 00005041 v 0000 * 00004227 v 0000 + 03110323 a 0301 + 00831191 n 0303 + 04080833 n 0301 + 04250850 n 0105 + 00831191 n 0101 ^ 00004227 v 0103 ^ 00005041 v 0103 $ 00002325 v 0000 $ 00002573 v 0000 ~ 00002573 v 0000 ~ 00002724 v 0000 ~ 00002942 v 0000 ~ 00003826 v 0000 ~ 00004032 v 0000 ~ 00004227 v 0000 ~ 00005041 v 0000 ~ 00006697 v 0000 ~ 00007328 v 0000 ~ 00017031 v 0000 02 + 02 00 + 08 00 | draw air into, and expel out of, the lungs; "I can breathe better when the air is clean"; "The patient is respiring"  \n'  # noqa: E501


def test_examples_of_a_gloss_are_its_quoted_phrases_of_three_to_twenty_words() -> None:
    assert examples_of_gloss(HAUL.split(" | ", 1)[1]) == []  # "haul stones", "haul nets": 2 words each
    assert examples_of_gloss(TRANSPORT.split(" | ", 1)[1]) == [
        "haul stones from the quarry in a truck", "haul vegetables to the market"
    ]
    assert examples_of_gloss('a sense; "' + " ".join(["word"] * 21) + '"') == []


def test_read_wordnet_examples_skips_the_licence_and_keeps_first_occurrences(tmp_path: Path) -> None:
    for name in DATA_FILES:
        (tmp_path / name).write_text(LICENSE_LINE, encoding="latin-1")
    (tmp_path / "data.verb").write_text(LICENSE_LINE + HAUL + TRANSPORT + BREATHE + TRANSPORT, encoding="latin-1")
    assert read_wordnet_examples(tmp_path) == [
        "haul stones from the quarry in a truck",
        "haul vegetables to the market",
        "I can breathe better when the air is clean",
        "The patient is respiring",
    ]
    (tmp_path / "data.adv").unlink()
    with pytest.raises(FileNotFoundError, match="data.adv is missing"):
        read_wordnet_examples(tmp_path)


def test_the_bundled_file_is_the_pinned_one_with_its_licence() -> None:
    assert hashlib.sha256(BUNDLED_EXAMPLES.read_bytes()).hexdigest() == BUNDLED_SHA256
    lines = gzip.decompress(BUNDLED_EXAMPLES.read_bytes()).decode("utf-8").splitlines()
    assert len(lines) == len(set(lines)) == 42369
    assert all(3 <= len(line.split()) <= 20 for line in lines)
    licence = (BUNDLED_EXAMPLES.parent / "LICENSE").read_text()
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in licence


def test_bundled_draws_are_deterministic_and_checked(tmp_path: Path) -> None:
    first = bundled_examples(50, seed=1)
    assert first == bundled_examples(50, seed=1) and len(set(first)) == 50
    assert first != bundled_examples(50, seed=2)
    assert bundled_examples(0, seed=1) == []
    with pytest.raises(ValueError, match="knowledge_context_sentences: 50000 asked.*holds 42369"):
        bundled_examples(50_000, seed=1)
    tampered = tmp_path / "examples.txt.gz"
    tampered.write_bytes(gzip.compress(b"one two three\n"))
    assert bundled_examples(1, seed=0, path=tampered) == ["one two three"]  # another file: not the pin


def test_a_changed_bundle_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import bitmar_pipeline.data.wordnet_text as wordnet_text

    monkeypatch.setattr(wordnet_text, "BUNDLED_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="examples.txt.gz: SHA-256 e008efac.*expected 0000"):
        wordnet_text.bundled_examples(5, seed=0)
