"""Word lists and invented place names that the toy world is built from."""

from __future__ import annotations

import random

# Task words: short, common, and each a single token once the tokenizer is trained.
TASK_WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "moon", "tree", "fish", "bird", "star", "cake", "milk",
    "book", "lamp", "door", "road", "ship", "rain", "snow", "wind", "fire", "rock",
    "leaf", "seed", "corn", "rice", "bread", "salt", "frog", "bear", "wolf", "duck",
    "goat", "lion", "owl", "bee", "ant", "cow", "pig", "hat", "cup", "key",
    "box", "pen", "bell", "drum", "kite", "ring", "coin", "shoe", "sock", "bag",
    "apple", "lemon", "pear", "plum", "grape", "olive", "onion", "bean", "nut", "egg",
    "red", "blue", "green", "gold", "pink", "gray", "black", "white", "brown", "teal",
)  # fmt: skip

# Words for the filler prose of the pretraining corpus.
NOUNS: tuple[str, ...] = (
    "farmer", "baker", "sailor", "teacher", "child", "doctor", "painter", "miner", "singer", "guard",
    "river", "hill", "garden", "market", "bridge", "forest", "village", "harbor", "valley", "castle",
    "letter", "basket", "lantern", "wagon", "blanket", "kettle", "ladder", "mirror", "window", "candle",
)  # fmt: skip
VERBS: tuple[str, ...] = (
    "carried", "found", "painted", "watched", "followed", "cleaned", "opened", "built", "sold", "bought",
    "visited", "crossed", "repaired", "counted", "dropped", "lifted", "hid", "shared", "moved", "kept",
)  # fmt: skip
ADJECTIVES: tuple[str, ...] = (
    "old", "small", "quiet", "bright", "heavy", "tall", "warm", "cold", "busy", "narrow",
    "gentle", "wooden", "dusty", "shiny", "broken", "crowded", "empty", "distant", "hidden", "famous",
)  # fmt: skip
TIMES: tuple[str, ...] = (
    "in the morning", "at noon", "before dinner", "after the storm", "on monday", "in winter",
    "every evening", "at dawn", "during the fair", "last summer",
)  # fmt: skip

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr", "st")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "th", "nd", "sk", "m")


def invented_word(rng: random.Random, syllables: int) -> str:
    """One pronounceable made-up word, e.g. 'drelvos'."""
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def invented_names(seed: int, count: int, syllables: tuple[int, int] = (2, 3)) -> list[str]:
    """`count` distinct invented names, the same ones for the same seed."""
    rng = random.Random(seed)
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < count:
        name = invented_word(rng, rng.randint(*syllables)).capitalize()
        if name not in seen and name.lower() not in TASK_WORDS:
            seen.add(name)
            names.append(name)
    return names
