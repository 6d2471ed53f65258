"""Tagged reasoning format: exact round trips, and a parser that reports instead of raising."""

from __future__ import annotations

import random

import pytest

from bitmar_model.reasoning_format import (
    REASONING_TAGS,
    ReasoningTrace,
    format_reasoning,
    parse_reasoning,
    robots_mentioned_positively,
)


def make_trace(**changes) -> ReasoningTrace:
    fields = dict(
        thinking="The task is to inspect a bridge over a river.",
        environment_analysis="Outdoor, high structure, water below.",
        robot_evaluation={
            "drone": (True, "reaches the underside of the deck"),
            "Underwater Robot": (True, "inspects the pillars below the waterline"),
            "Humanoid": (False, "cannot climb the structure"),
        },
        selection_reasoning="The deck needs flight and the pillars need diving.",
        confidence_check="Both parts of the task are covered.",
        robots=["Drone", "underwater drone", "UAV"],
        confidence=0.817,
        justification="A drone covers the deck;\nan underwater robot covers the pillars.",
    )
    fields.update(changes)
    return ReasoningTrace(**fields)


def valid_text() -> str:
    return format_reasoning(make_trace())


def test_round_trip_multi_robot() -> None:
    text = valid_text()
    parsed = parse_reasoning(text)
    assert parsed.well_formed, parsed.errors
    assert parsed.robots == ["Drone", "Underwater Robot"]
    assert parsed.confidence == 0.82
    assert parsed.justification == "A drone covers the deck;\nan underwater robot covers the pillars."
    assert list(parsed.sections) == list(REASONING_TAGS)
    assert parsed.sections["thinking"] == "The task is to inspect a bridge over a river."
    assert "Selected Robot: Drone, Underwater Robot\nConfidence: 0.82\n" in text
    assert robots_mentioned_positively(parsed.sections["robot_evaluation"]) == {"Drone", "Underwater Robot"}


def test_round_trip_no_robot_and_text_evaluation() -> None:
    trace = make_trace(
        robot_evaluation="All robots: unsuitable", robots=["none"], confidence=0.0, justification="Nothing fits."
    )
    parsed = parse_reasoning(format_reasoning(trace))
    assert parsed.well_formed, parsed.errors
    assert parsed.robots == ["No Robot"]
    assert parsed.confidence == 0.0
    assert parsed.sections["robot_evaluation"] == "All robots: unsuitable"


def test_robots_mentioned_positively_rule() -> None:
    text = (
        "- Drone: suitable, it flies\n* legged robot: Suitable\nHumanoid: "
        "unsuitable\nWheeled: not suitable\nSubmarine: suitable"
    )
    assert robots_mentioned_positively(text) == {"Drone", "Robot with Legs"}
    assert robots_mentioned_positively("") == set()


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"robots": ["Submarine"]}, "unknown robot"),
        ({"robots": ["No Robot", "Drone"]}, "cannot be combined"),
        ({"robots": []}, "no robot"),
        ({"confidence": 1.7}, "confidence"),
        ({"confidence": float("nan")}, "confidence"),
        ({"thinking": "  "}, "empty"),
        ({"thinking": "see <robot_selection>"}, "reasoning tag"),
        ({"justification": "fine\nConfidence: 0.1"}, "justification"),
        ({"robot_evaluation": {"Submarine": (True, "")}}, "unknown robot"),
    ],
)
def test_format_refuses_invalid_traces(changes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        format_reasoning(make_trace(**changes))


def swap_blocks(text: str, a: str, b: str) -> str:
    block_a = text[text.index(f"<{a}>") : text.index(f"</{a}>") + len(f"</{a}>")]
    block_b = text[text.index(f"<{b}>") : text.index(f"</{b}>") + len(f"</{b}>")]
    return text.replace(block_a, "\0").replace(block_b, block_a).replace("\0", block_b)


@pytest.mark.parametrize(
    ("broken", "expected_error"),
    [
        (lambda t: t.replace("<thinking>", "").replace("</thinking>", ""), "missing <thinking>"),
        (lambda t: swap_blocks(t, "thinking", "environment_analysis"), "out of order"),
        (lambda t: t.replace("</selection_reasoning>", ""), "unclosed <selection_reasoning>"),
        (lambda t: t.replace("</robot_selection>", ""), "unclosed <robot_selection>"),
        (lambda t: t + "\n<thinking>again</thinking>", "<thinking> appears 2 times"),
        (lambda t: t.replace("Confidence: 0.82", "Confidence: high"), "confidence 'high' is not a number"),
        (lambda t: t.replace("Confidence: 0.82", "Confidence: 1.7"), "confidence 1.7 is outside [0, 1]"),
        (lambda t: t.replace("Confidence: 0.82\n", ""), "missing 'Confidence:'"),
        (lambda t: t.replace("Underwater Robot\n", "Submarine\n"), "unknown robot name 'Submarine'"),
        (lambda t: t.replace("Drone, Underwater Robot", "No Robot, Drone"), "'No Robot' is combined"),
        (lambda t: t.replace("Drone, Underwater Robot", ""), "no robot selected"),
        (
            lambda t: t.replace(
                "Justification: A drone covers the deck;\nan underwater robot covers the pillars.", "Justification:"
            ),
            "empty justification",
        ),
        (
            lambda t: t.replace("<confidence_check>\nBoth parts of the task are covered.", "<confidence_check>"),
            "<confidence_check> is empty",
        ),
        (
            lambda t: t.replace("</thinking>", "").replace(
                "</environment_analysis>", "</environment_analysis></thinking>"
            ),
            "overlap",
        ),
        (lambda t: t[: len(t) // 2], "missing <robot_selection>"),
        (lambda t: "", "missing <thinking>"),
    ],
)
def test_broken_texts_are_reported(broken, expected_error: str) -> None:
    parsed = parse_reasoning(broken(valid_text()))
    assert not parsed.well_formed
    assert any(expected_error in error for error in parsed.errors), parsed.errors


def test_partial_results_survive_errors() -> None:
    text = valid_text().replace("</robot_selection>", "")
    parsed = parse_reasoning(text)
    assert parsed.robots == ["Drone", "Underwater Robot"]
    assert parsed.tags_in_order
    wrong_order = parse_reasoning(swap_blocks(valid_text(), "thinking", "robot_selection"))
    assert not wrong_order.tags_in_order
    assert wrong_order.robots == ["Drone", "Underwater Robot"]


def test_selection_accepts_variants() -> None:
    text = valid_text().replace("Selected Robot: Drone, Underwater Robot", "selected robots: uav and AUV, drone")
    text = text.replace("Confidence: 0.82", "Confidence: 82%")
    parsed = parse_reasoning(text)
    assert parsed.well_formed, parsed.errors
    assert parsed.robots == ["Drone", "Underwater Robot"]
    assert parsed.confidence == pytest.approx(0.82)


def test_garbage_never_raises() -> None:
    rng = random.Random(0)
    samples = [
        "",
        "<thinking>",
        "</robot_selection><robot_selection>",
        "<robot_selection>Selected Robot:\nConfidence: .\nJustification:</robot_selection>",
        bytes(rng.randrange(256) for _ in range(400)).decode("utf-8", errors="replace"),
        bytes(rng.randrange(256) for _ in range(400)).decode("latin-1"),
        "<" * 50 + ">" * 50,
    ]
    for text in samples:
        parsed = parse_reasoning(text)
        assert not parsed.well_formed
        assert parsed.errors
    assert not parse_reasoning(None).well_formed  # type: ignore[arg-type]


def test_fuzz_random_substrings_and_edits_never_raise() -> None:
    rng = random.Random(1234)
    text = valid_text()
    pieces = ["<", ">", "</", "\n", ":", "Confidence: ", "Selected Robot: ", *(f"<{t}>" for t in REASONING_TAGS)]
    for _ in range(600):
        start = rng.randrange(len(text))
        sample = text[start : start + rng.randrange(len(text) - start + 1)]
        for _ in range(rng.randrange(4)):
            position = rng.randrange(len(sample) + 1)
            sample = sample[:position] + rng.choice(pieces) + sample[position + rng.randrange(3) :]
        parsed = parse_reasoning(sample)
        assert parsed.well_formed == (
            not parsed.errors and parsed.tags_in_order and len(parsed.sections) == len(REASONING_TAGS)
        )
