"""Reading the files people have: which layout a file is in, and converting it to one of the book's schemas.

A layout is a set of column names (alpaca, ShareGPT, OpenAI `messages`, prompt/completion, preference pairs
with or without an explicit prompt, KTO feedback). `detect_layout` names the layout of a file's rows and
why; `load_any` reads a file (`data.read_rows`: JSON, JSONL, CSV/TSV, Parquet, saved `datasets` folders),
converts its rows with TRL's converters where TRL has one, checks every converted row
(`data.validate_records`) and says what it did. Any guess can be overridden: `layout=`, `columns=`
(renames), `speakers=` (ShareGPT names), `encoding=`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftcourse import data
from ftcourse.data import DataError, Problem


@dataclass(frozen=True)
class Layout:
    """A file layout: the columns that identify it, the book schema it becomes, and how."""

    name: str
    columns: tuple[str, ...]  # all of these present: this layout (most columns wins)
    optional: tuple[str, ...]
    schema: str  # the book schema it converts to (data.SCHEMAS)
    how: str  # the conversion, in words


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout("feedback", ("prompt", "completion", "label"), (), "feedback", "labels read as booleans"),
        Layout("preference", ("prompt", "chosen", "rejected"), (), "preference", "kept as is"),
        Layout(
            "preference-implicit",
            ("chosen", "rejected"),
            (),
            "preference",
            "shared prompt split off by TRL's extract_prompt",
        ),  # fmt: skip
        Layout("alpaca", ("instruction", "output"), ("input",), "messages", "data.alpaca_to_messages"),
        Layout(
            "sharegpt",
            ("conversations",),
            (),
            "messages",
            "data.sharegpt_to_messages (TRL's maybe_convert_to_chatml, speaker names mapped to roles)",
        ),  # fmt: skip
        Layout("messages", ("messages",), (), "messages", "kept as is (OpenAI chat format)"),
        Layout(
            "prompt-completion",
            ("prompt", "completion"),
            (),
            "messages",
            "prompt as the user turn, completion as the reply",
        ),  # fmt: skip
    )
}
# Words people use for KTO's thumbs up and down, read as True and False (case and spaces ignored).
LABEL_WORDS: dict[str, bool] = {
    **dict.fromkeys(("true", "yes", "1", "good", "liked", "like", "up", "thumbs_up", "positive"), True),
    **dict.fromkeys(
        ("false", "no", "0", "bad", "disliked", "dislike", "down", "thumbs_down", "negative"), False
    ),
}
# What each training method reads.
METHOD_SCHEMAS: dict[str, str] = {
    "sft": "messages",
    "lora": "messages",
    "qlora": "messages",
    "dpo": "preference",
    "simpo": "preference",
    "orpo": "preference",
    "kto": "feedback",
}


@dataclass(frozen=True)
class Detection:
    """Which layout a file's rows are in, and why."""

    layout: str
    columns: tuple[str, ...]  # the columns of the first row
    ignored: tuple[str, ...]  # columns the layout does not use (ids, sources, ...): dropped
    reason: str


def detect_layout(rows: Sequence[Mapping[str, Any]], source: str = "records") -> Detection:
    """The layout whose columns the first row has (the one that uses most of them); an error if none does."""
    if not rows:
        raise DataError([Problem(source, 0, "<file>", "at least one row", "no rows: the file is empty")])
    first = rows[0]
    if not isinstance(first, Mapping):
        raise DataError([Problem(source, 1, "<row>", "an object with named fields", data._kind(first))])
    columns = tuple(first)
    matches = [layout for layout in LAYOUTS.values() if set(layout.columns) <= set(columns)]
    if not matches:
        known = "; ".join(f"{name}: {', '.join(layout.columns)}" for name, layout in LAYOUTS.items())
        raise DataError(
            [
                Problem(
                    source,
                    1,
                    "<columns>",
                    f"the columns of a known layout ({known})",
                    f"columns {list(columns)}; rename them with columns={{'yours': 'theirs'}} "
                    "(command line: --columns yours=theirs)",
                )  # fmt: skip
            ]
        )
    best = max(matches, key=lambda layout: len(layout.columns))
    used = set(best.columns) | set(best.optional)
    return Detection(
        best.name,
        columns,
        tuple(c for c in columns if c not in used),
        f"columns {', '.join(best.columns)} present",
    )


def read_label(value: Any, source: str = "records", row: int = 1) -> bool:
    """A KTO label as a boolean: booleans, 0/1 and the words of LABEL_WORDS; anything else is an error."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in LABEL_WORDS:
        return LABEL_WORDS[value.strip().lower()]
    expected = f"true/false, or one of {sorted(LABEL_WORDS)}"
    raise DataError([Problem(source, row, "label", expected, data._kind(value))])


def convert_row(
    record: Mapping[str, Any], layout: str, speakers: Mapping[str, str] | None, source: str, row: int
) -> dict[str, Any]:
    """One row of `layout` as a record of its book schema (only the schema's fields kept)."""
    if layout == "alpaca":
        return data.alpaca_to_messages({"input": "", **record})
    if layout == "sharegpt":
        return data.sharegpt_to_messages(record, speakers, source, row)
    if layout == "prompt-completion":
        turns = data.as_conversational({"prompt": record["prompt"], "completion": record["completion"]})
        return {"messages": [*turns["prompt"], *turns["completion"]]}
    if layout == "preference-implicit":
        from trl.data_utils import extract_prompt

        return extract_prompt({"chosen": record["chosen"], "rejected": record["rejected"]})
    if layout == "feedback":
        fields = {k: record[k] for k in ("prompt", "completion")}
        return {**fields, "label": read_label(record["label"], source, row)}
    return {name: record[name] for name in data.SCHEMAS[LAYOUTS[layout].schema]}


def unpair(records: Sequence[Mapping[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """Preference pairs as KTO rows (chosen liked, rejected not) by TRL's unpair_preference_dataset, shuffled.

    TRL writes every chosen row, then every rejected one; KTO's batches then hold one label only, so the
    rows are shuffled (with `seed`).
    """
    import datasets
    from trl.data_utils import unpair_preference_dataset

    with data.progress_bars(False):  # a bar for mapping a few dozen rows is noise in a report
        rows = unpair_preference_dataset(datasets.Dataset.from_list([dict(r) for r in records])).to_list()
    random.Random(seed).shuffle(rows)
    return [{"prompt": r["prompt"], "completion": r["completion"], "label": r["label"]} for r in rows]


@dataclass
class Loaded:
    """A file read and converted: the records of one book schema, and what was detected and done."""

    source: str
    layout: str
    schema: str
    records: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)  # what was detected and converted, in words
    problems: list[Problem] = field(default_factory=list)  # rows that failed the checks (collect=True)

    def describe(self) -> str:
        """What was read, as lines of text."""
        head = f"{self.source}: {len(self.records)} rows, layout {self.layout!r} -> schema {self.schema!r}"
        return "\n".join([head, *(f"  {note}" for note in self.notes)])


def load_any(
    path: str | Path,
    *,
    layout: str | None = None,
    columns: Mapping[str, str] | None = None,
    speakers: Mapping[str, str] | None = None,
    encoding: str | None = None,
    method: str | None = None,
    collect: bool = False,
    seed: int = 0,
) -> Loaded:
    """Read a file in any known layout and return records of the schema `method` needs (else the layout's).

    `layout` overrides detection, `columns` renames columns first ({'question': 'instruction'}), `speakers`
    adds ShareGPT speaker names, `encoding` overrides the BOM/UTF-8 rule. Every converted row is checked;
    the first bad one raises DataError naming file, row and field (all of them with `collect=True`).
    """
    source = str(path)
    rows = [record for _, record in data.read_rows(path, encoding)]
    if columns:
        rows = [{columns.get(k, k): v for k, v in r.items()} if isinstance(r, dict) else r for r in rows]
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    found = detect_layout(rows, source)
    notes = [f"layout {found.layout!r} detected: {found.reason}"]
    if layout and layout != found.layout:
        notes = [f"layout {layout!r} as asked (detection said {found.layout!r})"]
    layout = layout or found.layout
    schema = LAYOUTS[layout].schema
    if found.ignored:
        notes.append(f"columns not used, dropped: {', '.join(found.ignored)}")
    records: list[Any] = []
    for row, record in enumerate(rows, start=1):
        missing = [c for c in LAYOUTS[layout].columns if not isinstance(record, Mapping) or c not in record]
        if missing:
            raise DataError(
                [Problem(source, row, missing[0], f"the columns of layout {layout!r}", "it is missing")]
            )
        try:
            records.append(convert_row(record, layout, speakers, source, row))
        except DataError:
            raise
        except ValueError as error:
            raise DataError(
                [Problem(source, row, "<row>", f"a row of layout {layout!r}", str(error))]
            ) from error
    if layout != "messages" and layout not in ("preference", "feedback"):
        notes.append(f"converted to {schema!r} by {LAYOUTS[layout].how}")
    plain = schema != "messages" and any(isinstance(r.get("prompt"), str) for r in records)
    checked = data.validate_records(records, schema, source, collect=collect)
    records = checked.records
    if plain:  # the chat template then applies to preference rows as it does to SFT rows
        records = [data.as_conversational(r) for r in records]
        notes.append("plain-text prompts and replies put in chat form (user and assistant turns)")
    if method is not None:
        records, schema = _for_method(records, schema, method, source, notes, seed)
    return Loaded(source, layout, schema, records, notes, checked.problems)


def _for_method(
    records: list[dict[str, Any]], schema: str, method: str, source: str, notes: list[str], seed: int
) -> tuple[list[dict[str, Any]], str]:
    """The records in the schema `method` trains on: preference pairs unpair for KTO; else it must match."""
    if method not in METHOD_SCHEMAS:
        raise ValueError(f"method must be one of {sorted(METHOD_SCHEMAS)}, got {method!r}")
    needed = METHOD_SCHEMAS[method]
    if needed == schema:
        return records, schema
    if needed == "feedback" and schema == "preference":
        notes.append(f"{len(records)} pairs unpaired for KTO by TRL's unpair_preference_dataset, shuffled")
        return unpair(records, seed), "feedback"
    advice = {
        "messages": "give a chat, alpaca, ShareGPT or prompt/completion file, or use a preference method",
        "preference": "give prompt/chosen/rejected pairs (KTO rows cannot be paired back), or use method kto"
        if schema == "feedback"
        else "give prompt/chosen/rejected pairs",
        "feedback": "give prompt/completion/label rows or prompt/chosen/rejected pairs",
    }[needed]
    raise ValueError(
        f"{source}: method {method!r} trains on {needed!r} rows ({', '.join(data.SCHEMAS[needed])}), but "
        f"this file holds {schema!r} rows ({', '.join(data.SCHEMAS[schema])}); {advice}."
    )
