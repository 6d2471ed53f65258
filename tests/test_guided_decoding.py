"""Head-guided decoding: the text states the head's decision, the model writes the rest."""

from __future__ import annotations

import torch

from bitmar_model.guided import HeadDecision, HeadGuidedDecoding, forced_continuation
from bitmar_model.reasoning_format import parse_reasoning, robots_mentioned_positively

# What an unguided decoder wrote (it contradicts a head that picked the Underwater Robot).
FREE_TEXT = """<robot_evaluation>
Drone: suitable - aerial inspection
Underwater Robot: unsuitable - water environments only
</robot_evaluation>
<robot_selection>
Selected Robot: Drone
Confidence: 0.97
Justification: Best match: aerial inspection.
</robot_selection>"""
CHARS = sorted(set(FREE_TEXT + " 0123456789.,-ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"))


def encode(text: str) -> list[int]:
    return [CHARS.index(c) for c in text]


def decode(ids: list[int]) -> str:
    return "".join(CHARS[i] for i in ids)


def scripted_logits(text: str) -> torch.Tensor:
    """A stand-in decoder that wants to write FREE_TEXT line by line: the next character of its
    line while the line so far agrees with it, else a newline."""
    lines, done = FREE_TEXT.split("\n"), text.split("\n")
    line, wanted = done[-1], lines[min(len(done) - 1, len(lines) - 1)]
    nxt = wanted[len(line)] if wanted.startswith(line) and len(line) < len(wanted) else "\n"
    logits = torch.zeros(len(CHARS))
    logits[CHARS.index(nxt)] = 10.0
    return logits


def guided_text(decision: HeadDecision, steps: int = len(FREE_TEXT) + 40) -> str:
    guide = HeadGuidedDecoding([decision], encode, decode)
    tokens: list[int] = []
    for _ in range(steps):
        so_far = torch.tensor([tokens], dtype=torch.long)
        logits = guide(so_far, scripted_logits(decode(tokens))[None].clone())
        tokens.append(int(logits.argmax()))
        if decode(tokens).endswith("</robot_selection>"):
            break
    return decode(tokens)


def test_guided_text_states_the_heads_selection_verdicts_and_confidence():
    text = guided_text(HeadDecision(["Underwater Robot"], 0.734))
    parsed = parse_reasoning(text)
    assert parsed.robots == ["Underwater Robot"]
    assert parsed.confidence == 0.73
    assert robots_mentioned_positively(parsed.sections["robot_evaluation"]) == {"Underwater Robot"}
    assert "Justification: Best match: aerial inspection." in text  # the model's own words stay


def test_unguided_scripted_text_is_the_contradiction_guidance_removes():
    parsed = parse_reasoning(FREE_TEXT)
    assert parsed.robots == ["Drone"] and parsed.confidence == 0.97


def test_forced_continuation_only_fills_decision_slots():
    decision = HeadDecision(["Drone", "Robot with Legs"], 0.5)
    assert forced_continuation("<robot_selection>\nSelected Robot:", decision) == " Drone, Robot with Legs\n"
    assert forced_continuation("x\nConfidence:", decision) == " 0.50\nJustification:"
    assert forced_continuation("</robot_evaluation>\n<selection_reasoning>\n", decision) == "Drone fits:"
    closing = forced_continuation("Confidence: 0.50\nJustification: Best match: stairs.\n", decision)
    assert closing == "</robot_selection>"
    assert forced_continuation("<robot_evaluation>\nHumanoid:", decision) == " unsuitable -"
    assert forced_continuation("<robot_evaluation>\nRobot with Legs:", decision) == " suitable -"
    # Outside <robot_evaluation>, or mid-line, nothing is forced.
    assert forced_continuation("<thinking>\nHumanoid:", decision) is None
    assert forced_continuation("<robot_evaluation>\nDrone: suitable - fastest", decision) is None
    assert forced_continuation("<robot_evaluation>\nx\n</robot_evaluation>\nDrone:", decision) is None
