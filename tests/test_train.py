"""train.py: the pipeline from a reader's file to a trained, evaluated, saved model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftcourse import data, formats, train

EXAMPLES = Path(__file__).resolve().parents[1] / "book" / "part3" / "your-data"
USER = {"role": "user", "content": "What is 2 + 3?"}
BOT = {"role": "assistant", "content": "5"}


def _small(tmp_path: Path, name: str, rows: int = 12) -> Path:
    """The first `rows` rows of an example file, in the example's own layout, as JSON lines."""
    raw = [r for _, r in data.read_rows(EXAMPLES / name)][:rows]
    path = tmp_path / f"{Path(name).stem}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in raw))
    return path


@pytest.fixture
def no_training(monkeypatch):
    """Make any attempt to load a model or train fail the test: bad input must stop before."""

    def refuse(*args, **kwargs):
        raise AssertionError("training started on bad input")

    for name in ("_load_model", "_train_sft", "_train_preference"):
        monkeypatch.setattr(train, name, refuse)


@pytest.mark.parametrize("steps", [0, -1, 2.5, True])
def test_steps_that_are_not_a_positive_whole_number_are_refused(steps, no_training):
    with pytest.raises(ValueError, match=r"steps must be a positive whole number.*epochs"):
        train.train("lora", EXAMPLES / "alpaca.json", out="unused", steps=steps)


def test_unknown_method_and_kto_batch_of_one_are_refused(no_training):
    with pytest.raises(ValueError, match="method must be one of"):
        train.train("ppo", EXAMPLES / "pairs.csv", out="unused")
    with pytest.raises(ValueError, match="kto needs batch_size of at least 2"):
        train.train("kto", EXAMPLES / "feedback.tsv", out="unused", batch_size=1)


BAD_ROWS = {
    "roles out of order": ("lora", {"messages": [BOT, USER, BOT]}, r"'assistant' first"),
    "user twice": ("lora", {"messages": [USER, USER, BOT]}, r"'user' twice in a row"),
    "system mid-chat": ("lora", {"messages": [USER, {"role": "system", "content": "x"}, BOT]}, "'system' at"),
    "chat prompt, string chosen": (
        "dpo",
        {"prompt": [USER], "chosen": "5", "rejected": [{**BOT, "content": "6"}]},
        r"field 'chosen': expected a list of \{role, content\} messages, like the prompt, found plain text",
    ),
    "chosen repeats the prompt": (
        "dpo",
        {"prompt": [USER], "chosen": [USER, BOT], "rejected": [{**BOT, "content": "6"}]},
        "the prompt repeated inside the reply",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_a_bad_row_stops_the_run_before_training_naming_its_row(case, tmp_path, no_training, capsys):
    method, row, message = BAD_ROWS[case]
    good = formats.load_any(EXAMPLES / ("pairs.csv" if method == "dpo" else "sharegpt.jsonl")).records[:11]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*good, row]))
    with pytest.raises(data.DataError, match=rf"mine\.jsonl, row 12, .*{message}"):
        train.train(method, path, out=tmp_path / "run", steps=2, progress=False)
    assert "problem rows" in capsys.readouterr().out  # the report listed it first


def test_file_level_bad_inputs_stop_before_training(tmp_path, no_training):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(data.DataError, match="no rows: the file is empty"):
        train.train("lora", tmp_path / "empty.jsonl", out=tmp_path / "run")
    (tmp_path / "latin1.csv").write_bytes("instruction,output\nSay it.,déjà vu\n".encode("latin-1"))
    with pytest.raises(data.DataError, match=r"latin1\.csv, row 1, field '<encoding>'.*byte 0xe9"):
        train.train("lora", tmp_path / "latin1.csv", out=tmp_path / "run")
    with pytest.raises(ValueError, match=r"method 'simpo' trains on 'preference'.*use method kto"):
        train.train("simpo", EXAMPLES / "feedback.tsv", out=tmp_path / "run")
    with pytest.raises(data.TruncationError, match=r"48 of 48 rows \(100%\).*max_length=8"):
        train.train("lora", EXAMPLES / "alpaca.json", out=tmp_path / "run", max_length=8, progress=False)


def test_a_run_saves_evaluates_and_a_second_run_resumes(tmp_path):
    path = _small(tmp_path, "sharegpt.jsonl", rows=16)
    out = tmp_path / "run"
    first = train.train("lora", path, out=out, steps=2, batch_size=4, progress=False, echo=lambda s: None)
    assert first.resumed_from is None and first.train_rows + first.heldout_rows == 16
    assert (out / "model" / "adapter_model.safetensors").is_file()
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    assert len(first.before) == len(first.after) == first.heldout_rows == first.difference.n_units
    assert first.export_command.startswith(f"ftcourse export {out / 'model'} {out / 'export'} --base ")
    second = train.train("lora", path, out=out, steps=3, batch_size=4, progress=False, echo=lambda s: None)
    assert Path(second.resumed_from).name == "checkpoint-2"
    # Steps 1-2 come back from the checkpoint's log as the first run wrote them; only step 3 ran.
    assert second.losses[:2] == first.losses and [step for step, _ in second.losses] == [1, 2, 3]
    saved = json.loads((out / "model" / "run.json").read_text())
    assert saved["resumed_from"] == second.resumed_from and saved["recipe"]["steps"] == 3


@pytest.mark.parametrize(
    ("method", "name"),
    [("sft", "alpaca.json"), ("dpo", "pairs.csv"), ("simpo", "pairs.csv"), ("orpo", "pairs.csv"),
     ("kto", "feedback.tsv"), ("qlora", "alpaca.json")],
)  # fmt: skip
def test_every_method_runs_one_step_from_its_file(method, name, tmp_path):
    result = train.train(
        method, _small(tmp_path, name), out=tmp_path / "run", steps=1, batch_size=2, progress=False,
        echo=lambda s: None,
    )  # fmt: skip
    assert result.recipe["steps"] == 1 and result.model_dir.is_dir()
    assert ("--base" in result.export_command) == (method != "sft")


def test_a_checkpoint_cut_short_is_not_resumed_from(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False), (10, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert Path(train.last_checkpoint(tmp_path)).name == "checkpoint-4"
    assert train.last_checkpoint(tmp_path / "missing") is None
