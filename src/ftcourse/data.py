"""Datasets in the schemas readers meet on the hub, from the task world (cpu) or the hub (spark).

Four schemas: Alpaca `instruction/input/output`, chat `messages`, preference `prompt/chosen/rejected`,
and binary feedback `prompt/completion/label`. The formatting code downstream sees the same columns
whichever profile produced them.
"""

from __future__ import annotations

from typing import Any

from ftcourse.profiles import Profile, active_profile
from ftcourse.toy.tasks import FAMILIES, Task, build_tasks

SCHEMAS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "input", "output"),
    "messages": ("messages",),
    "preference": ("prompt", "chosen", "rejected"),
    "feedback": ("prompt", "completion", "label"),
}


def to_alpaca(task: Task) -> dict[str, str]:
    """Alpaca record: instruction, optional input, output."""
    return {"instruction": task.instruction, "input": task.input, "output": task.answer}


def to_messages(task: Task) -> dict[str, list[dict[str, str]]]:
    """Chat record: one user turn, one assistant turn."""
    return {
        "messages": [{"role": "user", "content": task.prompt}, {"role": "assistant", "content": task.answer}]
    }


def to_preference(task: Task, which_wrong: int = 0) -> dict[str, Any]:
    """Preference record in TRL's conversational form: the right answer chosen, a wrong one rejected."""
    prompt = [{"role": "user", "content": task.prompt}]
    wrong = task.distractors[which_wrong % len(task.distractors)]
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": task.answer}],
        "rejected": [{"role": "assistant", "content": wrong}],
    }


def to_feedback(task: Task, good: bool) -> dict[str, Any]:
    """Binary-feedback record (KTO): a completion and whether a user liked it."""
    completion = task.answer if good else task.distractors[0]
    return {
        "prompt": [{"role": "user", "content": task.prompt}],
        "completion": [{"role": "assistant", "content": completion}],
        "label": good,
    }


def task_records(split: str, schema: str, per_family: int) -> list[dict[str, Any]]:
    """Task-world records of one split in one schema (feedback alternates liked and disliked)."""
    if schema not in SCHEMAS:
        raise ValueError(f"schema must be one of {sorted(SCHEMAS)}, got {schema!r}")
    tasks = build_tasks(split, per_family)
    if schema == "alpaca":
        return [to_alpaca(t) for t in tasks]
    if schema == "messages":
        return [to_messages(t) for t in tasks]
    if schema == "preference":
        return [to_preference(t, i) for i, t in enumerate(tasks)]
    return [to_feedback(t, good=i % 2 == 0) for i, t in enumerate(tasks)]


def load_records(
    schema: str, split: str = "train", size: int | None = None, profile: Profile | None = None
) -> Any:
    """A `datasets.Dataset` in `schema`: generated on the cpu profile, the profile's hub dataset on spark."""
    from datasets import Dataset, load_dataset

    profile = profile or active_profile()
    if not profile.uses_network:
        per_family = max(1, (size or profile.sft_examples) // len(FAMILIES))
        return Dataset.from_list(task_records(split, schema, per_family))
    dataset = load_dataset(profile.datasets[schema], split=split)
    missing = [c for c in SCHEMAS[schema] if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"hub dataset {profile.datasets[schema]!r} has columns {dataset.column_names}, "
            f"but schema {schema!r} needs {list(SCHEMAS[schema])}; missing {missing}"
        )
    return dataset.select(range(min(size, len(dataset)))) if size else dataset
