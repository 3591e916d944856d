"""formats.py: reading the files people have, detecting their layout, converting with TRL's converters."""

from __future__ import annotations

import codecs
import copy
import json
from pathlib import Path

import pytest

from ftcourse import data, formats, profiles
from ftcourse.data import DataError

EXAMPLES = Path(__file__).resolve().parents[1] / "book" / "part3" / "your-data"
USER = {"role": "user", "content": "What is 2 + 3?"}
BOT = {"role": "assistant", "content": "5"}


@pytest.fixture(scope="module")
def tokenizer():
    return profiles.load_tokenizer(profile=profiles.PROFILES["cpu"])


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# --- the example files: one per layout ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "layout", "schema"),
    [
        ("alpaca.json", "alpaca", "messages"),
        ("sharegpt.jsonl", "sharegpt", "messages"),
        ("pairs.csv", "preference", "preference"),
        ("feedback.tsv", "feedback", "feedback"),
    ],
)
def test_each_example_file_is_detected_and_converted(name, layout, schema):
    loaded = formats.load_any(EXAMPLES / name)
    assert (loaded.layout, loaded.schema, len(loaded.records)) == (layout, schema, 48)
    assert data.validate_records(loaded.records, schema).rows_kept == 48
    assert loaded.notes[0].startswith(f"layout {layout!r} detected")


def test_every_layout_is_detected_from_its_columns():
    rows = {
        "messages": {"messages": [USER, BOT]},
        "sharegpt": {"conversations": [{"from": "human", "value": "hi"}]},
        "alpaca": {"instruction": "Add.", "output": "5"},
        "prompt-completion": {"prompt": "2 + 3 =", "completion": "5"},
        "preference": {"prompt": "p", "chosen": "a", "rejected": "b"},
        "preference-implicit": {"chosen": [USER, BOT], "rejected": [USER, {**BOT, "content": "6"}]},
        "feedback": {"prompt": "p", "completion": "a", "label": True},
    }
    assert set(rows) == set(formats.LAYOUTS)
    for layout, row in rows.items():
        assert formats.detect_layout([row]).layout == layout


def test_an_unknown_layout_names_the_columns_and_the_override(tmp_path):
    path = _jsonl(tmp_path / "q.jsonl", [{"question": "What is 2 + 3?", "answer": "5"}])
    with pytest.raises(DataError, match=r"columns \['question', 'answer'\].*columns="):
        formats.load_any(path)
    loaded = formats.load_any(path, columns={"question": "instruction", "answer": "output"})
    assert loaded.records == [{"messages": [{"role": "user", "content": "What is 2 + 3?"}, BOT]}]


def test_an_explicit_layout_overrides_detection(tmp_path):
    path = _jsonl(tmp_path / "pc.jsonl", [{"prompt": "2 + 3 =", "completion": "5", "label": "yes"}])
    assert formats.load_any(path).layout == "feedback"
    loaded = formats.load_any(path, layout="prompt-completion")
    assert loaded.layout == "prompt-completion" and "as asked" in loaded.notes[0]
    with pytest.raises(ValueError, match="layout must be one of"):
        formats.load_any(path, layout="chatml")


# --- converters, each against the library's own ------------------------------------------------------------


def test_sharegpt_conversion_is_trls_with_speaker_names_mapped():
    from trl.data_utils import maybe_convert_to_chatml

    record = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"},
                                {"from": "bot", "value": "hello"}, {"from": "human", "value": "2+3?"},
                                {"from": "chatgpt", "value": "5"}]}  # fmt: skip
    ours = data.sharegpt_to_messages(record)
    theirs = maybe_convert_to_chatml(copy.deepcopy(record))["messages"]
    assert [m["content"] for m in ours["messages"]] == [m["content"] for m in theirs]
    assert [data.SHAREGPT_SPEAKERS[m["role"]] for m in theirs] == [m["role"] for m in ours["messages"]]
    assert record["conversations"][0] == {"from": "system", "value": "Be brief."}  # input left alone


def test_an_unknown_speaker_is_named_with_its_row_and_the_fix(tmp_path):
    path = _jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "hi"},
                                                           {"from": "robot", "value": "5"}]}])  # fmt: skip
    with pytest.raises(DataError, match=r"row 1.*conversations\[1\]\.from.*'robot'.*speakers="):
        formats.load_any(path)
    assert formats.load_any(path, speakers={"robot": "assistant"}).records[0]["messages"][1] == {
        "role": "assistant",
        "content": "5",
    }


def test_unpairing_is_trls_unpair_preference_dataset_shuffled():
    from datasets import Dataset
    from trl.data_utils import unpair_preference_dataset

    pairs = formats.load_any(EXAMPLES / "pairs.csv").records
    ours = formats.unpair(pairs, seed=0)
    theirs = unpair_preference_dataset(Dataset.from_list(pairs)).to_list()
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert sorted(map(key, ours)) == sorted(map(key, theirs))
    assert [r["label"] for r in ours[:10]] != [True] * 10  # TRL's order is all chosen first: shuffled here


def test_messages_to_prompt_completion_templates_to_the_same_text(tokenizer):
    from trl.data_utils import maybe_apply_chat_template

    record = {"messages": [{"role": "system", "content": "Be brief."}, USER, BOT]}
    split = data.messages_to_prompt_completion(record)
    assert split["completion"] == [BOT]
    parts = maybe_apply_chat_template(split, tokenizer)
    assert parts["prompt"] + parts["completion"] == maybe_apply_chat_template(record, tokenizer)["text"]


def test_alpaca_to_messages_keeps_instruction_input_and_output():
    # No library converter exists for Alpaca; the round trip through messages_to_alpaca checks it.
    record = {"instruction": "Count the words.", "input": "cat dog", "output": "2"}
    assert data.alpaca_to_messages(record)["messages"][0]["content"] == "Count the words. cat dog"
    no_input = {"instruction": "Add 2 and 3.", "input": "", "output": "5"}
    assert data.messages_to_alpaca(data.alpaca_to_messages(no_input)) == no_input


def test_plain_preference_rows_get_the_chat_form_trl_recognises():
    from trl.data_utils import is_conversational

    loaded = formats.load_any(EXAMPLES / "pairs.csv")
    assert all(is_conversational(r) for r in loaded.records)
    assert any("chat form" in note for note in loaded.notes)


def test_implicit_prompt_pairs_are_split_by_trls_extract_prompt(tmp_path):
    row = {"chosen": [USER, BOT], "rejected": [USER, {**BOT, "content": "6"}]}
    loaded = formats.load_any(_jsonl(tmp_path / "i.jsonl", [row]))
    assert loaded.records == [{"prompt": [USER], "chosen": [BOT], "rejected": [{**BOT, "content": "6"}]}]


# --- labels -------------------------------------------------------------------------------------------------


def test_string_kto_labels_are_read_and_an_unknown_one_is_named(tmp_path):
    labels = [r["label"] for r in formats.load_any(EXAMPLES / "feedback.tsv").records]
    assert labels.count(True) == labels.count(False) == 24
    path = tmp_path / "f.csv"
    path.write_text("prompt,completion,label\nhi,there,yes\nhi,you,maybe\n")
    with pytest.raises(DataError, match=r"f\.csv, row 2, field 'label': expected true/false.*'maybe'"):
        formats.load_any(path)


# --- methods and layouts ------------------------------------------------------------------------------------


def test_a_method_gets_its_schema_or_a_clear_refusal():
    assert formats.load_any(EXAMPLES / "pairs.csv", method="kto").schema == "feedback"
    with pytest.raises(
        ValueError, match=r"method 'simpo' trains on 'preference'.*'feedback'.*use method kto"
    ):
        formats.load_any(EXAMPLES / "feedback.tsv", method="simpo")
    with pytest.raises(ValueError, match=r"method 'lora' trains on 'messages'"):
        formats.load_any(EXAMPLES / "pairs.csv", method="lora")


# --- encodings and file-level problems ----------------------------------------------------------------------


def test_a_latin1_file_is_refused_naming_file_row_and_byte_then_read_when_asked(tmp_path):
    path = tmp_path / "cafe.csv"
    path.write_bytes("instruction,output\nSay hi.,hi\nName a drink.,café\n".encode("latin-1"))
    with pytest.raises(DataError) as caught:
        formats.load_any(path)
    message = str(caught.value)
    assert f"{path}, row 2, field '<encoding>'" in message and "byte 0xe9 at byte offset" in message, message
    assert "encoding='cp1252'" in message
    loaded = formats.load_any(path, encoding="latin-1")
    assert loaded.records[1]["messages"][1]["content"] == "café"


@pytest.mark.parametrize("codec", ["utf-16", "utf-8-sig"])
def test_a_bom_file_is_decoded_and_its_first_column_found(tmp_path, codec):
    path = tmp_path / "excel.csv"
    path.write_bytes("instruction,output\nSay hi.,héllo\n".encode(codec))
    assert path.read_bytes()[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF8[:2])
    assert formats.load_any(path).records[0]["messages"][1]["content"] == "héllo"


def test_utf16_without_a_bom_is_named_as_such(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_bytes((json.dumps({"instruction": "hi", "output": "x"}) + "\n").encode("utf-16-le"))
    with pytest.raises(DataError, match="UTF-16 without a byte-order mark"):
        formats.load_any(path)


def test_an_empty_file_says_so(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl, row 0, field '<file>': expected at least one row"):
        formats.load_any(tmp_path / "empty.jsonl")


def test_a_saved_datasets_folder_and_parquet_load(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = formats.load_any(EXAMPLES / "sharegpt.jsonl").records
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    Dataset.from_list(rows).to_parquet(str(tmp_path / "chat.parquet"))
    assert formats.load_any(tmp_path / "saved").records == rows
    assert formats.load_any(tmp_path / "chat.parquet").records == rows


def test_a_semicolon_csv_is_read_with_its_delimiter(tmp_path):
    (tmp_path / "eu.csv").write_text("instruction;output\nAdd 2 and 3.;5\n")
    assert formats.load_any(tmp_path / "eu.csv").records[0]["messages"][1] == BOT
