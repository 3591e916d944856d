"""Measuring a model on the task world: exact-match accuracy per task family, chat or raw form."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ftcourse.toy.tasks import FAMILIES, Task, build_tasks

STOP_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "\n")


def chat_prompt(tokenizer, task: Task, examples: Sequence[Task] = ()) -> str:
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


@torch.no_grad()
def generate(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 16, batch_size: int = 32
) -> list[str]:
    """Greedy continuations of `prompts` (special tokens kept, so stop markers stay visible)."""
    tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    replies: list[str] = []
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
    return replies


def replies(model, tokenizer, tasks: Sequence[Task], max_new_tokens: int = 16) -> list[str]:
    """The model's zero-shot chat answers to `tasks`, cut at the end of the turn."""
    prompts = [chat_prompt(tokenizer, t) for t in tasks]
    return [first_answer(r) for r in generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)]


@dataclass(frozen=True)
class AccuracyReport:
    """Exact-match accuracy per family, and over all tasks."""

    by_family: dict[str, float]
    overall: float
    n_tasks: int

    def as_row(self) -> dict[str, float]:
        """One flat row for a results table."""
        return {**self.by_family, "overall": self.overall}


def exact_match(
    model, tokenizer, tasks: Sequence[Task], form: str = "chat", shots: int = 0, batch_size: int = 32
) -> AccuracyReport:
    """Greedy exact-match accuracy on `tasks`, in the `chat` form (optionally few-shot) or the `raw` form."""
    if form not in ("chat", "raw"):
        raise ValueError(f"form must be 'chat' or 'raw', got {form!r}")
    if form == "raw" and shots:
        raise ValueError("few-shot examples are only defined for the chat form")
    pool = {f: [t for t in build_tasks("train", shots) if t.family == f] for f in FAMILIES} if shots else {}
    if form == "chat":
        prompts = [chat_prompt(tokenizer, t, pool.get(t.family, ())) for t in tasks]
    else:
        prompts = [t.raw_prompt for t in tasks]
    replies = generate(model, tokenizer, prompts, batch_size=batch_size)
    hits = [first_answer(reply) == task.answer for reply, task in zip(replies, tasks, strict=True)]
    by_family = {}
    for family in dict.fromkeys(t.family for t in tasks):
        scores = [hit for hit, t in zip(hits, tasks, strict=True) if t.family == family]
        by_family[family] = sum(scores) / len(scores)
    return AccuracyReport(by_family, sum(hits) / len(hits), len(hits))
