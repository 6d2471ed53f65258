"""The tagged chain-of-thought format BitMar writes, and a parser that never raises.

A trace is six blocks, in this order, each opened with <tag> and closed with </tag>:

    <thinking> ... </thinking>
    <environment_analysis> ... </environment_analysis>
    <robot_evaluation> ... </robot_evaluation>
    <selection_reasoning> ... </selection_reasoning>
    <confidence_check> ... </confidence_check>
    <robot_selection>
    Selected Robot: Drone, Robot with Legs
    Confidence: 0.82
    Justification: ...
    </robot_selection>

`format_reasoning` writes training targets (and raises on invalid input, since a bad
target is a bug). `parse_reasoning` reads model output, which may be truncated or
garbage, so it records every problem in `errors` instead of raising; rewards and
metrics use `well_formed` and the parsed fields. Text outside the blocks is ignored.

Robot evaluation lines follow one rule so a reward can check consistency between the
evaluation and the selection: `<robot name>: suitable ...` marks a robot as suitable;
`<robot name>: unsuitable ...` (or any other first word, e.g. "not suitable") does not.
A leading "-" or "*" bullet is allowed; names go through `normalize_robot_name`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import pairwise

from bitmar_model.robots import normalize_robot_name, split_robot_list

REASONING_TAGS: tuple[str, ...] = (
    "thinking",
    "environment_analysis",
    "robot_evaluation",
    "selection_reasoning",
    "confidence_check",
    "robot_selection",
)
NO_ROBOT = "No Robot"

_TAG_RE = re.compile(r"<(/?)(" + "|".join(REASONING_TAGS) + r")>")
_FIELD_RE = re.compile(r"^\s*(selected robots?|confidence|justification)\s*:[ \t]*(.*)$", re.IGNORECASE)
_EVALUATION_RE = re.compile(r"^\s*(?:[-*]\s*)?([^:\n]+?)\s*:\s*([A-Za-z]+)", re.MULTILINE)
_NUMBER_RE = re.compile(r"([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*(%?)")


@dataclass
class ReasoningTrace:
    """One reasoning target. `robot_evaluation` is free text, or robot -> (suitable, reason)."""

    thinking: str
    environment_analysis: str
    robot_evaluation: str | Mapping[str, tuple[bool, str]]
    selection_reasoning: str
    confidence_check: str
    robots: list[str]
    confidence: float
    justification: str


@dataclass
class ParsedReasoning:
    sections: dict[str, str]  # tag -> stripped content, for every tag found (even unclosed)
    robots: list[str]  # canonical names, first occurrence order, unknown names dropped
    confidence: float | None  # as written, even when outside [0, 1]; None when unparseable
    justification: str | None
    errors: list[str]
    tags_in_order: bool  # the blocks found appear in REASONING_TAGS order and do not overlap

    @property
    def well_formed(self) -> bool:
        """Every tag exactly once, in order and non-empty; a valid selection, confidence in [0, 1]."""
        return (
            not self.errors
            and self.tags_in_order
            and set(self.sections) == set(REASONING_TAGS)
            and bool(self.robots)
            and self.usable_confidence is not None
            and bool(self.justification)
        )

    @property
    def usable_confidence(self) -> float | None:
        """The stated confidence when it lies in [0, 1]; None when missing or out of range."""
        if self.confidence is None or not 0.0 <= self.confidence <= 1.0:
            return None
        return self.confidence

    @property
    def confidence_out_of_range(self) -> bool:
        """A confidence was written but lies outside [0, 1] (say "95" for 95%)."""
        return self.confidence is not None and self.usable_confidence is None


def canonical_robots(names: Iterable[str]) -> list[str]:
    """Canonical, de-duplicated robot names; ValueError on unknown names or 'No Robot' with others."""
    robots: list[str] = []
    for name in names:
        canonical = normalize_robot_name(name)
        if canonical is None:
            raise ValueError(f"unknown robot name {name!r}")
        if canonical not in robots:
            robots.append(canonical)
    if not robots:
        raise ValueError("no robot selected (use 'No Robot' when none fits)")
    if NO_ROBOT in robots and len(robots) > 1:
        raise ValueError(f"'{NO_ROBOT}' cannot be combined with other robots: {robots}")
    return robots


def format_robot_evaluation(evaluation: Mapping[str, tuple[bool, str]]) -> str:
    """Lines `Drone: suitable - reason` that `robots_mentioned_positively` reads back."""
    lines = []
    for name, (suitable, reason) in evaluation.items():
        (canonical,) = canonical_robots([name])
        verdict = "suitable" if suitable else "unsuitable"
        lines.append(f"{canonical}: {verdict} - {reason.strip()}" if reason.strip() else f"{canonical}: {verdict}")
    return "\n".join(lines)


def robots_mentioned_positively(robot_evaluation_text: str) -> set[str]:
    """Canonical names of robots whose evaluation line reads `<robot>: suitable ...`."""
    positive = set()
    for name, verdict in _EVALUATION_RE.findall(robot_evaluation_text):
        canonical = normalize_robot_name(name)
        if canonical is not None and verdict.lower() == "suitable":
            positive.add(canonical)
    return positive


def format_reasoning(trace: ReasoningTrace) -> str:
    """The tagged text of `trace`; raises ValueError on content the parser would reject."""
    robots = canonical_robots(trace.robots)
    if not (math.isfinite(trace.confidence) and 0.0 <= trace.confidence <= 1.0):
        raise ValueError(f"confidence must be in [0, 1], got {trace.confidence}")
    evaluation = trace.robot_evaluation
    if not isinstance(evaluation, str):
        evaluation = format_robot_evaluation(evaluation)
    selection = (
        f"Selected Robot: {', '.join(robots)}\n"
        f"Confidence: {trace.confidence:.2f}\n"
        f"Justification: {trace.justification.strip()}"
    )
    bodies = {
        "thinking": trace.thinking,
        "environment_analysis": trace.environment_analysis,
        "robot_evaluation": evaluation,
        "selection_reasoning": trace.selection_reasoning,
        "confidence_check": trace.confidence_check,
        "robot_selection": selection,
    }
    for tag, body in bodies.items():
        if not body.strip():
            raise ValueError(f"<{tag}> would be empty")
        if _TAG_RE.search(body):
            raise ValueError(f"<{tag}> content contains a reasoning tag, which would break parsing")
    if not trace.justification.strip():
        raise ValueError("justification is empty")
    if any(_FIELD_RE.match(line) for line in trace.justification.splitlines()[1:]):
        raise ValueError("justification contains a 'Selected Robot:', 'Confidence:' or 'Justification:' line")
    return "\n".join(f"<{tag}>\n{body.strip()}\n</{tag}>" for tag, body in bodies.items())


def _parse_confidence(value: str, errors: list[str]) -> float | None:
    match = _NUMBER_RE.fullmatch(value.strip())
    if match is None:
        errors.append(f"confidence {value.strip()!r} is not a number")
        return None
    confidence = float(match.group(1)) / (100.0 if match.group(2) else 1.0)
    if not 0.0 <= confidence <= 1.0:
        errors.append(f"confidence {confidence:g} is outside [0, 1]")
    return confidence


def _parse_selection(
    body: str, errors: list[str], fleet: Iterable[str] = ()
) -> tuple[list[str], float | None, str | None]:
    fields: dict[str, str] = {}
    current: str | None = None
    for line in body.splitlines():
        match = _FIELD_RE.match(line)
        if match:
            label = match.group(1).lower()
            key = "selected" if label.startswith("selected") else label
            current = None
            if key in fields:
                errors.append(f"duplicate {match.group(1)!r} line in <robot_selection>")
                continue
            fields[key] = match.group(2)
            current = key
        elif current == "justification":
            fields["justification"] += "\n" + line  # the justification may run over several lines
        elif line.strip():
            errors.append(f"unexpected line in <robot_selection>: {line.strip()[:80]!r}")

    robots: list[str] = []
    if "selected" not in fields:
        errors.append("missing 'Selected Robot:' line in <robot_selection>")
    else:
        names = split_robot_list(fields["selected"])
        if not names:
            errors.append("no robot selected")
        for name in names:
            canonical = normalize_robot_name(name, fleet)
            if canonical is None:
                errors.append(f"unknown robot name {name!r}")
            elif canonical not in robots:
                robots.append(canonical)
        if NO_ROBOT in robots and len(robots) > 1:
            errors.append(f"'{NO_ROBOT}' is combined with other robots")

    confidence = None
    if "confidence" not in fields:
        errors.append("missing 'Confidence:' line in <robot_selection>")
    else:
        confidence = _parse_confidence(fields["confidence"], errors)

    justification = None
    if "justification" not in fields:
        errors.append("missing 'Justification:' line in <robot_selection>")
    else:
        justification = fields["justification"].strip()
        if not justification:
            errors.append("empty justification")
    return robots, confidence, justification


def parse_reasoning(text: str, fleet: Iterable[str] = ()) -> ParsedReasoning:
    """Parse a (possibly broken) trace. Never raises; every problem is listed in `errors`. Robots
    described only in the `fleet` are known by their own names."""
    if not isinstance(text, str):
        return ParsedReasoning({}, [], None, None, [f"expected a string, got {type(text).__name__}"], False)
    errors: list[str] = []
    tokens = list(_TAG_RE.finditer(text))
    sections: dict[str, str] = {}
    spans: dict[str, tuple[int, int]] = {}
    for tag in REASONING_TAGS:
        opens = [t for t in tokens if t.group(2) == tag and not t.group(1)]
        closes = [t for t in tokens if t.group(2) == tag and t.group(1)]
        if not opens:
            errors.append(f"missing <{tag}>")
            continue
        if len(opens) > 1:
            errors.append(f"<{tag}> appears {len(opens)} times")
        if len(closes) > 1:
            errors.append(f"</{tag}> appears {len(closes)} times")
        start = opens[0]
        close = next((t for t in closes if t.start() >= start.end()), None)
        if close is None:
            errors.append(f"unclosed <{tag}>")
            # A truncated block runs to the next tag, so later blocks are still read.
            end = next((t.start() for t in tokens if t.start() >= start.end()), len(text))
            spans[tag] = (start.start(), end)
        else:
            end = close.start()
            spans[tag] = (start.start(), close.end())
        sections[tag] = text[start.end() : end].strip()
        if not sections[tag]:
            errors.append(f"<{tag}> is empty")

    found = [tag for tag in REASONING_TAGS if tag in spans]
    tags_in_order = all(spans[a][1] <= spans[b][0] for a, b in pairwise(found))
    if not tags_in_order:
        actual = sorted(found, key=lambda tag: spans[tag][0])
        errors.append(f"blocks are out of order or overlap: {', '.join(actual)}")

    robots: list[str] = []
    confidence = justification = None
    if "robot_selection" in sections:
        robots, confidence, justification = _parse_selection(sections["robot_selection"], errors, fleet)
    return ParsedReasoning(sections, robots, confidence, justification, errors, tags_in_order)
