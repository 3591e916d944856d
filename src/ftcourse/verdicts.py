"""Verdicts: a comparison turned into words by its statistics, never typed by hand.

A chapter measures two models (or a model against chance) and gets a `Difference` or a `WinTally` from
`ftcourse.evaluate`. `verdict` turns it into the sentence the prose glues: "higher by 25 points [12, 38]
(per question, n = 40)". It names a direction only when the interval excludes 0 *and* the test agrees;
it says "no detectable difference" when the interval spans 0, and "too few items to tell" when even a
unanimous result could not have been told from chance. Every sentence states its unit of analysis.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ftcourse.evaluate import Difference, PairedComparison, WinTally, difference_from


def fewest_units(alpha: float = 0.05) -> int:
    """The fewest units at which a unanimous result can reach p < alpha (a sign test: 2 * 0.5**n)."""
    n = 1
    while 2 * 0.5**n >= alpha:
        n += 1
    return n


@dataclass(frozen=True)
class Verdict:
    """What a comparison licenses you to say: the outcome, the sentence, and who (if anyone) is ahead."""

    outcome: str  # "higher", "lower", "no detectable difference", "too few items to tell", "not resolved"
    text: str  # the sentence for the prose, with the numbers, the interval and the unit
    winner: str | None  # the name that is better, or None when the data cannot say
    a: str = "A"
    b: str = "B"

    @property
    def resolved(self) -> bool:
        """True when the comparison names a direction (the interval excludes 0 and the test agrees)."""
        return self.outcome in ("higher", "lower")

    @property
    def sentence(self) -> str:
        """The text with its subject: "rank 32 against rank 1: higher by 25 points [12, 38] (...)"."""
        return f"{self.a} against {self.b}: {self.text}"

    def __str__(self) -> str:
        return self.text


def _number(value: float, scale: float, digits: int, signed: bool = False) -> str:
    return f"{scale * value:{'+' if signed else ''}.{digits}f}"


def _bound(value: float, scale: float, digits: int, signed: bool = True, reference: float = 0.0) -> str:
    """An interval bound printed so that its side of `reference` (0, or 50%) is never lost to rounding.

    At 0 digits, -0.003 would print "-0" and +0.004 "+0": an interval that spans 0 would look as if it
    excluded it, or the other way round. A bound that rounds onto the reference gets more digits until
    it does not (up to 4 more); a bound exactly on the reference prints as the bare reference.
    """
    if value == reference:
        return f"{scale * reference:.{digits}f}" if reference else "0"
    for shown_digits in range(digits, digits + 5):
        text = _number(value, scale, shown_digits, signed)
        if float(text) != scale * reference:
            return text
    return text


def verdict(
    result: Difference | WinTally | PairedComparison,
    a: str = "A",
    b: str = "B",
    *,
    higher_is_better: bool = True,
    scale: float = 100.0,
    unit_word: str = "points",
    digits: int = 0,
) -> Verdict:
    """The words a comparison of `a` against `b` licenses, computed from its interval and test."""
    if isinstance(result, WinTally):
        said = _win_verdict(result, a, b, digits)
    else:
        if isinstance(result, PairedComparison):  # one 0/1 answer per item: its McNemar p is the test
            result = difference_from(result, unit="item")
        said = _difference_verdict(result, a, b, higher_is_better, scale, unit_word, digits)
    return replace(said, a=a, b=b)


def _difference_verdict(
    result: Difference, a: str, b: str, higher_is_better: bool, scale: float, unit_word: str, digits: int
) -> Verdict:
    """The verdict on a Difference: direction only when the interval excludes 0 and the test agrees."""
    alpha = 1.0 - result.confidence
    unit = f"per {result.unit}, n = {result.n_units}"
    if result.n_observations > result.n_units:
        unit += f", {result.n_observations} answers averaged per {result.unit} first"
    interval = f"[{_bound(result.low, scale, digits)}, {_bound(result.high, scale, digits)}]"
    p_text = f"p = {result.p_value:.2g}" if result.p_value >= 0.001 else "p < 0.001"
    needed = fewest_units(alpha)
    if result.n_units < needed:
        return Verdict(
            "too few items to tell",
            f"too few items to tell: n = {result.n_units} {result.unit}s, and at least {needed} are needed "
            f"before even a unanimous result could reach p < {alpha:.2g}",
            None,
        )
    signed = f"{_number(result.estimate, scale, digits, True)} {unit_word} {interval}"
    excludes_zero = result.low > 0 or result.high < 0
    if not excludes_zero:
        if result.low == result.high == 0:
            reason = f"the two agree on every {result.unit}"
        else:
            reason = f"{signed}, the interval spans 0"
        return Verdict("no detectable difference", f"no detectable difference: {reason} ({unit})", None)
    if result.p_value >= alpha:  # the bootstrap interval and the test disagree: say so, name no one
        return Verdict(
            "not resolved",
            f"not resolved: {signed} excludes 0, but the sign-flip test gives {p_text} ({unit})",
            None,
        )
    outcome = "higher" if result.estimate > 0 else "lower"
    a_better = (outcome == "higher") == higher_is_better
    size = _number(abs(result.estimate), scale, digits)
    return Verdict(
        outcome, f"{outcome} by {size} {unit_word} {interval} ({unit}; {p_text})", a if a_better else b
    )


def _win_verdict(tally: WinTally, a: str, b: str, digits: int) -> Verdict:
    """Wins, ties and losses of `a` against `b`, and whether the share of decided wins differs from half."""
    alpha = 1.0 - tally.confidence
    counts = f"{tally.wins} wins, {tally.ties} ties, {tally.losses} losses for {a}"
    unit = f"per {tally.unit}, n = {tally.n_units}"
    needed = fewest_units(alpha)
    if tally.decided < needed:
        return Verdict(
            "too few items to tell",
            f"too few items to tell: {counts}; only {tally.decided} decided, and at least {needed} are "
            f"needed before a unanimous result could reach p < {alpha:.2g} ({unit})",
            None,
        )
    low, high = (_bound(x, 100, digits, signed=False, reference=0.5) for x in (tally.low, tally.high))
    share = f"{100 * tally.share:.{digits}f}% [{low}, {high}]"
    p_text = f"p = {tally.p_value:.2g}" if tally.p_value >= 0.001 else "p < 0.001"
    described = f"{counts}; {a} won {share} of the {tally.decided} decided ({unit}; ties set aside)"
    if tally.low <= 0.5 <= tally.high:
        return Verdict(
            "no detectable difference",
            f"no detectable preference: {described}, the interval spans 50%",
            None,
        )
    if tally.p_value >= alpha:
        return Verdict("not resolved", f"not resolved: {described}, but the sign test gives {p_text}", None)
    ahead = a if tally.share > 0.5 else b
    return Verdict("higher" if ahead == a else "lower", f"{ahead} preferred: {described}; {p_text}", ahead)
