"""Head-guided decoding: the reasoning text states the selection head's decision in the tagged format.

The selection head decides (it is trained, calibrated and evaluated for that); the decoder
explains. Left free, a small decoder sometimes names another robot than the head, calls the
robot it selects "unsuitable", states a confidence unrelated to the head's, or skips a tag.
Guided decoding is constrained generation over the format's skeleton (a logits processor):
the fixed parts are forced, each free part is the model's own text up to its end of line.

    <thinking>\\nGoal:                            [the task itself when the decision carries it, as
                                                     the SFT targets word it; else the model's line]
    </thinking>\\n<environment_analysis>\\nCues:  [model: one of the task's own cue phrases, when
                                                     the decision carries them; else its free line]
    </environment_analysis>\\n<robot_evaluation>\\n
    <robot>: suitable -  |  <robot>: unsuitable -   [model: the reason]   (one line per robot, by the head;
                                                     with the fleet's profiles, the reason is one of that
                                                     robot's capabilities and environments, or limitations,
                                                     chosen by the decoder; a selected robot's is the one
                                                     the model's task knowledge ranks nearest the task
                                                     when the decision carries it)
    </robot_evaluation>\\n<selection_reasoning>\\n<the head's first robot> fits:   [model: the reasons]
    </selection_reasoning>\\n<confidence_check>\\n   [model: the check]
    </confidence_check>\\n<robot_selection>\\nSelected Robot: <the head's selection>
    Confidence: <the shown confidence, 2 decimals>\\nJustification:   [model: the justification]
    (with profiles, the selection reasoning, the check's robot count and the justification
    "Best match: ..." are built the same way, each selected robot's phrase as its evaluation line's;
    the check ends "all cued by the task" or "not all ..." as the decision states, else by the model)
    </robot_selection>, then the end of the text
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from bitmar_model.reasoning_format import NO_ROBOT
from bitmar_model.robots import ROBOT_CLASSES

Encode = Callable[[str], list[int]]
Decode = Callable[[list[int]], str]

EVALUATED = tuple(r for r in ROBOT_CLASSES if r != NO_ROBOT)
# A "No Robot" selection's lines, as the SFT targets word them (reasoning_targets uses these).
NO_ROBOT_REASON = "No robot's profile fits this task."
NO_ROBOT_CHECK = "No robot needed, none is cued by the task."
NO_ROBOT_JUSTIFICATION = "No listed robot is suited to the task."
FREE = None  # a skeleton part the model writes, up to and including its newline
Profiles = Mapping[str, Mapping[str, Sequence[str]]]  # robot -> capabilities / limitations / environments


@dataclass(frozen=True)
class Choice:
    """A skeleton part the model writes as one of `options` (its logits pick which)."""

    options: tuple[str, ...]


def _reason(
    robot: str, suitable: bool, profiles: Profiles | None, end: str = "\n", ranked: str | None = None
) -> str | Choice | None:
    """What follows "<robot>: (un)suitable -" or "<robot> fits:": one of the robot's own profile
    phrases, so a reason is never another robot's ("Humanoid: unsuitable - water environments
    only"): `ranked` (the decision's reason for this robot) when given, else the model's Choice
    among them; FREE without profiles."""
    profile = (profiles or {}).get(robot)
    if not profile:
        return FREE
    if ranked is not None and suitable:
        return f" {ranked}{end}"
    fields = ("capabilities", "environments") if suitable else ("limitations",)
    phrases = [p.strip() for f in fields for p in profile.get(f, ()) if p.strip()]
    return Choice(tuple(dict.fromkeys(f" {p}{end}" for p in phrases))) if phrases else FREE


def _fit_choices(
    robots: list[str], profiles: Profiles | None, ranked: Mapping[str, str]
) -> list[str | Choice] | None:
    """One in-line fitting phrase (ranked, else a Choice) per selected robot, or None when a robot
    has none (no profiles, or "No Robot"): then the model writes that line itself."""
    choices = [_reason(robot, True, profiles, "", ranked.get(robot)) for robot in robots]
    fitting = [c for c in choices if c is not FREE]
    return fitting if len(fitting) == len(choices) else None


def _selection_reasoning(
    robots: list[str], profiles: Profiles | None, ranked: Mapping[str, str]
) -> list[str | Choice | None]:
    """"R1 fits: <R1's phrase>; R2 fits: <R2's phrase>." over the selected robots only (the SFT
    targets' wording); without profiles the model writes the line after "R1 fits:"."""
    opening = "</robot_evaluation>\n<selection_reasoning>\n"
    if robots == [NO_ROBOT]:
        return [f"{opening}{NO_ROBOT_REASON}\n"]
    choices = _fit_choices(robots, profiles, ranked)
    if choices is None:
        return [f"{opening}{robots[0]} fits:", FREE]
    parts: list[str | Choice | None] = []
    for i, (robot, choice) in enumerate(zip(robots, choices, strict=True)):
        parts += [f"{opening if i == 0 else '; '}{robot} fits:", choice]
    return [*parts, ".\n"]


def _justification(
    robots: list[str], profiles: Profiles | None, ranked: Mapping[str, str]
) -> list[str | Choice | None]:
    """"Best match: <a phrase of each selected robot>." with profiles (the targets' wording), the
    targets' fixed line for "No Robot", else the model's line after "Justification:"."""
    if robots == [NO_ROBOT]:
        return [f"Justification: {NO_ROBOT_JUSTIFICATION}\n"]
    choices = _fit_choices(robots, profiles, ranked)
    if choices is None:
        return ["Justification:", FREE]
    parts: list[str | Choice | None] = ["Justification: Best match:"]
    for i, choice in enumerate(choices):
        parts += ([","] if i else []) + [choice]
    return [*parts, ".\n"]


def _confidence_check(
    robots: list[str], profiles: Profiles | None, all_cued: bool | None
) -> list[str | Choice | None]:
    """With profiles the robot count is forced ("One robot needed," as the targets word it), so the
    check cannot contradict the selection; whether the task cued them all is stated when the decision
    knows it, else the model chooses between the targets' two endings (free, the line ran on into
    profile words)."""
    opening = "</selection_reasoning>\n<confidence_check>\n"
    if robots == [NO_ROBOT]:
        return [f"{opening}{NO_ROBOT_CHECK}\n"]
    if not profiles:
        return [opening, FREE]
    count = "One robot" if len(robots) == 1 else f"{len(robots)} robots"
    endings = (" all cued by the task.\n", " not all cued by the task.\n")
    return [f"{opening}{count} needed,", Choice(endings) if all_cued is None else endings[0 if all_cued else 1]]


@dataclass
class HeadDecision:
    robots: list[str]  # the head's selection (select_robots), e.g. ["Drone"] or ["No Robot"]
    confidence: float  # the probability shown for it (calibrated when a calibration exists)
    cues: Sequence[str] = ()  # phrases of the task itself the "Cues:" line chooses from (none: free line)
    goal: str | None = None  # the task as the "Goal:" line states it (None: the model's free line)
    # selected robot -> its reason, the capability or environment of its profile that the model's
    # task knowledge ranks nearest the task; a robot not in it: the decoder chooses among its phrases
    reasons: Mapping[str, str] = field(default_factory=dict)
    # whether a word of the task names every selected robot's reason (the targets' "all cued by the
    # task"); None: the decoder chooses the check's ending
    all_cued: bool | None = None


def _analysis(cues: Sequence[str]) -> list[str | Choice | None]:
    """"Cues: <one of the task's own phrases>." (the model's logits choose), so the analysis
    quotes the task instead of a remembered profile phrase; the model's free line without cues."""
    opening = "</thinking>\n<environment_analysis>\n"
    if not cues:
        return [opening, FREE]
    return [f"{opening}Cues:", Choice(tuple(dict.fromkeys(f" {c}.\n" for c in cues)))]


def reasoning_skeleton(decision: HeadDecision, profiles: Profiles | None = None) -> list[str | Choice | None]:
    """The guided text as forced strings, the model's choices and FREE model lines, in order."""
    evaluation: list[str | Choice | None] = []
    # Robots described only in the fleet (selected zero-shot) are evaluated after the trained ones.
    evaluated = EVALUATED + tuple(r for r in (profiles or {}) if r not in ROBOT_CLASSES)
    for i, robot in enumerate(evaluated):
        opening = "</environment_analysis>\n<robot_evaluation>\n" if i == 0 else ""
        suitable = robot in decision.robots
        verdict = "suitable" if suitable else "unsuitable"
        reason = _reason(robot, suitable, profiles, ranked=decision.reasons.get(robot))
        evaluation += [f"{opening}{robot}: {verdict} -", reason]
    robots = ", ".join(decision.robots)
    return [
        # Left free, the tiny decoder copies the task and then runs on with profile words
        # ("... barnacles inspection, marine inspection, aerial, aerial."): the goal is the task.
        "<thinking>\nGoal:", FREE if decision.goal is None else f" {decision.goal}.\n",
        *_analysis(decision.cues),
        *evaluation,
        *_selection_reasoning(decision.robots, profiles, decision.reasons),
        *_confidence_check(decision.robots, profiles, decision.all_cued),
        f"</confidence_check>\n<robot_selection>\nSelected Robot: {robots}\n"
        f"Confidence: {decision.confidence:.2f}\n",
        *_justification(decision.robots, profiles, decision.reasons),
        "</robot_selection>",
    ]  # fmt: skip


@dataclass
class _Row:
    parts: list[str | Choice | None]
    next_part: int = 0
    lines_at_start: int | None = None  # newlines in the text when the current FREE line began
    free_start: int = 0  # token index where the current FREE line began
    queue: list[int] = field(default_factory=list)
    options: list[list[int]] | None = None  # the current Choice's token sequences
    chosen_from: int = 0  # token index where the current Choice began


@dataclass
class HeadGuidedDecoding:
    """A `generate(logits_processor=...)` that writes `decisions` (one per row) into the skeleton."""

    decisions: Sequence[HeadDecision]
    encode: Encode
    decode: Decode
    eos_token_id: int | None = None  # forced after the skeleton's last part
    profiles: Profiles | None = None  # the fleet's profiles: reasons become Choices (see _reason)
    # A FREE line may not repeat one of its own n-grams (HF's no_repeat_ngram_size, per line):
    # a small decoder otherwise loops ("not all cued by the task the task the task"). 0: off.
    no_repeat_ngram_size: int = 3
    _rows: list[_Row] = field(init=False)

    def __post_init__(self) -> None:
        self._rows = [_Row(reasoning_skeleton(d, self.profiles)) for d in self.decisions]

    def _refill(self, row: _Row, text: str, length: int) -> None:
        """Queue the next forced part, unless the model is still writing a FREE line."""
        while row.next_part < len(row.parts):
            part = row.parts[row.next_part]
            if isinstance(part, Choice):
                row.options, row.chosen_from = [self.encode(o) for o in part.options], length
                row.next_part += 1
                return
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
            allowed = self._choice_step(row, tokens)
            if allowed is None and not row.queue:
                self._refill(row, self.decode(tokens), len(tokens))
                allowed = self._choice_step(row, tokens)
            if allowed is not None:
                keep = logits[index, allowed].clone()
                logits[index] = float("-inf")
                logits[index, allowed] = keep
            elif row.queue:
                token = row.queue.pop(0)
                logits[index] = float("-inf")
                logits[index, token] = 0.0
            elif row.lines_at_start is not None:
                banned = repeated_ngram_tokens(tokens[row.free_start :], self.no_repeat_ngram_size)
                if self.eos_token_id is not None:
                    banned.append(self.eos_token_id)  # the skeleton's remaining parts must still come
                logits[index, banned] = float("-inf")
        return logits

    @staticmethod
    def _choice_step(row: _Row, tokens: list[int]) -> list[int] | None:
        """The tokens that continue one of the current Choice's options, or None when no Choice is
        open (or the option written so far is complete, which closes it)."""
        if row.options is None:
            return None
        written = tokens[row.chosen_from :]
        if any(option == written for option in row.options):
            row.options = None
            return None
        n = len(written)
        allowed = sorted({o[n] for o in row.options if len(o) > n and o[:n] == written})
        return allowed or None


def repeated_ngram_tokens(line: Sequence[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram `line` already holds (none when n < 1)."""
    if n < 1 or len(line) < n:
        return []
    prefix = tuple(line[len(line) - n + 1 :]) if n > 1 else ()
    return [line[i + n - 1] for i in range(len(line) - n + 1) if tuple(line[i : i + n - 1]) == prefix]
