"""Held-out sets: what a chapter scores on, drawn from the source it trained on, under every profile.

On the cpu profile the chapters train on the task world and score exact match on its test split. On the
spark profile they train on hub datasets (no_robots, UltraFeedback, kto-mix), whose replies are open text:
there is no exact answer, so a held-out row is scored by how likely the model finds its reference reply
(mean log-probability per token), and a held-out pair by how much more likely it finds the chosen reply.
`score` returns one report type for both, so a chapter's cells read the same on every profile.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ftcourse import data, evaluate
from ftcourse.profiles import TASK_WORLD, Profile, active_profile, capability_check, note_source
from ftcourse.toy.tasks import FAMILIES, build_tasks

# What one score means, per schema of held-out rows: higher is always closer to what the data prefers.
SCORE_WORDS = {
    "tasks": "exact match of the greedy answer",
    "messages": "mean log-probability per token of the reference reply",
    "preference": "chosen minus rejected, mean log-probability per token",
    "feedback": "mean log-probability per token of the reply, negated for disliked replies",
}
TEST_SPLITS = ("messages", "preference", "feedback")  # yahma/alpaca-cleaned ships a train split only
CATEGORY_FIELD = "category"  # no_robots labels each row (Generation, Open QA, ...): its "families"


LIKELIHOOD_UNITS = {"scale": 1.0, "unit_word": "nats per token", "digits": 3}  # verdicts.verdict's options


def verdict_units(schema: str) -> dict[str, Any]:
    """`verdicts.verdict` options for differences of `schema` scores: exact-match points, or nats/token."""
    if schema not in SCORE_WORDS:
        raise ValueError(f"schema must be one of {sorted(SCORE_WORDS)}, got {schema!r}")
    return {} if schema == "tasks" else dict(LIKELIHOOD_UNITS)


@dataclass(frozen=True)
class HeldOut:
    """A held-out set: its rows (tasks or records), where they came from, and what a score measures."""

    source: str  # the dataset: TASK_WORLD, or a hub id
    split: str
    schema: str  # "tasks" (exact match) or a data.SCHEMAS name (likelihood of the reference)
    rows: tuple[Any, ...] = field(repr=False)
    capability: bool = False  # a declared capability check, not the chapter's score

    @property
    def measure(self) -> str:
        """What one score of this set means."""
        return SCORE_WORDS[self.schema]

    def __len__(self) -> int:
        return len(self.rows)


def heldout_set(
    schema: str = "messages", per_family: int | None = None, profile: Profile | None = None
) -> HeldOut:
    """The held-out rows a chapter that trains on `schema` scores on: `per_family` x 4 rows.

    cpu: the task world's test split (its tasks, scored by exact match). spark: the test split of the
    profile's hub dataset for `schema`, the one `data.load_records(schema, "train")` trains on.
    """
    profile = profile or active_profile()
    per_family = per_family or profile.eval_per_family
    if not profile.uses_network:
        return HeldOut(TASK_WORLD, "test", "tasks", tuple(build_tasks("test", per_family)))
    from datasets import load_dataset

    from ftcourse.profiles import resolve_dataset

    size = per_family * len(FAMILIES)
    hub_id = profile.datasets[schema]
    if schema not in TEST_SPLITS:
        raise ValueError(
            f"{hub_id!r} (schema {schema!r}) has no test split on the hub, so it has no held-out rows that "
            f"training never sees; train and score on one of {sorted(TEST_SPLITS)} instead"
        )
    records = data.load_records(schema, "test", profile=profile)
    full = load_dataset(resolve_dataset(hub_id), split="test")  # load_records kept the schema's columns only
    categories = full[CATEGORY_FIELD] if CATEGORY_FIELD in full.column_names else None
    rows = [dict(r) for r in records.select(range(min(size, len(records))))]
    if categories is not None:
        rows = [{**r, CATEGORY_FIELD: c} for r, c in zip(rows, categories, strict=False)]
    return HeldOut(hub_id, "test", schema, tuple(rows))


def capability_tasks(per_family: int, profile: Profile | None = None) -> HeldOut:
    """The task world's test tasks as a declared capability check (exact match; any profile)."""
    del profile  # the task world is the same on every profile
    return HeldOut(TASK_WORLD, "test", "tasks", tuple(build_tasks("test", per_family)), capability=True)


@dataclass(frozen=True)
class ReplyReport:
    """Likelihood scores of held-out rows, read like `evaluate.AccuracyReport` (hits are scores here)."""

    by_family: dict[str, float]
    overall: float
    n_tasks: int
    hits: tuple[float, ...] = field(default=(), repr=False)  # one score per row (SCORE_WORDS)
    families: tuple[str, ...] = field(default=(), repr=False)
    replies: tuple[str, ...] = field(default=(), repr=False)
    items: tuple[str, ...] = field(default=(), repr=False)
    measure: str = SCORE_WORDS["messages"]

    @classmethod
    def from_scores(
        cls, values: Sequence[float], heldout: HeldOut, replies: Sequence[str] = ()
    ) -> ReplyReport:
        """The report of one score per row of `heldout` (families: each row's category, if it has one)."""
        families = tuple(str(r.get(CATEGORY_FIELD) or heldout.schema) for r in heldout.rows)
        by_family = {
            f: float(np.mean([v for v, g in zip(values, families, strict=True) if g == f]))
            for f in dict.fromkeys(families)
        }
        items = tuple(str(i) for i in range(len(values)))
        return cls(
            by_family, float(np.mean(values)), len(values), tuple(values), families, tuple(replies), items,
            heldout.measure,
        )  # fmt: skip

    def as_row(self) -> dict[str, float]:
        """One flat row for a results table: mean score per family and overall."""
        return {**self.by_family, "overall": self.overall}

    def clusters(self) -> tuple[str, ...]:
        """Each row is its own unit: a hub row is one question."""
        return tuple(f"{f}/{i}" for f, i in zip(self.families, self.items, strict=True))

    def interval(self, family: str | None = None, confidence: float = 0.95) -> tuple[float, float]:
        """Bootstrap interval (low, high) of the mean score over rows, of all rows or one family."""
        chosen = [h for h, f in zip(self.hits, self.families, strict=True) if family in (None, f)]
        if not chosen:
            raise ValueError(f"no rows of family {family!r} in this report; it has {sorted(self.by_family)}")
        return evaluate.bootstrap_interval(np.array(chosen, dtype=float), confidence)

    def with_intervals(self, confidence: float = 0.95) -> dict[str, tuple[float, float, float]]:
        """(mean, low, high) per family and overall."""
        rows = {f: (score, *self.interval(f, confidence)) for f, score in self.by_family.items()}
        rows["overall"] = (self.overall, *self.interval(None, confidence))
        return rows


def reply_logprob(
    model: Any, tokenizer: Any, prompt: Sequence[Mapping[str, str]], reply: Sequence[Any]
) -> float:
    """Mean log-probability per token of `reply` after `prompt` (chat turns), with the model's template."""
    import torch
    from trl.data_utils import common_prefix_length

    def ids(turns: Sequence[Any], generation: bool) -> list[int]:
        encoded = tokenizer.apply_chat_template(
            [dict(t) for t in turns], tokenize=True, add_generation_prompt=generation, return_dict=True
        )
        return list(encoded["input_ids"])

    full = ids([*prompt, *reply], False)
    start = max(1, common_prefix_length(ids(prompt, True), full))  # the reply's first token
    device = getattr(model, "device", torch.device("cpu"))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full], device=device)).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, -1).gather(1, torch.tensor(full[1:], device=device)[:, None])[:, 0]
    return logprobs[start - 1 :].mean().item()


def row_scores(model: Any, tokenizer: Any, records: Sequence[Mapping[str, Any]], schema: str) -> list[float]:
    """One score per held-out row (SCORE_WORDS[schema]): higher means closer to what the data prefers."""
    if schema not in data.SCHEMAS or schema == "alpaca":
        raise ValueError(f"rows are scored in schema 'messages', 'preference' or 'feedback', got {schema!r}")
    was_training = model.training
    model.eval()
    scores = []
    for r in records:
        if schema == "messages":
            scores.append(reply_logprob(model, tokenizer, r["messages"][:-1], r["messages"][-1:]))
        elif schema == "preference":
            chosen = reply_logprob(model, tokenizer, r["prompt"], r["chosen"])
            scores.append(chosen - reply_logprob(model, tokenizer, r["prompt"], r["rejected"]))
        else:
            sign = 1.0 if r["label"] else -1.0
            scores.append(sign * reply_logprob(model, tokenizer, r["prompt"], r["completion"]))
    model.train(was_training)
    return scores


def score(model: Any, tokenizer: Any, heldout: HeldOut, **exact_match_options: Any) -> Any:
    """Score `model` on a held-out set: exact match on tasks, reference likelihood on hub rows.

    Returns `evaluate.AccuracyReport` for tasks (options such as form="raw" or shots go to
    `evaluate.exact_match`) and a `ReplyReport` for hub rows; both have overall, by_family, hits and
    with_intervals. A set marked `capability` is logged as a capability check.
    """
    with capability_check("task-world probe") if heldout.capability else nullcontext():
        if heldout.schema == "tasks":
            return evaluate.exact_match(model, tokenizer, list(heldout.rows), **exact_match_options)
        if exact_match_options:
            raise ValueError(
                f"{sorted(exact_match_options)} apply to exact match on tasks; the held-out rows of "
                f"{heldout.source!r} are scored by {heldout.measure}"
            )
        note_source("score", heldout.source, heldout.measure)  # a capability entry inside the block
        return ReplyReport.from_scores(row_scores(model, tokenizer, heldout.rows, heldout.schema), heldout)
