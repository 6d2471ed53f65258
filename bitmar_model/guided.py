"""Head-guided decoding: the reasoning text states the selection head's decision.

The selection head decides (it is trained, calibrated and evaluated for that); the decoder
explains. Left free, the decoder sometimes names another robot than the head, calls the
robot it selects "unsuitable" in `<robot_evaluation>`, or states a confidence unrelated to
the head's. Guided decoding forces exactly the decision slots of the tagged format and
leaves every other token to the model (a logits processor, as in constrained generation):

    <robot_evaluation>  "<robot>:"          -> " suitable -" if the head selects it, else " unsuitable -"
    <selection_reasoning> (its start)       -> "<the head's first robot> fits:"
    <robot_selection>   "Selected Robot:"   -> " <the head's selection>"  (then a newline)
                        "Confidence:"       -> " <the shown confidence, 2 decimals>" (then "Justification:")
                        the justification line's end -> "</robot_selection>", then end of text

The reason after "-", the thinking, the environment analysis, the selection reasoning and the
justification stay the model's own text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from bitmar_model.reasoning_format import NO_ROBOT
from bitmar_model.robots import ROBOT_CLASSES

_EVALUATED = frozenset(r for r in ROBOT_CLASSES if r != NO_ROBOT)
NO_ROBOT_REASON = "No robot's profile fits this task."  # as the SFT targets word it

Encode = Callable[[str], list[int]]
Decode = Callable[[list[int]], str]


@dataclass
class HeadDecision:
    robots: list[str]  # the head's selection (select_robots), e.g. ["Drone"] or ["No Robot"]
    confidence: float  # the probability shown for it (calibrated when a calibration exists)


def forced_continuation(text: str, decision: HeadDecision) -> str | None:
    """The text to force after `text` (the row's generation so far), or None to let the model go on."""
    if text.endswith("\n") and text.rstrip("\n").rsplit("\n", 1)[-1].startswith("Justification:"):
        # The justification is the last line: close the block (after a forced value the decoder
        # sometimes re-opened <selection_reasoning> here instead).
        return "</robot_selection>"
    if text.endswith("<selection_reasoning>\n"):
        return NO_ROBOT_REASON if decision.robots == [NO_ROBOT] else f"{decision.robots[0]} fits:"
    line = text.rsplit("\n", 1)[-1].strip()
    if line == "Selected Robot:":
        return f" {', '.join(decision.robots)}\n"
    if line == "Confidence:":
        # The next line's label too: after a value SFT never showed (say "0.99": "9", "9"), the
        # decoder tends to close the section without its justification.
        return f" {decision.confidence:.2f}\nJustification:"
    in_evaluation = text.rfind("<robot_evaluation>") > text.rfind("</robot_evaluation>")
    if in_evaluation and line.endswith(":") and line[:-1] in _EVALUATED:
        return " suitable -" if line[:-1] in decision.robots else " unsuitable -"
    return None


@dataclass
class HeadGuidedDecoding:
    """A `generate(logits_processor=...)` that forces the decision slots to `decisions` (one per row)."""

    decisions: Sequence[HeadDecision]
    encode: Encode
    decode: Decode
    eos_token_id: int | None = None  # forced once </robot_selection> is written: the text is complete
    _queues: list[list[int]] = field(init=False)

    def __post_init__(self) -> None:
        self._queues = [[] for _ in self.decisions]

    def __call__(self, generated: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """generated [B, n] (the new tokens so far), logits [B, V] -> logits with forced rows one-hot."""
        for row, queue in enumerate(self._queues):
            if not queue:
                text = self.decode(generated[row].tolist())
                if self.eos_token_id is not None and text.rstrip().endswith("</robot_selection>"):
                    queue.append(self.eos_token_id)
                else:
                    forced = forced_continuation(text, self.decisions[row])
                    queue.extend(self.encode(forced) if forced else ())
            if queue:
                token = queue.pop(0)
                logits[row] = float("-inf")
                logits[row, token] = 0.0
        return logits
