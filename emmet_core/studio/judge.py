"""One judgement of a prompt, used by every page: did the wanted object win, by how much,
and was the win clear?

CounterFact counts a prompt as a success when the wanted object's mean per-token NLL is
strictly lower than the other's (REFERENCE §7); :mod:`emmet_core.metrics` computes ES/PS/NS
that way and so does this module, so a page's ✓ count and its ES/PS/NS never disagree. A
win by a hair is still a win for the metric, but a lecture audience should see that it is
a hair: the margin (in nats of mean per-token log-probability) stands beside every mark and
a win below ``threshold`` is shown as *weak*. A prompt whose two objects are the same text
cannot be won by either side: it is a *tie*, counted as failed by both ES/PS and NS, and
never suggested as a check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

CLEAR_MARGIN = 1.0  # nats: the winner is e ≈ 2.7× as likely per token as the other object

Outcome = Literal["pass", "weak", "fail", "tie"]
SYMBOLS: dict[str, str] = {"pass": "✓", "weak": "✓?", "fail": "✗", "tie": "="}


def same_object(a: str | None, b: str | None) -> bool:
    """Two objects that are the same text (surrounding spaces ignored): the model scores
    them alike, so neither can win."""
    return (a or "").strip() == (b or "").strip()


@dataclass(frozen=True)
class Judgement:
    """The verdict on one prompt for the object it should prefer."""

    outcome: Outcome
    margin: float  # wanted minus other mean per-token log-probability (nats); > 0 favours the wanted one

    @property
    def passed(self) -> bool:
        """What ES/PS/NS count: the wanted object strictly more likely."""
        return self.outcome in ("pass", "weak")

    @property
    def symbol(self) -> str:
        return SYMBOLS[self.outcome]

    def label(self) -> str:
        """E.g. ``✓ +2.31`` or ``✓? +0.04``: the mark and its margin, always together."""
        if self.outcome == "tie":
            return "= same object"
        return f"{self.symbol} {self.margin:+.2f}"


def judge(nll_wanted: float, nll_other: float, *, threshold: float = CLEAR_MARGIN,
          tie: bool = False) -> Judgement:
    """Judge a prompt from the mean per-token NLLs of the object it should prefer and of
    the other one; ``tie`` marks a prompt whose two objects are the same text."""
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    margin = nll_other - nll_wanted
    if tie:
        return Judgement("tie", 0.0)
    if margin <= 0:
        return Judgement("fail", margin)
    return Judgement("pass" if margin >= threshold else "weak", margin)


def judge_new(nll_new: float, nll_true: float, new: str, true: str, threshold: float = CLEAR_MARGIN) -> Judgement:
    """A rewrite or paraphrase prompt: it should now prefer the new object."""
    return judge(nll_new, nll_true, threshold=threshold, tie=same_object(new, true))


def judge_kept(nll_new: float, nll_true: float, new: str, true: str, threshold: float = CLEAR_MARGIN) -> Judgement:
    """A neighbour prompt: it should keep preferring its own (true) object."""
    return judge(nll_true, nll_new, threshold=threshold, tie=same_object(new, true))


def tally(judgements: list[Judgement]) -> dict[str, int]:
    """How many passed (clear or weak), how many were weak, failed or ties."""
    counts = {outcome: sum(j.outcome == outcome for j in judgements) for outcome in SYMBOLS}
    return {"passed": counts["pass"] + counts["weak"], **counts, "total": len(judgements)}
