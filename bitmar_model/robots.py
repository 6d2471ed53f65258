"""The robot classes BitMar selects among, and the one place robot names are normalised.

The public datasets spell robots inconsistently ("Wheeled", "legged robot", ...). Every
stage (ingestion, targets, parsing generated text, metrics) maps names through
`normalize_robot_name`, so a class is never identified by two spellings. Unknown names
return None: callers quarantine or report them; nothing is guessed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

ROBOT_CLASSES: tuple[str, ...] = (
    "Drone",
    "Underwater Robot",
    "Humanoid",
    "Robot with Wheels",
    "Robot with Legs",
    "No Robot",
)
NUM_ROBOT_CLASSES = len(ROBOT_CLASSES)
ROBOT_INDEX: dict[str, int] = {name: i for i, name in enumerate(ROBOT_CLASSES)}
_NO_ROBOT = ROBOT_INDEX["No Robot"]

_ALIASES: dict[str, str] = {
    "drone": "Drone",
    "drones": "Drone",
    "uav": "Drone",
    "aerial drone": "Drone",
    "underwater robot": "Underwater Robot",
    "underwater": "Underwater Robot",
    "underwater drone": "Underwater Robot",
    "auv": "Underwater Robot",
    "rov": "Underwater Robot",
    "humanoid": "Humanoid",
    "humanoid robot": "Humanoid",
    "robot with wheels": "Robot with Wheels",
    "wheeled robot": "Robot with Wheels",
    "wheeled": "Robot with Wheels",
    "wheels": "Robot with Wheels",
    "robot with legs": "Robot with Legs",
    "legged robot": "Robot with Legs",
    "legged": "Robot with Legs",
    "legs": "Robot with Legs",
    "quadruped": "Robot with Legs",
    "no robot": "No Robot",
    "none": "No Robot",
}


def normalize_robot_name(name: str, fleet: Iterable[str] = ()) -> str | None:
    """Map a robot name or alias to its canonical class, or to the `fleet` robot it names (a robot
    described only in the fleet, matched by its own name), or None when it is unknown."""
    key = _key(name)
    return _ALIASES.get(key) or next((f for f in fleet if _key(f) == key), None)


def _key(name: str) -> str:
    return re.sub(r"\s+", " ", str(name)).strip().strip(".").lower()


def split_robot_list(text: str) -> list[str]:
    """Split "Drone, Robot with Legs and Humanoid" into its raw names (not normalised)."""
    parts = re.split(r",|;|\band\b|&|/", str(text))
    return [p.strip() for p in parts if p.strip()]


def select_robots(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Boolean [N, classes] selections from per-class probabilities [N, classes].

    "No Robot" excludes every robot, so it is decided against the best robot: it is the
    whole selection when its probability beats the best robot's; otherwise the selection
    is the robots at or above `threshold` and always the best one (never empty).
    """
    probs = np.asarray(probs, dtype=np.float64)
    rows = np.arange(len(probs))
    robot_probs = probs.copy()
    robot_probs[:, _NO_ROBOT] = -np.inf
    best = robot_probs.argmax(axis=1)
    selected = robot_probs >= threshold
    selected[rows, best] = True
    no_robot = probs[:, _NO_ROBOT] > probs[rows, best]
    selected[no_robot] = False
    selected[no_robot, _NO_ROBOT] = True
    return selected


def with_fleet_robots(head_probs: np.ndarray, fleet_probs: np.ndarray) -> np.ndarray:
    """[N, classes + F]: the head's columns, then robots described only in the fleet (scored
    zero-shot). Where the head selects "No Robot" (a no-robot gate's decision), no fleet robot
    claims more than 1 - P(no robot) either, as no trained one does, so it stays the selection."""
    head_probs, fleet_probs = np.asarray(head_probs, dtype=np.float64), np.asarray(fleet_probs, dtype=np.float64)
    no_robot = select_robots(head_probs)[:, _NO_ROBOT]
    ceiling = 1.0 - head_probs[:, _NO_ROBOT : _NO_ROBOT + 1]
    fleet_probs = np.where(no_robot[:, None], np.minimum(fleet_probs, ceiling), fleet_probs)
    return np.concatenate([head_probs, fleet_probs], axis=1)
