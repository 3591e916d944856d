"""Preference pairs and thumbs-up/down feedback from the task world, built so that preference methods differ.

A pair that only says "the right answer beats a wrong one" makes every method look alike, and the SFT start
already ranks such pairs right: it knows the answers. So the pairs come in four kinds, each testing one thing,
measured against the SFT start (see `ftcourse.train.evaluate_policy`):

- ``correct``: the right answer against a plausible wrong one of the same shape (the runner-up of a `max`
  list, a sum off by one, another country's capital). Only the content differs. The SFT start ranks almost
  all of them right already: it checks that preference training keeps the content.
- ``period``: the right answer with a full stop ("58.") against the bare answer ("58"). A style the SFT
  demonstrations never showed, so the SFT start ranks every such pair the wrong way round: the pairs a
  preference method must learn from. The preferred reply is the longer one, by one token.
- ``concise``: the bare answer against the same answer in a sentence ("The capital of Kelo is Tamar.").
  The rejected reply is several times longer: a check of length behaviour.
- ``sentence``: the reverse of ``concise``, the sentence preferred; the preferred reply is about ten tokens
  longer. Training on it separates a per-token reward (SimPO) from a per-sequence one (DPO).

Feedback records (KTO) are cut from the same pairs: every rejected reply becomes a thumbs-down, and only a
fraction of the chosen replies become thumbs-up, as in real feedback logs where complaints outnumber praise.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ftcourse.toy.tasks import WORLD_SEED, Task, build_tasks

KINDS: dict[str, str] = {
    "correct": "right answer vs a plausible wrong one, both short: does the method learn content?",
    "concise": "bare right answer vs the same answer in a sentence: does the method learn style, not length?",
    "period": "the right answer with a full stop vs the bare answer: a style the SFT start does not have",
    "sentence": "the right answer in a sentence vs the bare answer: the reply ten tokens longer is preferred",
}
# The standard runs train on content and a style the SFT start lacks; evaluation adds the length check.
TRAIN_KINDS: tuple[str, ...] = ("correct", "period")
HELDOUT_KINDS: tuple[str, ...] = ("correct", "concise", "period")


def _subject(task: Task) -> str:
    """What the raw form asks about: the word list, the numbers, 'a + b', or the country."""
    return task.raw_prompt.split(": ", 1)[1].strip()


def verbose_answer(task: Task) -> str:
    """The right answer of `task` wrapped in a full sentence, the way a chatty assistant would put it."""
    subject = _subject(task)
    if task.family == "max":
        return f"The largest number is {task.answer}."
    if task.family == "add":
        return f"{subject} = {task.answer}."
    if task.family == "count":
        return f"There are {task.answer} words in the list."
    if task.family == "capital":
        return f"The capital of {subject} is {task.answer}."
    raise ValueError(f"no verbose form for task family {task.family!r}; known: max, add, count, capital")


@dataclass(frozen=True)
class PreferencePair:
    """One preference: a prompt (from `task`), the reply a user preferred and the one they did not."""

    kind: str  # a key of KINDS
    task: Task
    chosen: str
    rejected: str

    def record(self) -> dict[str, Any]:
        """The pair in TRL's conversational preference form: prompt, chosen and rejected as message lists."""
        return {
            "prompt": [{"role": "user", "content": self.task.prompt}],
            "chosen": [{"role": "assistant", "content": self.chosen}],
            "rejected": [{"role": "assistant", "content": self.rejected}],
        }


def make_pair(task: Task, kind: str, which_wrong: int = 0) -> PreferencePair:
    """The pair of `kind` for `task`; `which_wrong` picks the distractor of a `correct` pair."""
    if kind == "correct":
        if not task.distractors:
            raise ValueError(f"task {task.prompt!r} has no distractors, so it cannot make a 'correct' pair")
        wrong = task.distractors[which_wrong % len(task.distractors)]
        return PreferencePair(kind, task, task.answer, wrong)
    if kind == "concise":
        return PreferencePair(kind, task, task.answer, verbose_answer(task))
    if kind == "period":
        return PreferencePair(kind, task, task.answer + ".", task.answer)
    if kind == "sentence":
        return PreferencePair(kind, task, verbose_answer(task), task.answer)
    raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")


def preference_pairs(
    split: str, per_family: int, kinds: tuple[str, ...] = tuple(KINDS), seed: int = WORLD_SEED
) -> list[PreferencePair]:
    """One pair of every kind for each task of `split`, shuffled with `seed` (same arguments, same pairs)."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty selection of {sorted(KINDS)}, got {list(kinds)}")
    tasks = build_tasks(split, per_family)
    pairs = [make_pair(task, kind, i) for i, task in enumerate(tasks) for kind in kinds]
    random.Random(f"{seed}-pairs-{split}").shuffle(pairs)
    return pairs


def preference_records(pairs: list[PreferencePair]) -> list[dict[str, Any]]:
    """The pairs as TRL preference records (prompt/chosen/rejected)."""
    return [pair.record() for pair in pairs]


def feedback_records(
    pairs: list[PreferencePair], desirable_per_undesirable: float = 0.25, seed: int = WORLD_SEED
) -> list[dict[str, Any]]:
    """Unpaired thumbs-up/down records (prompt/completion/label) cut from `pairs`, shuffled.

    Every rejected reply becomes a thumbs-down. Chosen replies become thumbs-up for the first
    `desirable_per_undesirable` fraction of the pairs, so 0.25 gives one thumbs-up per four thumbs-down.
    """
    if not 0 < desirable_per_undesirable <= 1:
        raise ValueError(f"desirable_per_undesirable must be in (0, 1], got {desirable_per_undesirable}")
    n_desirable = max(1, round(desirable_per_undesirable * len(pairs)))
    records = []
    for i, pair in enumerate(pairs):
        prompt = [{"role": "user", "content": pair.task.prompt}]
        records.append(
            {
                "prompt": prompt,
                "completion": [{"role": "assistant", "content": pair.rejected}],
                "label": False,
            }
        )
        if i < n_desirable:
            completion = [{"role": "assistant", "content": pair.chosen}]
            records.append({"prompt": prompt, "completion": completion, "label": True})
    # KTO estimates its reference point from the other rows of the same batch: mix the labels.
    random.Random(f"{seed}-feedback").shuffle(records)
    return records


def styled_reply(reply: str, answer: str, ends: Sequence[str] = ("<|im_end|>", "<|eot_id|>")) -> bool:
    """Whether a generated reply is the `period` style: the answer, a full stop, then the end of turn."""
    return any(reply.startswith(f"{answer}.{end}") for end in ends)
