"""Offline stand-in for the public robot selection datasets (the sample profile's source).

Writes a single-robot and a multi-robot JSON file in the real format and with the real
instruction text. Each task is built from environment templates, and the environment
words decide the correct robots (underwater -> Underwater Robot, aerial/roof/high-rise ->
Drone, stairs/rubble -> Robot with Legs, warehouse/road -> Robot with Wheels, human
interaction/tools -> Humanoid), so a model can learn the mapping from the text alone.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

from bitmar_model.io import atomic_write_text
from bitmar_model.robots import ROBOT_INDEX

SINGLE_FILE_NAME = "single_robot_selection.json"
MULTI_FILE_NAME = "multi_robot_selection_dataset.json"

# Copied verbatim from the public dataset so prompts match what real-data runs see.
ROBOT_SELECTION_INSTRUCTION = (
    "Robots: Drone, Underwater Robot, Humanoid, Robot with Wheels, Robot with Legs. "
    "What is the most suited robot for the task? It can be more than one robot if they are "
    "both equally suited for the task.\n"
    "Drone:\n"
    "capabilities: fastest, aerial navigation, surveillance, lightweight transport, aerial inspection,\n"
    "limitations: limited payload, loud, weather dependent, battery life,\n"
    "environments: outdoor, large indoor spaces, hard to reach areas\n"
    "Humanoid:\n"
    "capabilities: manipulation, walking, human interaction, complex tasks, tool use,\n"
    "limitations: slow movement, balance issues, high power consumption,\n"
    "environments: indoor, human environments, stairs, complex terrain\n"
    "Robot with Legs:\n"
    "capabilities: rough terrain navigation, stability, load carrying, inspection,\n"
    "limitations: limited manipulation, height restrictions,\n"
    "environments: outdoor, uneven terrain, stairs, industrial sites, search and rescue\n"
    "Robot with Wheels:\n"
    "capabilities: fast movement, good payload, stable platform, efficient,\n"
    "limitations: flat surfaces only, limited climbing, obstacle avoidance,\n"
    "environments: indoor, warehouse, flat outdoor areas, roads\n"
    "Underwater Robot:\n"
    "capabilities: underwater navigation, deep sea exploration, marine inspection, "
    "underwater manipulation,\n"
    "limitations: water environments only, communication limitations, pressure constraints,\n"
    "environments: underwater, marine, pools, pipes, ocean exploration"
)

# Share of tasks that need one robot; the rest combine two environments (two robots).
_SINGLE_ENVIRONMENT_SHARE = 0.6


@dataclass(frozen=True)
class _Environment:
    robot: str
    templates: tuple[str, ...]  # each names the environment word and has one "{}" slot
    targets: tuple[str, ...]  # slot fillers; none contains another environment's word


_ENVIRONMENTS: tuple[_Environment, ...] = (
    _Environment(
        "Drone",
        (
            "inspect the roof of the {} for storm damage",
            "run an aerial survey over the {}",
            "check the facade of the high-rise {} for cracks",
        ),
        (
            "hospital",
            "office tower",
            "hotel",
            "apartment block",
            "city hall",
            "stadium",
            "museum",
            "school",
        ),
    ),
    _Environment(
        "Underwater Robot",
        (
            "inspect the underwater hull of the {}",
            "recover a lost sensor underwater near the {}",
            "map the underwater foundations of the {}",
        ),
        (
            "cargo ship",
            "harbour pier",
            "offshore platform",
            "research vessel",
            "ferry terminal",
            "dam",
            "oil rig",
            "lighthouse",
        ),
    ),
    _Environment(
        "Robot with Legs",
        (
            "climb the stairs of the {} to reach a trapped worker",
            "search the rubble of the collapsed {} for survivors",
            "carry supplies across rubble near the {}",
        ),
        (
            "parking garage",
            "mine entrance",
            "old mill",
            "train depot",
            "power station",
            "textile factory",
            "bell tower",
            "farmhouse",
        ),
    ),
    _Environment(
        "Robot with Wheels",
        (
            "transport pallets across the {} warehouse",
            "deliver parcels by road to the {} depot",
            "move inventory between the aisles of the {} warehouse",
        ),
        ("grocery", "electronics", "pharmacy", "furniture", "hardware", "clothing", "toy", "book"),
    ),
    _Environment(
        "Humanoid",
        (
            "guide visitors through human interaction at the {} reception",
            "use hand tools to repair a cabinet in the {}",
            "operate power tools to assemble shelving in the {}",
        ),
        (
            "library",
            "clinic",
            "bank",
            "community centre",
            "kindergarten",
            "town hall",
            "art gallery",
            "care home",
        ),
    ),
)


def generate_sample_robot_datasets(
    directory: Path, num_tasks: int = 250, seed: int = 0
) -> tuple[Path, Path]:
    """Write the single- and multi-robot JSON files; byte-identical for the same arguments."""
    clauses = [
        (template.format(target), environment.robot)
        for environment in _ENVIRONMENTS
        for template in environment.templates
        for target in environment.targets
    ]
    pairs = [(a, b) for a, b in itertools.permutations(clauses, 2) if a[1] != b[1]]
    num_single = min(len(clauses), round(num_tasks * _SINGLE_ENVIRONMENT_SHARE))
    if num_tasks < 1 or num_tasks - num_single > len(pairs):
        raise ValueError(
            f"num_tasks must be between 1 and {len(clauses) + len(pairs)}, got {num_tasks}"
        )
    rng = random.Random(seed)
    plans = [[clause] for clause in rng.sample(clauses, num_single)]
    plans += [list(pair) for pair in rng.sample(pairs, num_tasks - num_single)]
    rng.shuffle(plans)

    single_records, multi_records = [], []
    for plan in plans:
        task = "Task: " + _sentence_case(", then ".join(text for text, _ in plan)) + "."
        robots = ", ".join(sorted({robot for _, robot in plan}, key=ROBOT_INDEX.__getitem__))
        steps = [(_sentence_case(text), robot) for text, robot in plan]
        steps.append(("Report the results to the operator", plan[0][1]))
        single_records.append(
            {"instruction": ROBOT_SELECTION_INSTRUCTION, "input": task, "output": robots}
        )
        multi_records.append(
            {
                "instruction": ROBOT_SELECTION_INSTRUCTION,
                "input": task,
                "subtasks": [
                    {"subtask": text, "assigned_robot": robot, "execution_order": order}
                    for order, (text, robot) in enumerate(steps, start=1)
                ],
                "original_single_robot_output": robots,
            }
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    single_path = _write_json(directory / SINGLE_FILE_NAME, single_records)
    multi_path = _write_json(directory / MULTI_FILE_NAME, multi_records)
    return single_path, multi_path


def _sentence_case(text: str) -> str:
    return text[:1].upper() + text[1:]


def _write_json(path: Path, records: list[dict]) -> Path:
    # Write then rename, so a killed run never leaves a truncated file for ingestion.
    return atomic_write_text(path, json.dumps(records, indent=2, ensure_ascii=False) + "\n")
