"""Measuring a model, the one way every chapter does it.

- exact match: greedy answers to task-world questions, per task family, chat or raw form;
- perplexity: how well the model still predicts held-out text of its pretraining distribution;
- win rate: how often a judge prefers model A's reply to model B's (a trained reward model on the cpu
  profile, an LLM served by Ollama on the spark profile), and the judge's own accuracy;
- capability retention: raw-form exact match and perplexity before and after fine-tuning;
- contamination: test prompts that also occur in the training data or in the pretraining text;
- uncertainty: Wilson and exact intervals for a proportion, a cluster bootstrap where items repeat, and
  paired comparisons of two models on the same items (paired bootstrap, McNemar's exact test);
- the unit of analysis: `paired_difference` averages seeds and repeats per question before it resamples
  questions and flips their signs, and `win_tally` counts a judge's wins, ties and losses separately.
  `ftcourse.verdicts` turns those results into words.

The reward model itself (training, scoring) is `ftcourse.reward`; here it is used as a judge.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from ftcourse.data import exchanges, normalize  # noqa: F401 (re-exported: chapters call evaluate.normalize)
from ftcourse.profiles import (
    TASK_WORLD,
    Profile,
    active_profile,
    note_skip,
    note_source,
    resolve_dataset,
    resolve_model,
)
from ftcourse.reward import Turn, reward_judge, reward_scores, turn_text
from ftcourse.toy import model_dir
from ftcourse.toy.corpus import ANSWER_GAPS, pretraining_documents
from ftcourse.toy.tasks import FAMILIES, Task, build_tasks

STOP_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "\n")


# ---------------------------------------------------------------------------------------------------------
# Generation and exact match
# ---------------------------------------------------------------------------------------------------------


def chat_prompt(tokenizer: Any, task: Task, examples: Sequence[Task] = ()) -> str:
    """The chat-form prompt for `task`, with `examples` as earlier solved turns (few-shot)."""
    messages = []
    for example in examples:
        messages += [
            {"role": "user", "content": example.prompt},
            {"role": "assistant", "content": example.answer},
        ]
    messages.append({"role": "user", "content": task.prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def first_answer(text: str) -> str:
    """The reply up to the first end-of-turn token or line break, stripped."""
    for marker in STOP_MARKERS:
        text = text.split(marker)[0]
    return text.strip()


def _device(model: Any) -> torch.device:
    # PEFT wrappers and plain modules both answer `.device`; test stubs may not.
    return getattr(model, "device", torch.device("cpu"))


@torch.no_grad()
def generate(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 16, batch_size: int = 32
) -> list[str]:
    """Greedy continuations of `prompts` (special tokens kept, so stop markers stay visible)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
    no_pad = tokenizer.pad_token is None  # Llama 3.1 has no pad token; left padding is masked, EOS serves
    if no_pad:
        tokenizer.pad_token = tokenizer.eos_token
    pad_id = tokenizer.pad_token_id
    replies: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(
                list(prompts[start : start + batch_size]),
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            ).to(model.device)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
            new_tokens = out[:, batch["input_ids"].shape[1] :]
            replies += tokenizer.batch_decode(new_tokens, skip_special_tokens=False)
    finally:
        if no_pad:  # leave the tokenizer as it came
            tokenizer.pad_token = None
    return replies


def replies(model: Any, tokenizer: Any, tasks: Sequence[Task], max_new_tokens: int = 16) -> list[str]:
    """The model's zero-shot chat answers to `tasks`, cut at the end of the turn."""
    prompts = [chat_prompt(tokenizer, t) for t in tasks]
    return [first_answer(r) for r in generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)]


def mean_by_family(values: Sequence[float], tasks: Sequence[Task]) -> dict[str, float]:
    """The mean of per-task `values` (hits, verdicts) within each task family, in order of appearance."""
    groups: dict[str, list[float]] = {}
    for value, task in zip(values, tasks, strict=True):
        groups.setdefault(task.family, []).append(float(value))
    return {family: float(np.mean(group)) for family, group in groups.items()}


# ---------------------------------------------------------------------------------------------------------
# Uncertainty: intervals for a proportion, clusters of repeated items, paired comparisons
# ---------------------------------------------------------------------------------------------------------

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile: the z of a two-sided 95% interval


def z_for(confidence: float) -> float:
    """The standard-normal z of a two-sided interval at `confidence` (1.96 for 0.95)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    return NormalDist().inv_cdf((1.0 + confidence) / 2)


def wilson_interval(successes: float, n: float, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval (low, high) for the proportion successes/n; positive width at 0% and 100%."""
    if n <= 0:
        raise ValueError(f"wilson_interval needs n > 0 trials, got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie between 0 and n={n}, got {successes}")
    # The interval is the set of true proportions p that a z-test would not reject given the observed
    # share: solving |share - p| <= z * sqrt(p (1 - p) / n) for p gives a centre pulled towards 1/2.
    share = successes / n
    scale = 1 + z**2 / n
    centre = (share + z**2 / (2 * n)) / scale
    half = z * math.sqrt(share * (1 - share) / n + z**2 / (4 * n**2)) / scale
    # At 0 and n successes the bound is exactly 0 or 1; say so rather than keep a rounding residue.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    return low, 1.0 if successes == n else min(1.0, centre + half)


def _binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed exactly."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def clopper_pearson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval (low, high) for successes/n: wider than Wilson, never too narrow."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got successes={successes}, n={n}")
    tail = (1.0 - confidence) / 2

    def solve(tail_probability, target: float) -> float:  # tail_probability increases in p; bisection
        low, high = 0.0, 1.0
        for _ in range(60):
            mid = (low + high) / 2
            low, high = (low, mid) if tail_probability(mid) > target else (mid, high)
        return (low + high) / 2

    # lower: the p at which `successes` or more has probability tail (that chance grows with p);
    # upper: the p at which `successes` or fewer has probability tail (that chance shrinks with p).
    lower = 0.0 if successes == 0 else solve(lambda p: 1 - _binomial_cdf(successes - 1, n, p), tail)
    upper = 1.0 if successes == n else solve(lambda p: 1 - _binomial_cdf(successes, n, p), 1 - tail)
    return lower, upper


def bootstrap_interval(
    values: Sequence[float], confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval (low, high) for the mean of `values`; zero width if all are equal."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        raise ValueError("bootstrap_interval needs at least one value")
    rng = np.random.default_rng(seed)
    # Resample the test set with replacement: the spread of the means is the spread we would see
    # if we had drawn another test set of the same size from the same task world.
    means = data[rng.integers(0, data.size, size=(n_resamples, data.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def _cluster_sums(values: Sequence[float], clusters: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Per cluster: the sum of its values and how many it has, in order of first appearance."""
    if len(values) != len(clusters):
        raise ValueError(
            f"need one cluster label per value; got {len(values)} values, {len(clusters)} labels"
        )
    if len(values) == 0:
        raise ValueError("need at least one value")
    index: dict[Any, int] = {}
    for cluster in clusters:
        index.setdefault(cluster, len(index))
    sums, counts = np.zeros(len(index)), np.zeros(len(index))
    for value, cluster in zip(values, clusters, strict=True):
        sums[index[cluster]] += float(value)
        counts[index[cluster]] += 1
    return sums, counts


def cluster_bootstrap_interval(
    values: Sequence[float],
    clusters: Sequence[Any],
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap interval (low, high) of the mean, resampling whole clusters of repeated items."""
    # Two phrasings of one capital question are not two independent draws from the task world: a model
    # that knows the capital usually gets both. Resampling countries, not questions, keeps that.
    sums, counts = _cluster_sums(values, clusters)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, sums.size, size=(n_resamples, sums.size))
    means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (items only A, or only B, got right)."""
    if only_a < 0 or only_b < 0:
        raise ValueError(f"discordant counts cannot be negative, got {only_a} and {only_b}")
    n = only_a + only_b
    if n == 0:
        return 1.0  # the two models never disagree: no evidence either way
    # Under "neither model is better", each discordant item is a fair coin: only_a ~ Binomial(n, 1/2).
    return min(1.0, 2 * _binomial_cdf(min(only_a, only_b), n, 0.5))


def _check_pairs(
    values_a: Sequence[Any], values_b: Sequence[Any], labels: Sequence[Any] | None = None
) -> None:
    """Raise a ValueError unless A and B give one value each per answer (and `labels` one label each)."""
    if len(values_a) != len(values_b):
        raise ValueError(
            f"a paired comparison needs one value of A and one of B per answer, on the same items in the "
            f"same order; got {len(values_a)} and {len(values_b)}. Pool seeds by concatenating each model's "
            "values in the same question order."
        )
    if len(values_a) == 0:
        raise ValueError("a paired comparison needs at least one item")
    if labels is not None and len(labels) != len(values_a):
        raise ValueError(
            f"need one question (or cluster) label per answer; got {len(labels)} labels for "
            f"{len(values_a)} answers"
        )


@dataclass(frozen=True)
class PairedComparison:
    """Two models scored on the same items: accuracies, discordant counts, interval of A - B, McNemar p."""

    n: int
    accuracy_a: float
    accuracy_b: float
    only_a: int  # items A got right and B got wrong
    only_b: int  # items B got right and A got wrong
    low: float  # paired-bootstrap interval of accuracy_a - accuracy_b
    high: float
    p_value: float  # exact McNemar test of "A and B are equally accurate"

    @property
    def difference(self) -> float:
        """Accuracy of A minus accuracy of B (a fraction; positive when A is better)."""
        return self.accuracy_a - self.accuracy_b


def paired_comparison(
    hits_a: Sequence[bool],
    hits_b: Sequence[bool],
    clusters: Sequence[Any] | None = None,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> PairedComparison:
    """A PairedComparison of two models' hits on the same items (bootstrap over `clusters` when given)."""
    _check_pairs(hits_a, hits_b, clusters)
    a, b = np.asarray(hits_a, dtype=float), np.asarray(hits_b, dtype=float)
    # Resampling item *pairs* keeps what both models share (easy items, hard items): the differences vary
    # far less than two separate accuracies do, which is why a paired test sees what two intervals hide.
    low, high = cluster_bootstrap_interval(
        a - b, clusters if clusters is not None else range(a.size), confidence, n_resamples, seed
    )
    only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    return PairedComparison(
        int(a.size),
        float(a.mean()),
        float(b.mean()),
        only_a,
        only_b,
        low,
        high,
        mcnemar_exact(only_a, only_b),
    )


# ---------------------------------------------------------------------------------------------------------
# The unit of analysis: questions, not answers
# ---------------------------------------------------------------------------------------------------------
# Three seeds of one model answer the same 40 questions: that is 120 answers but 40 questions, and the
# seeds are repeated measures of each question, not new questions. Everything below first averages over
# the repeats of a question, then treats questions as the independent units: the bootstrap resamples
# questions, and the test flips the sign of whole questions.


def question_means(values: Sequence[float], questions: Sequence[Any]) -> dict[Any, float]:
    """The mean of `values` per question label (seeds and repeats of a question averaged), in first order."""
    sums, counts = _cluster_sums(values, questions)
    labels = list(dict.fromkeys(questions))
    return {label: float(s / c) for label, s, c in zip(labels, sums, counts, strict=True)}


def sign_flip_test(differences: Sequence[float], n_resamples: int = 20000, seed: int = 0) -> float:
    """Two-sided p-value of "the differences are symmetric about 0", flipping the sign of whole units."""
    d = np.asarray(differences, dtype=float)
    d = d[d != 0]  # a unit on which A and B agree looks the same with either sign: it carries no evidence
    if d.size == 0:
        return 1.0
    magnitude = np.abs(d)
    if np.allclose(magnitude, magnitude[0], rtol=1e-9, atol=0.0):
        # Equal magnitudes (one answer per question, right or wrong): the count of positive signs is
        # Binomial(n, 1/2) under the null, and the test is exactly McNemar's.
        return mcnemar_exact(int((d > 0).sum()), int((d < 0).sum()))
    steps = _on_a_grid(magnitude)
    if steps is not None:
        # Means over a few seeds or phrasings are multiples of 1/L for a small L: on that grid the null
        # distribution of the sum (each sign a fair coin) is an exact convolution, whatever the n.
        total = int(steps.sum())
        probability = np.zeros(2 * total + 1)
        probability[total] = 1.0  # index total + k holds P(sum = k / L)
        for step in steps:
            probability = 0.5 * (np.roll(probability, step) + np.roll(probability, -step))
        observed = abs(int((np.sign(d) * steps).sum()))
        sums = np.abs(np.arange(-total, total + 1))
        return float(min(1.0, probability[sums >= observed].sum()))
    observed = abs(d.sum())
    if d.size <= 16:  # any values, few units: all 2^n sign patterns
        signs = 1 - 2 * ((np.arange(2**d.size)[:, None] >> np.arange(d.size)) & 1)
        # float sums of a few values: compare with a relative margin of a few ulps of the total
        return float(np.mean(np.abs(signs @ d) >= observed - 1e-9 * magnitude.sum()))
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=(n_resamples, d.size))
    extreme = np.sum(np.abs(signs @ d) >= observed - 1e-9 * magnitude.sum())
    return float((1 + extreme) / (1 + n_resamples))  # a Monte Carlo p-value is never exactly 0


def _on_a_grid(
    magnitudes: np.ndarray, largest_denominator: int = 720, largest_total: int = 20_000
) -> np.ndarray | None:
    """The magnitudes as integers k_i with magnitude_i = k_i / L for the smallest L that works, or None."""
    for denominator in range(1, largest_denominator + 1):
        scaled = magnitudes * denominator
        integers = np.round(scaled)
        if np.all(np.abs(scaled - integers) < 1e-6) and integers.sum() <= largest_total:
            return integers.astype(np.int64)
    return None


@dataclass(frozen=True)
class Difference:
    """A minus B, averaged per unit (question), with a bootstrap interval over units and a sign-flip p."""

    estimate: float  # mean over units of (mean of A on the unit - mean of B on the unit)
    low: float
    high: float
    p_value: float  # sign-flip test over units (McNemar's exact test when each unit has one 0/1 answer)
    n_units: int  # the independent units: questions (or items)
    n_observations: int  # the answers behind them: units x seeds x repeats
    unit: str = "question"
    confidence: float = 0.95
    mean_a: float = float("nan")  # A's mean over units, for the report
    mean_b: float = float("nan")


def paired_difference(
    values_a: Sequence[float],
    values_b: Sequence[float],
    questions: Sequence[Any] | None = None,
    unit: str = "question",
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Difference:
    """A - B paired by question: average each question's seeds and repeats, then bootstrap over questions."""
    _check_pairs(values_a, values_b, questions)
    labels = list(questions) if questions is not None else list(range(len(values_a)))
    means_a = np.array(list(question_means(values_a, labels).values()))
    means_b = np.array(list(question_means(values_b, labels).values()))
    per_unit = means_a - means_b  # one number per question: the seeds are not new questions
    low, high = bootstrap_interval(per_unit, confidence, n_resamples, seed)
    return Difference(
        float(per_unit.mean()),
        low,
        high,
        sign_flip_test(per_unit, seed=seed),
        int(per_unit.size),
        len(values_a),
        unit,
        confidence,
        float(means_a.mean()),
        float(means_b.mean()),
    )


def difference_from(pair: PairedComparison, unit: str = "question", confidence: float = 0.95) -> Difference:
    """The Difference of an existing PairedComparison (its items as units, its McNemar p)."""
    return Difference(
        pair.difference, pair.low, pair.high, pair.p_value, pair.n, pair.n, unit, confidence,
        pair.accuracy_a, pair.accuracy_b,
    )  # fmt: skip


def proportion_against(
    successes: int, n: int, reference: float, unit: str = "question", confidence: float = 0.95
) -> Difference:
    """A share of n independent units against a fixed reference (chance: 0.5), Wilson interval, exact test."""
    if not 0.0 <= reference <= 1.0:
        raise ValueError(f"the reference must be a share between 0 and 1, got {reference}")
    low, high = wilson_interval(successes, n, z_for(confidence))
    # Two-sided exact binomial test: every outcome at most as likely as the observed one counts.
    pmf = [math.comb(n, k) * reference**k * (1 - reference) ** (n - k) for k in range(n + 1)]
    p_value = min(1.0, sum(p for p in pmf if p <= pmf[successes] * (1 + 1e-9)))
    share = successes / n
    shifted = (share - reference, low - reference, high - reference)
    return Difference(*shifted, p_value, n, n, unit, confidence, share, reference)


@dataclass(frozen=True)
class WinTally:
    """Judge verdicts counted as wins, ties and losses of A; the share of wins among decided units."""

    wins: int
    ties: int
    losses: int
    share: float  # wins / (wins + losses): ties are set aside, not counted as half a win
    low: float  # interval of `share` (Wilson; cluster bootstrap when prompts repeat)
    high: float
    p_value: float  # sign test of wins against losses (sign flips over clusters when prompts repeat)
    n_units: int  # prompts (or clusters of repeated prompts)
    unit: str = "prompt"
    confidence: float = 0.95

    @property
    def decided(self) -> int:
        """How many verdicts were a win or a loss."""
        return self.wins + self.losses


def win_tally(
    judged: Sequence[float],
    clusters: Sequence[Any] | None = None,
    unit: str = "prompt",
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> WinTally:
    """Wins (1.0), ties (0.5) and losses (0.0) of A, with an interval on the share of wins among decided."""
    allowed = {0.0, 0.5, 1.0}
    if any(float(v) not in allowed for v in judged):
        raise ValueError(
            f"verdicts must be 1.0 (A wins), 0.5 (tie) or 0.0 (B wins); got {sorted(set(judged))}"
        )
    if not judged:
        raise ValueError("win_tally needs at least one verdict")
    verdict = np.asarray(judged, dtype=float)
    win, loss = (verdict == 1.0).astype(float), (verdict == 0.0).astype(float)
    wins, losses = int(win.sum()), int(loss.sum())
    ties = len(verdict) - wins - losses
    share = wins / (wins + losses) if wins + losses else float("nan")
    labels = list(clusters) if clusters is not None else list(range(len(verdict)))
    n_units = len(set(labels))
    if n_units == len(verdict):  # every prompt once: a binomial count among the decided ones
        low, high = wilson_interval(wins, wins + losses, z_for(confidence)) if wins + losses else (0.0, 1.0)
        p_value = mcnemar_exact(wins, losses)  # the sign test: each decided verdict a fair coin under H0
    else:  # repeated prompts: resample whole clusters, keep the ratio of their wins to their decided
        win_sums, _ = _cluster_sums(win, labels)
        loss_sums, _ = _cluster_sums(loss, labels)
        picks = np.random.default_rng(seed).integers(0, n_units, size=(n_resamples, n_units))
        decided = win_sums[picks].sum(axis=1) + loss_sums[picks].sum(axis=1)
        ratios = win_sums[picks].sum(axis=1)[decided > 0] / decided[decided > 0]
        tail = (1.0 - confidence) / 2
        low, high = (float(q) for q in np.quantile(ratios, [tail, 1 - tail])) if ratios.size else (0.0, 1.0)
        p_value = sign_flip_test(win_sums - loss_sums, seed=seed)
    return WinTally(wins, ties, losses, share, low, high, p_value, n_units, unit, confidence)


def percent(value: float, low: float | None = None, high: float | None = None) -> str:
    """A fraction as a percentage for tables, with its interval when given: '62 [55, 70]'."""
    text = f"{100 * value:.0f}"
    return text if low is None or high is None else f"{text} [{100 * low:.0f}, {100 * high:.0f}]"


@dataclass(frozen=True)
class AccuracyReport:
    """Exact-match accuracy per family, and over all tasks (plus each task's hit, reply and item)."""

    by_family: dict[str, float]
    overall: float
    n_tasks: int
    hits: tuple[bool, ...] = field(default=(), repr=False)
    families: tuple[str, ...] = field(default=(), repr=False)
    replies: tuple[str, ...] = field(default=(), repr=False)  # cut with first_answer
    items: tuple[str, ...] = field(default=(), repr=False)  # what each task asks about (Task.item)

    def as_row(self) -> dict[str, float]:
        """One flat row for a results table: accuracy per family and overall."""
        return {**self.by_family, "overall": self.overall}

    def clusters(self) -> tuple[str, ...]:
        """The cluster label of each task: its family and item, so repeated questions share one label."""
        items = self.items or tuple(str(i) for i in range(len(self.hits)))
        return tuple(f"{f}/{i}" for f, i in zip(self.families, items, strict=True))

    def interval(self, family: str | None = None, confidence: float = 0.95) -> tuple[float, float]:
        """Wilson interval (low, high) of the accuracy over all tasks or one family, an item counted once."""
        chosen = [
            (h, c)
            for h, f, c in zip(self.hits, self.families, self.clusters(), strict=True)
            if family in (None, f)
        ]
        if not chosen:
            raise ValueError(f"no tasks of family {family!r} in this report; it has {sorted(self.by_family)}")
        hits = [float(h) for h, _ in chosen]
        n_items = len(set(c for _, c in chosen))
        # Where an item is asked more than once (two phrasings of one capital, 6 + 26 and 26 + 6), its
        # questions are not independent draws. Kish's effective sample size for the worst case, twins
        # that always agree, is the number of distinct items: keep the accuracy, count items, not tasks.
        return wilson_interval(sum(hits) / len(hits) * n_items, n_items, z_for(confidence))

    def with_intervals(self, confidence: float = 0.95) -> dict[str, tuple[float, float, float]]:
        """(accuracy, low, high) per family and overall, the bounds from `interval` (Wilson)."""
        rows = {
            family: (score, *self.interval(family, confidence)) for family, score in self.by_family.items()
        }
        rows["overall"] = (self.overall, *self.interval(None, confidence))
        return rows


def exact_match(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[Task],
    form: str = "chat",
    shots: int = 0,
    batch_size: int = 32,
    max_new_tokens: int = 16,
) -> AccuracyReport:
    """Greedy exact-match accuracy on `tasks`, in the `chat` form (optionally few-shot) or the `raw` form."""
    if form not in ("chat", "raw"):
        raise ValueError(f"form must be 'chat' or 'raw', got {form!r}")
    if not tasks:
        raise ValueError("exact_match needs at least one task; got an empty list (check the split and size)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if shots < 0:
        raise ValueError(f"shots must be 0 or more, got {shots}")
    if form == "raw" and shots:
        raise ValueError("few-shot examples are only defined for the chat form")
    pool = {f: [t for t in build_tasks("train", shots) if t.family == f] for f in FAMILIES} if shots else {}
    if form == "chat":
        prompts = [chat_prompt(tokenizer, t, pool.get(t.family, ())) for t in tasks]
    else:
        prompts = [t.raw_prompt for t in tasks]
    check_context(model, tokenizer, prompts, max_new_tokens, shots)
    replies = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return score_replies(replies, tasks)


def check_context(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, shots: int = 0
) -> int:
    """The longest prompt's length in tokens, after checking prompt + reply fit the model's context."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if context is None or not callable(tokenizer) or not prompts:
        return 0  # a stub model in a test, or a model that does not state its context
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    longest = max(lengths)
    if longest + max_new_tokens > context:
        hint = f" Use fewer than {shots} shots." if shots else " Shorten the prompt or max_new_tokens."
        raise ValueError(
            f"the longest prompt is {longest} tokens; with max_new_tokens={max_new_tokens} it needs "
            f"{longest + max_new_tokens} positions, but the model's context (max_position_embeddings) is "
            f"{context}.{hint}"
        )
    return longest


def score_replies(replies: Sequence[str], tasks: Sequence[Task]) -> AccuracyReport:
    """Exact-match report of raw generated `replies` (cut at the end of the turn) against `tasks`."""
    if not tasks:
        raise ValueError("score_replies needs at least one task; got an empty list")
    if len(replies) != len(tasks):
        raise ValueError(f"need one reply per task; got {len(replies)} replies for {len(tasks)} tasks")
    note_source("score", TASK_WORLD, "exact match")
    answers = [first_answer(reply) for reply in replies]
    hits = [answer == task.answer for answer, task in zip(answers, tasks, strict=True)]
    families = tuple(t.family for t in tasks)
    by_family = mean_by_family(hits, tasks)
    items = tuple(t.item or t.prompt for t in tasks)
    return AccuracyReport(
        by_family, sum(hits) / len(hits), len(hits), tuple(hits), families, tuple(answers), items
    )


# ---------------------------------------------------------------------------------------------------------
# Perplexity
# ---------------------------------------------------------------------------------------------------------


def _toy_recipe(profile: Profile | None = None) -> dict[str, Any]:
    """The recipe of the toy model in use: one rebuilt via FTCOURSE_MODEL, else the embedded one."""
    # A hub model has no recipe.json and its pretraining text is not public, so the embedded model's
    # corpus is the one we can search.
    local = Path(resolve_model("lora", profile))
    folder = local if (local / "recipe.json").is_file() else model_dir()
    return json.loads((folder / "recipe.json").read_text())["recipe"]


def pretraining_texts(profile: Profile | None = None) -> list[str]:
    """The documents the toy model was pretrained on (count and seed from its recipe.json)."""
    recipe = _toy_recipe(profile)
    return list(pretraining_documents(recipe["n_docs"], seed=recipe["seed"]))


def heldout_texts(n_docs: int = 200, profile: Profile | None = None) -> list[str]:
    """Held-out text of the pretraining distribution: unseen toy documents, or the profile's hub corpus."""
    profile = profile or active_profile()
    # General text measures what a run kept, not what it learned: a capability check on every profile.
    note_source("capability", profile.heldout_text.partition(":")[0] or "toy pretraining text", "perplexity")
    if not profile.heldout_text:
        # The generator is deterministic: the documents that follow the ones pretraining used come from
        # the same distribution (the same invented names, too) and were never trained on. Short raw
        # lines such as an addition recur everywhere, so this is held-out *text*, not held-out facts.
        recipe = _toy_recipe(profile)
        documents = pretraining_documents(recipe["n_docs"] + n_docs, seed=recipe["seed"])
        return list(islice(documents, recipe["n_docs"], None))
    from datasets import load_dataset

    name, _, config = profile.heldout_text.partition(":")
    dataset = load_dataset(resolve_dataset(name), config or None, split="test")
    texts = [t for t in dataset["text"] if len(t.split()) >= 20]  # skip headings and blank lines
    return texts[:n_docs]


@torch.no_grad()
def token_nll(
    model: Any, tokenizer: Any, texts: Sequence[str], max_length: int = 256, batch_size: int = 16
) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over `texts`, and the number of tokens predicted."""
    # Default special tokens: a BOS for tokenizers that use one (Llama 3), nothing for the toy model.
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        rows = [torch.tensor(ids) for ids in encoded[start : start + batch_size] if len(ids) > 1]
        if not rows:
            continue
        # Right padding, built by hand: positions of real tokens stay 0..n-1 and the tokenizer's
        # padding side (which `generate` sets to left) does not matter.
        input_ids = pad_sequence(rows, batch_first=True, padding_value=pad_id).to(_device(model))
        mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True).to(input_ids.device)
        logits = model(input_ids=input_ids, attention_mask=mask).logits.float()  # (B, T, V)
        targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # token t+1 is predicted at t
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="sum")
        total += nll.item()
        count += int((targets != -100).sum())
    return total, count


@torch.no_grad()
def nll_at_token(
    model: Any, tokenizer: Any, texts: Sequence[str], token: str, max_length: int = 256
) -> dict[str, float]:
    """Mean next-token NLL over the targets that are `token` ("at") and over all the others ("elsewhere")."""
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{token!r} is {len(ids)} tokens for this tokenizer; pass a single token")
    at, elsewhere = [], []
    for encoded in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]:
        row = torch.tensor([encoded], device=_device(model))
        logits = model(input_ids=row).logits[0, :-1].float()  # (T-1, V): predictions for tokens 1..T-1
        nll = F.cross_entropy(logits, row[0, 1:], reduction="none")
        is_token = row[0, 1:] == ids[0]
        at.append(nll[is_token])
        elsewhere.append(nll[~is_token])
    return {"at": torch.cat(at).mean().item(), "elsewhere": torch.cat(elsewhere).mean().item()}


def perplexity(
    model: Any, tokenizer: Any, texts: Sequence[str], max_length: int = 256, batch_size: int = 16
) -> float:
    """exp of the token-weighted mean next-token NLL over `texts` (each truncated to `max_length`)."""
    total, count = token_nll(model, tokenizer, texts, max_length, batch_size)
    if count == 0:
        raise ValueError("perplexity needs texts of at least two tokens")
    return float(np.exp(total / count))


# ---------------------------------------------------------------------------------------------------------
# Capability retention
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Capabilities:
    """What pretraining gave the model: raw-form exact match and perplexity on held-out text."""

    raw: AccuracyReport
    perplexity: float


def capabilities(model: Any, tokenizer: Any, tasks: Sequence[Task], texts: Sequence[str]) -> Capabilities:
    """Raw-form exact match on `tasks` and perplexity on `texts`, measured on one model."""
    return Capabilities(exact_match(model, tokenizer, tasks, form="raw"), perplexity(model, tokenizer, texts))


def retention(before: Capabilities, after: Capabilities) -> dict[str, dict[str, float]]:
    """Before/after/change table of pretraining skills: raw exact match per family (%) and perplexity."""
    rows = {}
    for family, score in before.raw.as_row().items():
        name = f"raw exact match, {family} (%)"
        rows[name] = {"before": 100 * score, "after": 100 * after.raw.as_row()[family]}
    rows["held-out perplexity"] = {"before": before.perplexity, "after": after.perplexity}
    for row in rows.values():
        row["change"] = row["after"] - row["before"]
    return rows


# ---------------------------------------------------------------------------------------------------------
# Judges and win rate
# ---------------------------------------------------------------------------------------------------------


def verdicts(
    judge: Any,
    tokenizer: Any,
    prompts: Sequence[Turn],
    replies_a: Sequence[Turn],
    replies_b: Sequence[Turn],
) -> list[float]:
    """Per prompt: 1.0 if the judge prefers reply A, 0.0 if B, 0.5 for a tie."""
    if not len(prompts) == len(replies_a) == len(replies_b):
        raise ValueError(
            f"need one reply from each model per prompt; got {len(prompts)} prompts, "
            f"{len(replies_a)} replies A and {len(replies_b)} replies B"
        )
    # Identical replies are a tie by definition; asking a judge would only measure its noise.
    same = [turn_text(a).strip() == turn_text(b).strip() for a, b in zip(replies_a, replies_b, strict=True)]
    if hasattr(judge, "compare"):  # a pairwise judge, such as OllamaJudge
        return [
            0.5 if tie else judge.compare(turn_text(p), turn_text(a), turn_text(b))
            for p, a, b, tie in zip(prompts, replies_a, replies_b, same, strict=True)
        ]
    # A reward model scores each reply on its own, so it has no position bias.
    scores_a = reward_scores(judge, tokenizer, prompts, replies_a)
    scores_b = reward_scores(judge, tokenizer, prompts, replies_b)
    return [
        0.5 if tie or a == b else float(a > b) for a, b, tie in zip(scores_a, scores_b, same, strict=True)
    ]


def win_rate(
    judge: Any,
    tokenizer: Any,
    prompts: Sequence[Turn],
    replies_a: Sequence[Turn],
    replies_b: Sequence[Turn],
) -> float:
    """Fraction of prompts on which the judge prefers reply A to reply B, ties counted half."""
    return float(np.mean(verdicts(judge, tokenizer, prompts, replies_a, replies_b)))


def preference_verdicts(judge: Any, tokenizer: Any, records: Sequence[Mapping[str, Any]]) -> list[float]:
    """The judge's verdict on each preference record: 1.0 when it prefers `chosen` to `rejected`."""
    prompts = [r["prompt"] for r in records]
    return verdicts(
        judge, tokenizer, prompts, [r["chosen"] for r in records], [r["rejected"] for r in records]
    )


def judge_accuracy(judge: Any, tokenizer: Any, records: Sequence[Mapping[str, Any]]) -> float:
    """How often the judge prefers `chosen` to `rejected` on preference records it was not trained on."""
    return float(np.mean(preference_verdicts(judge, tokenizer, records)))


def judge_agreement(
    judged: Sequence[float], hits_a: Sequence[bool], hits_b: Sequence[bool]
) -> tuple[float, int]:
    """Where exactly one model is right by exact match: how often the judge picked that one, and how many."""
    decisive = [(v, a) for v, a, b in zip(judged, hits_a, hits_b, strict=True) if a != b]
    if not decisive:
        return float("nan"), 0
    # A verdict of 1.0 picks A; it agrees with the answer key when A is the one that is right.
    return float(np.mean([1.0 - abs(v - float(a)) for v, a in decisive])), len(decisive)


JUDGE_INSTRUCTIONS = (
    "You compare two answers to the same user request. Judge correctness first, then helpfulness and "
    "format. Reply with exactly one letter: A if answer A is better, B if answer B is better, T if they "
    "are equally good."
)


@dataclass(frozen=True)
class OllamaJudge:
    """An LLM judge served by Ollama; asks each comparison in both orders to cancel position bias."""

    model: str  # an Ollama model name, e.g. "llama3.1:70b"
    host: str | None = None  # None: OLLAMA_HOST, else http://localhost:11434

    def _client(self):
        import ollama

        return ollama.Client(host=self.host)

    def _ask(self, prompt: str, first: str, second: str) -> float:
        """1.0 if the model prefers the first answer shown, 0.0 the second, 0.5 a tie or an unclear reply."""
        question = f"User request:\n{prompt}\n\nAnswer A:\n{first}\n\nAnswer B:\n{second}\n\nBetter answer:"
        response = self._client().chat(
            model=self.model,
            messages=[
                {"role": "system", "content": JUDGE_INSTRUCTIONS},
                {"role": "user", "content": question},
            ],
            options={"temperature": 0},
        )
        letter = response["message"]["content"].strip()[:1].upper()
        return {"A": 1.0, "B": 0.0}.get(letter, 0.5)

    def compare(self, prompt: str, reply_a: str, reply_b: str) -> float:
        """1.0 if A is better, 0.0 if B is, 0.5 for a tie or when the two orders disagree."""
        # LLM judges favour one position; averaging both orders turns an order-driven verdict into a tie.
        return (self._ask(prompt, reply_a, reply_b) + 1.0 - self._ask(prompt, reply_b, reply_a)) / 2


class JudgeUnavailable(RuntimeError):
    """The profile's Ollama judge cannot be used here: no server answers, or it lacks the model."""


def ollama_judge(model: str, host: str | None = None) -> OllamaJudge:
    """An OllamaJudge, after checking that the server answers and has `model` pulled."""
    import ollama

    judge = OllamaJudge(model, host)
    where = host or "OLLAMA_HOST (default http://localhost:11434)"
    try:
        judge._client().show(model)
    except ConnectionError as error:
        raise JudgeUnavailable(
            f"No Ollama server answered at {where}. Start one with `ollama serve` and "
            f"`ollama pull {model}`, or judge with a reward model (`reward_judge`)."
        ) from error
    except ollama.ResponseError as error:
        raise JudgeUnavailable(
            f"The Ollama server at {where} does not have the judge model {model!r} ({error}). "
            f"Pull it first: `ollama pull {model}`."
        ) from error
    return judge


def load_judge(tokenizer: Any, profile: Profile | None = None, **train_kwargs: Any) -> Any:
    """The profile's judge: a reward model trained now (`reward-model`) or an Ollama LLM (`ollama:NAME`)."""
    profile = profile or active_profile()
    if profile.judge == "reward-model":
        return reward_judge(tokenizer, profile, **train_kwargs)
    if profile.judge.startswith("ollama:"):
        return ollama_judge(profile.judge.removeprefix("ollama:"))
    raise ValueError(
        f"profile {profile.name!r} names judge {profile.judge!r}; use 'reward-model' or 'ollama:NAME'"
    )


def available_judge(tokenizer: Any, profile: Profile | None = None, **train_kwargs: Any) -> tuple[Any, str]:
    """The profile's judge and ""; the reward-model judge and a note_skip line when Ollama cannot serve."""
    profile = profile or active_profile()
    try:
        return load_judge(tokenizer, profile, **train_kwargs), ""
    except JudgeUnavailable as error:
        name = profile.judge.removeprefix("ollama:")
        note = note_skip(
            f"the Ollama judge `{name}`", f"{error} The reward-model judge stands in, trained now."
        )
        return reward_judge(tokenizer, profile, **train_kwargs), note


# ---------------------------------------------------------------------------------------------------------
# Contamination
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContaminationReport:
    """Which test tasks leak into training data, and which appear in the pretraining text."""

    n_tasks: int
    prompt_leaks: tuple[str, ...]  # test prompts that are also training prompts
    answer_leaks: tuple[str, ...]  # ... whose training record also gives the test answer
    corpus_hits: dict[str, float] = field(default_factory=dict)  # family -> share found in pretraining text

    @property
    def leak_fraction(self) -> float:
        """Share of test tasks whose prompt occurs in the training records."""
        return len(self.prompt_leaks) / self.n_tasks


def in_corpus(tasks: Sequence[Task], documents: Sequence[str]) -> list[bool]:
    """Whether each task's raw form *with its answer*, after any of the ANSWER_GAPS, is in `documents`."""
    # One string with a newline at both ends, so that "add: 1 + 2\n3" cannot match inside "add: 11 + 2\n3".
    corpus = "\n" + "\n".join(documents) + "\n"
    # The corpus writes a raw task and its answer with one of several gaps ("\n", " =\n", "\nanswer:\n",
    # ...); the task's raw_prompt ends with the first of them. A leak is a leak whichever gap it used.
    stems = [task.raw_prompt.removesuffix("\n") for task in tasks]
    return [
        any(f"\n{stem}{gap}{task.answer}\n" in corpus for gap in ANSWER_GAPS)
        for stem, task in zip(stems, tasks, strict=True)
    ]


def contamination(
    test_tasks: Sequence[Task],
    training_records: Sequence[Mapping[str, Any]],
    corpus: Sequence[str] | None = None,
) -> ContaminationReport:
    """Test prompts found verbatim (after `normalize`) among training prompts, and optionally in `corpus`."""
    seen: dict[str, set[str]] = {}  # normalized training prompt -> normalized replies given to it
    for record in training_records:
        for prompt, reply in exchanges(record):
            seen.setdefault(normalize(prompt), set()).add(normalize(reply))
    leaks = [t for t in test_tasks if normalize(t.prompt) in seen]
    with_answer = [t for t in leaks if normalize(t.answer) in seen[normalize(t.prompt)]]
    hits = mean_by_family(in_corpus(test_tasks, corpus), test_tasks) if corpus is not None else {}
    return ContaminationReport(
        len(test_tasks), tuple(t.prompt for t in leaks), tuple(t.prompt for t in with_answer), hits
    )
