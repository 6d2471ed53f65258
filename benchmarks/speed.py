"""Speed of two small steps the tests used to time with wall-clock asserts (prints JSON):
generating the 1,000-image sample COCO set, and a bootstrap interval over 5,000 items. Both
were expected to take under 5 s on a laptop CPU; timings belong here, not in pass/fail tests.

    python benchmarks/speed.py
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bitmar_model.metrics import bootstrap_ci, sample_f1
from bitmar_pipeline.data.coco_sample import generate_sample_coco

EXPECTED_SECONDS = 5.0


def _seconds(step: Callable[[], object]) -> float:
    start = time.perf_counter()
    step()
    return round(time.perf_counter() - start, 3)


def _bootstrap_5000() -> None:
    rng = np.random.default_rng(0)
    probs = rng.random((5000, 6))
    gold = rng.random((5000, 6)) < 0.3
    bootstrap_ci(sample_f1, probs > 0.5, gold)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sample = _seconds(lambda: generate_sample_coco(Path(tmp), num_images=1000))
    bootstrap = _seconds(_bootstrap_5000)
    results = {"sample_coco_1000_images_s": sample, "bootstrap_ci_5000_items_s": bootstrap}
    print(json.dumps({"machine": platform.platform(), "expected_under_s": EXPECTED_SECONDS, **results}, indent=2))


if __name__ == "__main__":
    main()
