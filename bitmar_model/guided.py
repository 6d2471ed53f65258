"""Head-guided decoding: the reasoning text states the selection head's decision in the tagged format.

The selection head decides (it is trained, calibrated and evaluated for that); the decoder
explains. Left free, a small decoder sometimes names another robot than the head, calls the
robot it selects "unsuitable", states a confidence unrelated to the head's, or skips a tag.
Guided decoding is constrained generation over the format's skeleton (a logits processor):
the fixed parts are forced, each free part is the model's own text up to its end of line.

    <thinking>\\nGoal:                            [model: the goal]
    </thinking>\\n<environment_analysis>\\n        [model: the cues]
    </environment_analysis>\\n<robot_evaluation>\\n
    <robot>: suitable -  |  <robot>: unsuitable -   [model: the reason]   (one line per robot, by the head)
    </robot_evaluation>\\n<selection_reasoning>\\n<the head's first robot> fits:   [model: the reasons]
    </selection_reasoning>\\n<confidence_check>\\n   [model: the check]
    </confidence_check>\\n<robot_selection>\\nSelected Robot: <the head's selection>
    Confidence: <the shown confidence, 2 decimals>\\nJustification:   [model: the justification]
    </robot_selection>, then the end of the text
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from bitmar_model.reasoning_format import NO_ROBOT
from bitmar_model.robots import ROBOT_CLASSES

Encode = Callable[[str], list[int]]
Decode = Callable[[list[int]], str]

EVALUATED = tuple(r for r in ROBOT_CLASSES if r != NO_ROBOT)
NO_ROBOT_REASON = "No robot's profile fits this task."  # as the SFT targets word it
FREE = None  # a skeleton part the model writes, up to and including its newline


@dataclass
class HeadDecision:
    robots: list[str]  # the head's selection (select_robots), e.g. ["Drone"] or ["No Robot"]
    confidence: float  # the probability shown for it (calibrated when a calibration exists)


def reasoning_skeleton(decision: HeadDecision) -> list[str | None]:
    """The guided text as forced strings and FREE model lines, in order."""
    evaluation: list[str | None] = []
    for i, robot in enumerate(EVALUATED):
        opening = "</environment_analysis>\n<robot_evaluation>\n" if i == 0 else ""
        verdict = "suitable" if robot in decision.robots else "unsuitable"
        evaluation += [f"{opening}{robot}: {verdict} -", FREE]
    if decision.robots == [NO_ROBOT]:
        selection: list[str | None] = [f"</robot_evaluation>\n<selection_reasoning>\n{NO_ROBOT_REASON}\n"]
    else:
        selection = [f"</robot_evaluation>\n<selection_reasoning>\n{decision.robots[0]} fits:", FREE]
    robots = ", ".join(decision.robots)
    return [
        "<thinking>\nGoal:", FREE,
        "</thinking>\n<environment_analysis>\n", FREE,
        *evaluation,
        *selection,
        "</selection_reasoning>\n<confidence_check>\n", FREE,
        f"</confidence_check>\n<robot_selection>\nSelected Robot: {robots}\n"
        f"Confidence: {decision.confidence:.2f}\nJustification:", FREE,
        "</robot_selection>",
    ]  # fmt: skip


@dataclass
class _Row:
    parts: list[str | None]
    next_part: int = 0
    lines_at_start: int | None = None  # newlines in the text when the current FREE line began
    free_start: int = 0  # token index where the current FREE line began
    queue: list[int] = field(default_factory=list)


@dataclass
class HeadGuidedDecoding:
    """A `generate(logits_processor=...)` that writes `decisions` (one per row) into the skeleton."""

    decisions: Sequence[HeadDecision]
    encode: Encode
    decode: Decode
    eos_token_id: int | None = None  # forced after the skeleton's last part
    # A FREE line may not repeat one of its own n-grams (HF's no_repeat_ngram_size, per line):
    # a small decoder otherwise loops ("not all cued by the task the task the task"). 0: off.
    no_repeat_ngram_size: int = 3
    _rows: list[_Row] = field(init=False)

    def __post_init__(self) -> None:
        self._rows = [_Row(reasoning_skeleton(d)) for d in self.decisions]

    def _refill(self, row: _Row, text: str, length: int) -> None:
        """Queue the next forced part, unless the model is still writing a FREE line."""
        while row.next_part < len(row.parts):
            part = row.parts[row.next_part]
            if part is not FREE:
                row.queue.extend(self.encode(part))
                row.next_part += 1
                return
            if row.lines_at_start is None:
                row.lines_at_start = text.count("\n")  # the model's line starts now
                row.free_start = length
                return
            if text.count("\n") <= row.lines_at_start:
                return
            row.next_part, row.lines_at_start = row.next_part + 1, None  # its line ended
        if row.next_part == len(row.parts) and self.eos_token_id is not None:
            row.queue.append(self.eos_token_id)
        row.next_part = len(row.parts) + 1

    def __call__(self, generated: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """generated [B, n] (the new tokens so far), logits [B, V] -> logits with forced rows one-hot."""
        for index, row in enumerate(self._rows):
            tokens = generated[index].tolist()
            if not row.queue:
                self._refill(row, self.decode(tokens), len(tokens))
            if row.queue:
                token = row.queue.pop(0)
                logits[index] = float("-inf")
                logits[index, token] = 0.0
            elif row.lines_at_start is not None:
                banned = repeated_ngram_tokens(tokens[row.free_start :], self.no_repeat_ngram_size)
                if self.eos_token_id is not None:
                    banned.append(self.eos_token_id)  # the skeleton's remaining parts must still come
                logits[index, banned] = float("-inf")
        return logits


def repeated_ngram_tokens(line: Sequence[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram `line` already holds (none when n < 1)."""
    if n < 1 or len(line) < n:
        return []
    prefix = tuple(line[len(line) - n + 1 :]) if n > 1 else ()
    return [line[i + n - 1] for i in range(len(line) - n + 1) if tuple(line[i : i + n - 1]) == prefix]
