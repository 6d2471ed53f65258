"""Do the stated reasons read the task? A release's "<robot> fits: <phrase>" against the teacher.

For each task of the user-phrased set and the README examples, the release's head selects robots
and guided decoding writes the text twice, side by side: with each selected robot's reason ranked
by the model's own task knowledge (`profile_reasons`, what `bitmar predict` does) and with the
decoder choosing among the robot's phrases (the behaviour before). Each stated reason is compared
with the phrase the teacher (all-MiniLM-L6-v2 by default) ranks nearest the task among that
robot's capabilities and environments, and with the robot's first phrase (the SFT targets'
fallback). Prints JSON: per set and variant, agreement with the teacher's phrase, the mean cosine
the teacher gives the stated phrase below its best, and a few examples.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/reason_fit.py --model <release folder> [--teacher ID]
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from bitmar_pipeline.config import TrainingConfig
from bitmar_pipeline.evaluation.robustness import README_EXAMPLES_FILE, USER_PHRASED_FILE
from bitmar_pipeline.evaluation.selection_quality import encode_prompts, head_guidance
from bitmar_pipeline.release.inference import Predictor, load_predictor
from bitmar_pipeline.training.knowledge import SentenceTeacher
from bitmar_pipeline.training.reasoning_targets import profile_phrase_forms


@torch.no_grad()
def stated_fits(predictor: Predictor, tasks: Sequence[str], ranked: bool) -> list[dict[str, str]]:
    """Per task, selected robot -> the phrase its "<robot> fits:" clause states."""
    model, tokenizer = predictor.model, predictor.tokenizer
    ids, mask = encode_prompts(tokenizer, list(tasks), model.config.max_seq_len)
    probs = model(ids, mask).robot_probs.float().numpy()
    guidance = head_guidance(
        tokenizer, probs, predictor.calibration, predictor.profiles, tasks, model if ranked else None
    )
    out = model.generate(ids, mask, max_new_tokens=200, logits_processor=guidance)
    tokens = out.new_tokens.masked_fill(out.new_token_mask == 0, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    reasoning = [text.split("<selection_reasoning>")[-1] for text in texts]
    return [dict(re.findall(r"([A-Za-z ]+?) fits: ([^;.\n]+)", text)) for text in reasoning]


def unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def compare(predictor: Predictor, teacher: SentenceTeacher, tasks: Sequence[str]) -> dict[str, Any]:
    fits = {"knowledge": stated_fits(predictor, tasks, True), "decoder": stated_fits(predictor, tasks, False)}
    task_vectors = unit(teacher.encode(list(tasks)))
    result: dict[str, Any] = {"n_tasks": len(tasks)}
    rows: dict[str, list[tuple[bool, float]]] = {"knowledge": [], "decoder": [], "first_phrase": []}
    examples = []
    for i, task in enumerate(tasks):
        for robot, stated in fits["knowledge"][i].items():
            pairs = profile_phrase_forms(predictor.profiles[robot.strip()])
            cosine = unit(teacher.encode([form for _, form in pairs])) @ task_vectors[i]
            phrases = [p for p, _ in pairs]
            best = int(cosine.argmax())
            picks = {"knowledge": stated, "decoder": fits["decoder"][i].get(robot), "first_phrase": phrases[0]}
            for variant, pick in picks.items():
                if pick in phrases:
                    rows[variant].append((pick == phrases[best], float(cosine[best] - cosine[phrases.index(pick)])))
            examples.append({"task": task, "robot": robot.strip(), "teacher": phrases[best], **picks})
    for variant, pairs in rows.items():
        if not pairs:
            result[variant] = {"n": 0}
            continue
        agree, gap = np.array(pairs, dtype=float).reshape(-1, 2).T
        result[variant] = {"n": len(pairs), "agrees_with_teacher": round(float(agree.mean()), 3),
                           "mean_cosine_below_best": round(float(gap.mean()), 3)}
    result["examples"] = examples[:12]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="release folder (or Hub repo id)")
    parser.add_argument("--teacher", default=TrainingConfig().knowledge_teacher, help="sentence encoder (judge)")
    args = parser.parse_args()
    predictor = load_predictor(args.model)
    if not predictor.profiles or not predictor.model.config.knowledge_dim:
        raise SystemExit(f"{args.model}: the release has no fleet profiles or no task knowledge to rank reasons with")
    teacher = SentenceTeacher(args.teacher)
    sets = {"user_set": USER_PHRASED_FILE, "readme_examples": README_EXAMPLES_FILE}
    report = {"teacher": teacher.name}
    for name, path in sets.items():
        tasks = [row["task"] for row in json.loads(path.read_text())["tasks"]]
        report[name] = compare(predictor, teacher, tasks)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
