"""data.py: schema records, format conversion, row-level validation of files, cleaning and splitting."""

from __future__ import annotations

import csv
import json
from collections import Counter

import pytest

from ftcourse import data, profiles
from ftcourse.data import SCHEMAS, DataError, load_records, task_records

CPU = profiles.PROFILES["cpu"]
USER = {"role": "user", "content": "What is 2 + 3?"}
BOT = {"role": "assistant", "content": "5"}


@pytest.fixture(scope="module")
def tokenizer():
    return profiles.load_tokenizer(profile=CPU)


@pytest.mark.parametrize("schema", sorted(SCHEMAS))
def test_records_have_exactly_the_schema_columns(schema):
    records = task_records("train", schema, 5)
    assert len(records) == 20
    assert all(tuple(r) == SCHEMAS[schema] for r in records)
    assert data.validate_records(records, schema).rows_kept == 20  # generated data passes its own checks


def test_messages_are_a_user_then_an_assistant_turn():
    record = task_records("test", "messages", 1)[0]
    assert [m["role"] for m in record["messages"]] == ["user", "assistant"]


def test_preference_pairs_differ_and_feedback_alternates():
    for record in task_records("train", "preference", 10):
        assert record["chosen"][0]["content"] != record["rejected"][0]["content"]
    labels = [r["label"] for r in task_records("train", "feedback", 3)]
    assert labels == [True, False] * 6


@pytest.mark.parametrize("size", [1, 7, 8, 201])
def test_load_records_returns_exactly_size_records(size):
    dataset = load_records("alpaca", "test", size=size, profile=CPU)
    assert dataset.column_names == list(SCHEMAS["alpaca"])
    assert len(dataset) == size


def test_load_records_spreads_families_evenly_and_keeps_the_default_size():
    tasks = data._balanced(data.build_tasks("train", 30), 10, "train")
    assert sorted(Counter(t.family for t in tasks).values()) == [2, 2, 3, 3]
    assert len(load_records("messages", "train", profile=CPU)) == len(
        task_records("train", "messages", CPU.sft_examples // 4)
    )


def test_load_records_says_why_it_cannot_give_size_records():
    # max and count never run out of distinct tasks, so the refusal is checked on a drawn pool of 12
    pool = data.build_tasks("test", 3)
    with pytest.raises(ValueError, match=r"'test' split holds 12 distinct tasks.*fewer than size=13"):
        data._balanced(pool, 13, "test")
    with pytest.raises(ValueError, match="size must be a positive"):
        load_records("messages", "test", size=0, profile=CPU)


def test_unknown_schema_names_the_choices():
    with pytest.raises(ValueError, match="schema must be one of"):
        task_records("train", "sharegpt", 1)


# --- formats ---------------------------------------------------------------------------------------------


def test_the_renderers_write_each_formats_exact_tokens():
    turns = [USER, BOT]
    assert data.render_chatml(turns) == (
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"
    )
    assert data.render_llama3(turns) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n5<|eot_id|>"
    )
    text = data.render_alpaca({"instruction": "Add.", "input": "2 + 3", "output": "5"})
    assert "### Instruction:\nAdd.\n\n### Input:\n2 + 3\n\n### Response:\n5" in text
    assert "### Input" not in data.render_alpaca({"instruction": "Add 2 + 3.", "input": "", "output": "5"})


def test_chatml_renderer_matches_the_embedded_models_template(tokenizer):
    assert tokenizer.apply_chat_template([USER, BOT], tokenize=False) == data.render_chatml([USER, BOT])


def test_conversions_round_trip_and_refuse_what_alpaca_cannot_hold():
    alpaca = {"instruction": "What is 2 + 3?", "input": "", "output": "5"}
    assert data.alpaca_to_messages(alpaca) == {"messages": [USER, BOT]}
    assert data.messages_to_alpaca(data.alpaca_to_messages(alpaca)) == alpaca
    with_system = data.alpaca_to_messages(alpaca, system="Be brief.")
    with pytest.raises(ValueError, match="no field for a system prompt"):  # never dropped silently
        data.messages_to_alpaca(with_system)
    assert data.messages_to_alpaca(with_system, drop_system=True) == alpaca
    with pytest.raises(ValueError, match="multi-turn"):
        data.messages_to_alpaca({"messages": [USER, BOT, USER, BOT]})
    share = {"conversations": [{"from": "human", "value": USER["content"]}, {"from": "gpt", "value": "5"}]}
    assert data.sharegpt_to_messages(share) == {"messages": [USER, BOT]}


def test_assistant_mask_covers_the_reply_and_its_end_token_only(tokenizer):
    table = data.assistant_mask(tokenizer, [USER, BOT])
    assert [tok for tok, _, counted in table if counted] == ["5", "<|im_end|>"]
    assert table[-1] == ("Ċ", tokenizer.convert_tokens_to_ids("Ċ"), False)  # the newline after it is not


# --- validation: every bad-input case names its row and field --------------------------------------------

GOOD_MESSAGES = {"messages": [USER, BOT]}
BAD_CASES = [
    ("alpaca", {"instruction": "Add.", "input": ""}, "output", "missing"),
    ("alpaca", {"instruction": "Add.", "input": "", "output": "5", "source": "web"}, "source", "extra field"),
    ("alpaca", {"instruction": 7, "input": "", "output": "5"}, "instruction", "a string"),
    ("alpaca", {"instruction": "Add.", "input": None, "output": "5"}, "input", "a string"),
    ("alpaca", {"instruction": "Add.", "input": "", "output": "  "}, "output", "empty string"),
    ("messages", {"messages": "hi"}, "messages", "non-empty list"),
    ("messages", {"messages": [USER, {"role": "bot", "content": "5"}]}, "messages[1].role", "one of"),
    ("messages", {"messages": [USER, {"role": "assistant"}]}, "messages[1]", "missing ['content']"),
    ("messages", {"messages": [USER, {"role": "assistant", "content": ""}]}, "messages[1].content", "empty"),
    ("messages", {"messages": [BOT, USER]}, "messages", "ends with the assistant"),
    (
        "preference",
        {"prompt": [USER], "chosen": [BOT], "rejected": [BOT]},
        "rejected",
        "same reply as chosen",
    ),
    ("preference", {"prompt": [USER], "chosen": "5", "rejected": 6}, "rejected", "int 6"),
    ("messages", {"messages": [BOT]}, "messages", "a user turn"),
    ("feedback", {"prompt": [USER], "completion": [BOT], "label": "yes"}, "label", "a boolean"),
    ("feedback", {"prompt": [USER], "completion": [BOT], "label": 1}, "label", "a boolean"),
    # roles out of order, and replies that do not fit their prompt
    ("messages", {"messages": [BOT, USER, BOT]}, "messages", "'assistant' first"),
    ("messages", {"messages": [USER, USER, BOT]}, "messages", "'user' twice in a row at position 1"),
    (
        "messages",
        {"messages": [USER, {"role": "system", "content": "Be brief."}, BOT]},
        "messages",
        "'system' at",
    ),
    ("preference", {"prompt": [USER], "chosen": "5", "rejected": "6"}, "chosen", "found plain text"),
    ("preference", {"prompt": "Add.", "chosen": [BOT], "rejected": "6"}, "chosen", "found a list of"),
    ("preference", {"prompt": [USER], "chosen": [USER, BOT], "rejected": [BOT]}, "chosen", "prompt repeated"),
    ("preference", {"prompt": [USER], "chosen": [USER], "rejected": [BOT]}, "chosen", "ends with 'user'"),
    (
        "preference",
        {"prompt": "Say hi", "chosen": " say HI ", "rejected": "no"},
        "chosen",
        "user's turn repeated",
    ),
    ("feedback", {"prompt": [USER, USER], "completion": [BOT], "label": True}, "prompt", "twice in a row"),
]


@pytest.mark.parametrize(("schema", "record", "field", "found"), BAD_CASES)
def test_each_bad_row_is_named_by_file_row_and_field(schema, record, field, found, tmp_path):
    path = tmp_path / "train.jsonl"
    good = task_records("train", schema, 1)[:2]
    path.write_text("".join(json.dumps(r) + "\n" for r in [*good, record]))
    with pytest.raises(DataError) as caught:
        data.load_file(path, schema)
    message = str(caught.value)
    assert f"{path}, row 3, field {field!r}" in message, message
    assert found in message, message


def test_a_prompt_that_overflows_max_length_is_named(tokenizer):
    long = {"messages": [{"role": "user", "content": "cat " * 200}, BOT]}
    with pytest.raises(
        DataError, match=r"records, row 2, field 'messages'.*max_length=64.*\d+ prompt tokens"
    ):
        data.validate_records([GOOD_MESSAGES, long], "messages", tokenizer=tokenizer, max_length=64)
    assert (
        data.validate_records([GOOD_MESSAGES], "messages", tokenizer=tokenizer, max_length=64).rows_kept == 1
    )


def test_collect_mode_reports_every_problem_and_counts_every_row():
    rows = [GOOD_MESSAGES, {"messages": [BOT]}, {"text": "hi"}, GOOD_MESSAGES]
    report = data.validate_records(rows, "messages", "chat.json", collect=True)
    assert report.rows_kept == 2
    assert report.counts() == {"read": 4, "removed: invalid": 2, "kept": 2}
    assert [(p.row, p.field) for p in report.problems] == [(2, "messages"), (3, "messages"), (3, "text")]


def test_every_file_type_loads_the_same_records(tmp_path):
    records = task_records("train", "feedback", 2)
    (tmp_path / "a.json").write_text(json.dumps(records))
    data.write_jsonl(records, tmp_path / "a.jsonl")
    for suffix, delimiter in ((".csv", ","), (".tsv", "\t")):
        with (tmp_path / f"a{suffix}").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=SCHEMAS["feedback"], delimiter=delimiter)
            writer.writeheader()
            for r in records:
                writer.writerow(
                    {k: json.dumps(v) if isinstance(v, list) else str(v).lower() for k, v in r.items()}
                )
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), tmp_path / "a.parquet")
    for suffix in data.FILE_TYPES:
        assert data.load_file(tmp_path / f"a{suffix}", "feedback").records == records, suffix


def test_file_level_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match=r"expected a file ending in one of"):
        data.load_file(tmp_path / "a.txt", "messages")
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.load_file(tmp_path / "missing.jsonl", "messages")
    (tmp_path / "bad.jsonl").write_text(json.dumps(GOOD_MESSAGES) + "\n\n{oops\n")
    with pytest.raises(DataError, match=r"row 2, field '<line>'.*invalid JSON on line 3"):
        data.load_file(tmp_path / "bad.jsonl", "messages")
    (tmp_path / "obj.json").write_text(json.dumps(GOOD_MESSAGES))
    with pytest.raises(DataError, match="a JSON list of objects"):
        data.load_file(tmp_path / "obj.json", "messages")
    (tmp_path / "a.csv").write_text("prompt,completion,label\nhi,there,maybe\n")
    with pytest.raises(DataError, match=r"row 1, field 'label': expected a boolean"):
        data.load_file(tmp_path / "a.csv", "feedback")


# --- cleaning ---------------------------------------------------------------------------------------------


def test_jaccard_and_minhash_agree_on_a_hand_worked_case():
    a, b = data.shingles("abcdef", 3), data.shingles("abcdxy", 3)
    assert a == {"abc", "bcd", "cde", "def"}
    assert data.jaccard(a, b) == pytest.approx(2 / 6)  # {abc, bcd} shared of 6 distinct shingles
    x, y = (
        data.shingles("the quick brown fox jumps over the lazy dog"),
        data.shingles("the quick brown fox jumps"),
    )
    agreement = (data.minhash(x, 512) == data.minhash(y, 512)).mean()
    assert agreement == pytest.approx(data.jaccard(x, y), abs=0.06)  # MinHash estimates J (sd ~0.02 here)


def test_deduplicate_removes_exact_and_near_copies_and_says_which():
    base = task_records("train", "messages", 3)
    shouted = {"messages": [{**m, "content": m["content"].upper() + "  "} for m in base[0]["messages"]]}
    text = base[1]["messages"][0]["content"]
    nearly = {"messages": [{"role": "user", "content": text + " Please."}, base[1]["messages"][1]]}
    result = data.deduplicate([*base, shouted, nearly], threshold=0.7)
    assert result.exact == [(len(base), 0)]
    assert [(i, j) for i, j, _ in result.near] == [(len(base) + 1, 1)]
    assert len(result.kept) == len(base)
    assert sum(result.removed().values()) == 2


def test_token_lengths_and_stats(tokenizer):
    lengths = data.token_lengths(
        [GOOD_MESSAGES, {"instruction": "What is 2 + 3?", "input": "", "output": "5"}], tokenizer
    )
    assert lengths == [23, 23]  # counted by hand from the template: see test_assistant_mask...
    stats = data.length_stats([1, 2, 3, 4, 100], max_length=50)
    assert (stats["median"], stats["max"], stats["over max_length"]) == (3.0, 100.0, 1.0)


def test_stratified_split_keeps_each_familys_share():
    tasks = data.build_tasks("train", 50)
    train, test = data.stratified_split(tasks, key=lambda t: t.family, test_fraction=0.2, seed=0)
    assert Counter(t.family for t in test) == {f: 10 for f in data.FAMILIES}
    assert len(train) + len(test) == len(tasks) and not set(train) & set(test)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        data.stratified_split(tasks, key=lambda t: t.family, test_fraction=1.0)


def test_preference_and_feedback_from_one_rated_source():
    tasks = data.build_tasks("train", 2)
    rated = data.rated_responses(tasks)
    rated.append({"prompt": "tie", "responses": [{"text": "a", "rating": 1.0}, {"text": "b", "rating": 1.0}]})
    pairs, ties = data.preference_pairs(rated)
    assert ties == 1 and len(pairs) == len(tasks)
    assert data.validate_records(pairs, "preference").rows_kept == len(pairs)
    assert pairs[0]["chosen"][0]["content"] == tasks[0].answer
    feedback = data.feedback_rows(rated[:1])
    assert [r["label"] for r in feedback] == [True] + [False] * len(tasks[0].distractors)
    assert data.validate_records(feedback, "feedback").rows_kept == len(feedback)


def test_clean_counts_every_row_it_removes():
    base = task_records("train", "messages", 3)
    rows = [*base, base[0], {"messages": [BOT]}]
    report = data.clean(rows, "messages")
    counts = report.counts()
    assert counts == {"read": 14, "removed: invalid": 1, "removed: exact duplicates": 1, "kept": 12}
    assert counts["read"] == counts["kept"] + sum(v for k, v in counts.items() if k.startswith("removed"))


def test_load_records_fills_a_short_family_from_the_others():
    # capital has 140 training tasks, fewer than a quarter of 1040: the other families make up the rest
    records = data.load_records("messages", "train", size=1040, profile=profiles.PROFILES["cpu"])
    assert len(records) == 1040
    prompts = [r["messages"][0]["content"] for r in records]
    assert len(set(prompts)) == len(prompts)


# --- hub datasets (spark profile): every row validated, here on the local stand-ins ---------------------

SPARK = profiles.PROFILES["spark"]


@pytest.fixture(scope="module")
def standin_datasets():
    from ftcourse.toy import standin

    return standin.build_standins() / "datasets"  # cached under _build/ftcourse-cache after the first call


@pytest.mark.parametrize("schema", sorted(SCHEMAS))
def test_hub_rows_of_every_schema_load_and_pass_the_file_validators(schema, standin_datasets, monkeypatch):
    monkeypatch.setenv(profiles.DATASETS_ENV, str(standin_datasets))
    dataset = load_records(schema, "train", profile=SPARK)
    assert dataset.column_names == list(SCHEMAS[schema]) and len(dataset) >= 20
    assert data.validate_records(dataset.to_list(), schema).rows_kept == len(dataset)


def _bad_copy(tmp_path, hub_id: str, bad_row: int, spoil) -> str:
    """A hub-shaped copy of one stand-in dataset whose train row `bad_row` (1-based) is spoiled."""
    from ftcourse.toy import standin

    config, splits = standin.DATASETS[hub_id]

    def rows(split, n):
        made = splits[split](split, n)
        if split == "train":
            spoil(made[bad_row - 1])
        return made

    # a file name of its own: datasets caches local splits by relative file name
    standin.write_dataset(tmp_path / hub_id, config, {"train": rows}, 4, f"bad-{tmp_path.name}")
    return str(tmp_path)


def test_a_bad_hub_row_is_named_by_dataset_split_row_and_field(tmp_path, monkeypatch):
    def end_with_user(row):
        row["messages"] = row["messages"][:-1]  # the conversation now ends with the user

    monkeypatch.setenv(
        profiles.DATASETS_ENV, _bad_copy(tmp_path, "HuggingFaceH4/no_robots", 3, end_with_user)
    )
    with pytest.raises(DataError) as raised:
        load_records("messages", "train", profile=SPARK)
    message = str(raised.value)
    assert "hub dataset 'HuggingFaceH4/no_robots'" in message and "local copy" in message
    assert "split 'train', row 3, field 'messages'" in message
    problem = raised.value.problems[0]
    assert (problem.row, problem.field) == (3, "messages") and "assistant" in problem.expected


def test_a_hub_feedback_label_that_is_not_a_boolean_is_rejected(tmp_path, monkeypatch):
    def say_yes(row):
        row["label"] = "yes"  # a string column where the hub has booleans

    monkeypatch.setenv(profiles.DATASETS_ENV, _bad_copy(tmp_path, "trl-lib/kto-mix-14k", 1, say_yes))
    with pytest.raises(
        DataError, match=r"kto-mix-14k'.*split 'train', row 1, field 'label': expected a boolean"
    ):
        load_records("feedback", "train", profile=SPARK)


def test_only_the_rows_asked_for_are_loaded_and_checked(tmp_path, monkeypatch):
    def spoil(row):
        row["output"] = "   "  # an empty output in row 6

    monkeypatch.setenv(profiles.DATASETS_ENV, _bad_copy(tmp_path, "yahma/alpaca-cleaned", 6, spoil))
    assert len(load_records("alpaca", "train", size=5, profile=SPARK)) == 5  # rows 1-5 are fine
    with pytest.raises(
        DataError, match="row 6, field 'output': expected non-empty text, found an empty string"
    ):
        load_records("alpaca", "train", size=6, profile=SPARK)


# --- the data report before training ----------------------------------------------------------------------


def test_the_report_counts_duplicates_problems_labels_and_truncation(tokenizer):
    records = task_records("train", "feedback", 3)
    records = [*records, records[0]]  # one exact duplicate
    lengths = data.sequence_lengths(records, tokenizer)
    bad = data.check_record({"prompt": [USER], "completion": [BOT], "label": "maybe"}, "feedback", "f", 9)
    report = data.data_report(records, "feedback", tokenizer, max_length=min(lengths), problems=bad)
    assert report.rows == len(records) + 1 and report.duplicates == 1
    assert report.labels == {"liked": 7, "disliked": 6}
    over = [n - min(lengths) for n in lengths if n > min(lengths)]
    assert report.truncated() == (len(over), sum(over))
    assert {"max_length": 4096, "rows cut": 0, "tokens lost": 0} in report.truncation_table()
    assert "label: expected a boolean" in " ".join(report.problem_counts())
    text = report.table()
    assert "exact duplicates: 1" in text and "<- this run" in text and "liked 7, disliked 6" in text


def test_sequence_lengths_are_trls_templated_token_counts(tokenizer):
    from trl.data_utils import maybe_apply_chat_template

    record = task_records("train", "messages", 1)[0]
    text = maybe_apply_chat_template(record, tokenizer)["text"]
    assert data.sequence_lengths([record], tokenizer) == [
        len(tokenizer(text, add_special_tokens=False).input_ids)
    ]
    pair = task_records("train", "preference", 1)[0]
    parts = maybe_apply_chat_template(pair, tokenizer)
    count = lambda t: len(tokenizer(t, add_special_tokens=False).input_ids)  # noqa: E731
    assert data.sequence_lengths([pair], tokenizer) == [
        count(parts["prompt"]) + max(count(parts["chosen"]), count(parts["rejected"]))
    ]


def test_truncation_above_the_limit_stops_unless_allowed(tokenizer):
    records = task_records("train", "messages", 5)
    report = data.data_report(records, "messages", tokenizer, max_length=8, source="chat.jsonl")
    with pytest.raises(
        data.TruncationError, match=r"chat\.jsonl: 20 of 20 rows \(100%\).*max_length=8.*allow"
    ):
        data.check_truncation(report)
    data.check_truncation(report, allow=True)
    data.check_truncation(data.data_report(records, "messages", tokenizer, max_length=4096))


def test_drop_duplicates_keeps_the_first_copy():
    records = task_records("train", "alpaca", 2)
    copy = {**records[1], "output": " " + records[1]["output"].upper() + " "}
    assert data.drop_duplicates([*records, copy]) == records


# --- max_length from the measured lengths, and what it cuts ------------------------------------------------


def test_length_limit_is_the_smallest_multiple_of_64_holding_the_share():
    lengths = [10, 70, 130, 300]
    assert data.length_limit(lengths, keep=0.75) == 192  # the third row (130) whole: 3 * 64 tokens
    assert data.length_limit(lengths, keep=1.0) == 320  # every row whole: 300 rounds up to 5 * 64
    assert data.length_limit(lengths) == 320  # the default keeps 95%: of 4 rows, all 4
    assert data.length_limit([64, 64]) == 64  # a length already on the step stays
    with pytest.raises(ValueError, match="at least one row"):
        data.length_limit([])
    with pytest.raises(ValueError, match=r"keep must be a share in \(0, 1\]"):
        data.length_limit(lengths, keep=0)


def test_check_lengths_counts_what_max_length_cuts_and_stops_above_the_limit():
    lengths = [10, 70, 130, 300]
    cut = data.check_lengths(lengths, 256, "chat.jsonl", allow=True)
    assert (cut.rows, cut.rows_cut, cut.tokens_lost, cut.longest) == (4, 1, 44, 300)
    assert cut.share == 0.25
    assert cut.sentence() == (
        "max_length 256: 1 of 4 rows (25.0%) cut, 44 tokens lost (longest row 300 tokens)"
    )
    with pytest.raises(data.TruncationError) as stopped:
        data.check_lengths(lengths, 128, "chat.jsonl")
    message = str(stopped.value)
    for part in ("chat.jsonl", "2 of 4 rows (50%)", "max_length=128", "lose 174 tokens", "limit is 5%",
                 "longest row has 300 tokens", "allow_truncation=True"):  # fmt: skip
        assert part in message, part
    whole = data.check_lengths(lengths, 320)  # nothing cut: no error, nothing lost
    assert (whole.rows_cut, whole.tokens_lost, whole.share) == (0, 0, 0.0)
    assert data.check_lengths([10] * 19 + [300], 64).rows_cut == 1  # exactly 5%: allowed


def test_sequence_lengths_are_the_lengths_sfttrainer_builds_for_every_form(tokenizer, tmp_path):
    """Chat rows, chat prompt/completion, plain text, plain prompt/completion: counted as TRL counts them."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    chats = task_records("train", "messages", 2)
    pairs = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in chats]
    forms = {
        "messages": chats,
        "chat prompt/completion": [data.messages_to_prompt_completion(r) for r in chats],
        "text": [{"text": f"{q} {a}"} for q, a in pairs],
        "plain prompt/completion": [{"prompt": q + "\n", "completion": a} for q, a in pairs],
    }
    args = SFTConfig(output_dir=str(tmp_path), max_length=None, assistant_only_loss=False, report_to="none",
                     use_cpu=True, bf16=False)  # fmt: skip
    trainer = SFTTrainer(
        model=profiles.load_base(profile=CPU), args=args, train_dataset=Dataset.from_list(chats[:1]),
        processing_class=tokenizer,
    )  # fmt: skip
    for name, rows in forms.items():
        built = trainer._prepare_dataset(Dataset.from_list(rows), tokenizer, args, False, None, name)
        assert data.sequence_lengths(rows, tokenizer) == [len(ids) for ids in built["input_ids"]], name
    assert data.sequence_lengths([{"input_ids": [1, 2, 3]}], tokenizer) == [3]  # already tokenized
