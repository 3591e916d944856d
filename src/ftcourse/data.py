"""Datasets for fine-tuning: the schemas, converting between formats, loading files with row-level checks,
cleaning (duplicates, leakage, lengths) and splitting.

Four schemas: Alpaca `instruction/input/output`, chat `messages`, preference `prompt/chosen/rejected`,
and binary feedback `prompt/completion/label`. On the cpu profile the records come from the task world;
on spark from the hub. The code downstream sees the same columns whichever profile produced them.
"""

from __future__ import annotations

import codecs
import copy
import csv
import hashlib
import io
import json
import random
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ftcourse.profiles import (
    TASK_WORLD,
    Profile,
    active_profile,
    note_source,
    resolve_dataset,
    training_source,
)
from ftcourse.toy.tasks import FAMILIES, Task, build_tasks

SCHEMAS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "input", "output"),
    "messages": ("messages",),
    "preference": ("prompt", "chosen", "rejected"),
    "feedback": ("prompt", "completion", "label"),
}
ROLES = ("system", "user", "assistant")
FILE_TYPES = (".json", ".jsonl", ".csv", ".tsv", ".parquet")  # and folders written by Dataset.save_to_disk

# --- records from the task world ---------------------------------------------------------------------


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


def _balanced(tasks: Sequence[Task], size: int, split: str) -> list[Task]:
    """Exactly `size` tasks, as evenly spread over the families as the split allows, in family order."""
    by_family = {f: [t for t in tasks if t.family == f] for f in FAMILIES}
    if sum(len(v) for v in by_family.values()) < size:
        held = {f: len(v) for f, v in by_family.items()}
        raise ValueError(
            f"the task world's {split!r} split holds {sum(held.values())} distinct tasks ({held}), "
            f"fewer than size={size}; ask for at most that many, or use another split"
        )
    quota = dict.fromkeys(FAMILIES, 0)
    while sum(quota.values()) < size:  # round robin over the families that still have tasks left
        for f in FAMILIES:
            if quota[f] < len(by_family[f]) and sum(quota.values()) < size:
                quota[f] += 1
    return [t for f in FAMILIES for t in by_family[f][: quota[f]]]


def task_records(split: str, schema: str, per_family: int) -> list[dict[str, Any]]:
    """Task-world records of one split in one schema (feedback alternates liked and disliked)."""
    if schema not in SCHEMAS:
        raise ValueError(f"schema must be one of {sorted(SCHEMAS)}, got {schema!r}")
    if split == "train":
        note_source("train", TASK_WORLD, schema)
    return _records(build_tasks(split, per_family), schema)


def _records(tasks: Sequence[Task], schema: str) -> list[dict[str, Any]]:
    """Tasks turned into records of `schema`."""
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
    """A `datasets.Dataset` of exactly `size` records in `schema` (task world on cpu, hub dataset on spark).

    Raises a ValueError that says how many records exist when fewer than `size` do. `size=None` gives the
    whole hub split on spark, and on cpu the quick-run set: up to `sft_examples / 4` tasks per family.
    """
    from datasets import Dataset, load_dataset

    if schema not in SCHEMAS:
        raise ValueError(f"schema must be one of {sorted(SCHEMAS)}, got {schema!r}")
    if size is not None and size < 1:
        raise ValueError(f"size must be a positive number of records, got {size}")
    profile = profile or active_profile()
    if split == "train":  # what a chapter loads to train on: the source its scores must come from
        note_source("train", training_source(schema, profile), schema)
    if not profile.uses_network:
        if size is None:  # the quick-run set: up to sft_examples / 4 per family (capital has fewer)
            return Dataset.from_list(task_records(split, schema, profile.sft_examples // len(FAMILIES)))
        per_family = -(-size // len(FAMILIES))  # ceil: every family must be able to fill its share
        tasks = build_tasks(split, per_family + 10)  # a margin for families short in this split
        if len(tasks) < size:  # a family ran short in this split: draw more so the others fill in
            tasks = build_tasks(split, size)
        return Dataset.from_list(_records(_balanced(tasks, size, split), schema))
    dataset = load_dataset(resolve_dataset(profile.datasets[schema]), split=split)
    if schema == "preference" and "prompt" not in dataset.column_names and "chosen" in dataset.column_names:
        # trl-lib/ultrafeedback_binarized keeps the prompt inside chosen/rejected ("implicit prompt"):
        # split off the shared leading turns, as TRL does, so every profile sees prompt/chosen/rejected.
        from trl.data_utils import extract_prompt

        dataset = dataset.map(extract_prompt)
    missing = [c for c in SCHEMAS[schema] if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"hub dataset {profile.datasets[schema]!r} has columns {dataset.column_names}, "
            f"but schema {schema!r} needs {list(SCHEMAS[schema])}; missing {missing}"
        )
    if size is not None and size > len(dataset):
        raise ValueError(
            f"hub dataset {profile.datasets[schema]!r} split {split!r} has {len(dataset)} rows, "
            f"fewer than size={size}; ask for at most {len(dataset)}"
        )
    dataset = dataset.select_columns(list(SCHEMAS[schema]))  # hub datasets carry extra columns (ids, tags)
    dataset = dataset.select(range(size)) if size else dataset
    # Every row the caller gets passes the checks local files pass; the first bad one stops the load.
    source = hub_source(profile.datasets[schema], split, resolve_dataset(profile.datasets[schema]))
    validate_records(dataset.to_list(), schema, source)
    return dataset


def hub_source(hub_id: str, split: str, location: str) -> str:
    """How errors name a hub dataset's split: the hub id, and the local copy when one was used."""
    copy = f" (local copy {location})" if location != hub_id else ""
    return f"hub dataset {hub_id!r}{copy}, split {split!r}"


@contextmanager
def progress_bars(show: bool) -> Iterator[None]:
    """Hide the `datasets` progress bars (mapping, TRL's tokenizing) unless `show`; restore them after."""
    import datasets

    were_on = datasets.is_progress_bar_enabled()
    if not show:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if were_on:
            datasets.enable_progress_bars()


# --- formats -----------------------------------------------------------------------------------------

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


def render_alpaca(record: Mapping[str, str]) -> str:
    """An Alpaca record as the Stanford Alpaca prompt text followed by its output."""
    has_input = bool(record.get("input"))
    return (
        ALPACA_PROMPT.format(
            with_input=", paired with an input that provides further context" if has_input else "",
            instruction=record["instruction"],
            input_block=f"### Input:\n{record['input']}\n\n" if has_input else "",
        )
        + record["output"]
    )


def render_chatml(messages: Sequence[Mapping[str, str]]) -> str:
    """Messages in ChatML, the format of the embedded model (and of Qwen, SmolLM, ...)."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def render_llama3(messages: Sequence[Mapping[str, str]]) -> str:
    """Messages in Llama 3's format: header tokens around each role, <|eot_id|> after each turn."""
    turns = "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in messages
    )
    return "<|begin_of_text|>" + turns


def alpaca_to_messages(record: Mapping[str, str], system: str | None = None) -> dict[str, Any]:
    """An Alpaca record as a `messages` record: instruction (and input) as the user turn."""
    user = f"{record['instruction']} {record['input']}" if record.get("input") else record["instruction"]
    turns = [{"role": "system", "content": system}] if system else []
    turns += [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    return {"messages": turns}


def messages_to_alpaca(record: Mapping[str, Any], drop_system: bool = False) -> dict[str, str]:
    """A single-exchange `messages` record as Alpaca (input left empty); more turns cannot be expressed.

    Alpaca has no system prompt: a system turn is an error unless `drop_system=True` says to drop it.
    """
    roles = [m["role"] for m in record["messages"]]
    turns = [m for m in record["messages"] if m["role"] != "system"]
    if [m["role"] for m in turns] != ["user", "assistant"]:
        raise ValueError(
            f"Alpaca holds one instruction and one output, but this conversation has roles "
            f"{roles}; keep multi-turn data in the messages format"
        )
    if len(turns) < len(roles) and not drop_system:
        raise ValueError(
            "Alpaca has no field for a system prompt, and this conversation has one; pass "
            "drop_system=True to drop it, or keep the record in the messages format"
        )
    return {"instruction": turns[0]["content"], "input": "", "output": turns[1]["content"]}


# ShareGPT speaker names seen on the hub, and the role each one is (extend with `speakers=`).
SHAREGPT_SPEAKERS: dict[str, str] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
}


def sharegpt_to_messages(
    record: Mapping[str, Any],
    speakers: Mapping[str, str] | None = None,
    source: str = "records",
    row: int = 1,
) -> dict[str, Any]:
    """A ShareGPT record (`conversations` of from/value) as a `messages` record, speakers mapped to roles.

    TRL's `maybe_convert_to_chatml` renames the keys (from/value to role/content); it keeps the speaker
    names, which chat templates do not know, so each is mapped through SHAREGPT_SPEAKERS (plus `speakers`).
    An unknown speaker raises DataError naming `source`, `row` and the turn.
    """
    from trl.data_utils import maybe_convert_to_chatml

    names = {**SHAREGPT_SPEAKERS, **(speakers or {})}
    converted = maybe_convert_to_chatml(copy.deepcopy(dict(record)))  # it renames in place
    turns = converted.get("messages")
    if not isinstance(turns, list) or not all(isinstance(turn, dict) for turn in turns):
        expected = "a list of {from, value} turns"
        raise DataError([Problem(source, row, "conversations", expected, _kind(turns))])
    messages = []
    for i, turn in enumerate(turns):
        speaker = turn.get("role")
        if not isinstance(speaker, str) or speaker.strip().lower() not in names:
            found = f"{_kind(speaker)}; pass speakers={{{speaker!r}: 'assistant'}} (or 'user', 'system')"
            expected = f"a speaker name, one of {sorted(names)}"
            raise DataError([Problem(source, row, f"conversations[{i}].from", expected, found)])
        messages.append({"role": names[speaker.strip().lower()], "content": turn.get("content")})
    return {"messages": messages}


def messages_to_prompt_completion(record: Mapping[str, Any]) -> dict[str, Any]:
    """A `messages` record as TRL's conversational prompt/completion: earlier turns, then the last reply."""
    turns = list(record["messages"])
    if not turns or turns[-1]["role"] != "assistant":
        raise ValueError(f"a conversation must end with an assistant reply to split off; roles are "
                         f"{[m['role'] for m in turns]}")  # fmt: skip
    return {"prompt": turns[:-1], "completion": turns[-1:]}


def as_conversational(record: Mapping[str, Any]) -> dict[str, Any]:
    """A standard-form preference or feedback record (plain strings) in conversational form.

    The prompt becomes a user turn and each reply an assistant turn, so the model's chat template applies
    to preference training exactly as it does to SFT. Fields already in conversational form are kept.
    """
    roles = {"prompt": "user", "chosen": "assistant", "rejected": "assistant", "completion": "assistant"}
    return {
        k: [{"role": roles[k], "content": v}] if k in roles and isinstance(v, str) else v
        for k, v in record.items()
    }


def assistant_mask(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[tuple[str, int, bool]]:
    """Each token of the chat-templated conversation: (token text, id, whether the loss counts it)."""
    from trl.chat_template_utils import get_training_chat_template

    # A model's own template may lack {% generation %} markers (Llama 3.1's does); TRL ships patched
    # copies of the common ones and uses them in SFTTrainer. None means the template needs no patch.
    template = get_training_chat_template(tokenizer)
    encoded = tokenizer.apply_chat_template(
        list(messages),
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        **({"chat_template": template} if template else {}),
    )
    ids = encoded["input_ids"]
    return [
        (tokenizer.convert_ids_to_tokens(i), i, bool(m))
        for i, m in zip(ids, encoded["assistant_masks"], strict=True)
    ]


# --- validation --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one row: where it is, which field, what was expected and what was found."""

    source: str
    row: int  # 1-based position among the file's records
    field: str
    expected: str
    found: str

    def __str__(self) -> str:
        """The problem as one sentence."""
        where = f"{self.source}, row {self.row}, field {self.field!r}"
        return f"{where}: expected {self.expected}, found {self.found}"


class DataError(ValueError):
    """Raised when a dataset row is invalid; `.problems` lists what was wrong, first problem first."""

    def __init__(self, problems: Sequence[Problem], rows_read: int | None = None) -> None:
        self.problems = list(problems)
        extra = f" (and {len(self.problems) - 1} more problems)" if len(self.problems) > 1 else ""
        super().__init__(
            f"{self.problems[0]}{extra}. Fix the row, or load with collect=True to list every problem."
        )


@dataclass
class LoadReport:
    """What loading produced: the valid records, every problem, and how many rows each step removed."""

    source: str
    schema: str
    rows_read: int
    records: list[dict[str, Any]]
    problems: list[Problem] = field(default_factory=list)
    removed: dict[str, int] = field(default_factory=dict)  # reason -> rows removed for it

    @property
    def rows_kept(self) -> int:
        """How many rows survived."""
        return len(self.records)

    def counts(self) -> dict[str, int]:
        """Rows read, removed for each reason, and kept; read = kept + every removal."""
        return {
            "read": self.rows_read,
            **{f"removed: {k}": v for k, v in self.removed.items()},
            "kept": self.rows_kept,
        }


def _kind(value: Any) -> str:
    """A short description of a value for an error message."""
    if isinstance(value, str):
        return "an empty string" if not value.strip() else f"the string {value[:40]!r}"
    return f"{type(value).__name__} {value!r}"[:60]


def _check_text(problems: list[Problem], where: tuple[str, int], name: str, value: Any) -> None:
    """A non-empty string is expected in `name`."""
    if not isinstance(value, str):
        problems.append(Problem(*where, name, "a string", _kind(value)))
    elif not value.strip():
        problems.append(Problem(*where, name, "non-empty text", "an empty string"))


def _check_turns(
    problems: list[Problem], where: tuple[str, int], name: str, turns: Any, last_role: str | None
) -> None:
    """A list of {role, content} messages with known roles, ending with `last_role` when given."""
    if not isinstance(turns, list) or not turns:
        problems.append(Problem(*where, name, "a non-empty list of {role, content} messages", _kind(turns)))
        return
    for i, turn in enumerate(turns):
        at = f"{name}[{i}]"
        if not isinstance(turn, dict):
            problems.append(Problem(*where, at, "a {role, content} object", _kind(turn)))
            continue
        keys = set(turn)
        if keys != {"role", "content"}:
            missing, extra = sorted({"role", "content"} - keys), sorted(keys - {"role", "content"})
            problems.append(
                Problem(*where, at, "exactly the keys role and content", f"missing {missing}, extra {extra}")
            )
            continue
        if turn["role"] not in ROLES:
            problems.append(Problem(*where, f"{at}.role", f"one of {list(ROLES)}", _kind(turn["role"])))
        _check_text(problems, where, f"{at}.content", turn["content"])
    if last_role and isinstance(turns[-1], dict) and turns[-1].get("role") != last_role:
        problems.append(
            Problem(
                *where,
                name,
                f"a conversation that ends with the {last_role}",
                f"it ends with {turns[-1].get('role')!r}",
            )
        )


def _check_order(problems: list[Problem], where: tuple[str, int], name: str, turns: list[dict]) -> None:
    """Roles in chat order: a system turn only first, then user and assistant taking turns, user first."""
    roles = [turn["role"] for turn in turns]
    for i, role in enumerate(roles):
        previous = roles[i - 1] if i > 0 and roles[i - 1] != "system" else None
        if role == "system" and i > 0:
            expected, found = "a system turn only at the start", f"'system' at position {i}"
        elif role != "system" and previous is None and role != "user":
            expected, found = "a user turn before the assistant replies", f"{role!r} first"
        elif role != "system" and previous == role:
            expected, found = "user and assistant taking turns", f"{role!r} twice in a row at position {i}"
        else:
            continue
        problems.append(Problem(*where, name, expected, f"{found}, roles {roles}"))
        return


def _check_pair_form(
    problems: list[Problem], where: tuple[str, int], record: Mapping[str, Any], replies: Sequence[str]
) -> None:
    """Prompt and replies in one form (all text or all messages); replies hold assistant turns only."""
    prompt = record["prompt"]
    if isinstance(prompt, list):
        _check_order(problems, where, "prompt", prompt)
    for name in replies:
        reply = record[name]
        if isinstance(prompt, list) != isinstance(reply, list):
            forms = ("a list of {role, content} messages, like the prompt", "plain text")
            problems.append(Problem(*where, name, *(forms if isinstance(prompt, list) else forms[::-1])))
            continue
        if isinstance(reply, list) and any(turn["role"] != "assistant" for turn in reply):
            problems.append(
                Problem(
                    *where,
                    name,
                    "assistant turns only (the prompt lives in 'prompt')",
                    f"roles {[turn['role'] for turn in reply]}: the prompt repeated inside the reply; "
                    "load the file with layout='preference-implicit' to split it off",
                )
            )
            continue
        asked = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        if normalize(_turn_text(reply)) == normalize(asked):
            problems.append(Problem(*where, name, "a reply to the user's turn", "the user's turn repeated"))


def _turn_or_text(problems: list[Problem], where: tuple[str, int], name: str, value: Any, last: str) -> None:
    """A field that may be plain text (standard form) or a list of messages (conversational form)."""
    if isinstance(value, str):
        _check_text(problems, where, name, value)
    elif isinstance(value, list):
        _check_turns(problems, where, name, value, last)
    else:
        problems.append(Problem(*where, name, "text or a list of {role, content} messages", _kind(value)))


def _prompt_tokens(tokenizer: Any, record: Mapping[str, Any], schema: str) -> int:
    """Tokens of the prompt (everything before the reply) once the chat template is applied."""
    if schema == "alpaca":
        turns = alpaca_to_messages(record)["messages"][:-1]
    elif schema == "messages":
        turns = record["messages"][:-1]
    else:
        prompt = record["prompt"]
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return len(
        tokenizer.apply_chat_template(turns, tokenize=True, add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
    )


def check_record(
    record: Any,
    schema: str,
    source: str = "records",
    row: int = 1,
    tokenizer: Any = None,
    max_length: int | None = None,
) -> list[Problem]:
    """Every problem of one record in `schema` (an empty list for a valid record)."""
    where = (source, row)
    if not isinstance(record, dict):
        return [Problem(*where, "<row>", f"an object with the fields {list(SCHEMAS[schema])}", _kind(record))]
    problems: list[Problem] = []
    expected = SCHEMAS[schema]
    for name in expected:
        if name not in record:
            problems.append(Problem(*where, name, f"the field {name!r} (schema {schema!r})", "it is missing"))
    for name in record:
        if name not in expected:
            problems.append(Problem(*where, name, f"only the fields {list(expected)}", "an extra field"))
    if problems:
        return problems
    if schema == "alpaca":
        _check_text(problems, where, "instruction", record["instruction"])
        if not isinstance(record["input"], str):  # an empty input is allowed: most Alpaca rows have none
            problems.append(
                Problem(*where, "input", "a string (empty when there is no input)", _kind(record["input"]))
            )
        _check_text(problems, where, "output", record["output"])
    elif schema == "messages":
        _check_turns(problems, where, "messages", record["messages"], "assistant")
        if not problems:
            _check_order(problems, where, "messages", record["messages"])
    elif schema == "preference":
        _turn_or_text(problems, where, "prompt", record["prompt"], "user")
        _turn_or_text(problems, where, "chosen", record["chosen"], "assistant")
        _turn_or_text(problems, where, "rejected", record["rejected"], "assistant")
        if not problems:
            _check_pair_form(problems, where, record, ("chosen", "rejected"))
        if not problems and record["chosen"] == record["rejected"]:
            problems.append(
                Problem(*where, "rejected", "a reply different from chosen", "the same reply as chosen")
            )
    else:
        _turn_or_text(problems, where, "prompt", record["prompt"], "user")
        _turn_or_text(problems, where, "completion", record["completion"], "assistant")
        if not problems:
            _check_pair_form(problems, where, record, ("completion",))
        if not isinstance(record["label"], bool):
            problems.append(
                Problem(
                    *where,
                    "label",
                    "a boolean (true or false; see formats.LABEL_WORDS)",
                    _kind(record["label"]),
                )
            )
    if not problems and tokenizer is not None and max_length is not None:
        n = _prompt_tokens(tokenizer, record, schema)
        if n >= max_length:
            problems.append(
                Problem(
                    *where,
                    "prompt" if schema != "messages" else "messages",
                    f"a prompt shorter than max_length={max_length} tokens (room left for the reply)",
                    f"{n} prompt tokens",
                )  # fmt: skip
            )
    return problems


def validate_records(
    records: Sequence[Any],
    schema: str,
    source: str = "records",
    *,
    tokenizer: Any = None,
    max_length: int | None = None,
    collect: bool = False,
    first_row: int = 1,
) -> LoadReport:
    """Check every record; raise DataError at the first bad one, or with collect=True report them all."""
    if schema not in SCHEMAS:
        raise ValueError(f"schema must be one of {sorted(SCHEMAS)}, got {schema!r}")
    kept: list[dict[str, Any]] = []
    problems: list[Problem] = []
    for row, record in enumerate(records, start=first_row):
        found = check_record(record, schema, source, row, tokenizer, max_length)
        if found and not collect:
            raise DataError(found)
        problems += found
        if not found:
            kept.append(record)
    invalid = len(records) - len(kept)
    return LoadReport(source, schema, len(records), kept, problems, {"invalid": invalid} if invalid else {})


_JSON_FIELDS = {"messages", "prompt", "chosen", "rejected", "completion"}


def _csv_value(name: str, text: str | None) -> Any:
    """A CSV cell as a value: JSON lists for message fields, true/false for labels, text otherwise."""
    if text is None:
        return None
    if name in _JSON_FIELDS and text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    if name == "label" and text.strip().lower() in ("true", "false"):
        return text.strip().lower() == "true"
    return text


def decode_text(raw: bytes, source: str, encoding: str | None = None, rows_start: int = 0) -> tuple[str, str]:
    """File bytes as text and the encoding used: `encoding` if given, else a BOM's, else strict UTF-8.

    A BOM settles it (Excel writes UTF-8 with one, Windows tools UTF-16). Without one the file must be UTF-8;
    anything else is refused with the byte, its line and row, since Latin-1 and Windows-1252 cannot be told
    apart from the bytes alone. `rows_start` is the line of the first row (1 for a CSV header), for the row.
    """
    if encoding is None:
        for bom, name in ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
                          (codecs.BOM_UTF16_BE, "utf-16")):  # fmt: skip
            if raw.startswith(bom):
                encoding = name
                break
    try:
        text = raw.decode(encoding or "utf-8")
        if encoding is None and "\x00" in text[:1000]:  # ASCII in UTF-16 is valid UTF-8 with a NUL per char
            found = (
                "NUL characters: it looks like UTF-16 without a byte-order mark; pass encoding='utf-16-le'"
            )
            raise DataError([Problem(source, 1, "<encoding>", "UTF-8 text", found)])
        return text, encoding or "utf-8"
    except (UnicodeDecodeError, LookupError) as error:
        if isinstance(error, LookupError):
            raise ValueError(
                f"{source}: unknown encoding {encoding!r}; try 'utf-8', 'latin-1' or 'utf-16'"
            ) from error
        line = raw[: error.start].count(b"\n") + 1
        context = raw[max(0, error.start - 20) : error.start + 4]
        hint = (
            "it looks like UTF-16 without a byte-order mark: pass encoding='utf-16-le'"
            if raw[1::2].count(0) > len(raw) // 4
            else "if it was saved as Latin-1 or Windows-1252 (Excel on Windows), pass encoding='cp1252' "
            "(on the command line: --encoding cp1252), or save it as UTF-8"
        )
        found = f"byte 0x{raw[error.start]:02x} at byte offset {error.start} (line {line}, after {context!r})"
        found += f"; {hint}"
        raise DataError([Problem(source, max(1, line - rows_start), "<encoding>",
                                 f"{encoding or 'UTF-8'} text", found)]) from error  # fmt: skip


def _json_rows(text: str, source: str) -> Iterator[tuple[int, Any]]:
    """The rows of a JSON list."""
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            [Problem(source, 0, "<file>", "a JSON list of objects", f"invalid JSON: {error}")]
        ) from error
    if isinstance(rows, dict) and len(rows) == 1 and next(iter(rows)) in ("data", "train", "rows"):
        rows = next(iter(rows.values()))  # {"data": [...]}: the whole list under one wrapper key
    if not isinstance(rows, list):
        raise DataError([Problem(source, 0, "<file>", "a JSON list of objects", _kind(rows))])
    yield from enumerate(rows, start=1)


def _jsonl_rows(text: str, source: str) -> Iterator[tuple[int, Any]]:
    """The rows of a JSON-lines text, blank lines skipped."""
    row = 0
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        row += 1
        try:
            yield row, json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                [
                    Problem(
                        source,
                        row,
                        "<line>",
                        "one JSON object per line",
                        f"invalid JSON on line {line_number}: {error.msg}",
                    )
                ]  # fmt: skip
            ) from error


def _csv_rows(text: str, source: str, delimiter: str | None) -> Iterator[tuple[int, Any]]:
    """The rows of a CSV/TSV text; the delimiter is sniffed from the header when not given."""
    if delimiter is None:
        header = text.split("\n", 1)[0]
        delimiter = max(",;\t", key=header.count)  # Excel in many European locales writes ';'
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    if reader.fieldnames:
        reader.fieldnames = [name.strip() for name in reader.fieldnames]
    for row, raw in enumerate(reader, start=1):
        if None in raw:  # more cells than the header has columns
            raw["<unnamed columns>"] = raw.pop(None)
        yield row, {k: _csv_value(k, v) for k, v in raw.items()}


def _saved_dataset_rows(path: Path, split: str) -> Iterator[tuple[int, Any]]:
    """The rows of a folder written by `Dataset.save_to_disk` (a DatasetDict: the split `split`)."""
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except FileNotFoundError as error:
        raise ValueError(
            f"{path}: a folder, but not one written by Dataset.save_to_disk ({error}); give a file instead"
        ) from error
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise ValueError(f"{path}: a DatasetDict without the split {split!r}; it has {list(dataset)}")
        dataset = dataset[split]
    yield from enumerate(dataset.to_list(), start=1)


def read_rows(
    path: str | Path, encoding: str | None = None, split: str = "train"
) -> Iterator[tuple[int, Any]]:
    """The rows of a JSON (a list), JSONL, CSV/TSV or Parquet file, or a saved `datasets` folder, numbered.

    Text files are decoded by `decode_text` (BOMs honoured, non-UTF-8 bytes refused with their position).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        yield from _saved_dataset_rows(path, split)
        return
    if path.suffix.lower() not in FILE_TYPES:
        raise ValueError(
            f"{path}: expected a file ending in one of {list(FILE_TYPES)} or a saved datasets folder, "
            f"found {path.suffix!r}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from enumerate(pq.read_table(path).to_pylist(), start=1)
        return
    source = str(path)
    text, _ = decode_text(
        path.read_bytes(), source, encoding, rows_start=1 if suffix in (".csv", ".tsv") else 0
    )
    if suffix == ".jsonl":
        yield from _jsonl_rows(text, source)
    elif suffix == ".json":
        yield from _json_rows(text, source)
    else:
        yield from _csv_rows(text, source, "\t" if suffix == ".tsv" else None)


def load_file(
    path: str | Path,
    schema: str,
    *,
    tokenizer: Any = None,
    max_length: int | None = None,
    collect: bool = False,
    encoding: str | None = None,
) -> LoadReport:
    """Records of `schema` from a JSON/JSONL/CSV/TSV/Parquet file or folder, every row checked."""
    rows = [record for _, record in read_rows(path, encoding)]
    return validate_records(
        rows, schema, str(path), tokenizer=tokenizer, max_length=max_length, collect=collect
    )


def write_jsonl(records: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write records as JSON lines, atomically; returns the path."""
    from ftcourse.atomic import atomic_output

    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


# --- cleaning ----------------------------------------------------------------------------------------


def normalize(text: str) -> str:
    """Lower case, with every run of whitespace turned into one space: leaks survive reformatting."""
    return " ".join(text.lower().split())


def _turn_text(turn: Any) -> str:
    """The text of a turn: the string itself, or the content of its last message."""
    return turn if isinstance(turn, str) else turn[-1]["content"]


def exchanges(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The (user prompt, reply) pairs of a training record in any of the four schemas."""
    if "messages" in record:
        turns = record["messages"]
        return [
            (turn["content"], turns[i + 1]["content"] if i + 1 < len(turns) else "")
            for i, turn in enumerate(turns)
            if turn["role"] == "user"
        ]
    if "instruction" in record:
        prompt = (
            f"{record['instruction']}\n{record['input']}" if record.get("input") else record["instruction"]
        )
        return [(prompt, record.get("output", ""))]
    reply = record.get("chosen", record.get("completion", ""))
    return [(_turn_text(record["prompt"]), _turn_text(reply) if reply else "")]


def record_text(record: Mapping[str, Any]) -> str:
    """The normalised text of a record (its prompts and replies), the unit of duplicate detection."""
    return normalize(" ".join(f"{p} {r}" for p, r in exchanges(record)))


def shingles(text: str, n: int = 5) -> set[str]:
    """The set of character n-grams of `text` (the whole text when it is shorter than n)."""
    return {text[i : i + n] for i in range(max(1, len(text) - n + 1))}


def jaccard(a: set[str], b: set[str]) -> float:
    """|a ∩ b| / |a ∪ b|: 1 for identical sets, 0 for disjoint ones."""
    return len(a & b) / len(a | b) if a or b else 1.0


_PRIME = (1 << 31) - 1  # a Mersenne prime: a * x + b stays below 2**63 for a, x, b < 2**31


@lru_cache(maxsize=8)
def _hash_parameters(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The random (a, b) of the hash functions h(x) = (a * x + b) mod p."""
    rng = np.random.default_rng(seed)
    return (
        rng.integers(1, _PRIME, size=num_perm, dtype=np.uint64),
        rng.integers(0, _PRIME, size=num_perm, dtype=np.uint64),
    )


def minhash(shingle_set: set[str], num_perm: int = 128, seed: int = 0) -> np.ndarray:
    """MinHash signature: for each of `num_perm` random hash functions, the least hash over the shingles.

    Two signatures agree in a given position with probability equal to the Jaccard similarity of the sets.
    """
    a, b = _hash_parameters(num_perm, seed)
    digests = [hashlib.blake2b(s.encode(), digest_size=8).digest() for s in shingle_set]
    x = np.frombuffer(b"".join(digests), dtype=np.uint64) % np.uint64(_PRIME)
    return ((x[:, None] * a + b) % np.uint64(_PRIME)).min(axis=0)  # (num_perm,)


@dataclass
class DedupResult:
    """Records kept after duplicate removal, and which row each removed one duplicated."""

    kept: list[dict[str, Any]]
    exact: list[tuple[int, int]]  # (removed row, the kept row it repeats), 0-based
    near: list[tuple[int, int, float]]  # (removed row, kept row, Jaccard similarity of their shingles)
    threshold: float

    def removed(self) -> dict[str, int]:
        """Rows removed per reason, for a LoadReport."""
        return {
            "exact duplicates": len(self.exact),
            f"near duplicates (Jaccard >= {self.threshold})": len(self.near),
        }


def deduplicate(
    records: Sequence[Mapping[str, Any]],
    threshold: float = 0.8,
    ngram: int = 5,
    bands: int = 32,
    rows: int = 4,
) -> DedupResult:
    """Drop exact duplicates (same normalised text), then near duplicates found by MinHash LSH.

    Signatures of `bands * rows` hashes are cut into bands; two records become candidates when one band
    agrees entirely, which happens with probability 1 - (1 - J**rows)**bands for Jaccard similarity J.
    Candidates are kept apart unless their true shingle Jaccard is at least `threshold`.
    """
    texts = [record_text(r) for r in records]
    first_seen: dict[str, int] = {}
    exact: list[tuple[int, int]] = []
    unique: list[int] = []
    for i, text in enumerate(texts):
        if text in first_seen:
            exact.append((i, first_seen[text]))
        else:
            first_seen[text] = i
            unique.append(i)
    sets = {i: shingles(texts[i], ngram) for i in unique}
    buckets: dict[tuple[int, bytes], list[int]] = defaultdict(list)
    near: list[tuple[int, int, float]] = []
    removed: set[int] = set()
    for i in unique:
        signature = minhash(sets[i], bands * rows)
        keys = [(band, signature[band * rows : (band + 1) * rows].tobytes()) for band in range(bands)]
        candidates = {j for key in keys for j in buckets[key]}
        best = max(((jaccard(sets[i], sets[j]), j) for j in candidates), default=(0.0, -1))
        if best[0] >= threshold:
            near.append((i, best[1], best[0]))
            removed.add(i)
            continue
        for key in keys:
            buckets[key].append(i)
    kept = [dict(records[i]) for i in unique if i not in removed]
    return DedupResult(kept, exact, near, threshold)


def clean(
    records: Sequence[Any],
    schema: str,
    source: str = "records",
    *,
    tokenizer: Any = None,
    max_length: int | None = None,
    threshold: float = 0.8,
) -> LoadReport:
    """Validate (collecting problems), then drop exact and near duplicates; every removal is counted."""
    report = validate_records(
        records, schema, source, tokenizer=tokenizer, max_length=max_length, collect=True
    )
    result = deduplicate(report.records, threshold=threshold)
    report.records = result.kept
    report.removed.update({reason: n for reason, n in result.removed().items() if n})
    return report


def token_lengths(records: Sequence[Mapping[str, Any]], tokenizer: Any) -> list[int]:
    """Tokens per record after the chat template (Alpaca records are converted to messages first)."""
    lengths = []
    for record in records:
        turns = record["messages"] if "messages" in record else alpaca_to_messages(record)["messages"]
        lengths.append(
            len(tokenizer.apply_chat_template(list(turns), tokenize=True, return_dict=True)["input_ids"])
        )
    return lengths


def length_stats(lengths: Sequence[int], max_length: int | None = None) -> dict[str, float]:
    """Min, median, 95th percentile and max of token lengths, and how many exceed `max_length`."""
    values = np.asarray(lengths)
    stats = {
        "records": float(len(values)),
        "min": float(values.min()),
        "median": float(np.median(values)),
        "p95": float(np.percentile(values, 95)),
        "max": float(values.max()),
    }
    if max_length is not None:
        stats["over max_length"] = float((values > max_length).sum())
    return stats


def stratified_split(
    records: Sequence[Any], key: Callable[[Any], str], test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Any], list[Any]]:
    """Split records so that every stratum (`key(record)`) keeps its share in both parts."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    strata: dict[str, list[Any]] = defaultdict(list)
    for record in records:
        strata[key(record)].append(record)
    rng = random.Random(seed)
    train: list[Any] = []
    test: list[Any] = []
    for name in sorted(strata):
        group = list(strata[name])
        rng.shuffle(group)
        n_test = round(len(group) * test_fraction)
        test += group[:n_test]
        train += group[n_test:]
    return train, test


# --- preference pairs and feedback from one rated source ---------------------------------------------


def rated_responses(tasks: Sequence[Task]) -> list[dict[str, Any]]:
    """A rated source: each prompt with several replies scored 0..1 (right answer 1, distractors 0)."""
    rows = []
    for task in tasks:
        replies = [{"text": task.answer, "rating": 1.0}] + [
            {"text": d, "rating": 0.0} for d in task.distractors
        ]
        rows.append({"prompt": task.prompt, "responses": replies})
    return rows


def preference_pairs(rated: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Best-vs-worst pairs in TRL's conversational form, and how many prompts were skipped as ties."""
    pairs, ties = [], 0
    for row in rated:
        ranked = sorted(row["responses"], key=lambda r: r["rating"], reverse=True)
        best, worst = ranked[0], ranked[-1]
        if best["rating"] == worst["rating"] or best["text"] == worst["text"]:
            ties += 1
            continue
        pairs.append(
            {
                "prompt": [{"role": "user", "content": row["prompt"]}],
                "chosen": [{"role": "assistant", "content": best["text"]}],
                "rejected": [{"role": "assistant", "content": worst["text"]}],
            }
        )
    return pairs, ties


def feedback_rows(rated: Sequence[Mapping[str, Any]], liked_at: float = 0.5) -> list[dict[str, Any]]:
    """Every rated reply as a KTO row in conversational form, labelled liked when rating >= liked_at."""
    return [
        {
            "prompt": [{"role": "user", "content": row["prompt"]}],
            "completion": [{"role": "assistant", "content": reply["text"]}],
            "label": bool(reply["rating"] >= liked_at),
        }
        for row in rated
        for reply in row["responses"]
    ]


# --- the data report before training ------------------------------------------------------------------

TRUNCATION_LIMIT = 0.05  # the share of rows a run may cut at max_length unless truncation is allowed
REPORT_LENGTHS = (128, 256, 512, 1024, 2048, 4096)  # the max_length values the report tabulates


class TruncationError(ValueError):
    """Raised when more than the allowed share of rows is longer than max_length."""


def sequence_lengths(records: Sequence[Mapping[str, Any]], tokenizer: Any) -> list[int]:
    """Tokens each record puts through the model, counted the way TRL's trainers build their sequences.

    Chat rows go through the chat template (TRL's maybe_apply_chat_template). Plain-text SFT rows (`text`,
    or string `prompt` and `completion`) count the tokenizer's own special tokens and the EOS that
    SFTTrainer appends; pre-tokenized rows count their `input_ids`. A pair counts its prompt and the longer
    of its two replies: the trainer cuts each side at max_length.
    """
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    pair_fields = {"chosen", "rejected", "label"}  # preference and KTO rows: prompt + the longer reply
    eos = tokenizer.eos_token or ""
    texts: dict[bool, list[str]] = {False: [], True: []}  # key: with the tokenizer's special tokens
    plans: list[int | list[tuple[bool, int]]] = []  # per record: a known length, or its texts (prompt first)

    def text(value: str, special: bool = False) -> tuple[bool, int]:
        texts[special].append(value)
        return special, len(texts[special]) - 1

    rows = records.to_list() if hasattr(records, "to_list") else records  # a Dataset: one Arrow read, not n
    for record in map(dict, rows):
        sft_row = ("text" in record or "completion" in record) and not pair_fields & set(record)
        if "input_ids" in record:
            plans.append(len(record["input_ids"]))
        elif sft_row and not is_conversational(record):
            # SFTTrainer on plain text: tokenizer(prompt + completion + EOS), BOS as the tokenizer adds it
            whole = record["text"] if "text" in record else record["prompt"] + record["completion"]
            plans.append([text(whole if whole.endswith(eos) else whole + eos, special=True)])
        else:
            rendered = maybe_apply_chat_template(record, tokenizer)
            if "text" in rendered:
                plans.append([text(rendered["text"])])
            else:  # an implicit prompt (no "prompt" key) stays inside each reply
                replies = [text(rendered[k]) for k in ("chosen", "rejected", "completion") if k in rendered]
                plans.append([text(rendered.get("prompt", "")), *replies])
    counts = {  # one tokenizer call per kind: a call per row costs more than the tokenizing itself
        special: [len(ids) for ids in tokenizer(batch, add_special_tokens=special)["input_ids"]]
        for special, batch in texts.items()
        if batch
    }
    lengths = []
    for plan in plans:
        parts = [plan] if isinstance(plan, int) else [counts[special][i] for special, i in plan]
        lengths.append(parts[0] + max(parts[1:], default=0))
    return lengths


@dataclass
class DataReport:
    """What a training file holds before any training: rows, duplicates, problems, labels, token lengths."""

    source: str
    schema: str
    rows: int
    duplicates: int  # rows that repeat an earlier row exactly (after lower-casing and collapsing spaces)
    problems: list[Problem]
    labels: dict[str, int]  # KTO: liked / disliked rows
    lengths: list[int]  # tokens per valid row with the model's chat template
    max_length: int

    def truncated(self, max_length: int | None = None) -> tuple[int, int]:
        """(rows longer than max_length, tokens beyond it, summed): what the trainer would cut."""
        limit = self.max_length if max_length is None else max_length
        over = [n - limit for n in self.lengths if n > limit]
        return len(over), sum(over)

    @property
    def truncated_share(self) -> float:
        """The share of valid rows longer than the run's max_length."""
        return self.truncated()[0] / len(self.lengths) if self.lengths else 0.0

    def problem_counts(self) -> dict[str, int]:
        """Problem rows per kind (field and what was expected)."""
        kinds: dict[str, int] = defaultdict(int)
        for problem in self.problems:
            kinds[f"{problem.field.split('[')[0]}: expected {problem.expected}"] += 1
        return dict(kinds)

    def truncation_table(self) -> list[dict[str, int]]:
        """For each max_length of REPORT_LENGTHS (and the run's): rows cut and tokens lost."""
        limits = sorted({*REPORT_LENGTHS, self.max_length})
        return [{"max_length": m, **dict(zip(("rows cut", "tokens lost"), self.truncated(m), strict=True))}
                for m in limits]  # fmt: skip

    def table(self) -> str:
        """The report as plain text."""
        lines = [f"data report: {self.source} ({self.schema})", f"  rows: {self.rows}"]
        lines.append(f"  exact duplicates: {self.duplicates}")
        lines += [f"  problem rows, {kind}: {n}" for kind, n in self.problem_counts().items()]
        lines += [f"    {problem}" for problem in self.problems[:3]]
        if self.labels:
            lines.append("  labels: " + ", ".join(f"{k} {v}" for k, v in self.labels.items()))
        if self.lengths:
            lines.append(
                f"  tokens per row (chat template): min {min(self.lengths)}, median "
                f"{int(np.median(self.lengths))}, max {max(self.lengths)}"
            )
            for row in self.truncation_table():
                mark = "  <- this run" if row["max_length"] == self.max_length else ""
                lines.append(
                    f"    max_length {row['max_length']:>5}: {row['rows cut']:>4} rows cut, "
                    f"{row['tokens lost']:>6} tokens lost{mark}"
                )
        return "\n".join(lines)


def _normalized(value: Any) -> Any:
    """Every string inside `value` normalised (lower case, spaces collapsed)."""
    if isinstance(value, str):
        return normalize(value)
    if isinstance(value, Mapping):
        return {k: _normalized(v) for k, v in value.items()}
    return [_normalized(v) for v in value] if isinstance(value, list) else value


def _row_key(record: Mapping[str, Any]) -> str:
    """A record as normalised text: two rows with the same key are exact duplicates."""
    return json.dumps(_normalized(record), sort_keys=True, ensure_ascii=False)


def data_report(
    records: Sequence[Mapping[str, Any]],
    schema: str,
    tokenizer: Any,
    max_length: int,
    source: str = "records",
    problems: Sequence[Problem] = (),
) -> DataReport:
    """The report on valid `records` (and the `problems` of the rows that were not valid)."""
    keys = [_row_key(r) for r in records]
    labels: dict[str, int] = {}
    if schema == "feedback":
        liked = sum(bool(r["label"]) for r in records)
        labels = {"liked": liked, "disliked": len(records) - liked}
    return DataReport(
        source,
        schema,
        len(records) + len({p.row for p in problems}),
        len(keys) - len(set(keys)),
        list(problems),
        labels,
        sequence_lengths(records, tokenizer),
        max_length,
    )


def drop_duplicates(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The records without exact repeats (first copy kept): a repeat split off as held out would leak."""
    seen: set[str] = set()
    kept = []
    for record in records:
        key = _row_key(record)
        if key not in seen:
            seen.add(key)
            kept.append(dict(record))
    return kept


def check_truncation(report: DataReport, allow: bool = False, limit: float = TRUNCATION_LIMIT) -> None:
    """Raise TruncationError when more than `limit` of the rows would be cut at max_length, unless `allow`."""
    check_lengths(report.lengths, report.max_length, report.source, allow, limit)


@dataclass(frozen=True)
class Truncation:
    """What a max_length cuts from a training set: rows, rows longer than it, tokens beyond it."""

    max_length: int
    rows: int
    rows_cut: int
    tokens_lost: int
    longest: int

    @property
    def share(self) -> float:
        """The share of rows longer than max_length."""
        return self.rows_cut / self.rows if self.rows else 0.0

    def sentence(self) -> str:
        """One line for a run's output: what max_length cut."""
        return (
            f"max_length {self.max_length}: {self.rows_cut} of {self.rows} rows ({self.share:.1%}) cut, "
            f"{self.tokens_lost} tokens lost (longest row {self.longest} tokens)"
        )


def check_lengths(
    lengths: Sequence[int],
    max_length: int,
    source: str = "the training rows",
    allow: bool = False,
    limit: float = TRUNCATION_LIMIT,
) -> Truncation:
    """What `max_length` cuts from rows of these `lengths`; TruncationError above `limit` unless `allow`."""
    over = [n - max_length for n in lengths if n > max_length]
    cut = Truncation(max_length, len(lengths), len(over), sum(over), max(lengths, default=0))
    if allow or cut.share <= limit:
        return cut
    raise TruncationError(
        f"{source}: {cut.rows_cut} of {cut.rows} rows ({cut.share:.0%}) are longer than "
        f"max_length={max_length} tokens with the chat template; training would cut them and lose "
        f"{cut.tokens_lost} tokens. The limit is {limit:.0%} of rows. Raise max_length (the longest row has "
        f"{cut.longest} tokens), shorten or drop the long rows, or allow it explicitly "
        "(allow_truncation=True, on the command line --allow-truncation)."
    )


def fit_lengths(
    lengths: Sequence[int],
    max_length: int | None = None,
    source: str = "the training rows",
    allow: bool = False,
) -> Truncation:
    """`check_lengths` at `max_length` (None: `length_limit` of the rows), printed when it cuts any row.

    The one place a training run decides what its max_length cuts: SFT, preference and reward-model runs
    call it before they build a trainer, so a run that would cut too much stops before any work.
    """
    cut = check_lengths(lengths, length_limit(lengths) if max_length is None else max_length, source, allow)
    if cut.rows_cut:
        print(cut.sentence())
    return cut


def length_limit(lengths: Sequence[int], keep: float = 1 - TRUNCATION_LIMIT, step: int = 64) -> int:
    """The smallest multiple of `step` tokens that holds at least `keep` of the rows whole.

    How the spark profile sets max_length from the data it trains on (sequence_lengths), instead of a
    fixed number that would cut long hub replies to fragments.
    """
    if not lengths:
        raise ValueError("length_limit needs the token lengths of at least one row")
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be a share in (0, 1], got {keep}")
    ordered = sorted(lengths)
    needed = ordered[max(0, int(np.ceil(keep * len(ordered))) - 1)]  # the row at the `keep` quantile
    return int(step * -(-needed // step))
