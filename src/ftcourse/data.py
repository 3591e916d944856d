"""Datasets for fine-tuning: the schemas, converting between formats, loading files with row-level checks,
cleaning (duplicates, leakage, lengths) and splitting.

Four schemas: Alpaca `instruction/input/output`, chat `messages`, preference `prompt/chosen/rejected`,
and binary feedback `prompt/completion/label`. On the cpu profile the records come from the task world;
on spark from the hub. The code downstream sees the same columns whichever profile produced them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ftcourse.evaluate import exchanges, normalize
from ftcourse.profiles import Profile, active_profile, resolve_dataset
from ftcourse.toy.tasks import FAMILIES, Task, build_tasks

SCHEMAS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "input", "output"),
    "messages": ("messages",),
    "preference": ("prompt", "chosen", "rejected"),
    "feedback": ("prompt", "completion", "label"),
}
ROLES = ("system", "user", "assistant")
FILE_TYPES = (".json", ".jsonl", ".csv", ".parquet")

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


def sharegpt_to_messages(record: Mapping[str, Any]) -> dict[str, Any]:
    """A ShareGPT record (`conversations` of from/value, human/gpt) as a `messages` record."""
    names = {
        "system": "system",
        "human": "user",
        "user": "user",
        "gpt": "assistant",
        "assistant": "assistant",
    }
    return {"messages": [{"role": names[t["from"]], "content": t["value"]} for t in record["conversations"]]}


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
        roles = [m["role"] for m in record["messages"]] if not problems else []
        if roles and "user" not in roles:
            problems.append(
                Problem(*where, "messages", "a user turn before the assistant replies", f"roles {roles}")
            )
    elif schema == "preference":
        _turn_or_text(problems, where, "prompt", record["prompt"], "user")
        _turn_or_text(problems, where, "chosen", record["chosen"], "assistant")
        _turn_or_text(problems, where, "rejected", record["rejected"], "assistant")
        if not problems and record["chosen"] == record["rejected"]:
            problems.append(
                Problem(*where, "rejected", "a reply different from chosen", "the same reply as chosen")
            )
    else:
        _turn_or_text(problems, where, "prompt", record["prompt"], "user")
        _turn_or_text(problems, where, "completion", record["completion"], "assistant")
        if not isinstance(record["label"], bool):
            problems.append(Problem(*where, "label", "a boolean (true or false)", _kind(record["label"])))
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


def read_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """The rows of a JSON (a list), JSONL, CSV or Parquet file as (row number, raw record)."""
    path = Path(path).expanduser()
    if path.suffix not in FILE_TYPES:
        raise ValueError(
            f"{path}: expected a file ending in one of {list(FILE_TYPES)}, found {path.suffix!r}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".jsonl":
        row = 0
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                row += 1
                try:
                    yield row, json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(
                        [
                            Problem(
                                str(path),
                                row,
                                "<line>",
                                "one JSON object per line",
                                f"invalid JSON on line {line_number}: {error.msg}",
                            )
                        ]
                    ) from error
    elif path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise DataError(
                [Problem(str(path), 0, "<file>", "a JSON list of objects", f"invalid JSON: {error}")]
            ) from error
        if not isinstance(rows, list):
            raise DataError([Problem(str(path), 0, "<file>", "a JSON list of objects", _kind(rows))])
        yield from enumerate(rows, start=1)
    elif path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as handle:
            for row, raw in enumerate(csv.DictReader(handle), start=1):
                if None in raw:  # more cells than the header has columns
                    raw["<unnamed columns>"] = raw.pop(None)
                yield row, {k: _csv_value(k, v) for k, v in raw.items() if v is not None or k in raw}
    else:
        import pyarrow.parquet as pq

        yield from enumerate(pq.read_table(path).to_pylist(), start=1)


def load_file(
    path: str | Path,
    schema: str,
    *,
    tokenizer: Any = None,
    max_length: int | None = None,
    collect: bool = False,
) -> LoadReport:
    """Records of `schema` from a JSON/JSONL/CSV/Parquet file, every row checked (see validate_records)."""
    rows = [record for _, record in read_rows(path)]
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
