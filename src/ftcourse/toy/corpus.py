"""The synthetic pretraining corpus: raw task lines, capital facts and filler prose, all seeded."""

from __future__ import annotations

import random
from collections.abc import Iterator

from ftcourse.toy.lexicon import ADJECTIVES, NOUNS, TASK_WORDS, TIMES, VERBS, invented_names
from ftcourse.toy.tasks import ADD_MAX, FACT_TEMPLATES, NUMBER_MAX, countries, max_subject, raw_text

N_PEOPLE = 3000  # invented first names in the prose: they give the tokenizer a realistic vocabulary
LINE_KINDS = ("max", "add", "count", "capital", "fact", "prose")
LINE_WEIGHTS = (0.2, 0.2, 0.15, 0.12, 0.08, 0.25)
# What separates a raw task from its answer. Varying it forces the model to find a task's operands by
# what they are rather than by how far back they sit: a model that only ever saw "\n" there learned
# position tricks that broke under the chat template, which puts several tokens in that place (the
# appendix on the embedded model counts them).
ANSWER_GAPS = ("\n", " =\n", " ->\n", "\nanswer:\n", "\nso the answer is\n")
GAP_WEIGHTS = (0.4, 0.15, 0.15, 0.15, 0.15)


def prose_sentence(rng: random.Random, people: list[str]) -> str:
    """A sentence of plain filler prose, so the model also learns ordinary language."""
    who, other = rng.sample(people, 2)
    noun, place = rng.choice(NOUNS), rng.choice(NOUNS)
    adjective, verb, time = rng.choice(ADJECTIVES), rng.choice(VERBS), rng.choice(TIMES)
    shapes = (
        f"{who} the {noun} {verb} the {adjective} {place} {time}.",
        f"{time.capitalize()}, {who} {verb} a {adjective} {noun} with {other}.",
        f"{who} and {other} {verb} {rng.randint(2, 40)} {place}s near the {adjective} {noun}.",
    )
    return rng.choice(shapes)


def raw_line(kind: str, rng: random.Random, world: list[tuple[str, str]], people: list[str]) -> str:
    """One line (a raw task is two) of the corpus, of the given kind."""
    gap = rng.choices(ANSWER_GAPS, weights=GAP_WEIGHTS)[0]
    if kind == "count":
        words = rng.sample(TASK_WORDS, rng.randint(1, 8))
        return raw_text("count", " ".join(words), str(len(words)), gap)
    if kind == "max":
        numbers = rng.sample(range(NUMBER_MAX + 1), rng.randint(2, 6))
        return raw_text("max", max_subject(numbers), str(max(numbers)), gap)
    if kind == "add":
        a, b = rng.randint(0, ADD_MAX), rng.randint(0, ADD_MAX)
        return raw_text("add", f"{a} + {b}", str(a + b), gap)
    if kind == "capital":
        country, capital = rng.choice(world)
        return raw_text("capital", country, capital, gap)
    if kind == "fact":
        country, capital = rng.choice(world)
        return rng.choice(FACT_TEMPLATES).format(country=country, capital=capital)
    return prose_sentence(rng, people)


def pretraining_documents(n_docs: int, seed: int = 0) -> Iterator[str]:
    """`n_docs` documents of 6 to 14 mixed lines; the same documents for the same seed."""
    rng = random.Random(seed)
    world = countries()
    people = invented_names(seed + 1, N_PEOPLE, syllables=(1, 3))
    for _ in range(n_docs):
        kinds = rng.choices(LINE_KINDS, weights=LINE_WEIGHTS, k=rng.randint(6, 14))
        yield "\n".join(raw_line(kind, rng, world, people) for kind in kinds)
