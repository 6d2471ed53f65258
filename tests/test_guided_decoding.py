"""Head-guided decoding: the format's skeleton and the head's decision are forced, the model
writes the free lines."""

from __future__ import annotations

import torch

from bitmar_model.guided import (
    FREE,
    Choice,
    HeadDecision,
    HeadGuidedDecoding,
    reasoning_skeleton,
    repeated_ngram_tokens,
)
from bitmar_model.reasoning_format import ReasoningTrace, format_reasoning, parse_reasoning, robots_mentioned_positively

# What an unguided decoder wants to write: it picks the Drone, the head picked the Underwater Robot.
FREE_TEXT = format_reasoning(
    ReasoningTrace(
        thinking="Goal: Inspect the hull of a ship.",
        environment_analysis="Cues: aerial inspection.",
        robot_evaluation={
            "Drone": (True, "aerial inspection"),
            "Underwater Robot": (False, "water environments only"),
            "Humanoid": (False, "slow movement"),
            "Robot with Wheels": (False, "flat surfaces only"),
            "Robot with Legs": (False, "limited manipulation"),
        },
        selection_reasoning="Drone fits: aerial inspection.",
        confidence_check="One robot needed, all cued by the task.",
        robots=["Drone"],
        confidence=0.97,
        justification="Best match: aerial inspection.",
    )
)
CHARS = sorted(set(FREE_TEXT + " 0123456789.,;-:ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'<>/_\n") | {"\0"})
EOS = CHARS.index("\0")


def encode(text: str) -> list[int]:
    return [CHARS.index(c) for c in text]


def decode(ids: list[int]) -> str:
    return "".join(CHARS[i] for i in ids if i != EOS)


def scripted_logits(text: str) -> torch.Tensor:
    """A stand-in decoder that wants to write FREE_TEXT line by line: the next character of its
    line while the line so far agrees with it, else a newline."""
    lines, done = FREE_TEXT.split("\n"), text.split("\n")
    line, wanted = done[-1], lines[min(len(done) - 1, len(lines) - 1)]
    nxt = wanted[len(line)] if wanted.startswith(line) and len(line) < len(wanted) else "\n"
    logits = torch.zeros(len(CHARS))
    logits[CHARS.index("\n")] = 1.0  # its second choice: end the line
    logits[CHARS.index(nxt)] = 10.0
    return logits


def guided_text(
    decision: HeadDecision, steps: int = 2 * len(FREE_TEXT), no_repeat: int = 0, profiles=None
) -> str:
    # Character tokens: the n-gram rule (meant for word pieces) is off unless a test asks for it.
    guide = HeadGuidedDecoding(
        [decision], encode, decode, eos_token_id=EOS, no_repeat_ngram_size=no_repeat, profiles=profiles
    )
    tokens: list[int] = []
    for _ in range(steps):
        logits = guide(torch.tensor([tokens], dtype=torch.long), scripted_logits(decode(tokens))[None].clone())
        tokens.append(int(logits.argmax()))
        if tokens[-1] == EOS:
            break
    assert tokens[-1] == EOS, "the guide ends the text after </robot_selection>"
    return decode(tokens)


def test_guided_text_states_the_heads_decision_and_keeps_the_models_words():
    assert parse_reasoning(FREE_TEXT).robots == ["Drone"]
    text = guided_text(HeadDecision(["Underwater Robot"], 0.734))
    parsed = parse_reasoning(text)
    assert parsed.well_formed, parsed.errors
    assert parsed.robots == ["Underwater Robot"] and parsed.confidence == 0.73
    assert robots_mentioned_positively(parsed.sections["robot_evaluation"]) == {"Underwater Robot"}
    # The model's own lines stay: its goal, cues, reasons and justification.
    for own in ("Goal: Inspect the hull of a ship.", "Cues: aerial inspection.", "Justification: Best match"):
        assert own in text


def test_skeleton_forces_verdicts_selection_and_confidence_and_leaves_free_lines():
    parts = reasoning_skeleton(HeadDecision(["Drone", "Robot with Legs"], 0.5))
    forced = "".join(p for p in parts if p is not FREE)
    assert "Drone: suitable -" in forced and "Robot with Legs: suitable -" in forced
    assert "Humanoid: unsuitable -" in forced and "Underwater Robot: unsuitable -" in forced
    assert "Selected Robot: Drone, Robot with Legs\nConfidence: 0.50\nJustification:" in forced
    assert parts.count(FREE) == 10  # goal, cues, five reasons, selection reasons, check, justification
    filled = "".join(" text.\n" if p is FREE else p for p in parts)
    assert parse_reasoning(filled).well_formed


def test_no_robot_skeleton_calls_every_robot_unsuitable():
    """"No Robot" is never trained on the public data, so none of its lines is left to the model:
    the selection reasoning, the check and the justification are the targets' own (the same
    constants build them), with or without the fleet's profiles."""
    from bitmar_pipeline.training.reasoning_targets import build_reasoning_target

    target = parse_reasoning(build_reasoning_target("Write a poem", ["No Robot"], PROFILES, None))
    for profiles in (None, PROFILES):
        parts = reasoning_skeleton(HeadDecision(["No Robot"], 0.9), profiles)
        assert parts.count(FREE) == 2 + (0 if profiles else 5)  # goal and cues; the reasons without profiles
        text = "".join(" text.\n" if p is FREE else p.options[0] if isinstance(p, Choice) else p for p in parts)
        filled = parse_reasoning(text)
        assert filled.well_formed and filled.robots == ["No Robot"]
        assert robots_mentioned_positively(filled.sections["robot_evaluation"]) == set()
        for tag in ("selection_reasoning", "confidence_check"):
            assert filled.sections[tag] == target.sections[tag]
        assert filled.justification == target.justification


def test_repeated_ngram_tokens_are_those_completing_an_earlier_ngram():
    assert repeated_ngram_tokens([1, 2, 3, 1, 2], 3) == [3]
    assert repeated_ngram_tokens([1, 2, 1, 2, 1], 3) == [2]
    assert repeated_ngram_tokens([5, 6, 5, 6], 2) == [5]
    assert repeated_ngram_tokens([1, 2], 3) == [] and repeated_ngram_tokens([1, 2, 1, 2], 0) == []


def test_a_free_line_cannot_loop():
    """A decoder that would write "the task the task ..." forever in its goal line: the line ends
    before it repeats itself, and the rest of the skeleton still follows."""
    looping = "Goal: the task the task the task the task the task."
    global FREE_TEXT
    saved, FREE_TEXT = FREE_TEXT, FREE_TEXT.replace("Goal: Inspect the hull of a ship.", looping)
    try:
        text = guided_text(HeadDecision(["Drone"], 0.5), no_repeat=3)
    finally:
        FREE_TEXT = saved
    goal = text.split("\n")[1]
    assert goal.startswith("Goal: the task") and "the task the task" not in goal
    assert parse_reasoning(text).well_formed


PROFILES = {
    "Drone": {"capabilities": ["aerial inspection", "fast flight"], "limitations": ["limited payload"],
              "environments": ["open air"]},
    "Underwater Robot": {"capabilities": ["deep diving", "sonar mapping"], "limitations": ["water only"],
                         "environments": ["underwater"]},
    "Humanoid": {"capabilities": ["tool use"], "limitations": ["slow movement", "indoor only"], "environments": []},
    "Robot with Wheels": {"capabilities": ["heavy loads"], "limitations": ["flat surfaces only"]},
    "Robot with Legs": {"capabilities": ["stairs"], "limitations": ["limited manipulation", "loud"]},
}


def test_with_profiles_each_reason_is_one_of_that_robots_own_phrases():
    """The scripted decoder wants "Underwater Robot: ... water environments only" and "Drone: aerial
    inspection" under the wrong verdicts; each reason it may write is one of that robot's phrases:
    capabilities or environments when suitable, limitations when not."""
    text = guided_text(HeadDecision(["Underwater Robot", "Robot with Legs"], 0.5), profiles=PROFILES)
    parsed = parse_reasoning(text)
    assert parsed.well_formed, parsed.errors
    lines = dict(line.split(": ", 1) for line in parsed.sections["robot_evaluation"].splitlines())
    assert len(lines) == 5
    for robot, line in lines.items():
        verdict, reason = line.split(" - ", 1)
        profile = PROFILES[robot]
        allowed = profile["limitations"] if verdict == "unsuitable" else (
            profile["capabilities"] + profile.get("environments", [])
        )
        assert reason in allowed, (robot, verdict, reason)
    assert lines["Underwater Robot"].startswith("suitable") and lines["Drone"].startswith("unsuitable")
    # The decoder's preference decides among the options: "limited payload" is the Drone's only limitation.
    assert lines["Drone"] == "unsuitable - limited payload"
    # The selection reasoning names the selected robots only, each with one of its phrases, and the
    # check states their number.
    fits = parsed.sections["selection_reasoning"].rstrip(".").split("; ")
    assert [f.split(" fits: ")[0] for f in fits] == ["Underwater Robot", "Robot with Legs"]
    for fit in fits:
        robot, reason = fit.split(" fits: ")
        assert reason in PROFILES[robot]["capabilities"] + PROFILES[robot].get("environments", [])
    # ... and ends the check with one of the targets' two endings (the decoder's "all cued" here).
    assert parsed.sections["confidence_check"] == "2 robots needed, all cued by the task."
    best = parsed.justification.removeprefix("Best match: ").rstrip(".").split(", ")
    assert len(best) == 2 and best[0] in PROFILES["Underwater Robot"]["capabilities"] + ["underwater"]
    assert "Goal: Inspect the hull of a ship." in text  # free lines are still the model's


def test_with_task_cues_the_analysis_quotes_one_of_the_tasks_own_phrases():
    """The scripted decoder wants "Cues: aerial inspection." (a remembered profile phrase); given
    the task's own phrases, the line is one of them, and which one is the decoder's choice."""
    cues = ("hull", "ship hull", "Inspect, ship hull")
    text = guided_text(HeadDecision(["Underwater Robot"], 0.9, cues), profiles=PROFILES)
    parsed = parse_reasoning(text)
    assert parsed.well_formed, parsed.errors
    line = parsed.sections["environment_analysis"]
    assert line.startswith("Cues: ") and line.removeprefix("Cues: ").rstrip(".") in cues
    # Without cues the line is the decoder's own, as before.
    free = parse_reasoning(guided_text(HeadDecision(["Underwater Robot"], 0.9), profiles=PROFILES))
    assert free.sections["environment_analysis"] == "Cues: aerial inspection."


def test_with_a_goal_the_thinking_line_is_the_task():
    """The decoder looping in its goal line, given the task: the line is "Goal: <task>." and the
    rest of the skeleton still follows."""
    global FREE_TEXT
    saved, FREE_TEXT = FREE_TEXT, FREE_TEXT.replace("Goal: Inspect the hull of a ship.", "Goal: the task the task.")
    try:
        text = guided_text(HeadDecision(["Underwater Robot"], 0.9, goal="Scrape barnacles off a hull"))
    finally:
        FREE_TEXT = saved
    parsed = parse_reasoning(text)
    assert parsed.well_formed, parsed.errors
    assert parsed.sections["thinking"] == "Goal: Scrape barnacles off a hull."


def test_a_ranked_reason_is_stated_for_each_selected_robot_and_the_rest_stay_the_decoders():
    """The decision carries each selected robot's reason (the phrase its task knowledge ranks nearest
    the task): the evaluation line, the selection reasoning and the justification state it, whatever
    the decoder prefers; an unselected robot's limitation is still the decoder's choice."""
    reasons = {"Underwater Robot": "sonar mapping", "Robot with Legs": "stairs"}
    text = guided_text(HeadDecision(["Underwater Robot", "Robot with Legs"], 0.5, reasons=reasons), profiles=PROFILES)
    parsed = parse_reasoning(text)
    assert parsed.well_formed, parsed.errors
    lines = dict(line.split(": ", 1) for line in parsed.sections["robot_evaluation"].splitlines())
    assert lines["Underwater Robot"] == "suitable - sonar mapping" and lines["Robot with Legs"] == "suitable - stairs"
    assert lines["Humanoid"].removeprefix("unsuitable - ") in PROFILES["Humanoid"]["limitations"]
    fits = "Underwater Robot fits: sonar mapping; Robot with Legs fits: stairs."
    assert parsed.sections["selection_reasoning"] == fits
    assert parsed.justification == "Best match: sonar mapping, stairs."
    # Without ranked reasons the decoder picks its favourite phrase ("deep diving", the first).
    free = parse_reasoning(guided_text(HeadDecision(["Underwater Robot"], 0.5), profiles=PROFILES))
    assert free.sections["selection_reasoning"] == "Underwater Robot fits: deep diving."


def test_the_check_states_whether_the_task_names_each_selected_robots_profile():
    """"all cued by the task" is the targets' rule applied to the task (a content word of it names a
    capability or environment of every selected robot), not the decoder's guess."""
    from bitmar_pipeline.evaluation.selection_quality import cued_by

    assert cued_by("Inspect underwater pipelines", ["Underwater Robot"], PROFILES) is True
    # With a stated reason, that reason must be the cued phrase ("underwater", not "sonar mapping").
    assert cued_by("Inspect underwater pipelines", ["Underwater Robot"], PROFILES, {"Underwater Robot": "underwater"})
    sonar = {"Underwater Robot": "sonar mapping"}
    assert not cued_by("Inspect underwater pipes", ["Underwater Robot"], PROFILES, sonar)
    assert cued_by("Map the sea floor with sonar", ["Underwater Robot", "Robot with Legs"], PROFILES) is False
    assert cued_by("Search a shipwreck", ["No Robot"], PROFILES) is None and cued_by(None, ["Drone"], PROFILES) is None
    # The scripted decoder wants "all cued by the task"; the decision says not.
    text = guided_text(HeadDecision(["Underwater Robot"], 0.9, all_cued=False), profiles=PROFILES)
    assert parse_reasoning(text).sections["confidence_check"] == "One robot needed, not all cued by the task."
