"""Zero-shot robots, measured by holding each data robot out of the CV fold models (issue 12, item 1).

For each fold model that `benchmarks/robot_cv.py` left in --workdir (fold<k>_models/grpo_policy) and
each of the five data robots R: R's column of the model's knowledge logits is dropped, and R is
scored as a robot described only by its profile would be at prediction time (`fleet_scores` among
the whole fleet, the zero-shot map `fit_zero_shot` fitted on the fold's validation tasks over the
other four robots). Selection over [the four trained robots' knowledge probabilities, R's zero-shot
probability] is compared on the fold's test tasks and on the user-phrased set with the model's own
trained column for R: R's recall and precision, summed over folds, and top-1 accuracy (fold mean).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/zero_shot_robot.py --workdir DIR [--data-dir ../shared/data]

Prints JSON. The model's selection here is its knowledge classifier alone, which is what the
blended head selects (docs/decisions.md, CV at 371c360: the head adds nothing to it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from robot_selection_ablation import load_tasks, load_user_set  # noqa: E402

from bitmar_model.metrics import top1_accuracy  # noqa: E402
from bitmar_model.modeling import BitMarModel  # noqa: E402
from bitmar_model.robots import ROBOT_CLASSES, ROBOT_INDEX, select_robots  # noqa: E402
from bitmar_pipeline.evaluation.selection_quality import encode_prompts  # noqa: E402
from bitmar_pipeline.evaluation.zero_shot import fit_zero_shot, fleet_scores  # noqa: E402

ROBOTS = [r for r in ROBOT_CLASSES if r != "No Robot"]


def held_out_counts(probs: np.ndarray, gold: np.ndarray, column: int) -> list[float]:
    """[gold, hits, picks] of one robot column, and top-1 accuracy over all robots."""
    chosen = select_robots(probs)[:, column]
    truth = gold[:, column].astype(bool)
    return [float(truth.sum()), float((truth & chosen).sum()), float(chosen.sum()), top1_accuracy(probs, gold)]


@torch.no_grad()
def fold_rows(folder: Path, fold: int, data: Any, user: tuple[list[str], np.ndarray]) -> dict[str, dict[str, list]]:
    model = BitMarModel.from_pretrained(str(folder / "grpo_policy")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    model.knowledge.weight.fill_(1.0)
    validation, test = np.flatnonzero(data.folds == (fold + 1) % 5), np.flatnonzero(data.folds == fold)
    sets = {"test": ([data.texts[i] for i in test], data.gold[test]), "user_set": user}
    rows: dict[str, dict[str, list]] = {}
    for robot in ROBOTS:
        known = {r: data.profiles[r] for r in ROBOTS if r != robot}
        calibration, _ = fit_zero_shot(
            model, tokenizer, [data.texts[i] for i in validation],
            [[ROBOT_CLASSES[j] for j in np.flatnonzero(data.gold[i])] for i in validation], known,
        )
        fleet = {**known, robot: data.profiles[robot]}
        for name, (texts, gold) in sets.items():
            ids, mask = encode_prompts(tokenizer, texts, model.config.max_seq_len)
            trained = torch.sigmoid(model.knowledge(ids, mask)).double().numpy()
            zero_shot = trained.copy()
            zero_shot[:, ROBOT_INDEX[robot]] = calibration(fleet_scores(model, tokenizer, texts, fleet)[:, -1])
            entry = rows.setdefault(robot, {}).setdefault(name, {"zero_shot": [], "trained": []})
            entry["zero_shot"].append(held_out_counts(zero_shot, gold, ROBOT_INDEX[robot]))
            entry["trained"].append(held_out_counts(trained, gold, ROBOT_INDEX[robot]))
    return rows


def summary(per_fold: list[list[float]]) -> dict[str, float]:
    counts = np.array(per_fold)
    gold, hits, picks = counts[:, :3].sum(axis=0)
    return {"gold": int(gold), "recall": round(hits / max(gold, 1), 3), "precision": round(hits / max(picks, 1), 3),
            "top1": round(float(counts[:, 3].mean()), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="robot_cv.py's workdir (fold<k>_models)")
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = parser.parse_args()
    data, user = load_tasks(args.data_dir), load_user_set()
    folds = [k for k in range(5) if (args.workdir / f"fold{k}_models" / "grpo_policy").is_dir()]
    if not folds:
        raise SystemExit(f"{args.workdir}: no fold<k>_models/grpo_policy (run benchmarks/robot_cv.py first)")
    merged: dict[str, dict[str, dict[str, list]]] = {}
    for k in folds:
        for robot, sets in fold_rows(args.workdir / f"fold{k}_models", k, data, user).items():
            for name, variants in sets.items():
                for variant, rows in variants.items():
                    merged.setdefault(robot, {}).setdefault(name, {}).setdefault(variant, []).extend(rows)
    result = {robot: {name: {v: summary(rows) for v, rows in variants.items()} for name, variants in sets.items()}
              for robot, sets in merged.items()}
    print(json.dumps({"folds": folds, "held_out": result}, indent=1))


if __name__ == "__main__":
    main()
