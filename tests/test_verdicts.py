"""ftcourse.verdicts: the words follow the statistics, and no winner is named on an interval spanning 0."""

from __future__ import annotations

import pytest

from ftcourse import evaluate, verdicts


def test_refuses_to_name_a_winner_when_the_interval_spans_zero():
    # 40 questions: A alone right on 5, B alone right on 4, the rest alike: a 1-point lead, pure noise
    a = [1] * 5 + [0] * 4 + [1] * 15 + [0] * 16
    b = [0] * 5 + [1] * 4 + [1] * 15 + [0] * 16
    said = verdicts.verdict(evaluate.paired_difference(a, b), "tuned", "base")
    assert said.outcome == "no detectable difference" and said.winner is None and not said.resolved
    assert "the interval spans 0" in said.text and "per question, n = 40" in said.text
    assert "higher" not in said.text and "lower" not in said.text


def test_identical_answers_are_no_difference_not_a_tie_broken_by_chance():
    said = verdicts.verdict(evaluate.paired_difference([1, 0] * 10, [1, 0] * 10))
    assert said.outcome == "no detectable difference" and "agree on every question" in said.text


def test_a_clear_win_and_a_clear_loss_name_the_better_model():
    a = [1] * 20 + [1] * 10 + [0] * 10  # A alone right on 20 questions, B alone on none
    b = [0] * 20 + [1] * 10 + [0] * 10
    win = verdicts.verdict(evaluate.paired_difference(a, b), "rank 32", "rank 1")
    assert win.outcome == "higher" and win.winner == "rank 32" and win.resolved
    assert win.text.startswith("higher by 50 points [") and "per question, n = 40" in win.text
    assert win.sentence.startswith("rank 32 against rank 1: higher by 50 points")
    loss = verdicts.verdict(evaluate.paired_difference(b, a), "rank 1", "rank 32")
    assert loss.outcome == "lower" and loss.winner == "rank 32" and loss.text.startswith("lower by 50 points")
    # For a loss (lower is better) the same numbers make the *lower* one the winner.
    lower_loss = verdicts.verdict(
        evaluate.paired_difference(b, a), "rank 1", "rank 32", higher_is_better=False
    )
    assert lower_loss.winner == "rank 1"


def test_hand_worked_case_six_discordant_questions_of_eight():
    # 8 questions; A alone right on 6, both wrong on 2. Difference 6/8 = 75 points. Under "no difference"
    # each of the 6 discordant questions is a fair coin: p = 2 * (1/2)^6 = 0.03125 (two-sided).
    a, b = [1] * 6 + [0, 0], [0] * 8
    result = evaluate.paired_difference(a, b)
    assert result.estimate == 0.75 and result.n_units == 8
    assert result.p_value == pytest.approx(2 * 0.5**6)
    assert result.low > 0  # a resample of 8 questions with none of the 6 happens with chance (1/4)^8
    said = verdicts.verdict(result, "A", "B")
    assert said.text.startswith("higher by 75 points") and "p = 0.031" in said.text


def test_too_few_items_to_tell_even_when_unanimous():
    # 5 questions, A right on all, B on none: p = 2 / 2^5 = 0.0625 at best, so no n = 5 can decide at 5%
    assert verdicts.fewest_units(0.05) == 6  # 2 / 2^6 = 0.031 < 0.05 <= 2 / 2^5
    said = verdicts.verdict(evaluate.paired_difference([1] * 5, [0] * 5))
    assert said.outcome == "too few items to tell" and said.winner is None
    assert "n = 5 questions" in said.text and "at least 6" in said.text


def test_interval_and_test_that_disagree_name_no_winner():
    # 10 questions: A alone right on 5, no question for B. The bootstrap interval excludes 0 (a resample
    # without any of the 5 has chance (1/2)^10), yet the exact test gives p = 2 / 2^5 = 0.0625.
    result = evaluate.paired_difference([1] * 5 + [0] * 5, [0] * 10)
    assert result.low > 0 and result.p_value == pytest.approx(0.0625)
    said = verdicts.verdict(result)
    assert said.outcome == "not resolved" and said.winner is None


def test_seeds_are_repeated_measures_so_the_unit_stays_the_question():
    a, b = [1] * 6 + [0] * 14, [0] * 20
    questions = list(range(20))
    once = evaluate.paired_difference(a, b, questions)
    twice = evaluate.paired_difference(a + a, b + b, questions + questions)  # the same 20, two seeds
    assert (twice.estimate, twice.low, twice.high, twice.p_value) == (
        once.estimate,
        once.low,
        once.high,
        once.p_value,
    )
    assert twice.n_units == 20 and twice.n_observations == 40
    said = verdicts.verdict(twice)
    assert "per question, n = 20, 40 answers averaged per question first" in said.text
    # McNemar on the 40 pooled answers counts each discordant question twice and is far too sure.
    assert evaluate.mcnemar_exact(12, 0) < once.p_value / 50


def test_a_win_tally_sets_ties_aside_and_refuses_on_an_interval_spanning_half():
    # 12 wins, 20 ties, 8 losses: among the 20 decided, 60% wins, Wilson [39, 78]: no preference shown
    judged = [1.0] * 12 + [0.5] * 20 + [0.0] * 8
    tally = evaluate.win_tally(judged)
    assert (tally.wins, tally.ties, tally.losses, tally.decided) == (12, 20, 8, 20)
    assert (tally.low, tally.high) == pytest.approx(evaluate.wilson_interval(12, 20))
    said = verdicts.verdict(tally, "NEFTune", "plain")
    assert said.outcome == "no detectable difference" and said.winner is None
    assert "12 wins, 20 ties, 8 losses for NEFTune" in said.text and "spans 50%" in said.text
    clear = verdicts.verdict(evaluate.win_tally([1.0] * 18 + [0.5] * 20 + [0.0] * 2), "NEFTune", "plain")
    assert clear.winner == "NEFTune" and clear.text.startswith("NEFTune preferred: 18 wins")


def test_a_share_against_chance():
    # 32 of 40 right where chance is 50%: Wilson [65, 90] minus 50, exact two-sided binomial p
    result = evaluate.proportion_against(32, 40, 0.5)
    assert result.estimate == pytest.approx(0.3)
    low, high = evaluate.wilson_interval(32, 40)
    assert (result.low, result.high) == pytest.approx((low - 0.5, high - 0.5))
    assert result.p_value == pytest.approx(evaluate.mcnemar_exact(32, 8))  # at 1/2 the same binomial
    said = verdicts.verdict(result, "the reward model", "chance")
    assert said.winner == "the reward model" and said.text.startswith("higher by 30 points")


def test_an_existing_paired_comparison_is_read_with_its_items_as_units():
    a, b = [True] * 12 + [False] * 28, [False] * 12 + [False] * 28
    pair = evaluate.paired_comparison(a, b)
    said = verdicts.verdict(pair, "tuned", "base")
    assert said.winner == "tuned" and "per item, n = 40" in said.text
    assert said.text == verdicts.verdict(evaluate.difference_from(pair, unit="item"), "tuned", "base").text


def test_an_interval_bound_never_rounds_onto_zero_or_fifty():
    # A bound of -0.3 points printed at 0 digits would read "-0" (or "+0" for +0.4): an interval that spans
    # 0 must show a bound below 0, and one that excludes 0 must show both bounds on one side of it.
    spans = evaluate.Difference(0.05, -0.003, 0.12, 0.2, 40, 40)
    said = verdicts.verdict(spans)
    assert said.outcome == "no detectable difference" and "[-0.3, +12]" in said.text
    excludes = evaluate.Difference(0.05, 0.004, 0.12, 0.01, 40, 40)
    said = verdicts.verdict(excludes)
    assert said.outcome == "higher" and "[+0.4, +12]" in said.text
    on_zero = evaluate.Difference(0.05, 0.0, 0.12, 0.2, 40, 40)
    assert "[0, +12]" in verdicts.verdict(on_zero).text  # exactly 0: no sign that suggests a side
    tally = evaluate.WinTally(30, 0, 10, 0.75, 0.503, 0.86, 0.002, 40)
    said = verdicts.verdict(tally, "A", "B")
    assert said.winner == "A" and "[50.3, 86]" in said.text  # not "[50, 86]" beside "A preferred"
