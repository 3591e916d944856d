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


def test_qlora_trains_the_model_it_is_given_and_refuses_a_hub_id_offline(tmp_path):
    from ftcourse import profiles

    folder = profiles.resolve_model("lora")  # the embedded model, named explicitly as a reader's folder
    result = train.train(
        "qlora", _small(tmp_path, "alpaca.json"), model=folder, out=tmp_path / "run", steps=1, batch_size=2,
        progress=False, echo=lambda s: None,
    )  # fmt: skip
    assert result.recipe["steps"] == 1 and f"--base {folder}" in result.export_command
    with pytest.raises(ValueError, match="is not a local folder, and the 'cpu' profile never downloads"):
        train.train(
            "qlora", _small(tmp_path, "alpaca.json"), model="meta-llama/Llama-3.1-8B", out=tmp_path / "x"
        )


def test_a_checkpoint_cut_short_is_not_resumed_from(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False), (10, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert Path(train.last_checkpoint(tmp_path)).name == "checkpoint-4"
    assert train.last_checkpoint(tmp_path / "missing") is None


# --- the standard preference runs (train.preference_run and its evaluation) --------------------------------


def _standin(monkeypatch: pytest.MonkeyPatch):
    """Run this test on the spark profile's code with the stand-ins (hub-shaped data); returns the profile."""
    from ftcourse import profiles
    from ftcourse.toy import standin

    for key, value in standin.standin_environment().items():
        monkeypatch.setenv(key, value)
    return profiles.active_profile()


def _source_log(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Log what the code under test trains and scores on (profiles.note_source) to a file; its path."""
    from ftcourse import profiles

    log = tmp_path / "sources.jsonl"
    monkeypatch.setenv(profiles.SOURCE_LOG_ENV, str(log))
    return log


def _logged(log: Path) -> set[tuple[str, str]]:
    return (
        {(e["use"], e["source"]) for e in map(json.loads, log.read_text().splitlines())}
        if log.is_file()
        else set()
    )


def test_prefs_does_not_import_the_pipeline():
    import subprocess
    import sys

    code = "import sys, ftcourse.prefs; print('ftcourse.train' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        == "False\n"
    )


def test_run_sizes_and_train_records_under_minimal_sizes():
    from dataclasses import replace

    from ftcourse import profiles

    minimal = replace(profiles.PROFILES["cpu"], minimal=True)
    assert train.run_sizes(minimal) == train.RUN_SIZES["minimal"]
    assert set(train.RUN_SIZES["minimal"]) == set(train.RUN_SIZES["cpu"])
    per_family = train.RUN_SIZES["minimal"]["train_per_family"]
    # the default size follows the profile's table: a minimal run does not ask for the cpu profile's 320
    assert train.train_records("dpo", minimal) == train.train_records("dpo", per_family=per_family)
    assert train.run_recipe("dpo", profile=minimal)["steps"] == train.RUN_SIZES["minimal"]["steps"]


def test_toy_training_records_log_the_task_world(monkeypatch, tmp_path):
    from ftcourse import profiles

    log = _source_log(monkeypatch, tmp_path)
    train.train_records("dpo")
    assert _logged(log) == {("train", profiles.TASK_WORLD)}


def test_kto_feedback_ratio_is_a_real_recipe_parameter(monkeypatch, tmp_path):
    # KTO's exercise changes desirable_per_undesirable: the standard run must train on data cut that way.
    from ftcourse import prefs, sft

    class Built(Exception):
        """Raised by the stand-in trainer once it has seen the data set."""

    seen: dict[float, list[bool]] = {}

    def trainer_seeing_the_data(method, model, tokenizer, dataset, **kwargs):
        seen[ratio] = list(dataset["label"])
        raise Built

    monkeypatch.setenv(sft.CACHE_ENV, str(tmp_path))  # no cached run to return instead
    monkeypatch.setattr(train, "sft_start", lambda profile=None: None)  # no model needed to see the data
    monkeypatch.setattr(prefs, "preference_trainer", trainer_seeing_the_data)
    for ratio in (train.KTO_DESIRABLE_PER_UNDESIRABLE, 1.0):
        with pytest.raises(Built):
            train.preference_run("kto", desirable_per_undesirable=ratio)
        up, down = seen[ratio].count(True), seen[ratio].count(False)
        assert up == round(ratio * down), (ratio, up, down)
    assert seen[1.0].count(True) > seen[train.KTO_DESIRABLE_PER_UNDESIRABLE].count(True)


def test_kto_recipe_weights_follow_the_data():
    from ftcourse import prefs

    # cpu: one thumbs-up per four thumbs-down gives (4, 1); balanced feedback (1, 1); explicit weights stay.
    assert train.run_recipe("kto")["kto_weights"] == [4.0, 1.0]
    assert train.run_recipe("kto", desirable_per_undesirable=1.0)["kto_weights"] == [1.0, 1.0]
    assert train.run_recipe("kto", kto_weights=[2.0, 1.0])["kto_weights"] == [2.0, 1.0]
    labels = [r["label"] for r in train.train_records("kto")]
    assert train.run_recipe("kto")["kto_weights"] == list(prefs.kto_weights(labels))
    assert "kto_weights" not in train.run_recipe("dpo")


def test_kto_recipe_weights_on_the_spark_standin(monkeypatch):
    # kto-mix-14k (and its stand-in) is paired data split 50/50: the weights come out (1, 1), in range.
    from ftcourse import prefs

    profile = _standin(monkeypatch)
    labels = [r["label"] for r in train.train_records("kto", profile)]
    n_desirable, n_undesirable = prefs.kto_label_counts(labels)
    assert n_desirable == n_undesirable > 0
    weights = train.run_recipe("kto", profile=profile)["kto_weights"]
    assert weights == [1.0, 1.0] and prefs.kto_weights_in_range(weights, labels)


def test_a_hub_recipe_names_its_dataset_and_refuses_task_world_options(monkeypatch):
    profile = _standin(monkeypatch)
    recipe = train.run_recipe("dpo", profile=profile)
    assert recipe["data"] == profile.datasets["preference"] and "kinds" not in recipe
    with pytest.raises(ValueError, match=r"kinds cut the task world's pairs.*trains on its hub datasets"):
        train.run_recipe("dpo", profile=profile, kinds=["sentence"])
    with pytest.raises(ValueError, match="leave desirable_per_undesirable out"):
        train.train_records("kto", profile, desirable_per_undesirable=1.0)


def test_styled_replies_and_reply_lengths():
    from ftcourse import profiles
    from ftcourse.toy.preferences import styled_reply

    tokenizer = profiles.load_tokenizer()
    assert styled_reply("58.<|im_end|><|endoftext|>", "58")
    assert not styled_reply("58<|im_end|>", "58") and not styled_reply("58..<|im_end|>", "58")
    assert not styled_reply("58.", "58")  # never ended its turn
    lengths = train.reply_lengths(tokenizer, ["58<|im_end|>", "58." * 20])
    assert lengths[0] == len(tokenizer("58", add_special_tokens=False)["input_ids"])
    assert lengths[1] == train.REPLY_TOKENS
    assert train.reply_lengths(tokenizer, ["58." * 20], max_new_tokens=40) == [40]


def test_feedback_rows_pair_up_by_prompt():
    def row(prompt, reply, label):
        return {"prompt": [{"role": "user", "content": prompt}], "completion": reply, "label": label}

    rows = [row("a", "good a", True), row("b", "bad b", False), row("a", "bad a", False),
            row("c", "good c", True), row("a", "bad a 2", False), row("b", "good b", True)]  # fmt: skip
    pairs = train.feedback_pairs(rows)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("good a", "bad a"), ("good b", "bad b")]
    assert train.feedback_pairs(rows, limit=1) == pairs[:1]
    assert train.feedback_pairs([row("c", "good c", True)]) == []  # rated one way only: no pair


def _fake_run(evaluation: dict, method: str = "dpo") -> train.PreferenceRun:
    return train.PreferenceRun(method, {}, evaluation=evaluation)


def test_compare_says_what_was_not_measured():
    sides = ("policy", "start")
    hub = {"source": "hub/pairs", "n_pairs": 0, "questions": {w: {"lengths": [3, 4]} for w in sides},
           "pairs": {train.HUB_PAIRS: {f"{w}_{m}": [] for w in sides for m in ("sequence", "per_token")}},
           "units": {"questions": ["test/0", "test/1"], "pairs": []}}  # fmt: skip
    run = _fake_run(hub)
    assert train.measured(run, "hits") == [] and train.measured(run, "lengths") == [3, 4]
    assert train.measured(run, "sequence", "period") == []  # every kind reads the hub pairs: none here
    assert train.compare((run, "policy"), (run, "start"), "hits") is None
    said = train.verdict((run, "policy"), (run, "start"), "hits", names=("DPO", "SFT start"))
    assert said.outcome == "not measured" and "exact match needs the task world's answers" in said.text
    assert (
        "gave no held-out pairs" in train.verdict((run, "policy"), (run, "start"), "sequence", "period").text
    )
    lengths = train.compare((run, "policy"), (run, "start"), "lengths")
    assert lengths.n_units == 2 and lengths.estimate == 0
    other = _fake_run({**hub, "source": "hub/feedback"})
    assert "different held-out sets (hub/pairs, hub/feedback)" in train.not_measured(
        (run, "policy"), (other, "policy"), "lengths"
    )
    toy = _fake_run({"questions": {"policy": {"hits": [1]}}, "pairs": {"period": {}}})
    assert train.heldout_note(toy) == ""
    assert train.heldout_note([toy, run]).startswith("Skipped here: the task world's measurements")
    assert "hub/pairs: 0 test pairs" in train.heldout_note(run)


def test_a_hub_run_is_scored_on_the_test_split_it_trained_on(monkeypatch, tmp_path):
    # The spark path: a policy trained on UltraFeedback is scored on UltraFeedback's test pairs and prompts,
    # never on the task world; KTO on kto-mix-14k's test rows, paired again by prompt.
    from peft import get_peft_model

    from ftcourse import profiles, sft

    profile = _standin(monkeypatch)
    log = _source_log(monkeypatch, tmp_path)
    tokenizer = profiles.load_tokenizer(profile=profile)
    policy = get_peft_model(profiles.load_base(profile=profile), sft.lora_config())
    evaluation = train.evaluate_policy(policy, tokenizer, profile, "dpo")
    n = 4 * train.run_sizes(profile)["eval_pairs_per_family"]
    assert evaluation["source"] == profile.datasets["preference"] and evaluation["n_pairs"] == n
    assert _logged(log) == {("score", profile.datasets["preference"])}
    run = _fake_run(evaluation)
    assert len(train.measured(run, "sequence", "period")) == len(train.measured(run, "lengths")) == n
    assert train.measured(run, "hits") == [] and "exact_match" not in evaluation
    assert all(0 < length <= 32 for length in train.measured(run, "lengths", who="start"))
    assert train.heldout_pairs(1, "period", profile) == train.heldout_pairs(
        1, None, profile
    )  # no kinds on hub
    # kto-mix-14k (and its stand-in) rates each test prompt both ways: KTO's held-out pairs are ranked too.
    kto = train.evaluate_policy(policy, tokenizer, profile, "kto")
    assert kto["source"] == profile.datasets["feedback"] and kto["n_pairs"] == n
    assert len(train.measured(_fake_run(kto, "kto"), "per_token", "period")) == n
    assert len(train.measured(_fake_run(kto, "kto"), "lengths")) == n
    assert ("score", profile.datasets["feedback"]) in _logged(log)
    assert profiles.TASK_WORLD not in {source for _, source in _logged(log)}


def test_a_cached_run_logs_what_it_trained_on(monkeypatch, tmp_path):
    from ftcourse import profiles, sft

    monkeypatch.setenv(sft.CACHE_ENV, str(tmp_path / "cache"))
    log = _source_log(monkeypatch, tmp_path)
    profile = profiles.active_profile()
    folder = train._run_dir(train.run_recipe("dpo", profile=profile), profile)
    folder.mkdir(parents=True)
    saved = {"history": [], "seconds": 1.0, "cpu_seconds": 1.0, "evaluation": {"pairs": {}}}
    (folder / "run.json").write_text(json.dumps(saved))
    log.unlink(missing_ok=True)  # run_recipe of KTO reads the data; DPO's does not, but start clean
    run = train.preference_run("dpo", load_model=False)
    assert run.model is None and run.truncation == {} and run.seconds == 1.0
    assert _logged(log) == {("train", profiles.TASK_WORLD)}
