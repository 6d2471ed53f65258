"""General English for the knowledge context encoder: WordNet 3.0's usage examples.

The encoder learns to read word combinations from the texts the teacher labels for it; the robot
tasks, their subtasks and captions alone leave it reading a user's short task ("Haul crates along
a smooth factory floor") at cosine ~.63 to the teacher. WordNet's ~42k usage examples ("he hauled
the crates onto the truck") are short, varied, everyday sentences under a licence that allows
redistribution; `wordnet/examples.txt.gz` holds them all, one per line, in the order
`read_wordnet_examples` extracts them from the dictionary's data files (see wordnet/SOURCE.md).
"""

from __future__ import annotations

import gzip
import random
import re
from pathlib import Path

from bitmar_model.io import sha256_file

BUNDLED_EXAMPLES = Path(__file__).resolve().parent / "wordnet" / "examples.txt.gz"
# The bundled file as built in wordnet/SOURCE.md; a copy that differs is refused.
BUNDLED_SHA256 = "e008efac3b5b0f0b6c5fafdccea493e048095a5e600a6a516771e0831946cb65"
DATA_FILES = ("data.adj", "data.adv", "data.noun", "data.verb")
_QUOTED = re.compile(r'"([^"]+)"')
MIN_WORDS, MAX_WORDS = 3, 20  # shorter ones are fragments ("the north"), longer ones rare quotations


def examples_of_gloss(gloss: str) -> list[str]:
    """The quoted usage examples of one synset's gloss, 3-20 words each."""
    return [e.strip() for e in _QUOTED.findall(gloss) if MIN_WORDS <= len(e.split()) <= MAX_WORDS]


def read_wordnet_examples(dict_dir: Path) -> list[str]:
    """Every usage example of a WordNet 3.0 `dict/` folder (e.g. Debian's /usr/share/wordnet), in file
    and line order, first occurrence kept. Lines without a gloss (the licence header) are skipped."""
    out: dict[str, None] = {}
    for name in DATA_FILES:
        path = dict_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"WordNet dictionary: {path} is missing (expected {', '.join(DATA_FILES)})")
        for line in path.read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or " | " not in line:
                continue
            out.update(dict.fromkeys(examples_of_gloss(line.split(" | ", 1)[1])))
    return list(out)


def bundled_examples(count: int, seed: int, path: Path = BUNDLED_EXAMPLES) -> list[str]:
    """`count` usage examples drawn without replacement (the same for the same seed) from the bundled
    file, checked against its pinned SHA-256 first; `count` above the file's size is an error."""
    if count == 0:
        return []
    if path == BUNDLED_EXAMPLES and (actual := sha256_file(path)) != BUNDLED_SHA256:
        raise ValueError(f"{path}: SHA-256 {actual}, expected {BUNDLED_SHA256} (see wordnet/SOURCE.md)")
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").splitlines()
    if count > len(lines):
        raise ValueError(f"training.knowledge_context_sentences: {count} asked, {path} holds {len(lines)}")
    return random.Random(seed).sample(lines, count)
