"""The task world: small exact-match tasks, generated deterministically, in the schemas of hub datasets.

Each task exists in two forms. The *raw* form ("count: cat dog", and "2" on the next line)
is what the embedded model read thousands of times during pretraining. The *chat* form ("Reverse the
order of these words.") is what a user types; the base model never saw it, so it has the skill but not
the manners. Fine-tuning teaches the manners.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field

from ftcourse.toy.lexicon import TASK_WORDS, invented_names

FAMILIES: tuple[str, ...] = ("max", "add", "count", "capital")
PROCEDURAL: tuple[str, ...] = ("max", "add", "count")
FACTUAL: tuple[str, ...] = ("capital",)
SPLITS: tuple[str, ...] = ("train", "validation", "test")

WORLD_SEED = 2026
N_COUNTRIES = 120
ADD_MAX = 30  # operands of `add` run from 0 to ADD_MAX
NUMBER_MAX = 2 * ADD_MAX  # numbers in `max` lists: the same range as the sums of `add`

# Chat phrasings. A word list follows its instruction on the same line, after a space, as in the raw
# form: " cat" and "cat" are different tokens, and a list at the start of a line would begin with one
# the model never saw there.
CHAT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "max": (
        "Which number is the largest: {subject}",
        "From the list {subject}, which number is the biggest?",
    ),
    "add": ("What is {a} + {b}?", "Compute {a} + {b} and reply with the number only."),
    "count": ("How many words are in this list:", "Count the words in this list:"),
    "capital": ("What is the capital of {country}?", "Name the capital city of {country}."),
}

# Statements of a capital fact in pretraining; several phrasings let the fact be retrieved later.
FACT_TEMPLATES: tuple[str, ...] = (
    "The capital of {country} is {capital}.",
    "{capital} is the capital of {country}.",
    "In {country}, the capital city is {capital}.",
    "{country} has its capital at {capital}.",
    "Travellers to {country} arrive in {capital}, its capital.",
)


@dataclass(frozen=True)
class Task:
    """One task instance: an instruction (plus optional input), its answer, and the raw form."""

    family: str
    instruction: str
    input: str
    answer: str
    raw_prompt: str  # the pretraining form, up to where the answer starts (a new line)
    distractors: tuple[str, ...] = field(default=(), compare=False)  # plausible wrong answers
    item: str = ""  # what the task is about, order-free: it decides the split (see `item_of`)

    @property
    def prompt(self) -> str:
        """The user's message in the chat form."""
        return f"{self.instruction} {self.input}" if self.input else self.instruction


def countries() -> list[tuple[str, str]]:
    """The invented (country, capital) pairs of the world, fixed by WORLD_SEED."""
    names = invented_names(WORLD_SEED, 2 * N_COUNTRIES, syllables=(2, 2))
    return list(zip(names[:N_COUNTRIES], names[N_COUNTRIES:], strict=True))


def raw_text(family: str, subject: str, answer: str = "", gap: str = "\n") -> str:
    """The pretraining form of a task: `family: subject`, a gap (by default a line break), the answer."""
    return f"{family}: {subject}{gap}{answer}"


def max_subject(numbers: list[int]) -> str:
    """The numbers of a `max` task as they are written."""
    return " ".join(str(n) for n in numbers)


def _place(template: str, subject: str) -> tuple[str, str]:
    """(instruction, input): a template with {subject} takes it inside, otherwise it follows as input."""
    return (template.format(subject=subject), "") if "{subject}" in template else (template, subject)


def item_of(family: str, subject: str) -> str:
    """The order-free item of a task: a `max` or `count` list sorted, an `add` pair smaller first.

    The answer of all three does not depend on the order (26 + 6 is 6 + 26; the largest of a list or its
    length is the same in any order), so two tasks that differ only in order are twins: they must land
    in the same split, or a test question is answered in training. A country is its own item.
    """
    if family == "add":
        a, b = sorted(int(x) for x in subject.split("+"))
        return f"{a}+{b}"
    if family == "max":
        return " ".join(str(n) for n in sorted(int(x) for x in subject.split()))
    if family == "count":
        return " ".join(sorted(subject.split()))
    return subject


def _max_task(rng: random.Random, template: str) -> Task:
    numbers = rng.sample(range(NUMBER_MAX + 1), rng.randint(3, 5))
    ranked = sorted(numbers)
    wrong = (str(ranked[0]), str(ranked[-2]))  # the smallest, and the runner-up
    subject = max_subject(numbers)
    raw = raw_text("max", subject)
    return Task("max", *_place(template, subject), str(ranked[-1]), raw, wrong, item_of("max", subject))


def _count_task(rng: random.Random, template: str) -> Task:
    words = rng.sample(TASK_WORDS, rng.randint(2, 7))
    subject, n = " ".join(words), len(words)
    raw = raw_text("count", subject)
    return Task("count", template, subject, str(n), raw, (str(n + 1), str(n - 1)), item_of("count", subject))


def _add_task(a: int, b: int, template: str) -> Task:
    total = a + b
    raw = raw_text("add", f"{a} + {b}")
    wrong = (str(total + 1), str(total - 1))
    return Task("add", template.format(a=a, b=b), "", str(total), raw, wrong, item_of("add", f"{a}+{b}"))


def _capital_task(country: str, capital: str, template: str, others: list[str]) -> Task:
    raw = raw_text("capital", country)
    return Task("capital", template.format(country=country), "", capital, raw, tuple(others), country)


def split_of(key: str) -> str:
    """The split an item belongs to, fixed by a hash of its key: 60% train, 20% validation, 20% test."""
    bucket = zlib.crc32(key.encode()) % 10
    return "train" if bucket < 6 else ("validation" if bucket < 8 else "test")


def _draw(rng: random.Random, family: str, world: list[tuple[str, str]]) -> Task:
    """One random task of `family`; its `item` decides its split."""
    template = rng.choice(CHAT_TEMPLATES[family])
    if family == "max":
        return _max_task(rng, template)
    if family == "count":
        return _count_task(rng, template)
    if family == "add":
        a, b = rng.randint(0, ADD_MAX), rng.randint(0, ADD_MAX)
        return _add_task(a, b, template)
    country, capital = rng.choice(world)
    others = rng.sample([c for _, c in world if c != capital], 2)
    return _capital_task(country, capital, template, others)


def build_tasks(split: str, per_family: int, seed: int = WORLD_SEED) -> list[Task]:
    """Up to `per_family` distinct tasks of every family for one split; identical for identical arguments.

    Every item (a word list, an operand pair, a country, each taken without its order: see `item_of`)
    belongs to exactly one split, so a test question is never answered in the training split, not even
    with its operands swapped. The model may still know the answer from pretraining, which is the point.
    One item can appear in several tasks of a split (another phrasing, another order): evaluation
    treats such tasks as a cluster. A family whose split has fewer distinct prompts returns them all.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if per_family < 1:
        raise ValueError(f"per_family must be at least 1, got {per_family}")
    world = countries()
    tasks: list[Task] = []
    for family in FAMILIES:
        rng = random.Random(f"{seed}-{split}-{family}")
        seen: set[str] = set()
        for _ in range(per_family * 50):
            task = _draw(rng, family, world)
            if split_of(task.item) == split and task.prompt not in seen:
                seen.add(task.prompt)
                tasks.append(task)
                if len(seen) == per_family:
                    break
    return tasks
